"""Worker code for the torch.distributed tests: real processes, gloo, a file rendezvous.

A module of its own (not a test module) so that spawned processes import it without
collecting tests. Each case builds the same loss on every rank, feeds it a deterministic
stream of per-rank batches and writes what the parent compares to ``output_dir``.
"""

from __future__ import annotations

import datetime
from pathlib import Path

import torch
import torch.distributed as dist
from conftest import clustered_lonlat

import annloss

DIM = 16
STEPS = 6
# Rows per rank of every case; "unequal" gives the two ranks different batch sizes.
BATCH_SIZES = {"unequal": (5, 3)}
DEFAULT_BATCH = (8, 8)
COUNTED_STATS = ("num_bank_positive_pairs", "num_bank_negative_pairs", "num_positive_pairs")


def make_criterion(case: str) -> annloss.MemoryBankSpatialLoss:
    """The loss of ``case``; the same settings on every rank and in the reference process.

    A case named ``"<case>-sharded"`` is ``<case>`` with the bank split over the ranks.
    """
    common = {"embedding_dim": DIM, "memory_size": 40, "num_negatives": 8, "max_positives": 8}
    if case.endswith("-sharded"):
        common["shard"] = True
        case = case.removesuffix("-sharded")
    if case in ("fixed", "unequal"):
        return annloss.MemoryBankSpatialLoss(distance_threshold=300.0, index="torch", **common)
    if case == "knn-radius":
        policy = annloss.KNNRadius(3, min_radius=50.0, max_radius=800.0)
        return annloss.MemoryBankSpatialLoss(radius=policy, index="flat", **common)
    if case == "scales-triplet":
        scales = [(annloss.QuantileRadius(0.2), 1.0), (600.0, 0.5)]
        return annloss.MemoryBankSpatialLoss(
            scales=scales, loss="triplet", margin=0.5, positive_index="exact", **common
        )
    raise ValueError(f"unknown case {case!r}")


def batch(case: str, step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return ``(embeddings, lonlat, ids)`` of one rank at one step, the same in every process."""
    size = BATCH_SIZES.get(case.removesuffix("-sharded"), DEFAULT_BATCH)[rank]
    seed = 1000 * step + 10 * rank
    lonlat = clustered_lonlat(size, num_clusters=3, spread_deg=3.0, seed=seed % 7)
    # Jitter so that no two rows of the stream share coordinates exactly.
    generator = torch.Generator().manual_seed(seed)
    lonlat = lonlat + torch.rand(size, 2, generator=generator, dtype=torch.float64) * 0.01
    embeddings = torch.randn(size, DIM, generator=generator)
    ids = torch.randint(0, 40, (size,), generator=generator)
    return embeddings, lonlat, ids


def concatenated_batch(case: str, step: int, world_size: int) -> tuple[torch.Tensor, ...]:
    """The batches of every rank at ``step``, concatenated in rank order."""
    parts = [batch(case, step, rank) for rank in range(world_size)]
    return tuple(torch.cat(column) for column in zip(*parts))


def _init(rank: int, world_size: int, output_dir: Path) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{output_dir / 'rendezvous'}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=60),
    )


def run_cases(rank: int, world_size: int, output_dir: str, cases: list[str], save_at: int) -> None:
    """Train every case for ``STEPS`` steps; record the losses and the final state.

    The state of each case after ``save_at`` steps is saved too, as a checkpoint to resume.
    """
    output_dir = Path(output_dir)
    _init(rank, world_size, output_dir)
    try:
        for case in cases:
            criterion = make_criterion(case)
            losses, counts = [], []
            for step in range(STEPS):
                embeddings, lonlat, ids = batch(case, step, rank)
                embeddings.requires_grad_()
                loss = criterion(embeddings, lonlat, ids)
                loss.backward()
                assert embeddings.grad is not None
                losses.append(loss.detach())
                counts.append([criterion.stats[name] for name in ("bank_size", *COUNTED_STATS)])
                if step + 1 == save_at:
                    torch.save(criterion.state_dict(), output_dir / f"{case}-checkpoint-{rank}.pt")
            torch.save(
                {"losses": losses, "counts": counts, "state": criterion.state_dict()},
                output_dir / f"{case}-rank{rank}.pt",
            )
    finally:
        dist.destroy_process_group()


def resume_case(rank: int, world_size: int, output_dir: str, case: str, save_at: int) -> None:
    """Load a checkpoint into a fresh loss and run the remaining steps.

    A shared bank loads rank 0's file on every rank; a sharded one loads its own rank's.
    """
    output_dir = Path(output_dir)
    _init(rank, world_size, output_dir)
    try:
        criterion = make_criterion(case)
        source = rank if case.endswith("-sharded") else 0
        state = torch.load(output_dir / f"{case}-checkpoint-{source}.pt", weights_only=True)
        criterion.load_state_dict(state)
        losses = []
        for step in range(save_at, STEPS):
            embeddings, lonlat, ids = batch(case, step, rank)
            losses.append(criterion(embeddings, lonlat, ids).detach())
        torch.save({"losses": losses}, output_dir / f"{case}-resumed-rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def load_other_shard(rank: int, world_size: int, output_dir: str, case: str) -> None:
    """Load the other rank's shard; the error message goes to a file per rank."""
    output_dir = Path(output_dir)
    _init(rank, world_size, output_dir)
    try:
        criterion = make_criterion(case)
        other = (rank + 1) % world_size
        state = torch.load(output_dir / f"{case}-checkpoint-{other}.pt", weights_only=True)
        try:
            criterion.load_state_dict(state)
        except ValueError as error:
            (output_dir / f"error-{rank}.txt").write_text(str(error))
    finally:
        dist.destroy_process_group()


def mismatched_width(rank: int, world_size: int, output_dir: str) -> None:
    """Rank 1 passes wider embeddings; every rank must raise instead of hanging."""
    output_dir = Path(output_dir)
    _init(rank, world_size, output_dir)
    try:
        width = DIM + rank
        criterion = annloss.MemoryBankSpatialLoss(
            embedding_dim=width, distance_threshold=300.0, memory_size=64, index="torch"
        )
        embeddings, lonlat, _ = batch("fixed", 0, rank)
        try:
            criterion(torch.randn(len(embeddings), width), lonlat)
        except ValueError as error:
            (output_dir / f"error-{rank}.txt").write_text(str(error))
    finally:
        dist.destroy_process_group()


def spawn(function, world_size: int, *args: object) -> None:
    """Run ``function(rank, world_size, *args)`` in ``world_size`` fresh processes.

    Spawned children receive the parent's ``sys.path``, so they import this module by name.
    """
    torch.multiprocessing.start_processes(
        function, args=(world_size, *args), nprocs=world_size, join=True, start_method="spawn"
    )
