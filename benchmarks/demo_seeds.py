"""Repeat the demo's trainings over several seeds and report each metric's mean and spread.

One demo run trains each method once, so a difference of 0.01 in recall between two rows may be
the seed. This script runs :func:`annloss.demo.run_demo` once per training seed (the held-out
split stays the same) and prints, per method, the mean and the sample standard deviation of each
metric across seeds, plus the per-seed values. Each seed's full results land in
``OUTPUT/seed{n}/``; the summary goes to ``OUTPUT/seeds.json``.

Run: python benchmarks/demo_seeds.py --seeds 0 1 2 --methods memory_bank memory_bank_adaptive
(about 6 minutes per method and seed on 2 CPU cores with the default settings).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from annloss.demo import DemoConfig, run_demo
from annloss.demo.config import METHODS
from annloss.demo.evaluate import METRIC_NAMES


def summarise(runs: dict[int, list[dict]]) -> dict[str, dict[str, dict[str, object]]]:
    """Return ``{method: {metric: {"mean", "std", "values"}}}`` over the seeds of ``runs``."""
    summary: dict[str, dict[str, dict[str, object]]] = {}
    for seed, rows in runs.items():
        for row in rows:
            method = summary.setdefault(row["key"], {})
            for metric in (*METRIC_NAMES, "train_time_s"):
                if row.get(metric) is not None:
                    method.setdefault(metric, {"values": {}})["values"][seed] = row[metric]
    for method in summary.values():
        for entry in method.values():
            values = list(entry["values"].values())
            entry["mean"] = statistics.fmean(values)
            entry["std"] = statistics.stdev(values) if len(values) > 1 else float("nan")
    return summary


def format_table(summary: dict[str, dict[str, dict[str, object]]]) -> str:
    """Return a Markdown table of mean +- standard deviation per method and metric."""
    header = ["method", *METRIC_NAMES, "train s"]
    lines = ["| " + " | ".join(header) + " |", "| --- |" + " ---: |" * (len(header) - 1)]
    for key, metrics in summary.items():
        cells = [key]
        for metric in (*METRIC_NAMES, "train_time_s"):
            entry = metrics.get(metric)
            if entry is None:
                cells.append("-")
            elif metric in ("median_nn_distance_km", "train_time_s"):
                cells.append(f"{entry['mean']:.1f} +- {entry['std']:.1f}")
            else:
                cells.append(f"{entry['mean']:.3f} +- {entry['std']:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--output-dir", type=Path, default=Path("annloss-demo-seeds"))
    parser.add_argument("--quick", action="store_true", help="the demo's quick settings")
    arguments = parser.parse_args()

    runs: dict[int, list[dict]] = {}
    for seed in arguments.seeds:
        settings = {
            "seed": seed,
            "methods": tuple(arguments.methods),
            "output_dir": arguments.output_dir / f"seed{seed}",
            "progress": False,
        }
        config = DemoConfig.quick(**settings) if arguments.quick else DemoConfig(**settings)
        runs[seed] = run_demo(config)["rows"]
        print(f"seed {seed} done", flush=True)

    summary = summarise(runs)
    (arguments.output_dir / "seeds.json").write_text(json.dumps(summary, indent=2))
    print(format_table(summary))


if __name__ == "__main__":
    main()
