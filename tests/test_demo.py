"""Tests of the demo: data preparation, tokeniser, metrics, report and one tiny end-to-end run."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from annloss.cli import main
from annloss.coordinates import EARTH_RADIUS_KM, pairwise_haversine_km
from annloss.demo import DemoConfig, InvalidConfigError, run_demo
from annloss.demo.data import (
    find_neighbours,
    format_nl_text,
    load_places,
    neighbour_offsets_km,
    split_places,
)
from annloss.demo.evaluate import (
    HeldOutEvaluator,
    distance_spearman,
    geographic_neighbours,
    nearest_neighbour_distances_km,
    neighbour_recall_at_k,
    sample_pairs,
)
from annloss.demo.report import format_table
from annloss.demo.tokenizer import PADDING_ID, HashingTokenizer

KM_PER_DEGREE = np.pi * EARTH_RADIUS_KM / 180.0


@pytest.fixture(scope="module")
def table():
    return load_places()


def uniform_sphere_lonlat(num_places: int, seed: int) -> np.ndarray:
    """(n, 2) [lon, lat] degrees, uniform on the sphere."""
    rng = np.random.default_rng(seed)
    lon = rng.uniform(-180.0, 180.0, num_places)
    lat = np.degrees(np.arcsin(rng.uniform(-1.0, 1.0, num_places)))
    return np.stack([lon, lat], axis=1)


def unit_xyz(lonlat: np.ndarray) -> np.ndarray:
    lon, lat = np.radians(lonlat[:, 0]), np.radians(lonlat[:, 1])
    return np.stack([np.cos(lat) * np.cos(lon), np.cos(lat) * np.sin(lon), np.sin(lat)], axis=1)


# Metrics


def test_recall_of_sphere_embeddings_is_one():
    # Cosine similarity of unit xyz vectors is the cosine of the great-circle angle, so the
    # embedding neighbours are exactly the geographic ones.
    coordinates = uniform_sphere_lonlat(600, seed=1)
    assert neighbour_recall_at_k(unit_xyz(coordinates), coordinates, 10) == 1.0


def test_recall_of_random_embeddings_is_low():
    coordinates = uniform_sphere_lonlat(600, seed=2)
    embeddings = np.random.default_rng(3).normal(size=(600, 32))
    # Chance level is 10 / 599, about 0.017.
    assert neighbour_recall_at_k(embeddings, coordinates, 10) < 0.05


def test_spearman_of_sphere_embeddings_near_one():
    coordinates = uniform_sphere_lonlat(600, seed=4)
    pairs = sample_pairs(600, 5000, seed=0)
    assert distance_spearman(unit_xyz(coordinates), coordinates, pairs) > 0.999


def test_spearman_of_random_embeddings_near_zero():
    coordinates = uniform_sphere_lonlat(600, seed=5)
    embeddings = np.random.default_rng(6).normal(size=(600, 32))
    pairs = sample_pairs(600, 5000, seed=0)
    assert abs(distance_spearman(embeddings, coordinates, pairs)) < 0.1


def test_nearest_neighbour_distance_of_sphere_embeddings():
    coordinates = uniform_sphere_lonlat(300, seed=7)
    distances = pairwise_haversine_km(torch.from_numpy(coordinates), torch.from_numpy(coordinates))
    distances.fill_diagonal_(float("inf"))
    expected = distances.min(dim=1).values.numpy()
    measured = nearest_neighbour_distances_km(unit_xyz(coordinates), coordinates)
    np.testing.assert_allclose(measured, expected, rtol=1e-9)


def test_geographic_neighbours_exclude_self_at_duplicates():
    # Three places share one coordinate: each must list the other two, never itself.
    coordinates = np.array([[10.0, 50.0], [10.0, 50.0], [10.0, 50.0], [11.0, 50.0], [30.0, 0.0]])
    neighbours = geographic_neighbours(coordinates, 2)
    for row in range(3):
        assert row not in neighbours[row]
        assert set(neighbours[row]) == {0, 1, 2} - {row}


def test_sample_pairs_are_distinct_places():
    pairs = sample_pairs(5, 2000, seed=0)
    assert (pairs[:, 0] != pairs[:, 1]).all()
    assert pairs.min() == 0
    assert pairs.max() == 4


def test_evaluator_returns_four_metrics():
    coordinates = uniform_sphere_lonlat(200, seed=8)
    metrics = HeldOutEvaluator(coordinates, num_pairs=1000).evaluate(unit_xyz(coordinates))
    assert set(metrics) == {
        "neighbour_recall_at_10",
        "neighbour_recall_at_100",
        "median_nn_distance_km",
        "spearman",
    }
    assert metrics["neighbour_recall_at_10"] == 1.0
    assert metrics["neighbour_recall_at_100"] == 1.0


def test_regional_recall_sees_what_local_recall_misses():
    # Embeddings that keep only the coarse position (rounded to 40 degrees, about 40 places per
    # cell here) lose the order inside a cell, so recall@10 falls far more than recall@100.
    coordinates = uniform_sphere_lonlat(1000, seed=9)
    coarse = np.round(coordinates / 40.0) * 40.0
    noise = np.random.default_rng(0).normal(scale=1e-3, size=(1000, 3))
    metrics = HeldOutEvaluator(coordinates, num_pairs=1000).evaluate(unit_xyz(coarse) + noise)
    assert metrics["neighbour_recall_at_10"] < 0.4
    assert metrics["neighbour_recall_at_100"] > metrics["neighbour_recall_at_10"] + 0.3


# Tokeniser


def test_tokenizer_ids_in_range_and_padded():
    tokenizer = HashingTokenizer(num_buckets=97, max_tokens=40)
    encoded = tokenizer.encode(["Saint-Denis", "São Paulo", ""])
    assert encoded.shape == (3, 40)
    assert encoded.dtype == np.int64
    assert encoded.max() <= 97
    assert (encoded[2] == PADDING_ID).all()
    # "saint-denis": 2 words, 1 bigram, and 5 trigrams each of "<saint>" and "<denis>".
    assert (encoded[0] != PADDING_ID).sum() == 13


def test_tokenizer_truncates_trigrams_first():
    tokenizer = HashingTokenizer(num_buckets=2**20, max_tokens=3)
    full = tokenizer.token_ids("Rio de Janeiro")
    assert list(tokenizer.encode(["Rio de Janeiro"])[0]) == full[:3]
    assert tokenizer.pieces("Rio de Janeiro")[:3] == ["w:rio", "w:de", "w:janeiro"]


def test_tokenizer_same_ids_in_other_processes():
    # Python's hash() of str is salted per process; the tokeniser must not depend on it.
    texts = ["Soldeu, 02, Andorra, Europe", "Zürich", "東京"]
    expected = HashingTokenizer().encode(texts).tolist()
    script = (
        "import json, sys; from annloss.demo.tokenizer import HashingTokenizer; "
        "print(json.dumps(HashingTokenizer().encode(json.loads(sys.argv[1])).tolist()))"
    )
    for hash_seed in ("1", "2"):
        environment = {**os.environ, "PYTHONHASHSEED": hash_seed}
        output = subprocess.run(
            [sys.executable, "-c", script, json.dumps(texts)],
            env=environment,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert json.loads(output) == expected


# Data


def test_find_neighbours_matches_brute_force(table):
    subset = np.random.default_rng(0).choice(len(table), size=3000, replace=False)
    coordinates = table.coordinates[subset]
    queries = np.arange(0, 3000, 7)
    neighbours, distances_km = find_neighbours(coordinates, queries, k=8)

    all_distances = pairwise_haversine_km(
        torch.from_numpy(coordinates[queries]), torch.from_numpy(coordinates)
    ).numpy()
    all_distances[np.arange(len(queries)), queries] = np.inf
    expected_distances = np.sort(all_distances, axis=1)[:, :8]

    np.testing.assert_allclose(distances_km, expected_distances, rtol=1e-6, atol=1e-6)
    found_distances = np.take_along_axis(all_distances, neighbours, axis=1)
    np.testing.assert_allclose(found_distances, expected_distances, rtol=1e-6, atol=1e-6)
    assert not (neighbours == queries[:, None]).any()


def test_find_neighbours_skips_self_among_duplicates():
    coordinates = np.array([[5.0, 45.0]] * 4 + [[5.1, 45.0], [6.0, 45.0]])
    neighbours, distances_km = find_neighbours(coordinates, np.arange(4), k=3)
    for row in range(4):
        assert row not in neighbours[row]
        assert set(neighbours[row]) == {0, 1, 2, 3} - {row}
    np.testing.assert_array_equal(distances_km, 0.0)


def test_offsets_point_east_and_north():
    origins = np.array([[0.0, 0.0], [0.0, 0.0], [179.5, 0.0]])
    targets = np.array([[0.0, 1.0], [1.0, 0.0], [-179.5, 0.0]])
    offsets = neighbour_offsets_km(origins, targets)
    np.testing.assert_allclose(offsets[0], [0.0, KM_PER_DEGREE], atol=1e-6)
    np.testing.assert_allclose(offsets[1], [KM_PER_DEGREE, 0.0], atol=1e-6)
    # Across the antimeridian the short way is east.
    np.testing.assert_allclose(offsets[2], [KM_PER_DEGREE, 0.0], atol=1e-6)


def test_nl_text_of_soldeu(table):
    index = int(np.flatnonzero(table.ids == 3038999)[0])
    assert format_nl_text(table, index) == "Soldeu, 02, Andorra, Europe"


def test_table_is_lonlat_degrees(table):
    assert len(table) > 200_000
    assert table.coordinates.dtype == np.float64
    index = int(np.flatnonzero(table.ids == 3038999)[0])
    np.testing.assert_allclose(table.coordinates[index], [1.66769, 42.57688])


def test_split_is_disjoint_and_nested():
    train, held_out = split_places(1000, 100, None, seed=0)
    assert len(np.intersect1d(train, held_out)) == 0
    assert len(train) + len(held_out) == 1000
    _, smaller_held_out = split_places(1000, 40, 200, seed=0)
    np.testing.assert_array_equal(smaller_held_out, held_out[:40])


# Report and CLI


def test_table_prints_missing_time_as_dash():
    rows = [
        {
            "method": "untrained",
            "neighbour_recall_at_10": 0.25,
            "neighbour_recall_at_100": 0.5,
            "median_nn_distance_km": 12.34,
            "spearman": 0.5,
            "train_time_s": None,
        }
    ]
    lines = format_table(rows).splitlines()
    assert lines[0].split()[0] == "method"
    assert lines[2].split() == ["untrained", "0.250", "0.500", "12.3", "0.500", "-"]


@pytest.mark.parametrize(
    "arguments",
    [
        ["demo", "--steps", "0"],
        ["demo", "--batch-size", "x"],
        ["demo", "--seed", "-1"],
        ["demo", "--radius-km", "0"],
        ["demo", "--radius-km", "inf"],
        [],
    ],
)
def test_cli_rejects_bad_arguments(arguments):
    with pytest.raises(SystemExit) as raised:
        main(arguments)
    assert raised.value.code == 2


def test_cli_radius_reaches_config():
    from annloss.cli import _demo_config, build_parser

    arguments = build_parser().parse_args(["demo", "--quick", "--radius-km", "25"])
    assert _demo_config(arguments).distance_threshold_km == 25.0


def test_cli_rejects_bad_device(capsys):
    assert main(["demo", "--quick", "--device", "no-such-device"]) == 2
    assert "no-such-device" in capsys.readouterr().err


def test_cli_rejects_num_eval_beyond_table(tmp_path, capsys):
    output_dir = tmp_path / "out"
    assert main(["demo", "--quiet", "--num-eval", "300000", "--output-dir", str(output_dir)]) == 2
    assert "num_eval=300000" in capsys.readouterr().err
    assert not output_dir.exists()


def test_config_rejects_num_eval_of_one():
    with pytest.raises(InvalidConfigError, match="num_eval"):
        DemoConfig(num_eval=1)


def test_config_rejects_unknown_method():
    with pytest.raises(InvalidConfigError, match=r"methods must be a non-empty selection"):
        DemoConfig(methods=("in_batch", "no_such_method"))


def test_cli_methods_reach_config():
    from annloss.cli import _demo_config, build_parser

    arguments = build_parser().parse_args(["demo", "--methods", "in_batch", "memory_bank"])
    assert _demo_config(arguments).methods == ("in_batch", "memory_bank")


# End to end


def test_tiny_demo_writes_results(tmp_path):
    config = DemoConfig(
        steps=4,
        batch_size=32,
        num_train=1500,
        num_eval=150,
        memory_size=256,
        num_negatives=16,
        eval_every=2,
        num_eval_pairs=500,
        output_dir=tmp_path,
        progress=False,
    )
    results = run_demo(config)

    saved = json.loads((tmp_path / "results.json").read_text())
    assert [row["key"] for row in saved["rows"]] == [
        "untrained",
        "in_batch",
        "memory_bank",
        "memory_bank_adaptive",
        "memory_bank_multiscale",
    ]
    for row in saved["rows"]:
        for metric in (
            "neighbour_recall_at_10",
            "neighbour_recall_at_100",
            "median_nn_distance_km",
            "spearman",
        ):
            assert np.isfinite(row[metric])
    assert saved["rows"][0]["train_time_s"] is None
    assert saved["rows"] == results["rows"]

    in_batch = saved["training"]["in_batch"]
    memory_bank = saved["training"]["memory_bank"]
    assert len(in_batch["losses"]) == 4
    assert len(memory_bank["losses"]) == 4
    assert in_batch["recall_steps"] == [2, 4]
    # Same seed, so the same initial model for both losses.
    assert in_batch["initial_parameter_sum"] == memory_bank["initial_parameter_sum"]
    assert memory_bank["stats"]["bank_size"][-1] > 0
    assert "mining_time_s" in memory_bank["stats"]
    # The fixed radius stays at 100 km; the k-nearest radius adapts within its clamp.
    assert set(memory_bank["stats"]["radius_median"]) == {100.0}
    adaptive = saved["training"]["memory_bank_adaptive"]["stats"]
    assert all(25.0 <= value <= 400.0 for value in adaptive["radius_median"])
    assert "scale2_num_positive_pairs" in saved["training"]["memory_bank_multiscale"]["stats"]

    assert saved["data"]["num_eval"] == 150
    assert saved["data"]["num_train"] == 1500
    png = (tmp_path / "results.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
