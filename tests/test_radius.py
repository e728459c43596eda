import math

import numpy as np
import pytest
import reference
import torch
from conftest import clustered_lonlat, random_embeddings
from scipy.spatial.distance import pdist

from annloss import (
    FixedRadius,
    KNNRadius,
    MemoryBankSpatialLoss,
    QuantileRadius,
    SpatialContrastiveLoss,
    SpatialTripletLoss,
    TargetPositives,
    log_scales,
)
from annloss.radius import make_radius

LONLAT = clustered_lonlat(40, seed=31)
EMBEDDINGS = random_embeddings(40, 8, seed=31)


def test_quantile_radius_equals_numpy_quantile():
    points = torch.rand(30, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    points = points * 1000.0
    for q in (0.05, 0.3, 0.77):
        criterion = SpatialContrastiveLoss(radius=QuantileRadius(q), metric="euclidean")
        criterion(random_embeddings(30, 4), points)
        expected = np.quantile(pdist(points.numpy()), q)
        assert criterion.stats["radius_median"] == pytest.approx(expected, abs=1e-9)
        assert criterion.stats["radius_min"] == criterion.stats["radius_max"]


def test_quantile_radius_is_clamped():
    criterion = SpatialContrastiveLoss(radius=QuantileRadius(0.5, max_radius=123.0))
    criterion(EMBEDDINGS, LONLAT)
    assert criterion.stats["radius_max"] == 123.0


def brute_force_kth(anchors, references, k, skip=lambda a, r: False):
    result = []
    for a in range(len(anchors)):
        distances = sorted(
            reference.haversine_km(anchors[a], references[r])
            for r in range(len(references))
            if not skip(a, r)
        )
        result.append(distances[k - 1] if len(distances) >= k else math.inf)
    return result


def test_knn_radius_in_batch_equals_brute_force():
    criterion = SpatialContrastiveLoss(radius=KNNRadius(3))
    usable = LONLAT[:, 0] == LONLAT[:, 0]
    distance = torch.tensor(
        [[reference.haversine_km(a, b) for b in LONLAT] for a in LONLAT], dtype=torch.float64
    ).fill_diagonal_(math.inf)
    positive, negative = criterion.scales[0][0](distance)
    expected = brute_force_kth(LONLAT, LONLAT, 3, skip=lambda a, r: a == r)
    assert usable.all()
    assert positive.tolist() == pytest.approx(expected, abs=1e-9)
    assert torch.equal(positive, negative)


@pytest.mark.parametrize("positive_index", ["exact", "balltree"])
def test_knn_radius_in_bank_equals_brute_force(positive_index):
    criterion = MemoryBankSpatialLoss(
        embedding_dim=8, radius=KNNRadius(4), memory_size=64, num_negatives=3,
        positive_index=positive_index,
    )
    bank_lonlat = clustered_lonlat(50, seed=32)
    bank_ids = torch.arange(50) % 20
    criterion.bank.add(random_embeddings(50, 8, dtype=torch.float32), bank_lonlat, bank_ids)
    anchors, anchor_ids = LONLAT[:10], torch.arange(10)
    _, distance = criterion._nearest_bank_entries(anchors, anchor_ids, 50, 4, None)
    expected = brute_force_kth(
        anchors, bank_lonlat, 4, skip=lambda a, r: int(bank_ids[r]) == int(anchor_ids[a])
    )
    assert distance[:, -1].tolist() == pytest.approx(expected, abs=1e-9)


def test_target_positives_gives_n_positives_per_anchor():
    criterion = SpatialContrastiveLoss(radius=TargetPositives(5))
    criterion(EMBEDDINGS, LONLAT)
    assert criterion.stats["num_positive_pairs"] == 40 * 5


@pytest.mark.parametrize("loss_class", [SpatialContrastiveLoss, SpatialTripletLoss])
def test_single_scale_with_weight_one_equals_single_radius(loss_class):
    single = loss_class(distance_threshold=300.0, negative_threshold=600.0)
    scaled = loss_class(scales=[(FixedRadius(300.0, negative_radius=600.0), 1.0)])
    assert torch.equal(single(EMBEDDINGS, LONLAT), scaled(EMBEDDINGS, LONLAT))


def test_zero_weight_removes_its_term():
    single = SpatialContrastiveLoss(scales=[(300.0, 1.0)])
    with_zero = SpatialContrastiveLoss(scales=[(300.0, 1.0), (3000.0, 0.0)])
    assert torch.equal(single(EMBEDDINGS, LONLAT), with_zero(EMBEDDINGS, LONLAT))


def test_multi_scale_is_weighted_sum_of_single_scales():
    fine = SpatialContrastiveLoss(distance_threshold=200.0)(EMBEDDINGS, LONLAT)
    coarse = SpatialContrastiveLoss(distance_threshold=2000.0)(EMBEDDINGS, LONLAT)
    criterion = SpatialContrastiveLoss(scales=[(200.0, 0.7), (2000.0, 0.3)])
    value = criterion(EMBEDDINGS, LONLAT)
    assert value.item() == pytest.approx(0.7 * fine.item() + 0.3 * coarse.item(), abs=1e-12)
    assert criterion.stats["scale0_loss"] == pytest.approx(fine.item(), abs=1e-12)
    assert criterion.stats["scale1_radius_median"] == 2000.0
    assert criterion.stats["num_positive_pairs"] == (
        criterion.stats["scale0_num_positive_pairs"] + criterion.stats["scale1_num_positive_pairs"]
    )


def test_empty_scales_give_finite_loss_and_gradient():
    embeddings = EMBEDDINGS.clone().requires_grad_()
    criterion = SpatialContrastiveLoss(scales=[(0.001, 1.0), (300.0, 1.0)])
    value = criterion(embeddings, LONLAT)
    assert torch.isfinite(value)
    assert criterion.stats["scale0_num_positive_pairs"] == 0
    only_empty = SpatialContrastiveLoss(scales=[(0.001, 1.0)])(embeddings, LONLAT)
    assert only_empty.item() == 0.0
    (value + only_empty).backward()
    assert torch.isfinite(embeddings.grad).all()


def test_log_scales():
    assert log_scales(10.0, 1000.0, 3) == [(10.0, 1.0), (100.0, 1.0), (1000.0, 1.0)]
    assert log_scales(5.0, 5.0, 1, weights=[2.0]) == [(5.0, 2.0)]
    with pytest.raises(ValueError, match=r"weights must have 2 values"):
        log_scales(1.0, 10.0, 2, weights=[1.0])


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda: make_radius(100.0, 100.0, None), ValueError, r"either radius= or distance_"),
        (lambda: make_radius(QuantileRadius(0.1), None, 200.0), ValueError,
         r"negative_threshold applies to a fixed radius only"),
        (lambda: make_radius(None, None, None), TypeError, r"a radius is required"),
        (lambda: make_radius("far", None, None), TypeError, r"radius must be a number"),
        (lambda: QuantileRadius(1.0), ValueError, r"q must be < 1, got 1.0"),
        (lambda: KNNRadius(0), ValueError, r"k must be an integer >= 1, got 0"),
        (lambda: TargetPositives(2.5), ValueError, r"n must be an integer >= 1, got 2.5"),
        (lambda: FixedRadius(10.0, min_radius=5.0, max_radius=1.0), ValueError,
         r"max_radius \(1.0\) must be >= min_radius \(5.0\)"),
        (lambda: FixedRadius(10.0, negative_factor=0.5), ValueError,
         r"negative_factor must be >= 1.0, got 0.5"),
        (lambda: SpatialContrastiveLoss(distance_threshold=10.0, scales=[(10.0, 1.0)]),
         ValueError, r"either scales= or a single radius"),
        (lambda: SpatialContrastiveLoss(scales=[(10.0, -1.0)]), ValueError,
         r"scale weight must be a number >= 0, got -1.0"),
        (lambda: SpatialContrastiveLoss(scales=[10.0]), ValueError,
         r"each scale must be a \(radius, weight\) pair"),
    ],
)
def test_bad_radius_arguments_raise(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_negative_factor_makes_ignore_band():
    policy = QuantileRadius(0.2, negative_factor=2.0, negative_offset=10.0)
    criterion = SpatialContrastiveLoss(radius=policy)
    criterion(EMBEDDINGS, LONLAT)
    positive = criterion.stats["radius_median"]
    band = SpatialContrastiveLoss(
        distance_threshold=positive, negative_threshold=2.0 * positive + 10.0
    )
    assert criterion(EMBEDDINGS, LONLAT).item() == band(EMBEDDINGS, LONLAT).item()


def bank_criterion(**overrides) -> MemoryBankSpatialLoss:
    options = {
        "embedding_dim": 8,
        "memory_size": 40,
        "num_negatives": 5,
        "max_positives": 64,
        "temperature": 0.2,
        "bank_dtype": torch.float64,
    }
    options.update(overrides)
    return MemoryBankSpatialLoss(**options)


def stream(num_steps: int, batch_size: int = 16, seed: int = 40):
    pool = clustered_lonlat(60, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    for step in range(num_steps):
        ids = torch.randperm(60, generator=generator)[:batch_size]
        yield random_embeddings(batch_size, 8, seed=200 + step), pool[ids], ids


def test_memory_bank_single_scale_equals_single_radius():
    single = bank_criterion(distance_threshold=300.0, negative_threshold=600.0)
    scaled = bank_criterion(scales=[(FixedRadius(300.0, negative_radius=600.0), 1.0)])
    for batch in stream(7):
        assert torch.equal(single(*batch), scaled(*batch))
    assert single.stats["num_bank_positive_pairs"] > 0


def test_memory_bank_zero_weight_removes_its_term():
    single = bank_criterion(scales=[(300.0, 1.0)])
    with_zero = bank_criterion(scales=[(300.0, 1.0), (3000.0, 0.0)])
    for batch in stream(6):
        assert torch.equal(single(*batch), with_zero(*batch))


def test_memory_bank_multi_scale_equals_dense_reference():
    # With K and P larger than the bank, every usable bank entry is a reference, so the mined
    # loss must equal the weighted sum of dense per-scale InfoNCE terms over batch and bank.
    scales = [(150.0, 0.5), (FixedRadius(400.0, negative_radius=800.0), 1.0), (3000.0, 0.25)]
    criterion = bank_criterion(scales=scales, num_negatives=64, min_bank_size=1)
    radii = [(150.0, 150.0, 0.5), (400.0, 800.0, 1.0), (3000.0, 3000.0, 0.25)]
    for step, (embeddings, lonlat, ids) in enumerate(stream(6)):
        if step >= 2:
            size = len(criterion.bank)
            bank_embeddings = criterion.bank.embeddings[:size].numpy()
            bank_lonlat = criterion.bank.coordinates[:size]
            bank_ids = criterion.bank.ids[:size].tolist()
            references = np.concatenate([embeddings.numpy(), bank_embeddings])
            expected = 0.0
            for positive_radius, negative_radius, weight in radii:
                positives, negatives = reference.in_batch_pairs(
                    lonlat, positive_radius, negative_radius
                )
                for a in range(len(lonlat)):
                    for slot in range(size):
                        if bank_ids[slot] == int(ids[a]):
                            continue
                        distance = reference.haversine_km(lonlat[a], bank_lonlat[slot])
                        if distance < positive_radius:
                            positives[a].append(len(lonlat) + slot)
                        elif distance >= negative_radius:
                            negatives[a].append(len(lonlat) + slot)
                expected += weight * reference.info_nce(
                    embeddings, references, positives, negatives, 0.2
                )
            value = criterion(embeddings, lonlat, ids)
            assert value.item() == pytest.approx(expected, abs=1e-9)
            assert criterion.stats["scale2_num_bank_positive_pairs"] > 0
        else:
            criterion(embeddings, lonlat, ids)


def test_memory_bank_negatives_respect_each_scale():
    criterion = bank_criterion(scales=[(100.0, 1.0), (1000.0, 1.0)], num_negatives=3)
    batches = list(stream(4))
    for batch in batches[:3]:
        criterion(*batch)
    embeddings, lonlat, ids = batches[3]
    unit = torch.nn.functional.normalize(embeddings, dim=1)
    negative_radius = torch.tensor([[100.0] * 16, [1000.0] * 16], dtype=torch.float64)
    slots, _ = criterion._mine_negatives(unit, lonlat, ids, len(criterion.bank), negative_radius)
    slots = slots.reshape(16, 2, 3)
    for scale, radius in enumerate((100.0, 1000.0)):
        for a in range(16):
            for slot in slots[a, scale].tolist():
                if slot >= 0:
                    bank_lonlat = criterion.bank.coordinates[slot]
                    assert reference.haversine_km(lonlat[a], bank_lonlat) >= radius
    # The fine scale's hard negatives include entries that the coarse scale cannot use.
    assert not torch.equal(slots[:, 0], slots[:, 1])


@pytest.mark.parametrize("backend", ["flat", "torch", "ivf", "hnsw"])
@pytest.mark.parametrize(
    "radius", [KNNRadius(3, max_radius=2000.0), TargetPositives(4), QuantileRadius(0.1)]
)
def test_adaptive_radii_work_with_every_backend(backend, radius):
    criterion = bank_criterion(radius=radius, index=backend, bank_dtype=torch.float32)
    for embeddings, lonlat, ids in stream(5):
        value = criterion(embeddings.float().requires_grad_(), lonlat, ids)
        assert torch.isfinite(value)
    assert criterion.stats["used_bank"]
    assert 0 < criterion.stats["radius_min"] <= criterion.stats["radius_max"]


def test_target_positives_counts_bank_entries():
    # Each anchor's radius reaches its 6th nearest reference over batch and usable bank, so it
    # gets 6 positives, more where several references tie at that distance.
    criterion = bank_criterion(radius=TargetPositives(6), min_bank_size=1)
    batches = list(stream(4))
    for batch in batches[:3]:
        criterion(*batch)
    embeddings, lonlat, ids = batches[3]
    size = len(criterion.bank)
    expected = 0
    for a in range(16):
        distances = [reference.haversine_km(lonlat[a], lonlat[b]) for b in range(16) if b != a]
        distances += [
            reference.haversine_km(lonlat[a], criterion.bank.coordinates[slot])
            for slot in range(size)
            if int(criterion.bank.ids[slot]) != int(ids[a])
        ]
        sixth = sorted(distances)[5]
        expected += sum(distance <= sixth for distance in distances)
    criterion(embeddings, lonlat, ids)
    assert expected > 16 * 6  # the data do have ties, which the count must include
    assert criterion.stats["num_positive_pairs"] == expected
