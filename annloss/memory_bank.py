"""A fixed-capacity ring buffer of past embeddings, coordinates, entity ids and steps."""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["MemoryBank"]

#: Entity id stored for entries added without an id; such entries never match an anchor's id.
NO_ID = -1


class MemoryBank(nn.Module):
    """Ring buffer of detached embeddings with their coordinates, ids and insertion step.

    Entries are written at a pointer that wraps around, so once the bank is full each new entry
    overwrites the oldest one. A batch that crosses the end of the buffer wraps to its start; a
    batch longer than the capacity keeps its last ``capacity`` rows. All state lives in
    persistent buffers, so ``state_dict()`` and ``load_state_dict()`` restore the bank exactly and
    ``.to(device)`` moves it.

    Before the first wrap the filled slots are the prefix ``[0, len(bank))``; after it, all
    ``capacity`` slots are filled.

    Args:
        capacity: number of slots ``M``.
        embedding_dim: embedding width ``D``.
        dtype: storage dtype of the embeddings. Default: float32. float16 halves the memory
            (``2 * D`` bytes per entry instead of ``4 * D``).
        coordinate_dim: columns per coordinate row. Default: 2.

    Buffers:
        - ``embeddings``: ``(M, D)`` in ``dtype``.
        - ``coordinates``: ``(M, 2)`` float64, in the order of the caller's coordinates.
        - ``ids``: ``(M,)`` int64 entity ids, ``-1`` for entries added without an id.
        - ``steps``: ``(M,)`` int64, the step at which each entry was written.
        - ``pointer`` and ``size``: scalar int64 tensors, the next write slot and the fill count.
        - ``num_added``: scalar int64, rows written since construction (or the last reset),
          counting rows of an oversized batch that were skipped.
    """

    embeddings: Tensor
    coordinates: Tensor
    ids: Tensor
    steps: Tensor
    pointer: Tensor
    size: Tensor
    num_added: Tensor

    def __init__(
        self,
        capacity: int,
        embedding_dim: int,
        *,
        dtype: torch.dtype = torch.float32,
        coordinate_dim: int = 2,
    ) -> None:
        super().__init__()
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"capacity must be an integer >= 1, got {capacity!r}")
        if (
            isinstance(embedding_dim, bool)
            or not isinstance(embedding_dim, int)
            or embedding_dim < 1
        ):
            raise ValueError(f"embedding_dim must be an integer >= 1, got {embedding_dim!r}")
        if not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating-point dtype, got {dtype}")

        self.capacity = capacity
        self.embedding_dim = embedding_dim
        self.register_buffer("embeddings", torch.zeros(capacity, embedding_dim, dtype=dtype))
        self.register_buffer(
            "coordinates", torch.zeros(capacity, coordinate_dim, dtype=torch.float64)
        )
        self.register_buffer("ids", torch.full((capacity,), NO_ID, dtype=torch.int64))
        self.register_buffer("steps", torch.zeros(capacity, dtype=torch.int64))
        self.register_buffer("pointer", torch.zeros((), dtype=torch.int64))
        self.register_buffer("size", torch.zeros((), dtype=torch.int64))
        self.register_buffer("num_added", torch.zeros((), dtype=torch.int64))

    def __len__(self) -> int:
        return int(self.size)

    @property
    def is_full(self) -> bool:
        """Whether every slot contains an entry."""
        return int(self.size) == self.capacity

    @torch.no_grad()
    def add(
        self,
        embeddings: Tensor,
        coordinates: Tensor,
        ids: Tensor | None = None,
        step: int = 0,
    ) -> Tensor:
        """Write a batch at the pointer, wrapping around the end of the buffer.

        Args:
            embeddings: ``(B, D)``; detached and cast to the bank dtype.
            coordinates: ``(B, 2)``; stored as float64.
            ids: optional ``(B,)`` integer entity ids. Default: ``-1`` for every row.
            step: the training step recorded with each entry.

        Returns:
            The ``(min(B, M),)`` slots written, in the order of the kept rows.
        """
        if embeddings.ndim != 2 or embeddings.shape[1] != self.embedding_dim:
            raise ValueError(
                f"embeddings must have shape (B, {self.embedding_dim}) to enter this bank, "
                f"got {tuple(embeddings.shape)}"
            )
        batch_size = embeddings.shape[0]
        if coordinates.shape != (batch_size, self.coordinates.shape[1]):
            raise ValueError(
                f"coordinates must have shape ({batch_size}, {self.coordinates.shape[1]}), "
                f"got {tuple(coordinates.shape)}"
            )
        if ids is not None and ids.shape != (batch_size,):
            raise ValueError(f"ids must have shape ({batch_size},), got {tuple(ids.shape)}")
        if embeddings.device != self.embeddings.device:
            raise ValueError(
                f"embeddings are on {embeddings.device} but the bank is on "
                f"{self.embeddings.device}; move the module with .to(embeddings.device)"
            )
        if batch_size == 0:
            return torch.empty(0, dtype=torch.int64, device=self.embeddings.device)

        # Rows that a later row of the same batch would overwrite are skipped up front.
        num_written = min(batch_size, self.capacity)
        first_slot = int(self.pointer) + batch_size - num_written
        offsets = torch.arange(num_written, device=self.embeddings.device)
        slots = (first_slot + offsets) % self.capacity

        self.embeddings[slots] = embeddings[-num_written:].detach().to(self.embeddings.dtype)
        self.coordinates[slots] = coordinates[-num_written:].detach().to(torch.float64)
        if ids is None:
            self.ids[slots] = NO_ID
        else:
            self.ids[slots] = ids[-num_written:].to(torch.int64)
        self.steps[slots] = int(step)

        self.pointer.fill_((int(self.pointer) + batch_size) % self.capacity)
        self.size.fill_(min(self.capacity, int(self.size) + batch_size))
        self.num_added += batch_size
        return slots

    @torch.no_grad()
    def reset(self) -> None:
        """Empty the bank without freeing its storage."""
        self.embeddings.zero_()
        self.coordinates.zero_()
        self.ids.fill_(NO_ID)
        self.steps.zero_()
        self.pointer.zero_()
        self.size.zero_()
        self.num_added.zero_()

    def overwritten_since(self, pointer: int, num_added: int, slots: Tensor) -> Tensor:
        """Mask of ``slots`` written after the bank had ``num_added`` rows and this ``pointer``.

        Used to recognise entries of an index snapshot whose slot now contains another entry.
        """
        written = int(self.num_added) - num_added
        if written >= self.capacity:
            return torch.ones_like(slots, dtype=torch.bool)
        return (slots - pointer) % self.capacity < written

    def slots_written_since(self, pointer: int, num_added: int) -> Tensor:
        """Return the slots written after the bank had ``num_added`` rows and this ``pointer``.

        The slots are in write order, oldest first, and each appears once.
        """
        written = min(int(self.num_added) - num_added, self.capacity)
        offsets = torch.arange(written, device=self.embeddings.device)
        return (pointer + offsets) % self.capacity

    def check_state(
        self,
        saved: object,
        capacity_argument: str = "capacity",
        dtype_argument: str = "dtype",
        *,
        capacity_scale: int = 1,
    ) -> None:
        """Raise unless ``saved``, a state's ``embeddings``, fits this bank's shape and dtype.

        The messages name the constructor arguments to change: ``capacity_argument`` and
        ``dtype_argument``, e.g. ``"memory_size"`` and ``"bank_dtype"`` for a loss that owns
        the bank. A bank that is one of ``capacity_scale`` shards reports capacities times
        that number, the value of ``memory_size``.
        """
        if not isinstance(saved, Tensor):
            return
        if saved.ndim != 2 or saved.shape[0] != self.capacity:
            raise ValueError(
                f"the saved memory bank has capacity {saved.shape[0] * capacity_scale} but this "
                f"one has {self.capacity * capacity_scale}; build it with "
                f"{capacity_argument}={saved.shape[0] * capacity_scale} to load this state"
            )
        if saved.shape[1] != self.embedding_dim:
            raise ValueError(
                f"the saved memory bank has embedding_dim {saved.shape[1]} but this one "
                f"has {self.embedding_dim}; build it with embedding_dim={saved.shape[1]} "
                "to load this state"
            )
        if saved.dtype != self.embeddings.dtype:
            raise TypeError(
                f"the saved memory bank stores {saved.dtype} but this one stores "
                f"{self.embeddings.dtype}; build it with {dtype_argument}={saved.dtype} to load "
                "this state"
            )

    def _load_from_state_dict(
        self,
        state_dict: dict,
        prefix: str,
        local_metadata: dict,
        strict: bool,
        missing_keys: list,
        unexpected_keys: list,
        error_msgs: list,
    ) -> None:
        # torch copies a saved buffer into the existing one and would silently cast another
        # dtype, so a bank saved with other settings is refused before anything is copied.
        self.check_state(state_dict.get(prefix + "embeddings"))
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def extra_repr(self) -> str:
        return (
            f"capacity={self.capacity}, embedding_dim={self.embedding_dim}, "
            f"dtype={self.embeddings.dtype}, size={int(self.size)}"
        )
