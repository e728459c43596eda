"""Coordinate validation and geographic distances.

Coordinates cross every public API as tensors of shape ``(N, 2)`` in degrees. The column order is
an explicit argument, ``coordinate_order``, which is ``"lonlat"`` by default (GeoJSON and GeoLM order)
or ``"latlon"``. Internally everything is converted once to ``(lat, lon)`` degrees in float64.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

__all__ = [
    "EARTH_RADIUS_KM",
    "WGS84_SEMI_MAJOR_AXIS_M",
    "CoordinateOrder",
    "Metric",
    "epsg4087_to_lonlat",
    "haversine_km",
    "lonlat_to_epsg4087",
    "paired_distance",
    "pairwise_distance",
    "pairwise_haversine_km",
    "to_latlon",
    "unit_vectors",
    "validate_coordinates",
]

#: Mean Earth radius in km (IUGG mean radius R1), used by every great-circle distance here.
EARTH_RADIUS_KM = 6371.0088

CoordinateOrder = Literal["lonlat", "latlon"]
Metric = Literal["haversine", "euclidean"]

_ORDERS = ("lonlat", "latlon")
_METRICS = ("haversine", "euclidean")


def check_coordinate_order(coordinate_order: str) -> None:
    """Raise ``ValueError`` unless ``coordinate_order`` is ``"lonlat"`` or ``"latlon"``."""
    if coordinate_order not in _ORDERS:
        raise ValueError(f"coordinate_order must be 'lonlat' or 'latlon', got {coordinate_order!r}")


def check_metric(metric: str) -> None:
    """Raise ``ValueError`` unless ``metric`` is ``"haversine"`` or ``"euclidean"``."""
    if metric not in _METRICS:
        raise ValueError(f"metric must be 'haversine' or 'euclidean', got {metric!r}")


def _first_bad_row(mask: Tensor) -> int:
    return int(torch.nonzero(mask.reshape(mask.shape[0], -1).any(dim=1))[0, 0])


def validate_coordinates(
    coordinates: Tensor,
    *,
    metric: str = "haversine",
    coordinate_order: str = "lonlat",
    batch_size: int | None = None,
    name: str = "coordinates",
) -> Tensor:
    """Check a coordinate tensor and return it as float64.

    Args:
        coordinates: tensor of shape ``(N, 2)``. For ``metric="haversine"`` the columns are
            degrees in ``coordinate_order``; for ``metric="euclidean"`` they are projected
            ``(x, y)`` values in the caller's units.
        metric: ``"haversine"`` or ``"euclidean"``.
        coordinate_order: ``"lonlat"`` or ``"latlon"``, used only by the haversine range checks.
        batch_size: when given, the required number of rows (the embedding batch length).
        name: the argument name used in error messages.

    Returns:
        The coordinates as a float64 tensor of shape ``(N, 2)`` in the input order.

    Raises:
        TypeError: if ``coordinates`` is not a tensor, or is float16/bfloat16 (too coarse: about
            14 km of resolution near 180 degrees).
        ValueError: on a wrong shape, a length that differs from ``batch_size``, NaN or inf,
            a latitude outside [-90, 90] or a longitude outside [-180, 180].
    """
    check_metric(metric)
    check_coordinate_order(coordinate_order)
    if not isinstance(coordinates, Tensor):
        raise TypeError(
            f"{name} must be a torch.Tensor of shape (N, 2), got {type(coordinates).__name__}; "
            "convert with torch.as_tensor(..., dtype=torch.float64)"
        )
    if coordinates.dtype in (torch.float16, torch.bfloat16):
        raise TypeError(
            f"{name} has dtype {coordinates.dtype}, which cannot hold degrees precisely "
            "(about 14 km resolution near 180 degrees); pass float32 or float64 coordinates"
        )
    if coordinates.dtype == torch.bool or coordinates.is_complex():
        raise TypeError(f"{name} must be a real-valued tensor, got dtype {coordinates.dtype}")
    if coordinates.ndim != 2 or coordinates.shape[1] != 2:
        raise ValueError(
            f"{name} must have shape (N, 2), got {tuple(coordinates.shape)}; "
            "pass one (lon, lat) or (lat, lon) row per embedding"
        )
    if batch_size is not None and coordinates.shape[0] != batch_size:
        raise ValueError(
            f"{name} has {coordinates.shape[0]} rows but the embeddings have {batch_size}; "
            "pass one coordinate row per embedding row"
        )

    coordinates = coordinates.to(torch.float64)
    not_finite = ~torch.isfinite(coordinates)
    if bool(not_finite.any()):
        row = _first_bad_row(not_finite)
        raise ValueError(
            f"{name} contains NaN or inf at row {row}: {coordinates[row].tolist()}; "
            "drop or fix that place before computing the loss"
        )
    if metric == "haversine":
        _check_degree_ranges(coordinates, coordinate_order, name)
    return coordinates


def _check_degree_ranges(coordinates: Tensor, coordinate_order: str, name: str) -> None:
    lat_col, lon_col = (1, 0) if coordinate_order == "lonlat" else (0, 1)
    lat = coordinates[:, lat_col]
    lon = coordinates[:, lon_col]

    bad_lat = lat.abs() > 90.0
    if bool(bad_lat.any()):
        row = _first_bad_row(bad_lat)
        other = "latlon" if coordinate_order == "lonlat" else "lonlat"
        raise ValueError(
            f"{name} row {row} has latitude {float(lat[row])}, outside [-90, 90] degrees, "
            f"with coordinate_order={coordinate_order!r}; the columns may be swapped: "
            f"pass coordinate_order={other!r} if the rows are "
            f"{'(lat, lon)' if other == 'latlon' else '(lon, lat)'}, or convert radians "
            "or projected units to degrees"
        )
    bad_lon = lon.abs() > 180.0
    if bool(bad_lon.any()):
        row = _first_bad_row(bad_lon)
        raise ValueError(
            f"{name} row {row} has longitude {float(lon[row])}, outside [-180, 180] degrees; "
            "wrap it into [-180, 180], or use metric='euclidean' for projected coordinates"
        )


def to_latlon(coordinates: Tensor, coordinate_order: str) -> Tensor:
    """Return ``coordinates`` with columns in ``(lat, lon)`` order."""
    check_coordinate_order(coordinate_order)
    if coordinate_order == "lonlat":
        return coordinates.flip(-1)
    return coordinates


def _haversine_from_latlon(lat1: Tensor, lon1: Tensor, lat2: Tensor, lon2: Tensor) -> Tensor:
    # The haversine form keeps metre-scale accuracy in float64, where the spherical law of
    # cosines loses it to cancellation. Clamping keeps asin's argument in [0, 1], which rounding
    # can push past 1 for antipodal points.
    lat1, lon1, lat2, lon2 = (torch.deg2rad(t) for t in (lat1, lon1, lat2, lon2))
    half_dlat = torch.sin((lat2 - lat1) / 2)
    half_dlon = torch.sin((lon2 - lon1) / 2)
    a = half_dlat**2 + torch.cos(lat1) * torch.cos(lat2) * half_dlon**2
    return 2.0 * EARTH_RADIUS_KM * torch.asin(torch.sqrt(a.clamp(0.0, 1.0)))


def haversine_km(
    coordinates1: Tensor, coordinates2: Tensor, *, coordinate_order: str = "lonlat"
) -> Tensor:
    """Great-circle distance in km between matching rows, computed in float64.

    Args:
        coordinates1: ``(..., 2)`` degrees in ``coordinate_order``.
        coordinates2: ``(..., 2)`` degrees, broadcastable against ``coordinates1``.
        coordinate_order: ``"lonlat"`` (default) or ``"latlon"``.

    Returns:
        A float64 tensor of the broadcast shape without the last dimension, in km.
    """
    a = to_latlon(coordinates1.to(torch.float64), coordinate_order)
    b = to_latlon(coordinates2.to(torch.float64), coordinate_order)
    return _haversine_from_latlon(a[..., 0], a[..., 1], b[..., 0], b[..., 1])


def pairwise_haversine_km(
    coordinates1: Tensor, coordinates2: Tensor, *, coordinate_order: str = "lonlat"
) -> Tensor:
    """Great-circle distances in km between every row of two sets, in float64.

    Shape:
        - coordinates1: ``(N, 2)`` degrees; coordinates2: ``(M, 2)`` degrees.
        - output: ``(N, M)`` km.
    """
    return haversine_km(
        coordinates1[:, None, :], coordinates2[None, :, :], coordinate_order=coordinate_order
    )


def unit_vectors(coordinates: Tensor, *, coordinate_order: str = "lonlat") -> Tensor:
    """Map degree coordinates to points on the unit sphere, in float64.

    The dot product of two such vectors is the cosine of their central angle, so ranking by dot
    product ranks by great-circle distance and costs one matrix product instead of the
    trigonometry of a haversine per pair.

    Shape:
        - coordinates: ``(..., 2)`` degrees in ``coordinate_order``.
        - output: ``(..., 3)``.
    """
    latlon = torch.deg2rad(to_latlon(coordinates.to(torch.float64), coordinate_order))
    lat, lon = latlon[..., 0], latlon[..., 1]
    return torch.stack([lat.cos() * lon.cos(), lat.cos() * lon.sin(), lat.sin()], dim=-1)


def radius_to_cosine(radius_km: float) -> float:
    """Cosine of the central angle that spans ``radius_km`` of great-circle distance."""
    return math.cos(min(math.pi, radius_km / EARTH_RADIUS_KM))


def paired_distance(
    coordinates1: Tensor,
    coordinates2: Tensor,
    *,
    metric: str = "haversine",
    coordinate_order: str = "lonlat",
) -> Tensor:
    """Spatial distance in float64 between broadcast rows of two coordinate tensors.

    ``metric="haversine"`` gives great-circle km between degree coordinates;
    ``metric="euclidean"`` gives straight-line distance in the caller's projected units.

    Shape:
        - coordinates1, coordinates2: ``(..., 2)``, broadcastable against each other.
        - output: the broadcast shape without the last dimension.
    """
    check_metric(metric)
    if metric == "haversine":
        return haversine_km(coordinates1, coordinates2, coordinate_order=coordinate_order)
    difference = coordinates1.to(torch.float64) - coordinates2.to(torch.float64)
    return torch.sqrt((difference**2).sum(-1))


def pairwise_distance(
    coordinates1: Tensor,
    coordinates2: Tensor,
    *,
    metric: str = "haversine",
    coordinate_order: str = "lonlat",
) -> Tensor:
    """Spatial distances in float64 between every row of two sets (see :func:`paired_distance`).

    Shape:
        - coordinates1: ``(N, 2)``; coordinates2: ``(M, 2)``.
        - output: ``(N, M)``.
    """
    return paired_distance(
        coordinates1[:, None, :],
        coordinates2[None, :, :],
        metric=metric,
        coordinate_order=coordinate_order,
    )


#: Semi-major axis of the WGS 84 ellipsoid in metres, the scale of EPSG:4087.
WGS84_SEMI_MAJOR_AXIS_M = 6378137.0
# Largest |x| and |y| of EPSG:4087: half the equator and a quarter meridian at that scale.
_EPSG4087_MAX_X = math.pi * WGS84_SEMI_MAJOR_AXIS_M
_EPSG4087_MAX_Y = math.pi / 2 * WGS84_SEMI_MAJOR_AXIS_M


def lonlat_to_epsg4087(
    coordinates: Tensor,
    *,
    coordinate_order: str = "lonlat",
    distance_norm_factor: float = 1.0,
) -> Tensor:
    """Project degrees to EPSG:4087 (WGS 84 / World Equidistant Cylindrical) ``(x, y)``.

    ``x = a * lon`` and ``y = a * lat`` with the angles in radians and ``a`` the WGS 84
    semi-major axis, as PROJ computes EPSG:4087 (for example through pyproj with
    ``always_xy=True``). The result is divided by ``distance_norm_factor``: GeoLM feeds its
    model EPSG:4087 metres divided by 100.

    Args:
        coordinates: ``(N, 2)`` degrees in ``coordinate_order``.
        distance_norm_factor: metres per output unit. Default: 1 (metres).

    Returns:
        ``(N, 2)`` float64 ``(x, y)``, ``x`` east and ``y`` north.
    """
    coordinates = validate_coordinates(coordinates, coordinate_order=coordinate_order)
    factor = _check_norm_factor(distance_norm_factor)
    latlon = to_latlon(coordinates, coordinate_order)
    xy = torch.deg2rad(latlon.flip(1)) * WGS84_SEMI_MAJOR_AXIS_M
    return xy / factor


def epsg4087_to_lonlat(
    xy: Tensor,
    *,
    distance_norm_factor: float = 1.0,
    coordinate_order: str = "lonlat",
) -> Tensor:
    """Convert EPSG:4087 ``(x, y)`` back to degrees, the inverse of :func:`lonlat_to_epsg4087`.

    Use it to compute haversine distances (and radii in km) from coordinates that a pipeline
    keeps in projected units.

    Args:
        xy: ``(N, 2)`` ``(x, y)`` in units of ``distance_norm_factor`` metres.
        distance_norm_factor: metres per input unit, e.g. 100 for GeoLM's model inputs.
            Default: 1 (metres).
        coordinate_order: column order of the result. Default: ``"lonlat"``.

    Returns:
        ``(N, 2)`` float64 degrees in ``coordinate_order``.

    Raises:
        ValueError: if a point lies outside EPSG:4087's extent (``|x| <= pi * a``,
            ``|y| <= pi / 2 * a``), which usually means a wrong ``distance_norm_factor``.
    """
    xy = validate_coordinates(xy, metric="euclidean", name="xy")
    check_coordinate_order(coordinate_order)
    metres = xy * _check_norm_factor(distance_norm_factor)
    # A little slack keeps points on the edge, which rounding can push just outside it.
    outside = (metres[:, 0].abs() > _EPSG4087_MAX_X * (1 + 1e-9)) | (
        metres[:, 1].abs() > _EPSG4087_MAX_Y * (1 + 1e-9)
    )
    if bool(outside.any()):
        row = _first_bad_row(outside)
        raise ValueError(
            f"xy row {row} is {metres[row].tolist()} m after multiplying by "
            f"distance_norm_factor={distance_norm_factor}, outside EPSG:4087's extent "
            f"(|x| <= {_EPSG4087_MAX_X:.0f}, |y| <= {_EPSG4087_MAX_Y:.0f} m); check the "
            "factor (GeoLM's model inputs use 100) and that the columns are (x, y)"
        )
    lonlat = torch.rad2deg(metres / WGS84_SEMI_MAJOR_AXIS_M)
    return lonlat if coordinate_order == "lonlat" else lonlat.flip(1)


def _check_norm_factor(distance_norm_factor: float) -> float:
    if (
        isinstance(distance_norm_factor, bool)
        or not isinstance(distance_norm_factor, (int, float))
        or not math.isfinite(distance_norm_factor)
        or distance_norm_factor <= 0
    ):
        raise ValueError(
            f"distance_norm_factor must be a finite number > 0 (metres per unit), "
            f"got {distance_norm_factor!r}"
        )
    return float(distance_norm_factor)
