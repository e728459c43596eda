import math

import pytest
import reference
import torch
from conftest import clustered_lonlat, random_embeddings
from pytorch_metric_learning.losses import NTXentLoss, TripletMarginLoss
from pytorch_metric_learning.reducers import MeanReducer

from annloss import SpatialContrastiveLoss, SpatialTripletLoss

RADIUS_KM = 300.0
BAND_KM = 600.0

# Three places on the equator: A and B 55.6 km apart, C 1,112 km from both.
THREE_LONLAT = torch.tensor([[0.0, 0.0], [0.5, 0.0], [10.0, 0.0]], dtype=torch.float64)
THREE_EMBEDDINGS = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=torch.float64)


def pml_pairs(positives, negatives):
    a1 = [a for a, refs in enumerate(positives) if negatives[a] for _ in refs]
    p = [ref for a, refs in enumerate(positives) if negatives[a] for ref in refs]
    a2 = [a for a, refs in enumerate(negatives) if positives[a] for _ in refs]
    n = [ref for a, refs in enumerate(negatives) if positives[a] for ref in refs]
    return tuple(torch.tensor(v, dtype=torch.int64) for v in (a1, p, a2, n))


def pml_triplets(positives, negatives):
    rows = [(a, p, n) for a in range(len(positives)) for p in positives[a] for n in negatives[a]]
    return tuple(torch.tensor(column, dtype=torch.int64) for column in zip(*rows))


def test_contrastive_three_points_by_hand():
    # Positives (A, B) and (B, A), cosine 0; each anchor's only negative is C with cosine
    # 1/sqrt(2). With temperature 0.5: loss = log(1 + e^{sqrt 2}).
    criterion = SpatialContrastiveLoss(distance_threshold=100.0, temperature=0.5)
    loss = criterion(THREE_EMBEDDINGS, THREE_LONLAT)
    assert float(loss) == pytest.approx(1.631835283954839, abs=1e-12)
    assert float(loss) == pytest.approx(math.log1p(math.exp(math.sqrt(2))), abs=1e-12)
    assert criterion.stats == {
        "num_positive_pairs": 2,
        "num_negative_pairs": 4,
        "radius_min": 100.0,
        "radius_median": 100.0,
        "radius_max": 100.0,
    }


def test_triplet_three_points_by_hand():
    # d(A, B) = sqrt(2) and d(A, C) = d(B, C) = sqrt(2 - sqrt(2)) on unit vectors; margin 1.
    criterion = SpatialTripletLoss(distance_threshold=100.0, margin=1.0)
    loss = criterion(THREE_EMBEDDINGS, THREE_LONLAT)
    expected = math.sqrt(2) - math.sqrt(2 - math.sqrt(2)) + 1.0
    assert float(loss) == pytest.approx(expected, abs=1e-12)
    assert float(loss) == pytest.approx(1.6488467, abs=1e-7)
    assert criterion.stats == {
        "num_triplets": 2,
        "num_active_triplets": 2,
        "radius_min": 100.0,
        "radius_median": 100.0,
        "radius_max": 100.0,
    }


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("negative_threshold", [None, BAND_KM])
def test_contrastive_matches_pml_ntxent(seed, negative_threshold):
    lonlat = clustered_lonlat(40, seed=seed)
    embeddings = random_embeddings(40, 16, seed=seed)
    negative_radius = negative_threshold or RADIUS_KM
    positives, negatives = reference.in_batch_pairs(lonlat, RADIUS_KM, negative_radius)

    criterion = SpatialContrastiveLoss(
        distance_threshold=RADIUS_KM, negative_threshold=negative_threshold, temperature=0.1
    )
    expected = NTXentLoss(temperature=0.1)(embeddings, indices_tuple=pml_pairs(positives, negatives))
    assert float(criterion(embeddings, lonlat)) == pytest.approx(float(expected), abs=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("negative_threshold", [None, BAND_KM])
def test_triplet_matches_pml(seed, negative_threshold):
    lonlat = clustered_lonlat(30, seed=seed)
    embeddings = random_embeddings(30, 16, seed=seed)
    negative_radius = negative_threshold or RADIUS_KM
    positives, negatives = reference.in_batch_pairs(lonlat, RADIUS_KM, negative_radius)
    triplets = pml_triplets(positives, negatives)

    for reduction, pml_loss in [
        ("nonzero_mean", TripletMarginLoss(margin=0.4)),
        ("mean", TripletMarginLoss(margin=0.4, reducer=MeanReducer())),
    ]:
        criterion = SpatialTripletLoss(
            distance_threshold=RADIUS_KM,
            negative_threshold=negative_threshold,
            margin=0.4,
            reduction=reduction,
        )
        expected = pml_loss(embeddings, indices_tuple=triplets)
        assert float(criterion(embeddings, lonlat)) == pytest.approx(float(expected), abs=1e-6)


@pytest.mark.parametrize("seed", [4, 5])
def test_contrastive_matches_loop_reference(seed):
    lonlat = clustered_lonlat(24, seed=seed)
    embeddings = random_embeddings(24, 8, seed=seed)
    positives, negatives = reference.in_batch_pairs(lonlat, RADIUS_KM, BAND_KM)
    expected = reference.info_nce(embeddings, embeddings, positives, negatives, 0.2)

    criterion = SpatialContrastiveLoss(
        distance_threshold=RADIUS_KM, negative_threshold=BAND_KM, temperature=0.2
    )
    assert expected > 0
    assert float(criterion(embeddings, lonlat)) == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize("seed", [4, 5])
def test_triplet_matches_loop_reference(seed):
    lonlat = clustered_lonlat(20, seed=seed)
    embeddings = random_embeddings(20, 8, seed=seed)
    positives, negatives = reference.in_batch_pairs(lonlat, RADIUS_KM, BAND_KM)
    expected = reference.triplet(embeddings, embeddings, positives, negatives, 0.3)

    criterion = SpatialTripletLoss(
        distance_threshold=RADIUS_KM, negative_threshold=BAND_KM, margin=0.3
    )
    assert expected > 0
    assert float(criterion(embeddings, lonlat)) == pytest.approx(expected, abs=1e-9)


def test_contrastive_gradcheck():
    lonlat = clustered_lonlat(12, seed=7)
    embeddings = random_embeddings(12, 5, seed=7).requires_grad_()
    criterion = SpatialContrastiveLoss(distance_threshold=RADIUS_KM, temperature=0.5)
    assert torch.autograd.gradcheck(lambda e: criterion(e, lonlat), (embeddings,))


def test_triplet_gradcheck():
    lonlat = clustered_lonlat(12, seed=7)
    embeddings = random_embeddings(12, 5, seed=7).requires_grad_()
    criterion = SpatialTripletLoss(distance_threshold=RADIUS_KM, margin=0.5, reduction="mean")
    assert torch.autograd.gradcheck(lambda e: criterion(e, lonlat), (embeddings,))


@pytest.mark.parametrize("loss_class", [SpatialContrastiveLoss, SpatialTripletLoss])
@pytest.mark.parametrize(
    "lonlat",
    [
        # Every pair far apart: no positive.
        torch.tensor([[0.0, 0.0], [40.0, 0.0], [80.0, 0.0]], dtype=torch.float64),
        # Every pair close: no negative.
        torch.tensor([[0.0, 0.0], [0.1, 0.0], [0.2, 0.0]], dtype=torch.float64),
        # A single place.
        torch.tensor([[0.0, 0.0]], dtype=torch.float64),
    ],
)
def test_no_valid_pair_gives_zero_with_gradient(loss_class, lonlat):
    embeddings = torch.randn(len(lonlat), 4, requires_grad=True)
    loss = loss_class(distance_threshold=100.0)(embeddings, lonlat)
    loss.backward()
    assert loss.item() == 0.0
    assert loss.requires_grad
    assert embeddings.grad is not None
    assert torch.equal(embeddings.grad, torch.zeros_like(embeddings))


@pytest.mark.parametrize("loss_class", [SpatialContrastiveLoss, SpatialTripletLoss])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_scored_in_float32(loss_class, dtype):
    lonlat = clustered_lonlat(32, seed=8)
    embeddings = random_embeddings(32, 16, seed=8, dtype=dtype)
    criterion = loss_class(distance_threshold=RADIUS_KM)
    half_loss = criterion(embeddings, lonlat)
    float_loss = criterion(embeddings.float(), lonlat)
    assert half_loss.dtype == torch.float32
    assert float(half_loss) == pytest.approx(float(float_loss), abs=1e-6)


@pytest.mark.parametrize("loss_class", [SpatialContrastiveLoss, SpatialTripletLoss])
def test_batch_permutation_invariance(loss_class):
    lonlat = clustered_lonlat(30, seed=9)
    embeddings = random_embeddings(30, 8, seed=9)
    permutation = torch.randperm(30, generator=torch.Generator().manual_seed(0))
    criterion = loss_class(distance_threshold=RADIUS_KM)
    assert float(criterion(embeddings[permutation], lonlat[permutation])) == pytest.approx(
        float(criterion(embeddings, lonlat)), abs=1e-12
    )


def test_aligned_embeddings_give_log_of_pair_count():
    # Identical embeddings make every logit equal, so each positive pair scores
    # log(1 + number of negatives of its anchor).
    lonlat = torch.tensor([[0.0, 0.0], [0.3, 0.0], [50.0, 0.0], [100.0, 0.0]], dtype=torch.float64)
    embeddings = torch.ones(4, 3, dtype=torch.float64)
    loss = SpatialContrastiveLoss(distance_threshold=100.0)(embeddings, lonlat)
    assert float(loss) == pytest.approx(math.log(3.0), abs=1e-12)


def test_euclidean_metric_in_projected_metres():
    # EPSG:4087-like metres: the first two points are 50 km apart, the third 500 km away.
    metres = torch.tensor([[0.0, 0.0], [30_000.0, 40_000.0], [500_000.0, 0.0]], dtype=torch.float64)
    criterion = SpatialContrastiveLoss(
        distance_threshold=100_000.0, temperature=0.5, metric="euclidean"
    )
    assert float(criterion(THREE_EMBEDDINGS, metres)) == pytest.approx(
        math.log1p(math.exp(math.sqrt(2))), abs=1e-12
    )


def test_many_triplets_stay_quadratic_in_memory():
    # 1,600 anchors in two far-apart groups: about 1e9 triplets, which would need several GiB
    # if materialised; the closed form needs only (B, B) matrices.
    lonlat = torch.cat(
        [clustered_lonlat(800, num_clusters=1, spread_deg=0.1, seed=s) for s in (10, 11)]
    )
    lonlat[800:, 0] = (lonlat[800:, 0] + 90) % 360 - 180
    embeddings = torch.randn(1600, 8)
    criterion = SpatialTripletLoss(distance_threshold=100.0, margin=0.2)
    loss = criterion(embeddings, lonlat)
    assert torch.isfinite(loss)
    assert criterion.stats["num_triplets"] > 5e8


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"distance_threshold": 0.0}, ValueError, r"distance_threshold must be a finite number > 0"),
        ({"distance_threshold": -5.0}, ValueError, r"got -5.0"),
        (
            {"distance_threshold": 100.0, "negative_threshold": 50.0},
            ValueError,
            r"negative_threshold \(50.0\) must be >= distance_threshold \(100.0\)",
        ),
        ({"distance_threshold": 100.0, "temperature": 0.0}, ValueError, r"temperature must be"),
        ({"distance_threshold": 100.0, "metric": "cosine"}, ValueError, r"metric must be"),
        ({"distance_threshold": "100"}, TypeError, r"distance_threshold must be a number or a RadiusPolicy"),
    ],
)
def test_invalid_arguments_raise(kwargs, error, message):
    with pytest.raises(error, match=message):
        SpatialContrastiveLoss(**kwargs)


def test_invalid_embeddings_raise():
    criterion = SpatialContrastiveLoss(distance_threshold=100.0)
    lonlat = THREE_LONLAT
    with pytest.raises(ValueError, match=r"NaN or inf at row 1"):
        criterion(torch.tensor([[1.0, 0.0], [float("nan"), 0.0], [0.0, 1.0]]), lonlat)
    with pytest.raises(ValueError, match=r"shape \(B, D\), got \(3,\)"):
        criterion(torch.ones(3), lonlat)
    with pytest.raises(TypeError, match=r"floating-point tensor, got dtype torch.int64"):
        criterion(torch.ones(3, 2, dtype=torch.int64), lonlat)
    with pytest.raises(ValueError, match=r"2 rows but the embeddings have 3"):
        criterion(torch.ones(3, 2), lonlat[:2])


def test_coordinates_on_other_device_raise():
    criterion = SpatialContrastiveLoss(distance_threshold=100.0)
    with pytest.raises(ValueError, match=r"coordinates are on meta but embeddings are on cpu"):
        criterion(torch.ones(3, 2), THREE_LONLAT.to("meta"))
