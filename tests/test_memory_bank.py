from collections import deque

import pytest
import torch

from annloss import MemoryBank


def batch(start: int, size: int, dim: int = 3):
    """Rows whose values encode their global index, so slots can be checked exactly."""
    index = torch.arange(start, start + size, dtype=torch.float64)
    embeddings = index[:, None].repeat(1, dim).float()
    coordinates = torch.stack([index % 360 - 180, (index % 180) - 90], dim=1)
    return embeddings, coordinates, index.to(torch.int64)


def test_fills_prefix_before_wrapping():
    bank = MemoryBank(10, 3)
    slots = bank.add(*batch(0, 4), step=7)
    assert slots.tolist() == [0, 1, 2, 3]
    assert len(bank) == 4
    assert not bank.is_full
    assert bank.ids[:4].tolist() == [0, 1, 2, 3]
    assert bank.ids[4:].tolist() == [-1] * 6
    assert bank.steps[:4].tolist() == [7] * 4
    assert int(bank.pointer) == 4


def test_batch_crossing_the_end_wraps():
    bank = MemoryBank(5, 3)
    bank.add(*batch(0, 4))
    slots = bank.add(*batch(4, 3))
    assert slots.tolist() == [4, 0, 1]
    assert bank.ids.tolist() == [5, 6, 2, 3, 4]
    assert bank.embeddings[:, 0].tolist() == [5.0, 6.0, 2.0, 3.0, 4.0]
    assert int(bank.pointer) == 2
    assert len(bank) == 5
    assert bank.is_full


@pytest.mark.parametrize("sizes", [[3, 3, 3, 3, 3, 3, 3], [7, 1, 9, 2, 5], [4, 25, 2]])
def test_wrapping_twice_matches_fifo_reference(sizes):
    capacity = 8
    bank = MemoryBank(capacity, 3)
    fifo: deque[int] = deque(maxlen=capacity)
    start = 0
    for step, size in enumerate(sizes):
        embeddings, coordinates, ids = batch(start, size)
        bank.add(embeddings, coordinates, ids, step=step)
        fifo.extend(range(start, start + size))
        start += size

    assert start > 2 * capacity
    assert sorted(bank.ids.tolist()) == sorted(fifo)
    # The oldest surviving entry sits at the pointer; reading from there gives FIFO order.
    order = (int(bank.pointer) + torch.arange(capacity)) % capacity
    assert bank.ids[order].tolist() == list(fifo)
    assert bank.embeddings[order, 0].tolist() == [float(i) for i in fifo]
    expected_coordinates = batch(0, start)[1][list(fifo)]
    assert torch.equal(bank.coordinates[order], expected_coordinates)


def test_batch_longer_than_capacity_keeps_last_rows():
    bank = MemoryBank(4, 3)
    bank.add(*batch(0, 2))
    bank.add(*batch(2, 10))
    assert sorted(bank.ids.tolist()) == [8, 9, 10, 11]
    assert int(bank.pointer) == (2 + 10) % 4
    order = (int(bank.pointer) + torch.arange(4)) % 4
    assert bank.ids[order].tolist() == [8, 9, 10, 11]


def test_add_without_ids_stores_minus_one():
    bank = MemoryBank(4, 3)
    embeddings, coordinates, _ = batch(0, 2)
    bank.add(embeddings, coordinates)
    assert bank.ids[:2].tolist() == [-1, -1]


def test_state_dict_round_trip_is_exact():
    bank = MemoryBank(6, 3, dtype=torch.float16)
    for step, start in enumerate(range(0, 20, 4)):
        bank.add(*batch(start, 4), step=step)

    restored = MemoryBank(6, 3, dtype=torch.float16)
    restored.load_state_dict(bank.state_dict())
    for name in ("embeddings", "coordinates", "ids", "steps", "pointer", "size"):
        assert torch.equal(getattr(restored, name), getattr(bank, name)), name

    bank.add(*batch(100, 3), step=9)
    restored.add(*batch(100, 3), step=9)
    assert torch.equal(restored.ids, bank.ids)
    assert int(restored.pointer) == int(bank.pointer)


def test_added_embeddings_are_detached():
    bank = MemoryBank(4, 2)
    embeddings = torch.ones(2, 2, requires_grad=True)
    bank.add(embeddings * 2, torch.zeros(2, 2))
    assert not bank.embeddings.requires_grad


def test_reset_empties_the_bank():
    bank = MemoryBank(4, 3)
    bank.add(*batch(0, 6))
    bank.reset()
    assert len(bank) == 0
    assert int(bank.pointer) == 0
    assert bank.ids.tolist() == [-1] * 4


@pytest.mark.parametrize(
    "args, message",
    [
        ((torch.ones(2, 4), torch.zeros(2, 2)), r"shape \(B, 3\) to enter this bank, got \(2, 4\)"),
        ((torch.ones(2, 3), torch.zeros(3, 2)), r"coordinates must have shape \(2, 2\)"),
        ((torch.ones(2, 3), torch.zeros(2, 2), torch.zeros(3)), r"ids must have shape \(2,\)"),
    ],
)
def test_add_rejects_bad_shapes(args, message):
    with pytest.raises(ValueError, match=message):
        MemoryBank(4, 3).add(*args)


def test_invalid_construction_raises():
    with pytest.raises(ValueError, match=r"capacity must be an integer >= 1, got 0"):
        MemoryBank(0, 3)
    with pytest.raises(ValueError, match=r"embedding_dim must be an integer >= 1"):
        MemoryBank(4, 0)
    with pytest.raises(TypeError, match=r"floating-point dtype"):
        MemoryBank(4, 3, dtype=torch.int64)
