"""MemoryBankSpatialLoss under torch.distributed: two real processes on the gloo backend."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from distributed_cases import (
    STEPS,
    concatenated_batch,
    load_other_shard,
    make_criterion,
    mismatched_width,
    resume_case,
    run_cases,
    spawn,
)

import annloss

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(),
    reason="this torch build has no torch.distributed gloo backend",
)

WORLD_SIZE = 2
CASES = ["fixed", "knn-radius", "scales-triplet", "unequal"]
SHARDED_CASES = ["fixed", "knn-radius", "unequal"]
SAVE_AT = 3


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory):
    """Every case trained on two ranks, then the "fixed" case resumed from its checkpoint."""
    output_dir = tmp_path_factory.mktemp("distributed")
    sharded = [f"{case}-sharded" for case in SHARDED_CASES]
    spawn(run_cases, WORLD_SIZE, str(output_dir), CASES + sharded, SAVE_AT)
    for case in ("fixed", "fixed-sharded"):
        # A fresh folder per run: each rendezvous file serves one process group.
        resume_dir = output_dir / f"resume-{case}"
        resume_dir.mkdir()
        for rank in range(WORLD_SIZE):
            checkpoint = output_dir / f"{case}-checkpoint-{rank}.pt"
            (resume_dir / checkpoint.name).write_bytes(checkpoint.read_bytes())
        spawn(resume_case, WORLD_SIZE, str(resume_dir), case, SAVE_AT)
    return output_dir


def load(output_dir, name):
    return torch.load(output_dir / name, weights_only=True)


def single_process_run(case):
    """The same case in this process, without a process group, on the concatenated batches."""
    criterion = make_criterion(case)
    losses = []
    for step in range(STEPS):
        losses.append(criterion(*concatenated_batch(case, step, WORLD_SIZE)).detach())
    return losses, criterion.state_dict()


@pytest.mark.parametrize("case", CASES)
def test_banks_identical_across_ranks(two_rank_run, case):
    ranks = [load(two_rank_run, f"{case}-rank{rank}.pt")["state"] for rank in range(WORLD_SIZE)]
    _, reference = single_process_run(case)
    assert int(reference["bank.num_added"]) > reference["bank.embeddings"].shape[0]  # wrapped
    for name, value in reference.items():
        for state in ranks:
            assert torch.equal(state[name], value), name


@pytest.mark.parametrize("case", CASES)
def test_mean_rank_loss_equals_one_process(two_rank_run, case):
    ranks = [load(two_rank_run, f"{case}-rank{rank}.pt")["losses"] for rank in range(WORLD_SIZE)]
    reference, _ = single_process_run(case)
    distributed = torch.stack([torch.stack(losses) for losses in ranks]).mean(dim=0)
    expected = torch.stack(reference)
    # From the third step on, the bank supplies pairs in every case.
    assert bool((expected[2:] > 0).all())
    torch.testing.assert_close(distributed, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", ["fixed", "fixed-sharded"])
def test_resume_from_checkpoint_gives_the_uninterrupted_losses(two_rank_run, case):
    for rank in range(WORLD_SIZE):
        uninterrupted = load(two_rank_run, f"{case}-rank{rank}.pt")["losses"][SAVE_AT:]
        resumed = load(two_rank_run / f"resume-{case}", f"{case}-resumed-rank{rank}.pt")
        assert len(resumed["losses"]) == STEPS - SAVE_AT
        torch.testing.assert_close(
            torch.stack(resumed["losses"]), torch.stack(uninterrupted), rtol=0, atol=0
        )


@pytest.mark.parametrize("case", SHARDED_CASES)
def test_sharded_bank_mines_what_the_whole_bank_mines(two_rank_run, case):
    for rank in range(WORLD_SIZE):
        whole = load(two_rank_run, f"{case}-rank{rank}.pt")
        sharded = load(two_rank_run, f"{case}-sharded-rank{rank}.pt")
        # Global bank size and pair counts per step, then the losses.
        assert sharded["counts"] == whole["counts"]
        assert any(counts[1] > 0 for counts in whole["counts"])
        torch.testing.assert_close(
            torch.stack(sharded["losses"]), torch.stack(whole["losses"]), rtol=1e-5, atol=1e-6
        )


@pytest.mark.parametrize("case", SHARDED_CASES)
def test_shards_partition_the_whole_bank(two_rank_run, case):
    whole = load(two_rank_run, f"{case}-rank0.pt")["state"]
    capacity = whole["bank.embeddings"].shape[0] // WORLD_SIZE
    for rank in range(WORLD_SIZE):
        shard = load(two_rank_run, f"{case}-sharded-rank{rank}.pt")["state"]
        assert int(shard["global_num_added"]) == int(whole["bank.num_added"])
        assert int(shard["shard_rank"]) == rank
        assert int(shard["num_shards"]) == WORLD_SIZE
        part = slice(rank * capacity, (rank + 1) * capacity)
        for name in ("embeddings", "coordinates", "ids", "steps"):
            assert torch.equal(shard[f"bank.{name}"], whole[f"bank.{name}"][part]), name


def test_loading_another_ranks_shard_raises(two_rank_run):
    folder = two_rank_run / "wrong-shard"
    folder.mkdir()
    for rank in range(WORLD_SIZE):
        checkpoint = two_rank_run / f"fixed-sharded-checkpoint-{rank}.pt"
        (folder / checkpoint.name).write_bytes(checkpoint.read_bytes())
    spawn(load_other_shard, WORLD_SIZE, str(folder), "fixed-sharded")
    for rank in range(WORLD_SIZE):
        message = (folder / f"error-{rank}.txt").read_text()
        assert f"shard of rank {(rank + 1) % WORLD_SIZE} but is loaded on rank {rank}" in message


def test_mismatched_embedding_widths_raise_on_every_rank(tmp_path):
    spawn(mismatched_width, WORLD_SIZE, str(tmp_path))
    for rank in range(WORLD_SIZE):
        message = (tmp_path / f"error-{rank}.txt").read_text()
        assert "same widths" in message
        assert "(16, 2)" in message
        assert "(17, 2)" in message


def test_distributed_true_without_a_process_group_raises():
    criterion = annloss.MemoryBankSpatialLoss(
        embedding_dim=4, distance_threshold=10.0, distributed=True
    )
    with pytest.raises(RuntimeError, match="init_process_group"):
        criterion(torch.randn(2, 4), torch.tensor([[0.0, 0.0], [1.0, 1.0]]))
