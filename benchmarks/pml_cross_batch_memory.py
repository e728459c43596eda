"""Per-step time of pytorch-metric-learning's CrossBatchMemory with grid-cell labels.

CrossBatchMemory needs class labels, so places get the label of their 1 x 1 degree grid cell
(about 111 km north-south), the closest label-based stand-in for a 100 km radius. Each memory
size runs in its own child process under an address-space limit (``resource.setrlimit``), so a
size that runs out of memory is recorded as such instead of taking the machine down.

Run: python benchmarks/pml_cross_batch_memory.py --memory-sizes 4096 16384 65536 --dim 128
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch
from tqdm import tqdm


def child(args: argparse.Namespace) -> None:
    """Time one memory size and print one JSON line; runs inside the capped process."""
    limit = int(args.memory_limit_gib * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    torch.set_num_threads(args.threads)

    from pytorch_metric_learning.losses import CrossBatchMemory, NTXentLoss
    from step_time import geographic_embeddings, load_lonlat

    lonlat = load_lonlat()
    pool = geographic_embeddings(lonlat, args.dim, noise=0.5, seed=0)
    cells = (torch.floor(lonlat[:, 0]) + 180) * 180 + torch.floor(lonlat[:, 1]) + 90
    labels = cells.long()
    generator = torch.Generator().manual_seed(1)

    criterion = CrossBatchMemory(NTXentLoss(temperature=0.1), args.dim, memory_size=args.memory_size)
    # Fill the memory directly so the timed steps see a full queue, as MemoryBankSpatialLoss does
    # in step_time.py. These are CrossBatchMemory's own attributes (pytorch-metric-learning 2.x).
    fill = torch.randint(len(lonlat), (args.memory_size,), generator=generator)
    criterion.embedding_memory[:] = pool[fill]
    criterion.label_memory[:] = labels[fill]
    criterion.has_been_filled = True
    criterion.queue_idx = 0

    def step() -> None:
        index = torch.randint(len(lonlat), (args.batch_size,), generator=generator)
        embeddings = pool[index].clone().requires_grad_()
        criterion(embeddings, labels[index]).backward()

    step()
    started = time.perf_counter()
    for _ in range(args.steps):
        step()
    print(json.dumps({"memory_size": args.memory_size,
                      "step_s": (time.perf_counter() - started) / args.steps,
                      "peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--memory-sizes", type=int, nargs="+", default=[4096, 16_384, 65_536],
                        help="CrossBatchMemory sizes to measure, in entries")
    parser.add_argument("--dim", type=int, default=128, help="embedding width D")
    parser.add_argument("--batch-size", type=int, default=256, help="batch size B")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per size")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--memory-limit-gib", type=float, default=20.0,
                        help="address-space limit of each child process, GiB")
    parser.add_argument("--timeout-s", type=float, default=900.0,
                        help="wall-clock limit of each child process, seconds")
    parser.add_argument("--memory-size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    rows = []
    for memory_size in tqdm(args.memory_sizes, desc="memory sizes"):
        command = [sys.executable, __file__, "--child", "--memory-size", str(memory_size),
                   "--dim", str(args.dim), "--batch-size", str(args.batch_size),
                   "--steps", str(args.steps), "--threads", str(args.threads),
                   "--memory-limit-gib", str(args.memory_limit_gib)]
        try:
            result = subprocess.run(command, capture_output=True, text=True,
                                    timeout=args.timeout_s, check=False)
        except subprocess.TimeoutExpired:
            rows.append({"memory_size": memory_size, "outcome": f"timed out after {args.timeout_s:.0f} s"})
            continue
        if result.returncode == 0:
            rows.append({**json.loads(result.stdout.strip().splitlines()[-1]), "outcome": "ok"})
        elif "MemoryError" in result.stderr or "not enough memory" in result.stderr \
                or "DefaultCPUAllocator" in result.stderr:
            rows.append({"memory_size": memory_size,
                         "outcome": f"out of memory at {args.memory_limit_gib:g} GiB"})
        else:
            last_line = (result.stderr.strip().splitlines() or ["no output"])[-1]
            rows.append({"memory_size": memory_size,
                         "outcome": f"failed with exit code {result.returncode}: {last_line}"})

    print(f"\nCrossBatchMemory(NTXentLoss), B={args.batch_size}, D={args.dim}, 1-degree grid labels")
    print("| memory size M | step (ms) | peak (GiB) | outcome |")
    print("| ---: | ---: | ---: | --- |")
    for row in rows:
        step = f"{1000 * row['step_s']:,.1f}" if "step_s" in row else ""
        peak = f"{row['peak_gib']:.2f}" if "peak_gib" in row else ""
        print(f"| {row['memory_size']:,} | {step} | {peak} | {row['outcome']} |")


if __name__ == "__main__":
    main()
