"""Training of the dual encoder with an in-batch or a memory-bank spatial contrastive loss."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

import annloss
from annloss.demo.config import METHODS, DemoConfig
from annloss.demo.data import DemoData
from annloss.demo.model import DualEncoder

__all__ = [
    "METHODS",
    "METHOD_LABELS",
    "TrainingHistory",
    "build_criterion",
    "build_model",
    "seed_everything",
    "train_model",
]

logger = logging.getLogger(__name__)

#: Row labels of the training methods (run order: ``METHODS``).
METHOD_LABELS = {
    "untrained": "untrained",
    "in_batch": "in-batch SpatialContrastiveLoss",
    "memory_bank": "MemoryBankSpatialLoss",
    "memory_bank_adaptive": "MemoryBankSpatialLoss, kNN radius",
    "memory_bank_multiscale": "MemoryBankSpatialLoss, 3 scales",
}


def _radius_options(method: str, config: DemoConfig) -> dict[str, object]:
    """The radius arguments of a memory-bank method.

    The adaptive radius reaches the 8th nearest bank entry, between a quarter and four times
    the fixed radius. The three scales are log-spaced from a quarter to four times it.
    """
    radius = config.distance_threshold_km
    if method == "memory_bank_adaptive":
        policy = annloss.KNNRadius(8, min_radius=radius / 4, max_radius=radius * 4)
        return {"radius": policy}
    if method == "memory_bank_multiscale":
        return {"scales": annloss.log_scales(radius / 4, radius * 4, 3)}
    return {"distance_threshold": radius}


@dataclass
class TrainingHistory:
    """Per-step record of one training run."""

    method: str
    #: Loss of every step.
    losses: list[float] = field(default_factory=list)
    #: Every numeric entry of ``criterion.stats``, one value per step.
    stats: dict[str, list[float]] = field(default_factory=dict)
    #: Steps after which the held-out recall@10 was measured, and its values.
    recall_steps: list[int] = field(default_factory=list)
    recall: list[float] = field(default_factory=list)
    #: Seconds of forward, loss, backward and optimiser steps, without the recall checks.
    train_time_s: float = 0.0
    #: Sum of all parameters before the first step. It is equal across methods when the seeds
    #: match.
    initial_parameter_sum: float = 0.0


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_model(data: DemoData, config: DemoConfig) -> DualEncoder:
    """Seed every generator with ``config.seed`` and return a fresh model on ``config.device``."""
    seed_everything(config.seed)
    return DualEncoder(data.vocabulary_size, config.embedding_dim).to(config.device)


def build_criterion(method: str, config: DemoConfig, embedding_dim: int) -> nn.Module:
    """Return the loss of ``method`` (one of :data:`METHODS`) on ``config.device``."""
    if method == "in_batch":
        criterion: nn.Module = annloss.SpatialContrastiveLoss(
            distance_threshold=config.distance_threshold_km, temperature=config.temperature
        )
    elif method in METHODS:
        criterion = annloss.MemoryBankSpatialLoss(
            embedding_dim=embedding_dim,
            **_radius_options(method, config),
            memory_size=config.memory_size,
            num_negatives=config.num_negatives,
            temperature=config.temperature,
        )
    else:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    return criterion.to(config.device).train()


def _batch_rows(num_rows: int, batch_size: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
    # Batches never straddle two epochs of shuffled rows, so no place repeats within a batch.
    if batch_size > num_rows:
        raise ValueError(f"batch_size={batch_size} exceeds the {num_rows} training places")
    while True:
        order = rng.permutation(num_rows)
        for start in range(0, num_rows - batch_size + 1, batch_size):
            yield order[start : start + batch_size]


def train_model(
    model: DualEncoder,
    criterion: nn.Module,
    data: DemoData,
    config: DemoConfig,
    *,
    method: str,
    recall_fn: Callable[[DualEncoder], float] | None = None,
) -> TrainingHistory:
    """Train ``model`` for ``config.steps`` Adam steps on the training rows of ``data``.

    The token embedding tables are updated with SparseAdam and the other parameters with Adam,
    both at ``config.learning_rate``.

    The batch order depends only on ``config.seed``, so two calls with the same config see the
    same batches.

    Args:
        criterion: called as ``criterion(embeddings, coordinates, ids)`` for the memory-bank
            methods and ``criterion(embeddings, coordinates)`` for "in_batch".
        method: one of :data:`METHODS`.
        recall_fn: returns the held-out recall@10 of the model; called every
            ``config.eval_every`` steps and after the last step when given.

    Raises:
        FloatingPointError: if the loss becomes NaN or infinite.
    """
    history = TrainingHistory(method=method)
    history.initial_parameter_sum = float(
        sum(p.detach().double().sum() for p in model.parameters())
    )
    optimizers = [
        torch.optim.SparseAdam(model.sparse_parameters(), lr=config.learning_rate),
        torch.optim.Adam(model.dense_parameters(), lr=config.learning_rate),
    ]
    batches = _batch_rows(data.num_train, config.batch_size, np.random.default_rng(config.seed))
    model.train()

    progress = tqdm(
        range(1, config.steps + 1),
        desc=METHOD_LABELS[method],
        disable=not config.progress,
        leave=True,
        dynamic_ncols=True,
    )
    for step in progress:
        started = time.perf_counter()
        batch = data.batch(next(batches), config.device)
        embeddings = model(batch)
        if method.startswith("memory_bank"):
            loss = criterion(embeddings, batch.coordinates, batch.ids)
        else:
            loss = criterion(embeddings, batch.coordinates)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"{METHOD_LABELS[method]} loss is {loss.item()} at step {step}; "
                f"lower learning_rate (now {config.learning_rate})"
            )
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for optimizer in optimizers:
            optimizer.step()
        history.train_time_s += time.perf_counter() - started

        history.losses.append(loss.item())
        for name, value in getattr(criterion, "stats", {}).items():
            if isinstance(value, (int, float)):
                history.stats.setdefault(name, []).append(float(value))
        postfix = {"loss": f"{history.losses[-1]:.3f}"}
        if "num_positive_pairs" in history.stats:
            postfix["positives"] = int(history.stats["num_positive_pairs"][-1])
        progress.set_postfix(postfix, refresh=False)

        is_check_step = config.eval_every and step % config.eval_every == 0
        if recall_fn is not None and (is_check_step or step == config.steps):
            history.recall_steps.append(step)
            history.recall.append(recall_fn(model))
            model.train()
    progress.close()

    logger.info(
        "%s: %d steps in %.1f s, final loss %.4f",
        METHOD_LABELS[method],
        config.steps,
        history.train_time_s,
        history.losses[-1],
    )
    return history
