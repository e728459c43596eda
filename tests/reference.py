"""Slow float64 references written with Python loops and the math module.

They share no code with annloss beyond the Earth radius, so an error in the vectorised
implementation cannot hide in them.
"""

from __future__ import annotations

import math

import numpy as np

from annloss import EARTH_RADIUS_KM


def haversine_km(lonlat1, lonlat2) -> float:
    lon1, lat1 = (math.radians(float(v)) for v in lonlat1)
    lon2, lat2 = (math.radians(float(v)) for v in lonlat2)
    a = (
        math.sin((lat2 - lat1) / 2) ** 2
        + math.cos(lat1) * math.cos(lat2) * math.sin((lon2 - lon1) / 2) ** 2
    )
    return 2 * EARTH_RADIUS_KM * math.asin(min(1.0, math.sqrt(a)))


def unit_rows(embeddings) -> np.ndarray:
    x = np.asarray(embeddings, dtype=np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def cosine(x, y) -> float:
    return float(np.dot(x, y) / (np.linalg.norm(x) * np.linalg.norm(y)))


def info_nce(anchors, references, positives, negatives, temperature) -> float:
    """Mean over positive pairs of -log(e^{s_ap/t} / (e^{s_ap/t} + sum_n e^{s_an/t})).

    ``positives[a]`` and ``negatives[a]`` list reference indices; anchors missing either are
    skipped. Returns 0.0 when no pair is valid.
    """
    anchors = np.asarray(anchors, dtype=np.float64)
    references = np.asarray(references, dtype=np.float64)
    losses = []
    for a, anchor in enumerate(anchors):
        if not positives[a] or not negatives[a]:
            continue
        negative_sum = sum(
            math.exp(cosine(anchor, references[n]) / temperature) for n in negatives[a]
        )
        for p in positives[a]:
            positive_term = math.exp(cosine(anchor, references[p]) / temperature)
            losses.append(-math.log(positive_term / (positive_term + negative_sum)))
    return float(np.mean(losses)) if losses else 0.0


def triplet(anchors, references, positives, negatives, margin, reduction="nonzero_mean") -> float:
    """Triplet margin loss over all triplets, on Euclidean distance of unit vectors."""
    anchors = unit_rows(anchors)
    references = unit_rows(references)
    losses = []
    for a, anchor in enumerate(anchors):
        for p in positives[a]:
            d_ap = float(np.linalg.norm(anchor - references[p]))
            for n in negatives[a]:
                d_an = float(np.linalg.norm(anchor - references[n]))
                losses.append(max(0.0, d_ap - d_an + margin))
    if reduction == "mean":
        return float(np.mean(losses)) if losses else 0.0
    active = [value for value in losses if value > 0]
    return float(np.mean(active)) if active else 0.0


def euclidean(xy1, xy2) -> float:
    return math.dist([float(v) for v in xy1], [float(v) for v in xy2])


def in_batch_pairs(lonlat, positive_radius, negative_radius, distance_fn=haversine_km):
    """Per-anchor positive and negative batch indices by ``distance_fn`` (great-circle km)."""
    size = len(lonlat)
    positives = [[] for _ in range(size)]
    negatives = [[] for _ in range(size)]
    for a in range(size):
        for j in range(size):
            if a == j:
                continue
            distance = distance_fn(lonlat[a], lonlat[j])
            if distance < positive_radius:
                positives[a].append(j)
            elif distance >= negative_radius:
                negatives[a].append(j)
    return positives, negatives


def mined_pairs(
    batch_embeddings,
    batch_lonlat,
    batch_ids,
    bank_embeddings,
    bank_lonlat,
    bank_ids,
    positive_radius,
    negative_radius,
    max_positives,
    num_negatives,
    distance_fn=haversine_km,
):
    """Brute-force version of the memory-bank mining.

    References are the batch rows followed by the bank rows (index ``B + slot``). Bank positives
    are the ``max_positives`` spatially nearest entries within the positive radius; bank negatives
    the ``num_negatives`` most cosine-similar entries at least the negative radius away. Entries
    sharing the anchor's id are skipped (id -1 never matches).
    """
    batch_embeddings = np.asarray(batch_embeddings, dtype=np.float64)
    bank_embeddings = np.asarray(bank_embeddings, dtype=np.float64)
    positives, negatives = in_batch_pairs(
        batch_lonlat, positive_radius, negative_radius, distance_fn
    )
    batch_size = len(batch_lonlat)
    for a in range(batch_size):
        bank_positive, bank_negative = [], []
        for slot in range(len(bank_lonlat)):
            if batch_ids is not None and bank_ids[slot] != -1 and bank_ids[slot] == batch_ids[a]:
                continue
            distance = distance_fn(batch_lonlat[a], bank_lonlat[slot])
            if distance < positive_radius:
                bank_positive.append((distance, slot))
            if distance >= negative_radius:
                similarity = cosine(batch_embeddings[a], bank_embeddings[slot])
                bank_negative.append((-similarity, slot))
        bank_positive.sort()
        bank_negative.sort()
        positives[a] += [batch_size + slot for _, slot in bank_positive[:max_positives]]
        negatives[a] += [batch_size + slot for _, slot in bank_negative[:num_negatives]]
    return positives, negatives
