"""Collectives that keep a memory bank identical, or sharded, across torch.distributed ranks.

Every function takes the process group to use (``None`` means the default group) and must be
called by every rank of that group in the same order, as any collective.

NOTE: the tests run these collectives with gloo on CPU tensors. The NCCL path for CUDA tensors
uses the same calls but has not run on GPUs yet.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["GatheredBatch", "all_reduce_sum", "gather_batch", "resolve_group", "world_info"]


def resolve_group(distributed: bool | None) -> bool:
    """Return whether a loss built with ``distributed`` runs across ranks right now.

    ``None`` follows the environment: True when a process group is initialised with more than
    one rank. ``True`` requires an initialised group.
    """
    initialised = dist.is_available() and dist.is_initialized()
    if distributed is None:
        return initialised and dist.get_world_size() > 1
    if distributed and not initialised:
        raise RuntimeError(
            "distributed=True needs an initialised process group; call "
            "torch.distributed.init_process_group(...) first (torchrun sets the environment), "
            "or pass distributed=None to follow the environment"
        )
    return bool(distributed)


def world_info(group: dist.ProcessGroup | None = None) -> tuple[int, int]:
    """Return ``(rank, world_size)`` within ``group``."""
    return dist.get_rank(group), dist.get_world_size(group)


@dataclass
class GatheredBatch:
    """One step's batch of every rank, concatenated in rank order.

    Attributes:
        embeddings: ``(N, D)`` detached unit embeddings, ``N`` the sum of all batch sizes.
        coordinates: ``(N, C)`` float64.
        ids: ``(N,)`` int64, ``-1`` where a rank passed no ids.
        offset: first row of this rank's batch within the ``N`` rows.
        sizes: batch size of every rank, in rank order.
        rank: this rank within the group.
    """

    embeddings: Tensor
    coordinates: Tensor
    ids: Tensor
    offset: int
    sizes: list[int]
    rank: int

    @property
    def local(self) -> slice:
        """Rows of this rank's batch."""
        return slice(self.offset, self.offset + self.sizes[self.rank])


@torch.no_grad()
def gather_batch(
    embeddings: Tensor,
    coordinates: Tensor,
    ids: Tensor | None,
    group: dist.ProcessGroup | None = None,
) -> GatheredBatch:
    """All-gather a batch from every rank, in rank order, without gradient.

    Ranks may pass different batch sizes; rows are padded to the largest for the collective and
    trimmed after it. Embeddings, coordinates and ids travel in one float64 tensor: float32 and
    float16 values and integer ids below 2**53 convert to float64 and back exactly.

    Args:
        embeddings: ``(B, D)`` this rank's embeddings, any floating dtype.
        coordinates: ``(B, C)``.
        ids: ``(B,)`` integer ids, or ``None`` (gathered as ``-1``).

    Returns:
        The concatenated batch, embeddings in ``embeddings.dtype``.
    """
    rank, world_size = world_info(group)
    device = embeddings.device
    batch_size, width = embeddings.shape
    # Every rank learns every rank's batch size and widths, so a mismatch raises on all ranks
    # instead of leaving the others waiting in the next collective.
    shape = torch.tensor([batch_size, width, coordinates.shape[1]], device=device)
    shapes = [torch.empty_like(shape) for _ in range(world_size)]
    dist.all_gather(shapes, shape, group=group)
    size_list = [int(entry[0]) for entry in shapes]
    widths = {(int(entry[1]), int(entry[2])) for entry in shapes}
    if len(widths) > 1:
        raise ValueError(
            "every rank must pass embeddings and coordinates of the same widths, got "
            f"(embedding width, coordinate width) per rank {sorted(widths)}; "
            "check that all ranks build the same model"
        )

    ids_column = (
        torch.full((batch_size,), -1, dtype=torch.int64, device=device) if ids is None else ids
    )
    packed = torch.zeros(
        max(size_list), width + coordinates.shape[1] + 1, dtype=torch.float64, device=device
    )
    packed[:batch_size, :width] = embeddings.detach()
    packed[:batch_size, width:-1] = coordinates
    packed[:batch_size, -1] = ids_column
    pieces = [torch.empty_like(packed) for _ in range(world_size)]
    dist.all_gather(pieces, packed, group=group)
    rows = torch.cat([piece[:size] for piece, size in zip(pieces, size_list)])
    return GatheredBatch(
        embeddings=rows[:, :width].to(embeddings.dtype),
        coordinates=rows[:, width:-1].contiguous(),
        ids=rows[:, -1].to(torch.int64),
        offset=sum(size_list[:rank]),
        sizes=size_list,
        rank=rank,
    )


def all_reduce_sum(
    values: list[float], device: torch.device, group: dist.ProcessGroup | None = None
) -> list[float]:
    """Return the sums over ranks of a short list of numbers (one collective)."""
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, group=group)
    return tensor.tolist()
