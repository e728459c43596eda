"""annloss: approximate-nearest-neighbour mined spatial contrastive losses for geographic embeddings.

The public API:

- :class:`SpatialContrastiveLoss` and :class:`SpatialTripletLoss`: exact in-batch losses whose
  positives are places closer than a radius.
- :class:`MemoryBankSpatialLoss`: the same losses with positives and hard negatives mined from a
  memory bank of past embeddings, coordinates and ids.
- :class:`MemoryBank`: the ring buffer behind it.
- Radius policies for ``radius=`` and ``scales=``: :class:`FixedRadius`,
  :class:`QuantileRadius`, :class:`KNNRadius`, :class:`TargetPositives`, and
  :func:`log_scales`.
- :mod:`annloss.coordinates`: coordinate validation, haversine distances, and conversions
  between degrees and EPSG:4087 metres (:func:`lonlat_to_epsg4087`,
  :func:`epsg4087_to_lonlat`).
"""

from annloss.coordinates import (
    EARTH_RADIUS_KM,
    epsg4087_to_lonlat,
    haversine_km,
    lonlat_to_epsg4087,
    paired_distance,
    pairwise_distance,
    pairwise_haversine_km,
    validate_coordinates,
)
from annloss.losses import SpatialContrastiveLoss, SpatialTripletLoss
from annloss.memory_bank import MemoryBank
from annloss.memory_bank_loss import MemoryBankSpatialLoss
from annloss.radius import (
    FixedRadius,
    KNNRadius,
    QuantileRadius,
    RadiusPolicy,
    TargetPositives,
    log_scales,
)

__version__ = "0.1.0"

__all__ = [
    "EARTH_RADIUS_KM",
    "FixedRadius",
    "KNNRadius",
    "MemoryBank",
    "MemoryBankSpatialLoss",
    "QuantileRadius",
    "RadiusPolicy",
    "SpatialContrastiveLoss",
    "SpatialTripletLoss",
    "TargetPositives",
    "epsg4087_to_lonlat",
    "haversine_km",
    "log_scales",
    "lonlat_to_epsg4087",
    "paired_distance",
    "pairwise_distance",
    "pairwise_haversine_km",
    "validate_coordinates",
]
