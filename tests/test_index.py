import pytest
import torch
import torch.nn.functional as F
from conftest import clustered_lonlat, random_embeddings

from annloss import MemoryBankSpatialLoss
from annloss.index import (
    AUTO_IVF_MIN_SIZE,
    FAISS_GPU_MAX_K,
    FaissGpuFlatIndex,
    FlatIndex,
    IVFIndex,
    TorchIndex,
    faiss_has_gpu,
    make_index,
)


def clustered_unit_vectors(num_rows: int, dim: int, *, seed: int) -> torch.Tensor:
    """Unit vectors around 50 centres, so approximate indexes face realistic structure."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(50, dim, generator=generator)
    assignment = torch.randint(50, (num_rows,), generator=generator)
    points = centres[assignment] + 0.5 * torch.randn(num_rows, dim, generator=generator)
    return F.normalize(points, dim=1)


def exact_top_k(queries: torch.Tensor, database: torch.Tensor, k: int) -> torch.Tensor:
    return torch.topk(queries.double() @ database.double().T, k, dim=1).indices


def recall(found: torch.Tensor, expected: torch.Tensor) -> float:
    hits = sum(len(set(f.tolist()) & set(e.tolist())) for f, e in zip(found, expected))
    return hits / expected.numel()


DATABASE = clustered_unit_vectors(6000, 32, seed=0)
QUERIES = clustered_unit_vectors(200, 32, seed=1)
EXPECTED = exact_top_k(QUERIES, DATABASE, 10)


@pytest.mark.parametrize("backend", ["flat", "torch"])
def test_exact_backends_match_brute_force(backend):
    index = make_index(backend, torch.device("cpu"), len(DATABASE))
    index.build(DATABASE)
    scores, rows = index.search(QUERIES, 10)
    assert index.exact
    assert recall(rows, EXPECTED) == 1.0
    expected_scores = (QUERIES.double() @ DATABASE.double().T).gather(1, EXPECTED)
    torch.testing.assert_close(scores.double(), expected_scores, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "backend, options", [("ivf", {"nprobe": 16}), ("hnsw", {"ef_search": 64})]
)
def test_approximate_backends_reach_recall(backend, options):
    index = make_index(backend, torch.device("cpu"), len(DATABASE), **options)
    index.build(DATABASE)
    _, rows = index.search(QUERIES, 10)
    assert not index.exact
    assert recall(rows, EXPECTED) >= 0.9


def test_ivf_probing_every_cell_is_exact():
    index = IVFIndex(nlist=20, nprobe=20)
    index.build(DATABASE)
    _, rows = index.search(QUERIES, 10)
    assert recall(rows, EXPECTED) == 1.0


def test_search_clips_k_to_snapshot():
    index = FlatIndex()
    index.build(DATABASE[:5])
    scores, rows = index.search(QUERIES[:3], 50)
    assert rows.shape == (3, 5)
    assert sorted(rows[0].tolist()) == [0, 1, 2, 3, 4]
    assert scores.shape == (3, 5)


def test_search_before_build_raises():
    with pytest.raises(RuntimeError, match=r"call build\(\)"):
        TorchIndex().search(QUERIES, 3)


def test_auto_picks_by_size_and_device():
    cpu = torch.device("cpu")
    assert isinstance(make_index("auto", cpu, 1000), TorchIndex)
    assert isinstance(make_index("auto", cpu, AUTO_IVF_MIN_SIZE), IVFIndex)
    assert isinstance(make_index("auto", torch.device("meta"), 1000), TorchIndex)


@pytest.mark.skipif(faiss_has_gpu(), reason="checks the fallback when FAISS has no GPU support")
def test_auto_cuda_without_faiss_gpu():
    with pytest.warns(RuntimeWarning, match=r"FAISS has no GPU support here"):
        index = make_index("auto", torch.device("cuda"), 1000)
    assert isinstance(index, TorchIndex)
    with pytest.raises(RuntimeError, match=r"no GPU support or sees no GPU"):
        FaissGpuFlatIndex()


GPU = pytest.mark.skipif(
    not (torch.cuda.is_available() and faiss_has_gpu()), reason="needs CUDA and FAISS GPU"
)


@GPU
@pytest.mark.parametrize("k", [10, FAISS_GPU_MAX_K + 1])
def test_faiss_gpu_flat_matches_brute_force(k):
    database = clustered_unit_vectors(6000, 32, seed=0)
    index = make_index("auto", torch.device("cuda"), len(database))
    assert isinstance(index, FaissGpuFlatIndex)
    index.build(database.cuda())
    _, rows = index.search(QUERIES.cuda(), k)
    assert rows.device.type == "cuda"
    assert recall(rows.cpu(), exact_top_k(QUERIES, database, k)) == 1.0


@GPU
def test_gpu_loss_matches_cpu_loss():
    cpu = mined_loss(index="flat")
    gpu = mined_loss(index="auto").cuda()
    for embeddings, lonlat, ids in batches(5):
        expected = cpu(embeddings, lonlat, ids).item()
        value = gpu(embeddings.cuda(), lonlat.cuda(), ids.cuda()).item()
        assert value == pytest.approx(expected, abs=1e-4)


def test_faiss_backend_on_accelerator_raises():
    with pytest.raises(ValueError, match=r"index='flat' runs FAISS on the CPU but the bank is on meta"):
        make_index("flat", torch.device("meta"), 1000)


def test_unknown_backend_raises():
    with pytest.raises(ValueError, match=r"index must be one of"):
        make_index("annoy", torch.device("cpu"), 10)


def mined_loss(**overrides) -> MemoryBankSpatialLoss:
    options = {
        "embedding_dim": 8,
        "distance_threshold": 300.0,
        "negative_threshold": 600.0,
        "memory_size": 64,
        "num_negatives": 6,
    }
    options.update(overrides)
    return MemoryBankSpatialLoss(**options)


def batches(num_batches: int, batch_size: int = 24):
    lonlat = clustered_lonlat(num_batches * batch_size, seed=21)
    for step in range(num_batches):
        rows = slice(step * batch_size, (step + 1) * batch_size)
        ids = torch.arange(step * batch_size, (step + 1) * batch_size)
        yield random_embeddings(batch_size, 8, seed=step, dtype=torch.float32), lonlat[rows], ids


def test_every_backend_gives_same_loss_when_exact():
    # IVF probing all cells and HNSW with a search list as large as the bank are exact.
    criteria = {
        "flat": mined_loss(index="flat"),
        "torch": mined_loss(index="torch"),
        "ivf": mined_loss(index="ivf", index_options={"nlist": 1, "nprobe": 1}),
        "hnsw": mined_loss(index="hnsw", refresh_every=1, index_options={"ef_search": 64}),
    }
    for batch in batches(6):
        values = {name: criterion(*batch).item() for name, criterion in criteria.items()}
        for name, value in values.items():
            assert value == pytest.approx(values["flat"], abs=1e-5), name


# IVF with one cell probed is exact, so these snapshot tests see staleness and nothing else.
EXACT_IVF = {"nlist": 1, "nprobe": 1}


def test_stale_snapshot_never_yields_overwritten_slots():
    criterion = mined_loss(
        index="ivf", index_options=EXACT_IVF, incremental=False, refresh_every=3
    )
    for batch in batches(9):
        criterion(*batch)
        embeddings, lonlat, ids = batch
        unit = F.normalize(embeddings, dim=1)
        slots, _ = criterion._mine_negatives(unit, lonlat, ids, len(criterion.bank))
        _, pointer, num_added = criterion._index_state
        mined = slots[slots >= 0]
        assert mined.numel() > 0
        assert not criterion.bank.overwritten_since(pointer, num_added, mined).any()
    # The first call finds an empty bank, so the first snapshot is taken at step 1 over 24
    # entries, again at step 2 when the bank has doubled, then every third step.
    assert criterion._index_state[0] == 8


def test_index_rebuilt_after_load_state_dict():
    original = mined_loss(refresh_every=4)
    stream = list(batches(6))
    for batch in stream[:5]:
        original(*batch)
    resumed = mined_loss(refresh_every=4)
    resumed.load_state_dict(original.state_dict())
    assert resumed._index is None
    resumed(*stream[5])
    assert resumed.stats["index_build_time_s"] > 0


@pytest.mark.parametrize("backend", ["flat", "torch"])
def test_exact_index_stays_current_whatever_the_refresh_period(backend):
    # Flat and torch read the bank tensor itself, so no refresh period can make them stale.
    criterion = mined_loss(index=backend, refresh_every=1000, audit_every=1, audit_sample=24)
    recalls = []
    for batch in batches(9):
        criterion(*batch)
        recalls.append(criterion.stats["audit_negative_recall"])
    assert recalls[0] is None
    assert recalls[1:] == [1.0] * 8


def test_audit_detects_stale_snapshot():
    criterion = mined_loss(
        index="ivf",
        index_options=EXACT_IVF,
        incremental=False,
        refresh_every=4,
        audit_every=1,
        audit_sample=24,
    )
    recalls = {}
    for step, batch in enumerate(batches(9)):
        criterion(*batch)
        if step > 0:
            rebuilt = criterion._index_state[0] == step
            recalls[step] = (rebuilt, criterion.stats["audit_negative_recall"])
    assert all(value == 1.0 for rebuilt, value in recalls.values() if rebuilt)
    assert min(value for rebuilt, value in recalls.values() if not rebuilt) < 1.0


def test_audit_off_reports_none():
    criterion = mined_loss()
    for batch in batches(3):
        criterion(*batch)
    assert criterion.stats["audit_negative_recall"] is None


def test_incremental_ivf_tracks_ring_buffer_exactly():
    # One cell probed fully makes IVF exact, so any drift from the bank shows as a difference
    # to the flat index rebuilt every step.
    flat = mined_loss(index="flat")
    incremental = mined_loss(
        index="ivf",
        index_options={"nlist": 1, "nprobe": 1},
        incremental=True,
        refresh_every=1000,
        audit_every=1,
        audit_sample=24,
    )
    for batch in batches(9):
        expected = flat(*batch).item()
        assert incremental(*batch).item() == pytest.approx(expected, abs=1e-5)
    # Built at step 1 and again at step 2, when the bank had doubled; never after.
    assert incremental._index_state[0] == 2
    assert incremental.stats["audit_negative_recall"] == 1.0
    # Nine batches of 24 rows wrapped the 64-slot bank three times.
    assert int(incremental.bank.num_added) == 216


def test_incremental_rejects_hnsw():
    with pytest.raises(ValueError, match=r"incremental=True needs an index that takes row updates"):
        mined_loss(index="hnsw", incremental=True)


def test_ivf_with_pca_quantizer_reaches_recall():
    # Half the width keeps most of the cluster structure; 8 of 32 dimensions gave 0.58 here.
    index = IVFIndex(nprobe=32, quantizer_dim=16)
    index.build(DATABASE)
    _, rows = index.search(QUERIES, 10)
    assert recall(rows, EXPECTED) >= 0.9


def test_ivf_pca_cells_probed_all_equal_exact_search():
    # Cells assigned in the 8-wide PCA space must still hold every full-width row.
    index = IVFIndex(nlist=20, nprobe=20, quantizer_dim=8)
    index.build(DATABASE)
    _, rows = index.search(QUERIES, 10)
    assert recall(rows, EXPECTED) == 1.0


def test_ivf_torch_assignment_matches_faiss_quantizer():
    # Rows are assigned to cells with torch; FAISS's own quantizer picks the cells a query
    # probes. Both must agree, or rows would sit in cells their neighbours never probe.
    index = IVFIndex(nlist=40, quantizer_dim=8)
    index.build(DATABASE)
    data = DATABASE.numpy()
    _, expected = index._quantizer.search(data, 1)
    agreement = (index._assign(data) == expected[:, 0]).mean()
    assert agreement >= 0.999


def test_ivf_update_replaces_rows_with_pca_quantizer():
    index = IVFIndex(nlist=20, nprobe=20, quantizer_dim=8)
    index.build(DATABASE)
    replaced = torch.arange(0, 6000, 3)
    new_rows = clustered_unit_vectors(len(replaced), 32, seed=5)
    index.update(replaced, new_rows)
    database = DATABASE.clone()
    database[replaced] = new_rows
    _, rows = index.search(QUERIES, 10)
    assert recall(rows, exact_top_k(QUERIES, database, 10)) == 1.0


@pytest.mark.parametrize(
    "options, message",
    [
        ({"nprobe": 0}, r"nprobe must be >= 1, got 0"),
        ({"quantizer_dim": 0}, r"quantizer_dim must be >= 1, got 0"),
        ({"training_points_per_cell": 0}, r"training_points_per_cell must be >= 1, got 0"),
    ],
)
def test_ivf_rejects_bad_options(options, message):
    with pytest.raises(ValueError, match=message):
        IVFIndex(**options)


def test_index_rebuilt_each_time_the_filling_bank_doubles():
    criterion = mined_loss(
        index="ivf", index_options=EXACT_IVF, refresh_every=1000, memory_size=400
    )
    builds = []
    for batch in batches(12):
        criterion(*batch)
        build = (criterion._index_state[0], criterion._index_build_size)
        if criterion._index is not None and build not in builds:
            builds.append(build)
    # Batches of 24 entries: built at step 1 over 24 entries, then whenever the bank doubled.
    assert builds == [(1, 24), (2, 48), (4, 96), (8, 192)]
