"""Result table, results.json and the results.png figure of a demo run."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

# The object-oriented Figure API needs no pyplot backend, so plotting works without a display
# and leaves the caller's matplotlib state alone.
from matplotlib.figure import Figure

__all__ = ["format_table", "plot_results", "write_json"]

logger = logging.getLogger(__name__)

_COLUMNS = (
    ("method", "method", "{}"),
    ("neighbour_recall_at_10", "recall@10", "{:.3f}"),
    ("neighbour_recall_at_100", "recall@100", "{:.3f}"),
    ("median_nn_distance_km", "median NN km", "{:.1f}"),
    ("spearman", "Spearman", "{:.3f}"),
    ("train_time_s", "train s", "{:.1f}"),
)


def format_table(rows: list[dict[str, Any]]) -> str:
    """Render result rows as a fixed-width text table; a missing value prints as "-"."""
    header = [title for _, title, _ in _COLUMNS]
    lines = [header]
    for row in rows:
        cells = []
        for key, _, template in _COLUMNS:
            value = row.get(key)
            cells.append("-" if value is None else template.format(value))
        lines.append(cells)
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]

    def render(cells: list[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = [cell.rjust(width) for cell, width in zip(cells[1:], widths[1:])]
        return "  ".join([first, *rest])

    rule = "-" * len(render(header))
    return "\n".join([render(header), rule, *(render(cells) for cells in lines[1:])])


def write_json(results: dict[str, Any], path: Path) -> None:
    """Write ``results`` as indented JSON."""
    path.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    logger.info("Wrote %s", path)


def _moving_average(values: list[float], window: int) -> np.ndarray:
    values_array = np.asarray(values, dtype=np.float64)
    window = max(1, min(window, len(values_array)))
    kernel = np.ones(window) / window
    return np.convolve(values_array, kernel, mode="valid")


#: Colour and short bar label of each row key.
_STYLES = {
    "untrained": ("tab:gray", "untrained"),
    "in_batch": ("tab:blue", "in-batch"),
    "memory_bank": ("tab:orange", "bank"),
    "memory_bank_adaptive": ("tab:green", "bank,\nkNN radius"),
    "memory_bank_multiscale": ("tab:red", "bank,\n3 scales"),
}


def plot_results(results: dict[str, Any], path: Path) -> None:
    """Save a PNG with training curves (loss, held-out recall, positives and radius per step)
    and bar charts of the four metrics for every row of ``results``.
    """
    rows = results["rows"]
    training = results["training"]
    figure = Figure(figsize=(19, 8.5), layout="constrained")
    axes = figure.subplots(2, 4)
    colours = {key: colour for key, (colour, _) in _STYLES.items()}
    config = results["config"]
    window = max(1, config["steps"] // 50)

    loss_axis, recall_axis, positives_axis, radius_axis = axes[0]
    for method, history in training.items():
        label = history["label"]
        steps = len(history["losses"])
        smoothed = _moving_average(history["losses"], window)
        loss_axis.plot(np.arange(window, steps + 1), smoothed, color=colours[method], label=label)
        if history["recall_steps"]:
            recall_axis.plot(
                history["recall_steps"], history["recall"], "o-", color=colours[method], label=label
            )
        for axis, key in ((positives_axis, "num_positive_pairs"), (radius_axis, "radius_median")):
            values = history["stats"].get(key)
            if values:
                axis.plot(
                    np.arange(window, steps + 1),
                    _moving_average(values, window),
                    color=colours[method],
                    label=label,
                )
    untrained = next(row for row in rows if row["key"] == "untrained")
    recall_axis.axhline(
        untrained["neighbour_recall_at_10"], color=colours["untrained"], ls="--", label="untrained"
    )
    loss_title = "training loss" if window == 1 else f"training loss (mean of {window} steps)"
    loss_axis.set(title=loss_title, xlabel="step")
    recall_axis.set(title="held-out neighbour recall@10", xlabel="step")
    positives_axis.set(
        title="positive pairs per step", xlabel="step", ylabel="pairs within radius", yscale="log"
    )
    radius_axis.set(
        title="median positive radius per step (first scale)",
        xlabel="step",
        ylabel="km",
        yscale="log",
    )
    for axis in (loss_axis, recall_axis, positives_axis, radius_axis):
        axis.legend(fontsize="small")
        axis.grid(alpha=0.3)

    bar_metrics = (
        ("neighbour_recall_at_10", "neighbour recall@10 (higher is better)"),
        ("neighbour_recall_at_100", "neighbour recall@100 (higher is better)"),
        ("spearman", "Spearman correlation (higher is better)"),
        ("median_nn_distance_km", "median km to nearest neighbour (lower is better)"),
    )
    labels = [_STYLES[row["key"]][1] for row in rows]
    for axis, (key, title) in zip(axes[1], bar_metrics):
        values = [row[key] for row in rows]
        bars = axis.bar(labels, values, color=[colours[row["key"]] for row in rows])
        axis.bar_label(bars, fmt="%.3g", fontsize="small")
        axis.set_title(title)
        axis.tick_params(axis="x", labelsize="small")
        axis.grid(axis="y", alpha=0.3)

    figure.suptitle(
        f"annloss demo: {config['steps']} steps x {config['batch_size']} places, radius "
        f"{config['distance_threshold_km']:g} km, {results['data']['num_eval']} held-out places"
    )
    figure.savefig(path, dpi=100)
    logger.info("Wrote %s", path)
