import math

import numpy as np
import pyproj
import pytest
import reference
import torch
from sklearn.metrics.pairwise import haversine_distances

import annloss
from annloss import EARTH_RADIUS_KM, haversine_km, pairwise_distance, validate_coordinates


def lonlat(*rows):
    return torch.tensor(rows, dtype=torch.float64)


def test_haversine_one_degree_on_equator():
    distance = haversine_km(lonlat([0.0, 0.0]), lonlat([1.0, 0.0]))
    assert float(distance) == pytest.approx(2 * math.pi * EARTH_RADIUS_KM / 360, abs=1e-9)


def test_haversine_pole_to_equator():
    distance = haversine_km(lonlat([17.0, 90.0]), lonlat([-40.0, 0.0]))
    assert float(distance) == pytest.approx(math.pi * EARTH_RADIUS_KM / 2, abs=1e-9)


def test_haversine_zero_distance():
    distance = haversine_km(lonlat([151.2, -33.9]), lonlat([151.2, -33.9]))
    assert float(distance) == 0.0


def test_haversine_antipodes_finite():
    points = lonlat([0.0, 0.0], [180.0, 0.0], [45.0, 30.0], [-135.0, -30.0])
    distance = haversine_km(points[[0, 2]], points[[1, 3]])
    assert torch.isfinite(distance).all()
    assert distance.tolist() == pytest.approx([math.pi * EARTH_RADIUS_KM] * 2, abs=1e-6)


def test_haversine_metre_scale():
    # 1 m east along the equator, and 1 m north at 60 degrees latitude.
    one_metre_deg = math.degrees(1e-3 / EARTH_RADIUS_KM)
    east = haversine_km(lonlat([10.0, 0.0]), lonlat([10.0 + one_metre_deg, 0.0]))
    north = haversine_km(lonlat([10.0, 60.0]), lonlat([10.0, 60.0 + one_metre_deg]))
    assert float(east) == pytest.approx(1e-3, abs=1e-9)
    assert float(north) == pytest.approx(1e-3, abs=1e-9)


def test_haversine_london_paris():
    # London and Paris are about 343.5 km apart on a sphere of radius 6371 km.
    distance = haversine_km(lonlat([-0.1278, 51.5074]), lonlat([2.3522, 48.8566]))
    assert float(distance) == pytest.approx(343.5, abs=0.5)


def test_pairwise_matches_sklearn_haversine():
    points = reference_points()
    expected = haversine_distances(np.radians(points.numpy()[:, ::-1])) * EARTH_RADIUS_KM
    actual = pairwise_distance(points, points).numpy()
    np.testing.assert_allclose(actual, expected, rtol=1e-12, atol=1e-8)


def test_pairwise_matches_loop_reference():
    points = reference_points()
    actual = pairwise_distance(points, points)
    for i in range(len(points)):
        for j in range(len(points)):
            expected = reference.haversine_km(points[i], points[j])
            assert float(actual[i, j]) == pytest.approx(expected, abs=1e-8)


def test_latlon_order_gives_same_distances():
    points = reference_points()
    lonlat_distance = pairwise_distance(points, points, coordinate_order="lonlat")
    latlon_distance = pairwise_distance(points.flip(1), points.flip(1), coordinate_order="latlon")
    torch.testing.assert_close(lonlat_distance, latlon_distance, rtol=0, atol=0)


def test_euclidean_in_projected_units():
    points = torch.tensor([[0.0, 0.0], [3000.0, 4000.0]], dtype=torch.float64)
    distance = pairwise_distance(points, points, metric="euclidean")
    assert distance.tolist() == [[0.0, 5000.0], [5000.0, 0.0]]


def reference_points():
    # Spans the antimeridian, both poles' neighbourhoods and the equator.
    return lonlat(
        [179.9, 10.0],
        [-179.9, 10.0],
        [0.0, 89.99],
        [120.0, 89.99],
        [0.0, -89.5],
        [-0.1278, 51.5074],
        [139.69, 35.69],
        [-58.38, -34.60],
    )


@pytest.mark.parametrize(
    "bad, message",
    [
        (lonlat([0.0, float("nan")]), r"NaN or inf at row 0"),
        (lonlat([0.0, 0.0], [float("inf"), 1.0]), r"NaN or inf at row 1"),
        (lonlat([0.0, 0.0], [10.0, 95.0]), r"latitude 95.0, outside \[-90, 90\].*swapped"),
        (lonlat([200.0, 10.0]), r"longitude 200.0, outside \[-180, 180\]"),
        (torch.zeros(3, 3, dtype=torch.float64), r"shape \(N, 2\), got \(3, 3\)"),
        (torch.zeros(4, dtype=torch.float64), r"shape \(N, 2\), got \(4,\)"),
    ],
)
def test_invalid_coordinates_raise(bad, message):
    with pytest.raises(ValueError, match=message):
        validate_coordinates(bad)


def test_swapped_latlon_names_the_fix():
    # Rows of (lat, lon) passed with the default lon-lat order: Tokyo's longitude 139.7
    # lands in the latitude column.
    with pytest.raises(ValueError, match=r"coordinate_order='latlon'"):
        validate_coordinates(lonlat([35.69, 139.69]))


def test_latlon_order_checks_first_column():
    with pytest.raises(ValueError, match=r"latitude 139.69"):
        validate_coordinates(lonlat([139.69, 35.69]), coordinate_order="latlon")


def test_batch_length_mismatch_raises():
    with pytest.raises(ValueError, match=r"3 rows but the embeddings have 4"):
        validate_coordinates(torch.zeros(3, 2, dtype=torch.float64), batch_size=4)


def test_half_precision_coordinates_raise():
    with pytest.raises(TypeError, match=r"float16.*pass float32 or float64"):
        validate_coordinates(torch.zeros(2, 2, dtype=torch.float16))


def test_non_tensor_coordinates_raise():
    with pytest.raises(TypeError, match=r"torch.Tensor of shape \(N, 2\), got list"):
        validate_coordinates([[0.0, 0.0]])


def test_euclidean_skips_degree_ranges():
    projected = torch.tensor([[1.0e6, 5.0e6]], dtype=torch.float64)
    assert validate_coordinates(projected, metric="euclidean").tolist() == [[1.0e6, 5.0e6]]


def test_unknown_order_and_metric_raise():
    with pytest.raises(ValueError, match=r"coordinate_order must be 'lonlat' or 'latlon'"):
        validate_coordinates(lonlat([0.0, 0.0]), coordinate_order="xy")
    with pytest.raises(ValueError, match=r"metric must be 'haversine' or 'euclidean'"):
        validate_coordinates(lonlat([0.0, 0.0]), metric="manhattan")


# EPSG:4087 coordinates of known places, computed by PROJ through pyproj 3.7.2
# (Transformer.from_crs("EPSG:4326", "EPSG:4087", always_xy=True)).
EPSG4087_POINTS = [
    ((0.0, 0.0), (0.0, 0.0)),
    ((180.0, 0.0), (20037508.342789244, 0.0)),
    ((0.0, 45.0), (0.0, 5009377.085697311)),
    ((0.0, 90.0), (0.0, 10018754.171394622)),
    ((2.3522, 48.8566), (261845.70624393807, 5438691.8338906495)),  # Paris
    ((-74.006, 40.7128), (-8238310.235647004, 4532128.1647683885)),  # New York
]


@pytest.mark.parametrize(("lonlat", "expected"), EPSG4087_POINTS)
def test_epsg4087_projection_of_known_points(lonlat, expected):
    xy = annloss.lonlat_to_epsg4087(torch.tensor([lonlat], dtype=torch.float64))
    torch.testing.assert_close(
        xy[0], torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-6
    )
    back = annloss.epsg4087_to_lonlat(torch.tensor([expected], dtype=torch.float64))
    torch.testing.assert_close(
        back[0], torch.tensor(lonlat, dtype=torch.float64), rtol=0, atol=1e-9
    )


def test_epsg4087_matches_pyproj_on_random_points():
    generator = torch.Generator().manual_seed(0)
    lonlat = torch.rand(1000, 2, generator=generator, dtype=torch.float64)
    lonlat = lonlat * torch.tensor([360.0, 180.0], dtype=torch.float64) - torch.tensor(
        [180.0, 90.0]
    )
    transformer = pyproj.Transformer.from_crs("EPSG:4326", "EPSG:4087", always_xy=True)
    x, y = transformer.transform(lonlat[:, 0].numpy(), lonlat[:, 1].numpy())
    expected = torch.stack([torch.from_numpy(x), torch.from_numpy(y)], dim=1)
    torch.testing.assert_close(annloss.lonlat_to_epsg4087(lonlat), expected, rtol=0, atol=1e-6)


def test_epsg4087_norm_factor_and_latlon_order():
    paris_latlon = torch.tensor([[48.8566, 2.3522]], dtype=torch.float64)
    xy = annloss.lonlat_to_epsg4087(
        paris_latlon, coordinate_order="latlon", distance_norm_factor=100
    )
    expected = torch.tensor([[2618.4570624393807, 54386.918338906495]], dtype=torch.float64)
    torch.testing.assert_close(xy, expected, rtol=0, atol=1e-8)
    back = annloss.epsg4087_to_lonlat(xy, distance_norm_factor=100, coordinate_order="latlon")
    torch.testing.assert_close(back, paris_latlon, rtol=0, atol=1e-9)


def test_epsg4087_round_trip_keeps_haversine_distances():
    lonlat = torch.tensor([[13.405, 52.52], [2.3522, 48.8566]], dtype=torch.float64)
    back = annloss.epsg4087_to_lonlat(
        annloss.lonlat_to_epsg4087(lonlat, distance_norm_factor=100), distance_norm_factor=100
    )
    # Berlin to Paris, about 878 km.
    distance = annloss.haversine_km(back[:1], back[1:], coordinate_order="lonlat")
    assert 870 < float(distance) < 885
    torch.testing.assert_close(back, lonlat, rtol=0, atol=1e-9)


def test_epsg4087_rejects_points_outside_the_extent():
    # Metres passed as if they were GeoLM's hundreds of metres.
    xy = torch.tensor([[261845.7, 5438691.8]], dtype=torch.float64)
    with pytest.raises(ValueError, match="distance_norm_factor=100, outside EPSG:4087's extent"):
        annloss.epsg4087_to_lonlat(xy, distance_norm_factor=100)


@pytest.mark.parametrize("factor", [0, -1.0, float("nan"), True])
def test_epsg4087_rejects_invalid_norm_factor(factor):
    with pytest.raises(ValueError, match="distance_norm_factor must be a finite number > 0"):
        annloss.lonlat_to_epsg4087(torch.zeros(1, 2), distance_norm_factor=factor)
