"""Per-step cost of sharing or sharding the memory bank across torch.distributed ranks.

Three set-ups score the same per-rank batches against a bank of the same size:

- ``single``: one process, no process group, the batch of one rank;
- ``shared``: ``world_size`` processes (gloo), every rank holding the whole bank;
- ``sharded``: ``world_size`` processes, each holding ``1 / world_size`` of the bank.

A step is the loss forward and backward on a leaf tensor plus the bank update. The bank is
filled before the timed steps. ``comm`` is the time spent inside the loss's collectives, which
includes waiting for the slowest rank. Every process uses ``--threads`` threads, so the
single-process row uses no more cores than one rank.

Run: python benchmarks/distributed_overhead.py --dim 768 --memory-size 16384
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from step_time import geographic_embeddings, load_lonlat

import annloss


def build(args: argparse.Namespace, shard: bool) -> annloss.MemoryBankSpatialLoss:
    return annloss.MemoryBankSpatialLoss(
        embedding_dim=args.dim,
        distance_threshold=100.0,
        memory_size=args.memory_size,
        num_negatives=args.num_negatives,
        index=args.index,
        shard=shard,
    )


def run_steps(args: argparse.Namespace, criterion, rank: int, world_size: int) -> dict:
    """Fill the bank, then time ``args.steps`` steps; return per-step means in ms."""
    lonlat = load_lonlat()
    pool = geographic_embeddings(lonlat, args.dim, noise=0.5, seed=0)
    generator = torch.Generator().manual_seed(rank)

    def step() -> None:
        rows = torch.randint(len(lonlat), (args.batch_size,), generator=generator)
        embeddings = pool[rows].clone().requires_grad_()
        criterion(embeddings, lonlat[rows], rows).backward()

    # Fill with whole steps so the bank's slots and the shards' ranges stay in step.
    for _ in range(-(-args.memory_size // (args.batch_size * world_size))):
        step()
    times, communication = [], []
    for _ in range(args.steps):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
        communication.append(criterion.stats["communication_time_s"])
    return {
        "step_ms": 1000 * statistics.fmean(times),
        "comm_ms": 1000 * statistics.fmean(communication),
    }


def worker(rank: int, world_size: int, args: argparse.Namespace, shard: bool, folder: str) -> None:
    torch.set_num_threads(args.threads)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{Path(folder) / 'rendezvous'}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(minutes=10),
    )
    try:
        result = run_steps(args, build(args, shard), rank, world_size)
        torch.save(result, Path(folder) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def distributed_row(args: argparse.Namespace, shard: bool) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        mp.start_processes(
            worker,
            args=(args.world_size, args, shard, folder),
            nprocs=args.world_size,
            start_method="spawn",
        )
        ranks = [torch.load(Path(folder) / f"rank{r}.pt") for r in range(args.world_size)]
    # The slowest rank sets the pace of a synchronous step.
    return {name: max(rank[name] for rank in ranks) for name in ("step_ms", "comm_ms")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--memory-size", type=int, default=16384)
    parser.add_argument("--batch-size", type=int, default=256, help="rows per rank and step")
    parser.add_argument("--num-negatives", type=int, default=64)
    parser.add_argument("--index", default="auto")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    single = run_steps(args, build(args, shard=False), rank=0, world_size=1)
    rows = {
        "single": single,
        "shared": distributed_row(args, shard=False),
        "sharded": distributed_row(args, shard=True),
    }
    print(
        f"D = {args.dim}, bank {args.memory_size:,}, {args.batch_size} rows per rank, "
        f"{args.world_size} ranks, {args.threads} thread(s) each, index {args.index!r}\n"
    )
    print("| set-up | step ms | in collectives ms | step vs single |")
    print("| --- | ---: | ---: | ---: |")
    for name, row in rows.items():
        ratio = row["step_ms"] / single["step_ms"]
        print(f"| {name} | {row['step_ms']:.1f} | {row['comm_ms']:.1f} | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
