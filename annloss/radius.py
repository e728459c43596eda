"""Positive and negative radii: fixed, or adapted to each batch and to local density.

A radius policy turns the spatial context of a batch into one positive radius per anchor, in
the unit of the loss's metric (km for haversine). Pairs closer than an anchor's positive radius
are positives; pairs at least its negative radius away are negatives; pairs in between are
ignored. Every policy clamps the positive radius to ``[min_radius, max_radius]`` and derives the
negative radius as ``positive * negative_factor + negative_offset``, so an ignore band can
follow an adaptive radius.

Policies:

- :class:`FixedRadius`: one radius for every anchor.
- :class:`QuantileRadius`: the ``q``-quantile of the batch's pairwise distances, shared by all
  anchors of the batch.
- :class:`KNNRadius`: the distance to the anchor's ``k``-th nearest place, a local density
  estimate: in the memory bank when the loss has one, in the batch otherwise.
- :class:`TargetPositives`: the radius that gives the anchor ``n`` positives among the references
  the loss scores (the batch, plus the bank for the memory-bank loss).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

__all__ = [
    "FixedRadius",
    "KNNRadius",
    "QuantileRadius",
    "RadiusPolicy",
    "TargetPositives",
    "log_scales",
    "make_radius",
]

#: Given ``k``, returns ``(B, k)`` float64 distances from each anchor to its ``k`` nearest usable
#: bank entries, ascending, ``inf`` where the bank has fewer.
BankNearest = Callable[[int], Tensor]


def _check_number(name: str, value: float, *, minimum: float = 0.0, strict: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if value < minimum or (strict and value == minimum):
        relation = ">" if strict else ">="
        raise ValueError(f"{name} must be {relation} {minimum}, got {value!r}")
    return float(value)


class RadiusPolicy:
    """Base class: per-anchor radii with clamping and an ignore band.

    Args:
        min_radius: smallest positive radius. Default: 0.
        max_radius: largest positive radius. Default: no limit.
        negative_factor: negative radius = positive radius x this + ``negative_offset``,
            ``>= 1``. Default: 1.
        negative_offset: added to the scaled negative radius, ``>= 0``. Default: 0.
    """

    #: Whether :meth:`positive_radius` needs the memory bank's k-th nearest distances.
    uses_bank: bool = False

    def __init__(
        self,
        *,
        min_radius: float = 0.0,
        max_radius: float = math.inf,
        negative_factor: float = 1.0,
        negative_offset: float = 0.0,
    ) -> None:
        self.min_radius = _check_number("min_radius", min_radius)
        self.max_radius = _check_number("max_radius", max_radius)
        if self.max_radius < self.min_radius:
            raise ValueError(f"max_radius ({max_radius}) must be >= min_radius ({min_radius})")
        self.negative_factor = _check_number("negative_factor", negative_factor, minimum=1.0)
        self.negative_offset = _check_number("negative_offset", negative_offset)

    def positive_radius(self, batch_distance: Tensor, bank_nearest: BankNearest | None) -> Tensor:
        """Return the unclamped ``(B,)`` float64 positive radius of each anchor.

        Args:
            batch_distance: ``(B, B)`` float64 spatial distances within the batch, ``inf`` on
                the diagonal and between pairs that may not be used.
            bank_nearest: for the memory-bank loss, a function giving each anchor's
                distances to its ``k`` nearest usable bank entries; ``None`` otherwise.
        """
        raise NotImplementedError

    def __call__(
        self, batch_distance: Tensor, bank_nearest: BankNearest | None = None
    ) -> tuple[Tensor, Tensor]:
        """Return ``(positive, negative)`` radii, each ``(B,)`` float64."""
        positive = self.positive_radius(batch_distance, bank_nearest)
        positive = positive.clamp(self.min_radius, self.max_radius)
        negative = positive * self.negative_factor + self.negative_offset
        return positive, negative

    def _band_repr(self) -> str:
        parts = []
        if self.min_radius > 0:
            parts.append(f"min_radius={self.min_radius:g}")
        if math.isfinite(self.max_radius):
            parts.append(f"max_radius={self.max_radius:g}")
        if self.negative_factor != 1.0:
            parts.append(f"negative_factor={self.negative_factor:g}")
        if self.negative_offset:
            parts.append(f"negative_offset={self.negative_offset:g}")
        return ", ".join(parts)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._band_repr()})"


class FixedRadius(RadiusPolicy):
    """The same positive radius for every anchor: the behaviour of ``distance_threshold``.

    Example:
        >>> FixedRadius(100.0, negative_offset=50.0)  # positives < 100 km, negatives >= 150 km
        FixedRadius(100, negative_offset=50)
    """

    def __init__(self, radius: float, negative_radius: float | None = None, **band: float) -> None:
        super().__init__(**band)
        self.radius = _check_number("radius", radius, strict=True)
        if negative_radius is not None:
            if band.get("negative_factor", 1.0) != 1.0 or band.get("negative_offset", 0.0):
                raise ValueError(
                    "give negative_radius or negative_factor / negative_offset, not both"
                )
            if negative_radius < radius:
                raise ValueError(
                    f"negative_radius ({negative_radius}) must be >= radius ({radius})"
                )
        self.negative_radius = negative_radius

    def positive_radius(self, batch_distance, bank_nearest):
        return torch.full(
            (batch_distance.shape[0],),
            self.radius,
            dtype=torch.float64,
            device=batch_distance.device,
        )

    def __call__(self, batch_distance, bank_nearest=None):
        positive, negative = super().__call__(batch_distance, bank_nearest)
        if self.negative_radius is not None:
            negative = torch.full_like(negative, self.negative_radius)
        return positive, negative

    def __repr__(self) -> str:
        band = self._band_repr()
        if self.negative_radius is not None and self.negative_radius != self.radius:
            band = f"negative_radius={self.negative_radius:g}" + (", " + band if band else "")
        return f"FixedRadius({self.radius:g}{', ' + band if band else ''})"


def _linear_quantile(values: Tensor, q: float) -> Tensor:
    """Return the ``q``-quantile of 1-D ``values``, interpolated linearly as numpy does.

    Sorting instead of ``torch.quantile`` avoids its limit of 2**24 elements (a batch of 5,793).
    """
    ordered = torch.sort(values).values
    position = q * (ordered.numel() - 1)
    low = math.floor(position)
    high = min(low + 1, ordered.numel() - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


class QuantileRadius(RadiusPolicy):
    """The ``q``-quantile of the batch's pairwise distances, for every anchor of the batch.

    With ``q = 0.05`` about 5% of the batch's pairs are positives whatever the spatial spread
    of the batch. Each unordered pair counts once, and pairs excluded from the loss (an anchor
    with itself) do not count. Interpolation is linear, as numpy's default.

    Args:
        q: quantile in ``(0, 1)``.
    """

    def __init__(self, q: float, **band: float) -> None:
        super().__init__(**band)
        self.q = _check_number("q", q, strict=True)
        if self.q >= 1:
            raise ValueError(f"q must be < 1, got {q!r}")

    def positive_radius(self, batch_distance, bank_nearest):
        # Each unordered pair once: the upper triangle of the symmetric distance matrix.
        values = batch_distance[torch.triu(torch.isfinite(batch_distance), diagonal=1)]
        if values.numel() == 0:
            radius = torch.tensor(self.min_radius, dtype=torch.float64)
        else:
            radius = _linear_quantile(values, self.q)
        return radius.to(batch_distance.device).expand(batch_distance.shape[0]).clone()

    def __repr__(self) -> str:
        band = self._band_repr()
        return f"QuantileRadius({self.q:g}{', ' + band if band else ''})"


def _kth_in_batch(batch_distance: Tensor, k: int) -> Tensor:
    """Return each row's ``k``-th smallest distance, ``inf`` where the row has fewer."""
    if k > batch_distance.shape[1]:
        return torch.full(
            (batch_distance.shape[0],), math.inf, dtype=torch.float64, device=batch_distance.device
        )
    return torch.topk(batch_distance, k, dim=1, largest=False).values[:, -1]


class KNNRadius(RadiusPolicy):
    """The distance to the anchor's ``k``-th nearest place, times ``scale``.

    Dense regions get small radii and empty ones large radii. The memory-bank loss measures the
    distance in its bank, through its BallTree, because the bank shows the density of the
    training data. The in-batch losses measure it among the other places of the batch. An anchor with fewer
    than ``k`` places gets ``max_radius``.

    Args:
        k: neighbour rank, ``>= 1``.
        scale: factor on the k-th distance, ``> 0``. Default: 1.
    """

    uses_bank = True

    def __init__(self, k: int, scale: float = 1.0, **band: float) -> None:
        super().__init__(**band)
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be an integer >= 1, got {k!r}")
        self.k = k
        self.scale = _check_number("scale", scale, strict=True)

    def positive_radius(self, batch_distance, bank_nearest):
        if bank_nearest is not None:
            kth = bank_nearest(self.k)[:, -1].to(batch_distance.device)
        else:
            kth = _kth_in_batch(batch_distance, self.k)
        return kth * self.scale

    def __repr__(self) -> str:
        band = self._band_repr()
        return f"KNNRadius({self.k}, scale={self.scale:g}{', ' + band if band else ''})"


class TargetPositives(RadiusPolicy):
    """The radius that gives each anchor ``n`` positives among the references it is scored on.

    For the in-batch losses this is the distance to the ``n``-th nearest other place of the
    batch, just above it so that place counts. For the memory-bank loss the bank's nearest
    entries count too, so a small batch still gets ``n`` positives per anchor where the bank
    has them. An anchor with fewer than ``n`` references gets ``max_radius``.

    Args:
        n: positives wanted per anchor, ``>= 1``.
    """

    uses_bank = True

    def __init__(self, n: int, **band: float) -> None:
        super().__init__(**band)
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be an integer >= 1, got {n!r}")
        self.n = n

    def positive_radius(self, batch_distance, bank_nearest):
        candidates = batch_distance
        if bank_nearest is not None:
            # The n nearest references lie among the n nearest of the batch and of the bank.
            bank = bank_nearest(self.n).to(batch_distance.device)
            candidates = torch.cat([batch_distance, bank], dim=1)
        kth = _kth_in_batch(candidates, self.n)
        # Positives are strictly closer than the radius, so the next float up includes the n-th.
        return torch.nextafter(kth, torch.full_like(kth, math.inf))

    def __repr__(self) -> str:
        band = self._band_repr()
        return f"TargetPositives({self.n}{', ' + band if band else ''})"


def make_radius(
    radius: float | RadiusPolicy | None,
    distance_threshold: float | None,
    negative_threshold: float | None,
) -> RadiusPolicy:
    """Resolve the ``radius=`` argument and the older ``distance_threshold`` pair to a policy."""
    if radius is not None and distance_threshold is not None:
        raise ValueError(
            "pass either radius= or distance_threshold=, not both; "
            f"got radius={radius!r} and distance_threshold={distance_threshold!r}"
        )
    name = "radius"
    if radius is None:
        if distance_threshold is None:
            raise TypeError(
                "a radius is required: pass radius= (a number, or a policy such as "
                "QuantileRadius(0.05)) or distance_threshold="
            )
        radius, name = distance_threshold, "distance_threshold"
    if isinstance(radius, RadiusPolicy):
        if negative_threshold is not None:
            raise ValueError(
                "negative_threshold applies to a fixed radius only; give the policy "
                "negative_factor= or negative_offset= instead"
            )
        return radius
    if isinstance(radius, bool) or not isinstance(radius, (int, float)):
        raise TypeError(
            f"{name} must be a number or a RadiusPolicy such as QuantileRadius(0.05), "
            f"got {type(radius).__name__}"
        )
    from annloss._checks import check_positive, check_radii

    check_positive(name, radius)
    positive, negative = check_radii(float(radius), negative_threshold)
    return FixedRadius(positive, negative_radius=negative)


def log_scales(
    min_radius: float, max_radius: float, num: int, weights: Sequence[float] | None = None
) -> list[tuple[float, float]]:
    """Return ``num`` log-spaced ``(radius, weight)`` scales from ``min_radius`` to ``max_radius``.

    Weights default to 1 for every scale.

    Example:
        >>> log_scales(10.0, 1000.0, 3)
        [(10.0, 1.0), (100.0, 1.0), (1000.0, 1.0)]
    """
    _check_number("min_radius", min_radius, strict=True)
    _check_number("max_radius", max_radius, minimum=min_radius)
    if isinstance(num, bool) or not isinstance(num, int) or num < 1:
        raise ValueError(f"num must be an integer >= 1, got {num!r}")
    if weights is None:
        weights = [1.0] * num
    if len(weights) != num:
        raise ValueError(f"weights must have {num} values, one per scale, got {len(weights)}")
    if num == 1:
        return [(float(min_radius), float(weights[0]))]
    ratio = (max_radius / min_radius) ** (1 / (num - 1))
    radii = [min_radius * ratio**i for i in range(num)]
    radii[-1] = float(max_radius)
    return [(round(r, 12), float(w)) for r, w in zip(radii, weights)]
