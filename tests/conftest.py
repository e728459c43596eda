"""Shared fixtures: seeded, spatially clustered places."""

from __future__ import annotations

import pytest
import torch


def clustered_lonlat(
    num_places: int, *, num_clusters: int = 4, spread_deg: float = 2.0, seed: int = 0
) -> torch.Tensor:
    """Return ``(N, 2)`` float64 [lon, lat] degrees grouped around random cluster centres.

    With the default spread most pairs inside a cluster are within a few hundred km and pairs
    across clusters thousands of km apart, so both positives and negatives occur at 100-500 km.
    """
    generator = torch.Generator().manual_seed(seed)
    centre_lon = torch.rand(num_clusters, generator=generator, dtype=torch.float64) * 300 - 150
    centre_lat = torch.rand(num_clusters, generator=generator, dtype=torch.float64) * 120 - 60
    cluster = torch.randint(num_clusters, (num_places,), generator=generator)
    offsets = torch.randn(num_places, 2, generator=generator, dtype=torch.float64) * spread_deg
    lon = (centre_lon[cluster] + offsets[:, 0] + 180) % 360 - 180
    lat = (centre_lat[cluster] + offsets[:, 1]).clamp(-89.9, 89.9)
    return torch.stack([lon, lat], dim=1)


def random_embeddings(
    num_places: int, dim: int, *, seed: int = 0, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed + 1000)
    return torch.randn(num_places, dim, generator=generator, dtype=torch.float64).to(dtype)


@pytest.fixture
def places() -> torch.Tensor:
    return clustered_lonlat(48, seed=3)
