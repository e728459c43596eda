"""Exact in-batch spatial contrastive losses."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from annloss._checks import (
    check_embeddings,
    check_non_negative,
    check_positive,
    check_same_device,
)
from annloss.coordinates import (
    check_coordinate_order,
    check_metric,
    pairwise_distance,
    validate_coordinates,
)
from annloss.functional import (
    cosine_to_euclidean,
    info_nce_from_masks,
    spatial_pair_masks,
    triplet_margin_from_masks,
    zero_loss,
)
from annloss.radius import BankNearest, FixedRadius, RadiusPolicy, make_radius

__all__ = ["SpatialContrastiveLoss", "SpatialTripletLoss"]


Scales = Sequence[tuple["float | RadiusPolicy", float]]


def _make_scales(
    radius: float | RadiusPolicy | None,
    distance_threshold: float | None,
    negative_threshold: float | None,
    scales: Scales | None,
) -> list[tuple[RadiusPolicy, float]]:
    """Resolve the radius arguments of a spatial loss to ``[(policy, weight), ...]``."""
    if scales is None:
        return [(make_radius(radius, distance_threshold, negative_threshold), 1.0)]
    if radius is not None or distance_threshold is not None or negative_threshold is not None:
        raise ValueError(
            "pass either scales= or a single radius (radius= or distance_threshold=), not both"
        )
    resolved = []
    for entry in scales:
        if not isinstance(entry, (tuple, list)) or len(entry) != 2:
            raise ValueError(
                f"each scale must be a (radius, weight) pair such as (100.0, 1.0), got {entry!r}"
            )
        scale_radius, weight = entry
        weight = check_non_negative("scale weight", weight)
        resolved.append((make_radius(scale_radius, None, None), weight))
    if not resolved:
        raise ValueError("scales must hold at least one (radius, weight) pair")
    return resolved


def _radius_stats(prefix: str, radius: Tensor) -> dict[str, float]:
    if radius.numel() == 0:
        return {}
    return {
        f"{prefix}radius_min": float(radius.min()),
        f"{prefix}radius_median": float(radius.median()),
        f"{prefix}radius_max": float(radius.max()),
    }


def _add_scale_stats(
    stats: dict[str, float],
    index: int,
    num_scales: int,
    positive: Tensor,
    value: Tensor,
    counts: dict[str, int],
) -> None:
    """Add one scale's pair counts to the totals in ``stats``.

    With several scales, also add the scale's radii, counts and loss under ``scale{index}_``.
    """
    for key, count in counts.items():
        stats[key] = stats.get(key, 0) + count
    if num_scales > 1:
        stats.update(_radius_stats(f"scale{index}_", positive))
        stats.update({f"scale{index}_{key}": count for key, count in counts.items()})
        stats[f"scale{index}_loss"] = float(value.detach())


class _SpatialPairLoss(nn.Module):
    """Shared configuration and pair construction of the spatial losses.

    A loss has one or more scales, each a radius policy and a weight. The loss is the weighted
    sum of one term per scale.
    """

    def __init__(
        self,
        *,
        distance_threshold: float | None,
        negative_threshold: float | None,
        metric: str,
        coordinate_order: str,
        radius: float | RadiusPolicy | None = None,
        scales: Scales | None = None,
    ) -> None:
        super().__init__()
        check_metric(metric)
        check_coordinate_order(coordinate_order)
        self.scales = _make_scales(radius, distance_threshold, negative_threshold, scales)
        # The radii of a single fixed scale, kept as plain attributes, or None otherwise.
        self.distance_threshold: float | None = None
        self.negative_threshold: float | None = None
        policy = self.scales[0][0]
        if len(self.scales) == 1 and isinstance(policy, FixedRadius):
            self.distance_threshold = policy.radius
            self.negative_threshold = (
                policy.negative_radius
                if policy.negative_radius is not None
                else policy.radius * policy.negative_factor + policy.negative_offset
            )
        self.metric = metric
        self.coordinate_order = coordinate_order
        self.stats: dict[str, float] = {}

    def batch_context(
        self, embeddings: Tensor, coordinates: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Check inputs and return what every scale needs.

        Returns:
            ``(unit_embeddings (B, D), coordinates (B, 2) float64, spatial_distance (B, B)
            float64, self_pairs (B, B) bool)``.
        """
        embeddings = check_embeddings(embeddings)
        if isinstance(coordinates, Tensor):
            check_same_device(embeddings, coordinates, "coordinates")
        coordinates = validate_coordinates(
            coordinates,
            metric=self.metric,
            coordinate_order=self.coordinate_order,
            batch_size=embeddings.shape[0],
        )
        spatial_distance = pairwise_distance(
            coordinates, coordinates, metric=self.metric, coordinate_order=self.coordinate_order
        )
        self_pairs = torch.eye(embeddings.shape[0], dtype=torch.bool, device=embeddings.device)
        coordinates = coordinates.to(device=embeddings.device, dtype=torch.float64)
        return F.normalize(embeddings, dim=1), coordinates, spatial_distance, self_pairs

    def scale_radii(
        self,
        spatial_distance: Tensor,
        excluded: Tensor,
        bank_nearest: BankNearest | None = None,
    ) -> list[tuple[Tensor, Tensor, float]]:
        """Return ``(positive (B,), negative (B,), weight)`` radii of every scale."""
        usable = spatial_distance.masked_fill(excluded, math.inf)
        return [(*policy(usable, bank_nearest), weight) for policy, weight in self.scales]

    def batch_pairs(self, embeddings: Tensor, coordinates: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Return unit embeddings and the in-batch pair masks of the first scale.

        Returns:
            ``(unit_embeddings (B, D), positive_mask (B, B), negative_mask (B, B))``; the
            diagonal is in neither mask.
        """
        unit, _, spatial_distance, self_pairs = self.batch_context(embeddings, coordinates)
        positive, negative, _ = self.scale_radii(spatial_distance, self_pairs)[0]
        positive_mask, negative_mask = spatial_pair_masks(
            spatial_distance, positive[:, None], negative[:, None], exclude=self_pairs
        )
        return unit, positive_mask, negative_mask

    def _weighted_terms(
        self,
        embeddings: Tensor,
        coordinates: Tensor,
        term: Callable[[Tensor, Tensor, Tensor], tuple[Tensor, dict[str, float]]],
    ) -> Tensor:
        """Sum ``weight * term(unit, positive_mask, negative_mask)`` over the scales.

        Fills ``stats`` with the counts summed over scales, the first scale's radii, and, with
        several scales, each scale's radii, counts and loss under ``scale{i}_``.
        """
        unit, _, spatial_distance, self_pairs = self.batch_context(embeddings, coordinates)
        total: Tensor | None = None
        stats: dict[str, float] = {}
        radii = self.scale_radii(spatial_distance, self_pairs)
        for index, (positive, negative, weight) in enumerate(radii):
            if index == 0:
                stats.update(_radius_stats("", positive))
            if weight == 0:
                continue
            positive_mask, negative_mask = spatial_pair_masks(
                spatial_distance, positive[:, None], negative[:, None], exclude=self_pairs
            )
            value, counts = term(unit, positive_mask, negative_mask)
            total = weight * value if total is None else total + weight * value
            _add_scale_stats(stats, index, len(radii), positive, value, counts)
        self.stats = stats
        return zero_loss(unit) if total is None else total

    def extra_repr(self) -> str:
        if self.distance_threshold is not None:
            radius = (
                f"distance_threshold={self.distance_threshold}, "
                f"negative_threshold={self.negative_threshold}"
            )
        elif len(self.scales) == 1:
            radius = f"radius={self.scales[0][0]!r}"
        else:
            radius = "scales=[" + ", ".join(f"({p!r}, {w:g})" for p, w in self.scales) + "]"
        return f"{radius}, metric={self.metric!r}, coordinate_order={self.coordinate_order!r}"


class SpatialContrastiveLoss(_SpatialPairLoss):
    r"""InfoNCE on cosine similarity with positives defined by spatial distance.

    Two places of a batch form a positive pair when their spatial distance is below
    ``distance_threshold`` and a negative pair when it is at least ``negative_threshold``
    (equal to ``distance_threshold`` unless an ignore band is requested). For each positive pair
    :math:`(a, p)`, with cosine similarity :math:`s` and temperature :math:`\tau`:

    .. math::
        \ell(a, p) = -\log \frac{e^{s_{ap}/\tau}}{e^{s_{ap}/\tau} + \sum_{n} e^{s_{an}/\tau}}

    where :math:`n` runs over the negatives of :math:`a`. The loss is the mean of :math:`\ell`
    over all positive pairs. Anchors without a positive or without a negative are skipped; a batch
    with no valid pair returns a zero that still backpropagates. This equals
    pytorch-metric-learning's ``NTXentLoss`` given the same pairs.

    Args:
        distance_threshold: positive radius. Kilometres for ``metric="haversine"``, the
            coordinates' own unit for ``metric="euclidean"``.
        temperature: :math:`\tau > 0`. Default: 0.1.
        negative_threshold: radius from which pairs are negatives, ``>= distance_threshold``,
            same unit. Pairs between the two radii are ignored. Default: ``distance_threshold``.
        radius: instead of ``distance_threshold``, a number or a radius policy from
            :mod:`annloss.radius` (``QuantileRadius``, ``KNNRadius``, ``TargetPositives``,
            ``FixedRadius``) that sets one positive and one negative radius per anchor.
        scales: instead of a single radius, ``[(radius, weight), ...]``: the loss is the
            weighted sum of one term per scale, each with its own masks. See
            :func:`annloss.radius.log_scales`.
        metric: ``"haversine"`` (great-circle km on degrees) or ``"euclidean"`` (projected
            coordinates, e.g. EPSG:4087 metres). Default: ``"haversine"``.
        coordinate_order: ``"lonlat"`` (GeoJSON, GeoLM) or ``"latlon"``. Default: ``"lonlat"``.

    Shape:
        - embeddings: ``(B, D)``, any floating dtype; float16 and bfloat16 are scored in float32.
        - coordinates: ``(B, 2)`` degrees in ``coordinate_order`` (or projected units).
        - output: scalar.

    After each call, ``stats`` contains ``num_positive_pairs`` and ``num_negative_pairs``.

    Example:
        >>> import torch
        >>> criterion = SpatialContrastiveLoss(distance_threshold=100.0)  # km
        >>> embeddings = torch.randn(4, 8, requires_grad=True)
        >>> lonlat = torch.tensor([[2.35, 48.86], [2.29, 48.80], [-0.13, 51.51], [13.40, 52.52]])
        >>> loss = criterion(embeddings, lonlat)
        >>> loss.backward()
    """

    def __init__(
        self,
        *,
        distance_threshold: float | None = None,
        temperature: float = 0.1,
        negative_threshold: float | None = None,
        radius: float | RadiusPolicy | None = None,
        scales: Scales | None = None,
        metric: str = "haversine",
        coordinate_order: str = "lonlat",
    ) -> None:
        super().__init__(
            distance_threshold=distance_threshold,
            negative_threshold=negative_threshold,
            radius=radius,
            scales=scales,
            metric=metric,
            coordinate_order=coordinate_order,
        )
        self.temperature = check_positive("temperature", temperature)

    def forward(self, embeddings: Tensor, coordinates: Tensor) -> Tensor:
        def term(unit: Tensor, positive_mask: Tensor, negative_mask: Tensor):
            loss, num_pairs = info_nce_from_masks(
                unit @ unit.T, positive_mask, negative_mask, self.temperature
            )
            counts = {
                "num_positive_pairs": num_pairs,
                "num_negative_pairs": int(negative_mask.sum()),
            }
            return loss, counts

        return self._weighted_terms(embeddings, coordinates, term)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, " + super().extra_repr()


class SpatialTripletLoss(_SpatialPairLoss):
    r"""Triplet margin loss with positives and negatives defined by spatial distance.

    For every anchor :math:`a`, positive :math:`p` (closer than ``distance_threshold``) and
    negative :math:`n` (at least ``negative_threshold`` away), with :math:`d` the Euclidean
    distance between L2-normalised embeddings (so :math:`0 \le d \le 2`):

    .. math::
        \ell(a, p, n) = \max(0, d_{ap} - d_{an} + m)

    With ``reduction="nonzero_mean"`` (default) the loss is the mean over triplets with
    :math:`\ell > 0`, as pytorch-metric-learning's ``TripletMarginLoss`` with its default
    ``AvgNonZeroReducer``; with ``"mean"`` it is the mean over all triplets. Triplets are counted
    in closed form, so memory is O(B^2) however many triplets there are. Anchors without a
    positive or a negative are skipped; with no valid triplet the loss is a zero that still
    backpropagates.

    Args:
        distance_threshold: positive radius, km for ``"haversine"``, coordinate units for
            ``"euclidean"``.
        margin: :math:`m \ge 0`, in embedding distance. Default: 1.0.
        negative_threshold: radius from which pairs are negatives. Default: ``distance_threshold``.
        radius: instead of ``distance_threshold``, a number or a radius policy from
            :mod:`annloss.radius` (``QuantileRadius``, ``KNNRadius``, ``TargetPositives``,
            ``FixedRadius``) that sets one positive and one negative radius per anchor.
        scales: instead of a single radius, ``[(radius, weight), ...]``: the loss is the
            weighted sum of one term per scale, each with its own masks. See
            :func:`annloss.radius.log_scales`.
        metric: ``"haversine"`` or ``"euclidean"``. Default: ``"haversine"``.
        coordinate_order: ``"lonlat"`` or ``"latlon"``. Default: ``"lonlat"``.
        reduction: ``"nonzero_mean"`` or ``"mean"``. Default: ``"nonzero_mean"``.

    Shape:
        - embeddings: ``(B, D)``; coordinates: ``(B, 2)``; output: scalar.

    After each call, ``stats`` contains ``num_triplets`` and ``num_active_triplets``.
    """

    def __init__(
        self,
        *,
        distance_threshold: float | None = None,
        margin: float = 1.0,
        negative_threshold: float | None = None,
        radius: float | RadiusPolicy | None = None,
        scales: Scales | None = None,
        metric: str = "haversine",
        coordinate_order: str = "lonlat",
        reduction: str = "nonzero_mean",
    ) -> None:
        super().__init__(
            distance_threshold=distance_threshold,
            negative_threshold=negative_threshold,
            radius=radius,
            scales=scales,
            metric=metric,
            coordinate_order=coordinate_order,
        )
        if reduction not in ("nonzero_mean", "mean"):
            raise ValueError(f"reduction must be 'nonzero_mean' or 'mean', got {reduction!r}")
        self.margin = check_non_negative("margin", margin)
        self.reduction = reduction

    def forward(self, embeddings: Tensor, coordinates: Tensor) -> Tensor:
        def term(unit: Tensor, positive_mask: Tensor, negative_mask: Tensor):
            distance = cosine_to_euclidean(unit @ unit.T)
            loss, num_triplets, num_active = triplet_margin_from_masks(
                distance, positive_mask, negative_mask, self.margin, self.reduction
            )
            return loss, {"num_triplets": num_triplets, "num_active_triplets": num_active}

        return self._weighted_terms(embeddings, coordinates, term)

    def extra_repr(self) -> str:
        return f"margin={self.margin}, reduction={self.reduction!r}, " + super().extra_repr()
