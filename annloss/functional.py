"""Loss math on anchor-by-reference matrices with positive and negative masks.

Every function here takes dense ``(A, N)`` matrices: row ``a`` is an anchor, column ``j`` one of
its reference candidates (batch rows, or entries mined from a memory bank), and two boolean masks
mark which references are positives and which negatives. Memory is O(A x N), and no function
ever materialises a (positive pairs x negative pairs) or (anchor x positive x negative) tensor.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "cosine_to_euclidean",
    "info_nce_from_masks",
    "spatial_pair_masks",
    "triplet_margin_from_masks",
    "zero_loss",
]


def zero_loss(*tensors: Tensor) -> Tensor:
    """Return a scalar zero connected to the autograd graph of ``tensors``.

    A batch with no valid pair must still let ``loss.backward()`` run, and must not produce NaN.
    """
    total = tensors[0].sum() * 0.0
    for tensor in tensors[1:]:
        total = total + tensor.sum() * 0.0
    return total


def spatial_pair_masks(
    spatial_distance: Tensor,
    positive_radius: float | Tensor,
    negative_radius: float | Tensor,
    *,
    exclude: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Split anchor-reference pairs into positives, negatives and an ignore band.

    A pair is positive when ``distance < positive_radius`` and negative when
    ``distance >= negative_radius``; pairs in between are neither.

    Args:
        spatial_distance: ``(A, N)`` distances, in the same unit as the radii.
        positive_radius: pairs strictly closer than this are positives; a number, or an
            ``(A, 1)`` tensor with one radius per anchor.
        negative_radius: pairs at least this far apart are negatives; ``>= positive_radius``,
            a number or an ``(A, 1)`` tensor.
        exclude: optional ``(A, N)`` boolean mask of pairs that are never used (self pairs,
            the same entity, empty slots).

    Returns:
        ``(positive_mask, negative_mask)``, two disjoint ``(A, N)`` boolean tensors.
    """
    positive_mask = spatial_distance < positive_radius
    negative_mask = spatial_distance >= negative_radius
    if exclude is not None:
        positive_mask = positive_mask & ~exclude
        negative_mask = negative_mask & ~exclude
    return positive_mask, negative_mask


def info_nce_from_masks(
    similarity: Tensor,
    positive_mask: Tensor,
    negative_mask: Tensor,
    temperature: float,
) -> tuple[Tensor, int]:
    r"""InfoNCE over positive pairs, each against all negatives of its anchor.

    For a positive pair :math:`(a, p)` with similarities :math:`s` and temperature :math:`\tau`:

    .. math::
        \ell(a, p) = -\log \frac{e^{s_{ap}/\tau}}{e^{s_{ap}/\tau} + \sum_{n \in N(a)} e^{s_{an}/\tau}}
                   = \operatorname{softplus}\Big(\log\sum_{n \in N(a)} e^{s_{an}/\tau}
                     - s_{ap}/\tau\Big)

    The loss is the mean of :math:`\ell` over all positive pairs of anchors that have at least
    one positive and one negative. Other anchors are skipped. Other positives of the same anchor
    are not in the denominator (the NT-Xent convention of pytorch-metric-learning).

    Args:
        similarity: ``(A, N)`` similarities, scored in the dtype given (float32 or float64).
        positive_mask: ``(A, N)`` boolean.
        negative_mask: ``(A, N)`` boolean, disjoint from ``positive_mask``.
        temperature: :math:`\tau > 0`.

    Returns:
        ``(loss, num_positive_pairs)``. With no valid pair the loss is a zero that backpropagates.
    """
    valid_anchor = positive_mask.any(dim=1) & negative_mask.any(dim=1)
    if not bool(valid_anchor.any()):
        return zero_loss(similarity), 0

    logits = similarity[valid_anchor] / temperature
    positive_mask = positive_mask[valid_anchor]
    negative_mask = negative_mask[valid_anchor]

    # Each kept row has at least one negative, so the log-sum-exp is finite and its gradient is
    # well defined; masked entries get exactly zero weight.
    negative_lse = torch.logsumexp(logits.masked_fill(~negative_mask, float("-inf")), dim=1)
    pair_losses = F.softplus(negative_lse[:, None] - logits)[positive_mask]
    return pair_losses.mean(), int(pair_losses.numel())


def cosine_to_euclidean(similarity: Tensor) -> Tensor:
    """Euclidean distance between unit vectors from their cosine similarity.

    ``||x - y|| = sqrt(2 - 2 cos(x, y))`` for unit ``x, y``. The clamp keeps the square root and
    its gradient finite for identical vectors, where rounding can make ``2 - 2s`` zero or negative.
    """
    return torch.sqrt((2.0 - 2.0 * similarity).clamp_min(1e-12))


def triplet_margin_from_masks(
    distance: Tensor,
    positive_mask: Tensor,
    negative_mask: Tensor,
    margin: float,
    reduction: str = "nonzero_mean",
) -> tuple[Tensor, int, int]:
    r"""Triplet margin loss over every (anchor, positive, negative) triplet of the masks.

    For each anchor :math:`a`, positive :math:`p` and negative :math:`n`:

    .. math::
        \ell(a, p, n) = \max(0, d_{ap} - d_{an} + m)

    Triplets are never materialised: per anchor the negative distances are sorted once, and
    :math:`\sum_n \ell(a, p, n) = c\,|\{n : d_{an} < c\}| - \sum_{n : d_{an} < c} d_{an}` with
    :math:`c = d_{ap} + m`, read from a cumulative sum. Memory stays O(A x N).

    Args:
        distance: ``(A, N)`` embedding distances.
        positive_mask: ``(A, N)`` boolean.
        negative_mask: ``(A, N)`` boolean, disjoint from ``positive_mask``.
        margin: :math:`m`.
        reduction: ``"nonzero_mean"`` averages over triplets with a positive loss (as
            pytorch-metric-learning's ``AvgNonZeroReducer``); ``"mean"`` over all triplets.

    Returns:
        ``(loss, num_triplets, num_active_triplets)``. With no triplet, or no active triplet under
        ``"nonzero_mean"``, the loss is a zero that backpropagates.
    """
    if reduction not in ("nonzero_mean", "mean"):
        raise ValueError(f"reduction must be 'nonzero_mean' or 'mean', got {reduction!r}")
    valid_anchor = positive_mask.any(dim=1) & negative_mask.any(dim=1)
    if not bool(valid_anchor.any()):
        return zero_loss(distance), 0, 0

    distance = distance[valid_anchor]
    positive_mask = positive_mask[valid_anchor]
    negative_mask = negative_mask[valid_anchor]

    # Negatives sorted ascending per anchor; masked entries become +inf and sort to the end.
    negative_distance, _ = torch.sort(distance.masked_fill(~negative_mask, float("inf")), dim=1)
    finite = torch.isfinite(negative_distance)
    prefix_sum = torch.cumsum(torch.where(finite, negative_distance, 0.0), dim=1)
    prefix_sum = torch.cat([prefix_sum.new_zeros(prefix_sum.shape[0], 1), prefix_sum], dim=1)

    # For every reference column j, the number of negatives strictly closer than d_aj + m.
    threshold = distance + margin
    active_count = torch.searchsorted(negative_distance.detach(), threshold.detach().contiguous())
    active_sum = torch.gather(prefix_sum, 1, active_count)
    per_positive = threshold * active_count.to(distance.dtype) - active_sum

    total = per_positive[positive_mask].sum()
    num_negatives = negative_mask.sum(dim=1)
    num_triplets = int((positive_mask.sum(dim=1) * num_negatives).sum())
    num_active = int(active_count[positive_mask].sum())

    if reduction == "mean":
        return total / num_triplets, num_triplets, num_active
    if num_active == 0:
        return zero_loss(distance), num_triplets, 0
    return total / num_active, num_triplets, num_active
