import numpy as np
import pytest
import reference
import torch
import torch.nn.functional as F
from conftest import clustered_lonlat, random_embeddings
from pytorch_metric_learning.losses import NTXentLoss, SupConLoss, TripletMarginLoss

from annloss import MemoryBankSpatialLoss, SpatialContrastiveLoss, SpatialTripletLoss

RADIUS_KM = 300.0
BAND_KM = 600.0
DIM = 8


def make_criterion(**overrides) -> MemoryBankSpatialLoss:
    options = {
        "embedding_dim": DIM,
        "distance_threshold": RADIUS_KM,
        "negative_threshold": BAND_KM,
        "memory_size": 40,
        "num_negatives": 5,
        # A first fetch of exactly num_negatives makes most anchors go through the wider
        # repeated searches.
        "k_fetch": 5,
        "max_positives": 64,
        "temperature": 0.2,
        "bank_dtype": torch.float64,
    }
    options.update(overrides)
    return MemoryBankSpatialLoss(**options)


class PlaceStream:
    """Batches drawn from a fixed pool of places, so entity ids repeat across steps."""

    def __init__(self, pool_size: int = 60, batch_size: int = 16, seed: int = 0):
        self.lonlat = clustered_lonlat(pool_size, seed=seed)
        self.batch_size = batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.step = 0

    def next(self):
        ids = torch.randperm(len(self.lonlat), generator=self.generator)[: self.batch_size]
        embeddings = random_embeddings(self.batch_size, DIM, seed=100 + self.step)
        self.step += 1
        return embeddings, self.lonlat[ids], ids


def bank_snapshot(criterion: MemoryBankSpatialLoss):
    size = len(criterion.bank)
    bank = criterion.bank
    return (
        bank.embeddings[:size].clone(),
        bank.coordinates[:size].clone(),
        bank.ids[:size].clone(),
    )


def reference_pairs(criterion, embeddings, lonlat, ids, distance_fn=reference.haversine_km):
    bank_embeddings, bank_lonlat, bank_ids = bank_snapshot(criterion)
    positives, negatives = reference.mined_pairs(
        embeddings,
        lonlat,
        None if ids is None else ids.tolist(),
        bank_embeddings,
        bank_lonlat,
        bank_ids.tolist(),
        criterion.distance_threshold,
        criterion.negative_threshold,
        criterion.max_positives,
        criterion.num_negatives,
        distance_fn,
    )
    references = np.concatenate([np.asarray(embeddings), np.asarray(bank_embeddings)])
    return positives, negatives, references


@pytest.mark.parametrize(
    "loss, in_batch",
    [
        (
            "infonce",
            SpatialContrastiveLoss(
                distance_threshold=RADIUS_KM, negative_threshold=BAND_KM, temperature=0.2
            ),
        ),
        (
            "triplet",
            SpatialTripletLoss(
                distance_threshold=RADIUS_KM, negative_threshold=BAND_KM, margin=1.0
            ),
        ),
    ],
)
def test_too_small_bank_equals_in_batch_loss(loss, in_batch):
    criterion = make_criterion(loss=loss, min_bank_size=1000, memory_size=2000)
    stream = PlaceStream()
    for _ in range(4):
        embeddings, lonlat, ids = stream.next()
        value = criterion(embeddings, lonlat, ids)
        assert not criterion.stats["used_bank"]
        assert value.item() == in_batch(embeddings, lonlat).item()
    assert criterion.stats["bank_size"] == 48


def test_first_call_equals_in_batch_loss():
    criterion = make_criterion()
    embeddings, lonlat, ids = PlaceStream().next()
    expected = SpatialContrastiveLoss(
        distance_threshold=RADIUS_KM, negative_threshold=BAND_KM, temperature=0.2
    )(embeddings, lonlat)
    assert criterion(embeddings, lonlat, ids).item() == expected.item()


@pytest.mark.parametrize("loss", ["infonce", "triplet"])
@pytest.mark.parametrize("with_ids", [True, False])
def test_matches_brute_force_reference_after_wrapping(loss, with_ids):
    criterion = make_criterion(loss=loss, margin=0.5)
    stream = PlaceStream(seed=2)
    checked = 0
    for step in range(8):
        embeddings, lonlat, ids = stream.next()
        ids = ids if with_ids else None
        if step >= 3:
            positives, negatives, references = reference_pairs(criterion, embeddings, lonlat, ids)
            if loss == "infonce":
                expected = reference.info_nce(embeddings, references, positives, negatives, 0.2)
            else:
                expected = reference.triplet(embeddings, references, positives, negatives, 0.5)
            value = criterion(embeddings, lonlat, ids)
            assert criterion.stats["used_bank"]
            assert criterion.stats["num_bank_positive_pairs"] > 0
            assert value.item() == pytest.approx(expected, abs=1e-9)
            checked += 1
        else:
            criterion(embeddings, lonlat, ids)
    assert checked == 5
    # 8 batches of 16 went through a 40-slot bank: it wrapped more than twice.
    assert int(criterion.step) == 8


def test_euclidean_metric_matches_reference():
    # Projected metres (EPSG:4087-like): clusters spread over a few hundred km.
    stream = PlaceStream(seed=7)
    metres = stream.lonlat * 111_000.0
    criterion = make_criterion(
        metric="euclidean", distance_threshold=300_000.0, negative_threshold=600_000.0
    )
    for step in range(6):
        embeddings, _, ids = stream.next()
        if step >= 3:
            positives, negatives, references = reference_pairs(
                criterion, embeddings, metres[ids], ids, reference.euclidean
            )
            expected = reference.info_nce(embeddings, references, positives, negatives, 0.2)
            assert criterion(embeddings, metres[ids], ids).item() == pytest.approx(
                expected, abs=1e-9
            )
            assert criterion.stats["num_bank_positive_pairs"] > 0
        else:
            criterion(embeddings, metres[ids], ids)


def test_matches_pml_ntxent_with_bank_as_ref_emb():
    criterion = make_criterion()
    stream = PlaceStream(seed=3)
    for _ in range(4):
        criterion(*stream.next())
    embeddings, lonlat, ids = stream.next()
    positives, negatives, references = reference_pairs(criterion, embeddings, lonlat, ids)
    value = criterion(embeddings, lonlat, ids)

    valid = [a for a in range(len(positives)) if positives[a] and negatives[a]]
    a1 = torch.tensor([a for a in valid for _ in positives[a]])
    p = torch.tensor([r for a in valid for r in positives[a]])
    a2 = torch.tensor([a for a in valid for _ in negatives[a]])
    n = torch.tensor([r for a in valid for r in negatives[a]])
    expected = NTXentLoss(temperature=0.2)(
        embeddings, indices_tuple=(a1, p, a2, n), ref_emb=torch.from_numpy(references)
    )
    assert value.item() == pytest.approx(expected.item(), abs=1e-6)


def test_small_max_positives_keeps_spatially_nearest():
    lonlat = clustered_lonlat(200, num_clusters=2, spread_deg=1.0, seed=5)
    criterion = make_criterion(memory_size=300, max_positives=3, num_negatives=4)
    for start in range(0, 160, 32):
        batch = slice(start, start + 32)
        criterion(
            random_embeddings(32, DIM, seed=start), lonlat[batch], torch.arange(start, start + 32)
        )
    embeddings = random_embeddings(16, DIM, seed=999)
    ids = torch.arange(160, 176)
    positives, negatives, references = reference_pairs(criterion, embeddings, lonlat[160:176], ids)
    expected = reference.info_nce(embeddings, references, positives, negatives, 0.2)
    assert criterion(embeddings, lonlat[160:176], ids).item() == pytest.approx(expected, abs=1e-9)
    assert criterion.stats["num_bank_positive_pairs"] == 16 * 3


def test_false_negatives_are_filtered_and_counted():
    # One anchor and twenty bank entries. Ten lie 11 km away with the anchor's own embedding, so
    # they are the most similar candidates but inside the negative radius. The other ten lie a
    # quarter of the globe away.
    anchor = F.normalize(torch.randn(1, DIM, dtype=torch.float64), dim=1)
    near = torch.tensor([[0.0, 0.1]], dtype=torch.float64).repeat(10, 1)
    far = torch.stack([torch.full((10,), 90.0), torch.linspace(-5, 5, 10)], dim=1).double()
    far_embeddings = random_embeddings(10, DIM, seed=11)

    criterion = make_criterion(
        distance_threshold=50.0, negative_threshold=100.0, num_negatives=3, k_fetch=3
    )
    criterion.bank.add(anchor.repeat(10, 1), near, torch.arange(10, 20))
    criterion.bank.add(F.normalize(far_embeddings, dim=1), far, torch.arange(20, 30))

    lonlat = torch.tensor([[0.0, 0.0]], dtype=torch.float64)
    ids = torch.tensor([0])
    positives, negatives, references = reference_pairs(criterion, anchor, lonlat, ids)
    value = criterion(anchor, lonlat, ids)

    assert criterion.stats["num_filtered_negatives"] == 10
    assert criterion.stats["num_bank_negative_pairs"] == 3
    assert criterion.stats["num_bank_positive_pairs"] == 10
    assert sorted(negatives[0]) != []
    expected = reference.info_nce(anchor, references, positives, negatives, 0.2)
    assert value.item() == pytest.approx(expected, abs=1e-9)


def test_entity_never_pairs_with_its_stale_copy():
    criterion = make_criterion(num_negatives=2)
    lonlat = torch.tensor([[10.0, 10.0], [10.5, 10.0], [60.0, 10.0], [100.0, 10.0]]).double()
    embeddings = random_embeddings(4, DIM, seed=12)
    criterion(embeddings, lonlat, torch.tensor([1, 2, 3, 4]))

    # Place 1 comes back: its stale copy (same id, same coordinates) must not be a positive,
    # while place 2's bank entry (55 km away) is.
    criterion(embeddings[:1], lonlat[:1], torch.tensor([1]))
    assert criterion.stats["num_bank_positive_pairs"] == 1
    assert criterion.stats["num_bank_negative_pairs"] == 2

    # Without ids the same call also pairs the place with its own copy.
    criterion_without_ids = make_criterion(num_negatives=2)
    criterion_without_ids(embeddings, lonlat)
    criterion_without_ids(embeddings[:1], lonlat[:1])
    assert criterion_without_ids.stats["num_bank_positive_pairs"] == 2


def test_eval_mode_leaves_bank_unchanged():
    criterion = make_criterion()
    stream = PlaceStream()
    criterion(*stream.next())
    criterion.eval()
    before = criterion.bank.embeddings.clone()
    criterion(*stream.next())
    assert len(criterion.bank) == 16
    assert torch.equal(criterion.bank.embeddings, before)
    assert int(criterion.step) == 1


def test_state_dict_resume_gives_same_next_loss():
    stream = PlaceStream(seed=4)
    batches = [stream.next() for _ in range(7)]
    original = make_criterion()
    for batch in batches[:5]:
        original(*batch)

    resumed = make_criterion()
    resumed.load_state_dict(original.state_dict())
    for batch in batches[5:]:
        assert resumed(*batch).item() == original(*batch).item()
    assert torch.equal(resumed.bank.ids, original.bank.ids)
    assert int(resumed.step) == int(original.step) == 7


@pytest.mark.parametrize(
    ("override", "error", "message"),
    [
        ({"memory_size": 48}, ValueError, "capacity 40 but this one has 48"),
        ({"embedding_dim": DIM + 1}, ValueError, f"embedding_dim {DIM} but this one has {DIM + 1}"),
        (
            {"bank_dtype": torch.float32},
            TypeError,
            "torch.float64 but this one stores torch.float32; build it with bank_dtype",
        ),
    ],
)
def test_load_other_settings_raises(override, error, message):
    stream = PlaceStream(seed=4)
    original = make_criterion()
    for _ in range(3):
        original(*stream.next())
    other = make_criterion(**override)
    with pytest.raises(error, match=message):
        other.load_state_dict(original.state_dict())
    # Nothing was loaded.
    assert len(other.bank) == 0
    assert int(other.step) == 0


def test_ivf_resume_rebuilds_index():
    stream = PlaceStream(seed=5)
    batches = [stream.next() for _ in range(6)]
    options = {"index": "ivf", "index_options": {"nlist": 2}, "bank_dtype": torch.float32}
    original = make_criterion(**options)
    for batch in batches[:4]:
        original(*batch)
    resumed = make_criterion(**options)
    resumed.load_state_dict(original.state_dict())
    resumed(*batches[4])
    assert resumed.stats["index_build_time_s"] > 0
    assert resumed.stats["bank_size"] == 40
    assert resumed.stats["num_bank_negative_pairs"] > 0
    # The bank itself resumes exactly, whatever the index returned.
    original(*batches[4])
    assert torch.equal(resumed.bank.embeddings, original.bank.embeddings)


def test_flat_and_torch_backends_agree():
    stream = PlaceStream(seed=6)
    batches = [stream.next() for _ in range(5)]
    flat = make_criterion(index="flat", bank_dtype=torch.float32)
    exact = make_criterion(index="torch", bank_dtype=torch.float32)
    for batch in batches:
        flat_value = flat(*batch)
        exact_value = exact(*batch)
        assert flat_value.item() == pytest.approx(exact_value.item(), abs=1e-5)
        assert flat.stats["num_negative_pairs"] == exact.stats["num_negative_pairs"]


def test_gradient_flows_to_batch_only():
    criterion = make_criterion(bank_dtype=torch.float32)
    stream = PlaceStream()
    for _ in range(3):
        embeddings, lonlat, ids = stream.next()
        embeddings = embeddings.float().requires_grad_()
        criterion(embeddings, lonlat, ids).backward()
        assert torch.isfinite(embeddings.grad).all()
        assert embeddings.grad.abs().sum() > 0
    assert not criterion.bank.embeddings.requires_grad


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_embeddings(dtype):
    criterion = make_criterion(bank_dtype=torch.float16)
    stream = PlaceStream()
    for _ in range(4):
        embeddings, lonlat, ids = stream.next()
        value = criterion(embeddings.to(dtype), lonlat, ids)
        assert value.dtype == torch.float32
        assert torch.isfinite(value)


def test_stats_report_bank_and_timing():
    criterion = make_criterion()
    stream = PlaceStream()
    criterion(*stream.next())
    criterion(*stream.next())
    stats = criterion.stats
    assert stats["bank_size"] == 16
    assert stats["used_bank"] is True
    assert stats["mining_time_s"] >= 0.0
    assert stats["num_positive_pairs"] == (
        stats["num_batch_positive_pairs"] + stats["num_bank_positive_pairs"]
    )
    assert stats["num_bank_negative_pairs"] <= 16 * 5


def test_invalid_inputs_raise():
    criterion = make_criterion()
    lonlat = clustered_lonlat(4, seed=1)
    with pytest.raises(ValueError, match=r"width 5 but this loss was built with embedding_dim=8"):
        criterion(torch.randn(4, 5), lonlat)
    with pytest.raises(ValueError, match=r"ids must be >= 0, got -3"):
        criterion(torch.randn(4, DIM), lonlat, torch.tensor([1, 2, -3, 4]))
    with pytest.raises(TypeError, match=r"ids must be an integer tensor"):
        criterion(torch.randn(4, DIM), lonlat, torch.tensor([1.0, 2.0, 3.0, 4.0]))
    with pytest.raises(ValueError, match=r"ids must have shape \(4,\)"):
        criterion(torch.randn(4, DIM), lonlat, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match=r"latitude .* swapped"):
        criterion(torch.randn(4, DIM), lonlat.flip(1) * 2)
    assert len(criterion.bank) == 0


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"loss": "contrastive"}, r"loss must be 'infonce' or 'triplet'"),
        ({"index": "annoy"}, r"index must be one of"),
        ({"refresh_every": 0}, r"refresh_every must be an integer >= 1, got 0"),
        ({"num_negatives": 0}, r"num_negatives must be an integer >= 1, got 0"),
        ({"memory_size": 0}, r"memory_size must be an integer >= 1, got 0"),
        ({"margin": -1.0}, r"margin must be a number >= 0"),
        ({"k_fetch": 4}, r"k_fetch must be an integer >= 5, got 4"),
    ],
)
def test_invalid_arguments_raise(overrides, message):
    with pytest.raises(ValueError, match=message):
        make_criterion(**overrides)


@pytest.mark.parametrize(
    "pml_loss, builtin",
    [
        (NTXentLoss(temperature=0.2), {"loss": "infonce", "temperature": 0.2}),
        (TripletMarginLoss(margin=0.5), {"loss": "triplet", "margin": 0.5}),
    ],
)
def test_pml_loss_inside_equals_builtin(pml_loss, builtin):
    wrapped = make_criterion(loss=pml_loss)
    reference_criterion = make_criterion(**builtin)
    stream = PlaceStream(seed=9)
    for step in range(6):
        embeddings, lonlat, ids = stream.next()
        value = wrapped(embeddings, lonlat, ids)
        expected = reference_criterion(embeddings, lonlat, ids)
        assert value.item() == pytest.approx(expected.item(), abs=1e-6), step
    assert wrapped.stats["num_bank_negative_pairs"] > 0


def test_pml_supcon_inside_backpropagates():
    criterion = make_criterion(loss=SupConLoss(temperature=0.1), bank_dtype=torch.float32)
    stream = PlaceStream(seed=10)
    for _ in range(4):
        embeddings, lonlat, ids = stream.next()
        embeddings = embeddings.float().requires_grad_()
        value = criterion(embeddings, lonlat, ids)
        value.backward()
        assert torch.isfinite(value)
        assert embeddings.grad.abs().sum() > 0


def test_unsupported_loss_object_raises():
    with pytest.raises(TypeError, match=r"pytorch-metric-learning loss such as NTXentLoss\(\)"):
        make_criterion(loss=torch.nn.MSELoss())


def test_warmup_steps_fill_bank_without_mining():
    criterion = make_criterion(warmup_steps=3)
    reference_criterion = SpatialContrastiveLoss(
        distance_threshold=RADIUS_KM, negative_threshold=BAND_KM, temperature=0.2
    )
    stream = PlaceStream(seed=11)
    for step in range(5):
        embeddings, lonlat, ids = stream.next()
        value = criterion(embeddings, lonlat, ids)
        assert criterion.stats["used_bank"] is (step >= 3)
        if step < 3:
            assert value.item() == reference_criterion(embeddings, lonlat).item()
    assert criterion.stats["bank_size"] == 40


@pytest.mark.parametrize("positive_index", ["exact", "balltree"])
def test_max_age_keeps_old_entries_out(positive_index):
    # A 400-slot bank never wraps here, so only the age limit removes entries.
    criterion = make_criterion(memory_size=400, max_age=2, positive_index=positive_index)
    stream = PlaceStream(seed=12)
    criterion(*stream.next())
    for _ in range(5):
        embeddings, lonlat, ids = stream.next()
        unit = F.normalize(embeddings, dim=1)
        positives = criterion._mine_positives(lonlat, ids, len(criterion.bank))
        negatives, _ = criterion._mine_negatives(unit, lonlat, ids, len(criterion.bank))
        mined = torch.cat([positives[positives >= 0], negatives[negatives >= 0]])
        ages = int(criterion.step) - criterion.bank.steps[mined]
        assert mined.numel() > 0
        assert int(ages.max()) <= 2
        criterion(embeddings, lonlat, ids)

    # The last mining ran at step 5 over 80 entries, of which only steps 3 and 4 are young enough.
    assert criterion.stats["bank_size"] == 80
    assert set(criterion.bank.steps[mined].tolist()) == {3, 4}
