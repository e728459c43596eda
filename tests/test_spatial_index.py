import pytest
import reference
import torch
from conftest import clustered_lonlat, random_embeddings

from annloss import MemoryBankSpatialLoss
from annloss.spatial_index import BallTreeRadiusIndex, exact_radius_candidates, nearest_per_row


def edge_case_lonlat() -> torch.Tensor:
    """Places around the antimeridian and both poles, plus clustered places elsewhere."""
    generator = torch.Generator().manual_seed(5)
    antimeridian = torch.stack(
        [torch.rand(60, generator=generator) * 4 + 178, torch.rand(60, generator=generator) * 6 - 3],
        dim=1,
    ).double()
    antimeridian[:, 0] = (antimeridian[:, 0] + 180) % 360 - 180
    north = torch.stack(
        [torch.rand(40, generator=generator) * 360 - 180, 88 + torch.rand(40, generator=generator) * 2],
        dim=1,
    ).double()
    south = north * torch.tensor([1.0, -1.0], dtype=torch.float64)
    return torch.cat([antimeridian, north, south, clustered_lonlat(100, seed=6)])


def brute_force_pairs(anchors, references, radius, distance_fn=reference.haversine_km):
    return {
        (a, r)
        for a in range(len(anchors))
        for r in range(len(references))
        if distance_fn(anchors[a], references[r]) < radius
    }


POINTS = edge_case_lonlat()
ANCHORS = POINTS[::7]


@pytest.mark.parametrize("radius", [50.0, 300.0, 2000.0])
def test_balltree_matches_brute_force_haversine(radius):
    tree = BallTreeRadiusIndex("haversine", "lonlat")
    tree.build(POINTS)
    rows, slots, distance = tree.query(ANCHORS, radius)
    found = set(zip(rows.tolist(), slots.tolist()))
    expected = brute_force_pairs(ANCHORS, POINTS, radius)
    assert found == expected
    for a, s, d in zip(rows.tolist(), slots.tolist(), distance.tolist()):
        assert d == pytest.approx(reference.haversine_km(ANCHORS[a], POINTS[s]), abs=1e-8)


def test_balltree_crosses_antimeridian_and_pole():
    anchors = torch.tensor([[179.95, 0.0], [0.0, 89.9]], dtype=torch.float64)
    # 11 km east across the antimeridian; 22 km away across the north pole; far points.
    points = torch.tensor(
        [[-179.95, 0.0], [180.0, 89.9], [170.0, 0.0], [0.0, 80.0]], dtype=torch.float64
    )
    tree = BallTreeRadiusIndex("haversine", "lonlat")
    tree.build(points)
    rows, slots, distance = tree.query(anchors, 50.0)
    assert set(zip(rows.tolist(), slots.tolist())) == {(0, 0), (1, 1)}
    assert sorted(distance.tolist()) == pytest.approx([11.12, 22.24], abs=0.01)


@pytest.mark.parametrize("radius, k", [(50.0, 3), (300.0, 5), (2000.0, 20)])
def test_balltree_nearest_matches_brute_force(radius, k):
    tree = BallTreeRadiusIndex("haversine", "lonlat")
    tree.build(POINTS)
    rows, slots, distance, saturated = tree.query_nearest(ANCHORS, radius, k)
    for anchor in range(len(ANCHORS)):
        distances = sorted(
            (reference.haversine_km(ANCHORS[anchor], point), slot)
            for slot, point in enumerate(POINTS)
        )
        inside = [slot for d, slot in distances[:k] if d < radius]
        found = slots[rows == anchor].tolist()
        assert sorted(found) == sorted(inside), anchor
        # Saturated exactly when the k-th nearest lies inside the radius.
        assert bool(saturated[anchor]) == (distances[k - 1][0] < radius), anchor
    expected = [reference.haversine_km(ANCHORS[a], POINTS[s]) for a, s in zip(rows, slots)]
    assert distance.tolist() == pytest.approx(expected, abs=1e-8)


@pytest.mark.parametrize("radius", [50.0, 300.0])
def test_exact_scan_matches_brute_force_haversine(radius):
    slots = torch.arange(len(POINTS)) + 1000
    rows, found_slots, _ = exact_radius_candidates(
        ANCHORS, POINTS, slots, radius, metric="haversine", coordinate_order="lonlat"
    )
    found = {(a, s - 1000) for a, s in zip(rows.tolist(), found_slots.tolist())}
    assert found == brute_force_pairs(ANCHORS, POINTS, radius)


def test_latlon_order_gives_same_pairs():
    tree = BallTreeRadiusIndex("haversine", "latlon")
    tree.build(POINTS.flip(1))
    rows, slots, _ = tree.query(ANCHORS.flip(1), 300.0)
    assert set(zip(rows.tolist(), slots.tolist())) == brute_force_pairs(ANCHORS, POINTS, 300.0)


def test_euclidean_balltree_and_scan_match_brute_force():
    metres = POINTS * 100_000.0
    anchors = metres[::7]
    expected = brute_force_pairs(anchors, metres, 200_000.0, reference.euclidean)
    tree = BallTreeRadiusIndex("euclidean", "lonlat")
    tree.build(metres)
    rows, slots, _ = tree.query(anchors, 200_000.0)
    assert set(zip(rows.tolist(), slots.tolist())) == expected
    rows, slots, _ = exact_radius_candidates(
        anchors, metres, torch.arange(len(metres)), 200_000.0,
        metric="euclidean", coordinate_order="lonlat",
    )
    assert set(zip(rows.tolist(), slots.tolist())) == expected


def test_nearest_per_row_keeps_k_nearest_in_order():
    rows = torch.tensor([0, 2, 0, 0, 2, 0])
    slots = torch.tensor([10, 20, 11, 12, 21, 13])
    distance = torch.tensor([5.0, 1.0, 2.0, 9.0, 0.5, 1.0], dtype=torch.float64)
    result = nearest_per_row(rows, slots, distance, num_rows=3, k=3)
    assert result.tolist() == [[13, 11, 10], [-1, -1, -1], [21, 20, -1]]


def test_query_before_build_raises():
    with pytest.raises(RuntimeError, match=r"call build\(\)"):
        BallTreeRadiusIndex("haversine", "lonlat").query(ANCHORS, 10.0)


@pytest.mark.parametrize("refresh_every", [None, 1, 3])
def test_balltree_positives_equal_exact_positives(refresh_every):
    options = {
        "embedding_dim": 8,
        "distance_threshold": 300.0,
        "negative_threshold": 600.0,
        "memory_size": 50,
        "num_negatives": 4,
        "max_positives": 5,
        "refresh_every": refresh_every,
    }
    exact = MemoryBankSpatialLoss(positive_index="exact", **options)
    tree = MemoryBankSpatialLoss(positive_index="balltree", **options)
    lonlat = clustered_lonlat(400, num_clusters=2, seed=8)
    for step in range(12):
        rows = slice(step * 20, (step + 1) * 20)
        ids = torch.arange(step * 20, (step + 1) * 20) % 90
        embeddings = random_embeddings(20, 8, seed=step, dtype=torch.float32)
        coordinates = lonlat[rows]
        if step > 0:
            expected = exact._mine_positives(coordinates, ids, len(exact.bank))
            found = tree._mine_positives(coordinates, ids, len(tree.bank))
            assert torch.equal(found, expected), step
        exact(embeddings, coordinates, ids)
        tree(embeddings, coordinates, ids)
        assert tree.stats["num_bank_positive_pairs"] == exact.stats["num_bank_positive_pairs"]
    assert exact.stats["num_bank_positive_pairs"] > 0


def test_balltree_positives_fall_back_when_nearest_are_filtered():
    # 40 copies of the anchor's own entity sit on it, so the id filter drops every nearest row
    # fetched from the tree. The other entities, 5-30 km away, must still be found.
    options = {"embedding_dim": 4, "distance_threshold": 50.0, "memory_size": 64,
               "num_negatives": 1, "max_positives": 5}
    exact = MemoryBankSpatialLoss(positive_index="exact", **options)
    tree = MemoryBankSpatialLoss(positive_index="balltree", **options)
    anchor = torch.tensor([[10.0, 45.0]], dtype=torch.float64)
    copies = anchor.expand(40, 2)
    others = anchor + torch.linspace(0.05, 0.3, 12, dtype=torch.float64)[:, None] * torch.tensor(
        [[1.0, 0.0]], dtype=torch.float64
    )
    coordinates = torch.cat([copies, others])
    ids = torch.cat([torch.full((40,), 7), torch.arange(100, 112)])
    for criterion in (exact, tree):
        criterion.bank.add(random_embeddings(52, 4, dtype=torch.float32), coordinates, ids)
    expected = exact._mine_positives(anchor, torch.tensor([7]), 52)
    found = tree._mine_positives(anchor, torch.tensor([7]), 52)
    assert expected.tolist() == [[40, 41, 42, 43, 44]]
    assert torch.equal(found, expected)
