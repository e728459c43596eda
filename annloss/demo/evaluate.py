"""Metrics of how well embedding distance follows great-circle distance on held-out places.

Embeddings are compared by cosine similarity after L2 normalisation. Great-circle distances are
exact float64 haversine km from :mod:`annloss.coordinates`.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.stats import spearmanr

from annloss.coordinates import haversine_km, pairwise_haversine_km
from annloss.demo.config import REGIONAL_RECALL_K
from annloss.demo.data import DemoData
from annloss.demo.model import DualEncoder

__all__ = [
    "METRIC_NAMES",
    "RECALL_K",
    "HeldOutEvaluator",
    "distance_spearman",
    "embed_places",
    "embedding_neighbours",
    "geographic_neighbours",
    "nearest_neighbour_distances_km",
    "neighbour_recall_at_k",
    "sample_pairs",
]

#: Neighbours compared by the local and the regional recall metrics.
RECALL_K = 10

#: Keys of the dict that :meth:`HeldOutEvaluator.evaluate` returns.
METRIC_NAMES = (
    f"neighbour_recall_at_{RECALL_K}",
    f"neighbour_recall_at_{REGIONAL_RECALL_K}",
    "median_nn_distance_km",
    "spearman",
)

# Rows per block of the (n, n) distance and similarity matrices: 1024 x 5000 float64 is 40 MB.
_BLOCK_ROWS = 1024


@torch.no_grad()
def embed_places(
    model: DualEncoder,
    data: DemoData,
    rows: np.ndarray,
    *,
    device: torch.device | str = "cpu",
    batch_size: int = 1024,
) -> np.ndarray:
    """Embed ``rows`` of ``data`` with ``model`` in eval mode.

    Returns:
        (len(rows), D) float32 L2-normalised ``[geo, nl]`` embeddings. The model's train or eval
        mode is restored afterwards.
    """
    was_training = model.training
    model.eval()
    try:
        chunks = []
        for start in range(0, len(rows), batch_size):
            batch = data.batch(rows[start : start + batch_size], device)
            chunks.append(torch.nn.functional.normalize(model(batch), dim=1).cpu())
    finally:
        model.train(was_training)
    return torch.cat(chunks).numpy()


def _top_k_excluding_self(scores: torch.Tensor, start: int, k: int, largest: bool) -> torch.Tensor:
    # scores is a (rows, n) block whose row i belongs to place start + i. Masking that entry
    # keeps a place out of its own neighbours even when another place has the same score.
    rows = torch.arange(scores.shape[0])
    scores[rows, rows + start] = -torch.inf if largest else torch.inf
    return torch.topk(scores, k, dim=1, largest=largest).indices


def geographic_neighbours(coordinates: np.ndarray, k: int) -> np.ndarray:
    """Return the (n, k) indices of each place's k nearest other places by great-circle distance.

    Args:
        coordinates: (n, 2) [lon, lat] degrees.
    """
    _check_k(len(coordinates), k)
    points = torch.as_tensor(coordinates, dtype=torch.float64)
    blocks = []
    for start in range(0, len(points), _BLOCK_ROWS):
        distances = pairwise_haversine_km(points[start : start + _BLOCK_ROWS], points)
        blocks.append(_top_k_excluding_self(distances, start, k, largest=False))
    return torch.cat(blocks).numpy()


def embedding_neighbours(embeddings: np.ndarray, k: int) -> np.ndarray:
    """Return the (n, k) indices of each row's k most cosine-similar other rows.

    Similarities are computed in float64 because in float32 the cosine of two directions about
    1 km apart on the Earth (1 - 1.2e-8) rounds to 1, which would turn near neighbours into ties.
    """
    _check_k(len(embeddings), k)
    unit = torch.nn.functional.normalize(torch.as_tensor(embeddings, dtype=torch.float64), dim=1)
    blocks = []
    for start in range(0, len(unit), _BLOCK_ROWS):
        similarity = unit[start : start + _BLOCK_ROWS] @ unit.T
        blocks.append(_top_k_excluding_self(similarity, start, k, largest=True))
    return torch.cat(blocks).numpy()


def _check_k(num_rows: int, k: int) -> None:
    if not 1 <= k < num_rows:
        raise ValueError(f"k must be between 1 and {num_rows - 1} for {num_rows} places, got {k}")


def neighbour_recall_at_k(
    embeddings: np.ndarray,
    coordinates: np.ndarray,
    k: int = 10,
    *,
    true_neighbours: np.ndarray | None = None,
) -> float:
    """Mean fraction of each place's k geographic nearest neighbours that are also its k
    nearest in embedding space (both excluding the place itself).

    Args:
        embeddings: (n, D).
        coordinates: (n, 2) [lon, lat] degrees.
        true_neighbours: precomputed ``geographic_neighbours(coordinates, k)``, to skip the
            (n, n) haversine matrix on repeated calls.
    """
    if true_neighbours is None:
        true_neighbours = geographic_neighbours(coordinates, k)
    predicted = embedding_neighbours(embeddings, k)
    overlap = [
        len(np.intersect1d(p, t, assume_unique=True)) for p, t in zip(predicted, true_neighbours)
    ]
    return float(np.mean(overlap) / k)


def nearest_neighbour_distances_km(embeddings: np.ndarray, coordinates: np.ndarray) -> np.ndarray:
    """Return the (n,) great-circle km from each place to its nearest place in embedding space."""
    nearest = embedding_neighbours(embeddings, 1)[:, 0]
    points = torch.as_tensor(coordinates, dtype=torch.float64)
    return haversine_km(points, points[nearest]).numpy()


def sample_pairs(num_places: int, num_pairs: int, seed: int) -> np.ndarray:
    """Draw (num_pairs, 2) random index pairs of distinct places, reproducible by ``seed``."""
    if num_places < 2:
        raise ValueError(f"pairs need at least 2 places, got {num_places}")
    rng = np.random.default_rng(seed)
    first = rng.integers(0, num_places, size=num_pairs)
    # Adding an offset in [1, n) modulo n never returns the first index.
    second = (first + rng.integers(1, num_places, size=num_pairs)) % num_places
    return np.stack([first, second], axis=1)


def distance_spearman(embeddings: np.ndarray, coordinates: np.ndarray, pairs: np.ndarray) -> float:
    """Spearman correlation of cosine distance with great-circle distance over ``pairs``.

    Args:
        embeddings: (n, D); coordinates: (n, 2) [lon, lat] degrees; pairs: (m, 2) indices.
    """
    unit = torch.nn.functional.normalize(torch.as_tensor(embeddings, dtype=torch.float64), dim=1)
    cosine_distance = 1.0 - (unit[pairs[:, 0]] * unit[pairs[:, 1]]).sum(dim=1)
    points = torch.as_tensor(coordinates, dtype=torch.float64)
    great_circle_km = haversine_km(points[pairs[:, 0]], points[pairs[:, 1]])
    return float(spearmanr(cosine_distance.numpy(), great_circle_km.numpy()).statistic)


class HeldOutEvaluator:
    """Compute the demo metrics on a fixed set of held-out places.

    The geographic neighbours and the random pairs are computed once, so repeated calls during
    training cost only the embedding-side work.

    Args:
        coordinates: (n, 2) [lon, lat] degrees of the held-out places, n > REGIONAL_RECALL_K.
        num_pairs: random pairs for the Spearman correlation.
        seed: seed of the pair sample.
    """

    def __init__(self, coordinates: np.ndarray, *, num_pairs: int = 20000, seed: int = 0) -> None:
        self.coordinates = coordinates
        self.true_neighbours = geographic_neighbours(coordinates, RECALL_K)
        self.regional_neighbours = geographic_neighbours(coordinates, REGIONAL_RECALL_K)
        self.pairs = sample_pairs(len(coordinates), num_pairs, seed)

    def recall(self, embeddings: np.ndarray) -> float:
        """Return the neighbour recall@10 of ``embeddings``."""
        return neighbour_recall_at_k(
            embeddings, self.coordinates, RECALL_K, true_neighbours=self.true_neighbours
        )

    def evaluate(self, embeddings: np.ndarray) -> dict[str, float]:
        """Return every metric of :data:`METRIC_NAMES` for ``embeddings`` (n, D)."""
        return {
            METRIC_NAMES[0]: self.recall(embeddings),
            METRIC_NAMES[1]: neighbour_recall_at_k(
                embeddings,
                self.coordinates,
                REGIONAL_RECALL_K,
                true_neighbours=self.regional_neighbours,
            ),
            "median_nn_distance_km": float(
                np.median(nearest_neighbour_distances_km(embeddings, self.coordinates))
            ),
            "spearman": distance_spearman(embeddings, self.coordinates, self.pairs),
        }
