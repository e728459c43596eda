"""Argument and input checks shared by the loss modules."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def check_positive(name: str, value: float) -> float:
    """Return ``value`` as a float, raising ``ValueError`` unless it is finite and > 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def check_non_negative(name: str, value: float) -> float:
    """Return ``value`` as a float, raising ``ValueError`` unless it is a number >= 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ValueError(f"{name} must be a number >= 0, got {value!r}")
    return float(value)


def check_radii(distance_threshold: float, negative_threshold: float | None) -> tuple[float, float]:
    """Validate the positive radius and the negative radius that starts the negative region."""
    positive_radius = check_positive("distance_threshold", distance_threshold)
    if negative_threshold is None:
        return positive_radius, positive_radius
    negative_radius = check_positive("negative_threshold", negative_threshold)
    if negative_radius < positive_radius:
        raise ValueError(
            f"negative_threshold ({negative_radius}) must be >= distance_threshold "
            f"({positive_radius}); pairs between the two radii are ignored, so the negative "
            "radius cannot be smaller than the positive one"
        )
    return positive_radius, negative_radius


def check_embeddings(embeddings: Tensor) -> Tensor:
    """Validate a ``(B, D)`` floating embedding batch and return it in the scoring dtype.

    float16 and bfloat16 are scored in float32 because ``exp(s / temperature)`` overflows or
    loses precision in half precision; float32 and float64 are kept.
    """
    if not isinstance(embeddings, Tensor):
        raise TypeError(
            f"embeddings must be a torch.Tensor of shape (B, D), got {type(embeddings).__name__}"
        )
    if not embeddings.is_floating_point():
        raise TypeError(
            f"embeddings must be a floating-point tensor, got dtype {embeddings.dtype}; "
            "pass the model output before any rounding or argmax"
        )
    if embeddings.ndim != 2:
        raise ValueError(
            f"embeddings must have shape (B, D), got {tuple(embeddings.shape)}; "
            "flatten or pool to one vector per place"
        )
    if embeddings.shape[1] == 0:
        raise ValueError("embeddings have dimension D = 0; pass at least one feature per row")
    not_finite = ~torch.isfinite(embeddings)
    if bool(not_finite.any()):
        row = int(torch.nonzero(not_finite.any(dim=1))[0, 0])
        raise ValueError(
            f"embeddings contain NaN or inf at row {row}; check the model output "
            "(for example a diverged step or an fp16 overflow) before the loss"
        )
    if embeddings.dtype in (torch.float16, torch.bfloat16):
        return embeddings.float()
    return embeddings


def check_same_device(embeddings: Tensor, other: Tensor, other_name: str) -> None:
    """Raise ``ValueError`` when ``other`` sits on another device than ``embeddings``."""
    if other.device != embeddings.device:
        raise ValueError(
            f"{other_name} are on {other.device} but embeddings are on {embeddings.device}; "
            f"move them with {other_name}.to(embeddings.device)"
        )


def check_ids(ids: Tensor | None, batch_size: int, device: torch.device) -> Tensor | None:
    """Validate optional non-negative integer entity ids of shape ``(B,)``."""
    if ids is None:
        return None
    if not isinstance(ids, Tensor):
        raise TypeError(
            f"ids must be a torch.Tensor of shape (B,), got {type(ids).__name__}; "
            "convert with torch.as_tensor(..., dtype=torch.int64)"
        )
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise TypeError(f"ids must be an integer tensor, got dtype {ids.dtype}")
    if ids.ndim != 1 or ids.shape[0] != batch_size:
        raise ValueError(
            f"ids must have shape ({batch_size},), one id per embedding row, got {tuple(ids.shape)}"
        )
    if ids.device != device:
        raise ValueError(
            f"ids are on {ids.device} but embeddings are on {device}; "
            "move them with ids.to(embeddings.device)"
        )
    if batch_size and int(ids.min()) < 0:
        raise ValueError(
            f"ids must be >= 0, got {int(ids.min())}; the bank uses -1 for entries without an id"
        )
    return ids.to(torch.int64)
