"""Exact in-batch spatial contrastive losses."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from annloss._checks import (
    check_embeddings,
    check_non_negative,
    check_positive,
    check_radii,
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
)

__all__ = ["SpatialContrastiveLoss", "SpatialTripletLoss"]


class _SpatialPairLoss(nn.Module):
    """Shared configuration and pair construction of the in-batch spatial losses."""

    def __init__(
        self,
        *,
        distance_threshold: float,
        negative_threshold: float | None,
        metric: str,
        coordinate_order: str,
    ) -> None:
        super().__init__()
        check_metric(metric)
        check_coordinate_order(coordinate_order)
        self.distance_threshold, self.negative_threshold = check_radii(
            distance_threshold, negative_threshold
        )
        self.metric = metric
        self.coordinate_order = coordinate_order
        self.stats: dict[str, float] = {}

    def batch_pairs(self, embeddings: Tensor, coordinates: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Check inputs and return unit embeddings with the in-batch pair masks.

        Returns:
            ``(unit_embeddings (B, D), positive_mask (B, B), negative_mask (B, B))``; the
            diagonal is in neither mask.
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
        positive_mask, negative_mask = spatial_pair_masks(
            spatial_distance, self.distance_threshold, self.negative_threshold, exclude=self_pairs
        )
        return F.normalize(embeddings, dim=1), positive_mask, negative_mask

    def extra_repr(self) -> str:
        return (
            f"distance_threshold={self.distance_threshold}, "
            f"negative_threshold={self.negative_threshold}, metric={self.metric!r}, "
            f"coordinate_order={self.coordinate_order!r}"
        )


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
        distance_threshold: float,
        temperature: float = 0.1,
        negative_threshold: float | None = None,
        metric: str = "haversine",
        coordinate_order: str = "lonlat",
    ) -> None:
        super().__init__(
            distance_threshold=distance_threshold,
            negative_threshold=negative_threshold,
            metric=metric,
            coordinate_order=coordinate_order,
        )
        self.temperature = check_positive("temperature", temperature)

    def forward(self, embeddings: Tensor, coordinates: Tensor) -> Tensor:
        unit, positive_mask, negative_mask = self.batch_pairs(embeddings, coordinates)
        similarity = unit @ unit.T
        loss, num_pairs = info_nce_from_masks(
            similarity, positive_mask, negative_mask, self.temperature
        )
        self.stats = {
            "num_positive_pairs": num_pairs,
            "num_negative_pairs": int(negative_mask.sum()),
        }
        return loss

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
        distance_threshold: float,
        margin: float = 1.0,
        negative_threshold: float | None = None,
        metric: str = "haversine",
        coordinate_order: str = "lonlat",
        reduction: str = "nonzero_mean",
    ) -> None:
        super().__init__(
            distance_threshold=distance_threshold,
            negative_threshold=negative_threshold,
            metric=metric,
            coordinate_order=coordinate_order,
        )
        if reduction not in ("nonzero_mean", "mean"):
            raise ValueError(f"reduction must be 'nonzero_mean' or 'mean', got {reduction!r}")
        self.margin = check_non_negative("margin", margin)
        self.reduction = reduction

    def forward(self, embeddings: Tensor, coordinates: Tensor) -> Tensor:
        unit, positive_mask, negative_mask = self.batch_pairs(embeddings, coordinates)
        distance = cosine_to_euclidean(unit @ unit.T)
        loss, num_triplets, num_active = triplet_margin_from_masks(
            distance, positive_mask, negative_mask, self.margin, self.reduction
        )
        self.stats = {"num_triplets": num_triplets, "num_active_triplets": num_active}
        return loss

    def extra_repr(self) -> str:
        return f"margin={self.margin}, reduction={self.reduction!r}, " + super().extra_repr()
