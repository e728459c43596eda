"""annloss: approximate-nearest-neighbour mined spatial contrastive losses for geographic embeddings.

The public API:

- :class:`SpatialContrastiveLoss` and :class:`SpatialTripletLoss`: exact in-batch losses whose
  positives are places closer than a radius.
- :class:`MemoryBankSpatialLoss`: the same losses with positives and hard negatives mined from a
  memory bank of past embeddings, coordinates and ids.
- :class:`MemoryBank`: the ring buffer behind it.
- :mod:`annloss.coordinates`: coordinate validation and haversine distances.
"""

from annloss.coordinates import (
    EARTH_RADIUS_KM,
    haversine_km,
    paired_distance,
    pairwise_distance,
    pairwise_haversine_km,
    validate_coordinates,
)
from annloss.losses import SpatialContrastiveLoss, SpatialTripletLoss
from annloss.memory_bank import MemoryBank
from annloss.memory_bank_loss import MemoryBankSpatialLoss

__version__ = "0.1.0"

__all__ = [
    "EARTH_RADIUS_KM",
    "MemoryBank",
    "MemoryBankSpatialLoss",
    "SpatialContrastiveLoss",
    "SpatialTripletLoss",
    "haversine_km",
    "paired_distance",
    "pairwise_distance",
    "pairwise_haversine_km",
    "validate_coordinates",
]
