"""MemoryBankSpatialLoss under torch.distributed: two real processes on the gloo backend."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from distributed_cases import (
    STEPS,
    concatenated_batch,
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
SAVE_AT = 3


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory):
    """Every case trained on two ranks, then the "fixed" case resumed from its checkpoint."""
    output_dir = tmp_path_factory.mktemp("distributed")
    spawn(run_cases, WORLD_SIZE, str(output_dir), CASES, SAVE_AT)
    resume_dir = output_dir / "resume"
    resume_dir.mkdir()
    for rank in range(WORLD_SIZE):
        checkpoint = output_dir / f"fixed-checkpoint-{rank}.pt"
        (resume_dir / checkpoint.name).write_bytes(checkpoint.read_bytes())
    spawn(resume_case, WORLD_SIZE, str(resume_dir), "fixed", SAVE_AT)
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
def test_banks_are_identical_on_every_rank_and_to_one_process(two_rank_run, case):
    ranks = [load(two_rank_run, f"{case}-rank{rank}.pt")["state"] for rank in range(WORLD_SIZE)]
    _, reference = single_process_run(case)
    assert int(reference["bank.num_added"]) > reference["bank.embeddings"].shape[0]  # wrapped
    for name, value in reference.items():
        for state in ranks:
            assert torch.equal(state[name], value), name


@pytest.mark.parametrize("case", CASES)
def test_mean_of_rank_losses_equals_one_process_on_the_concatenated_batch(two_rank_run, case):
    ranks = [load(two_rank_run, f"{case}-rank{rank}.pt")["losses"] for rank in range(WORLD_SIZE)]
    reference, _ = single_process_run(case)
    distributed = torch.stack([torch.stack(losses) for losses in ranks]).mean(dim=0)
    expected = torch.stack(reference)
    # From the third step on, the bank supplies pairs in every case.
    assert bool((expected[2:] > 0).all())
    torch.testing.assert_close(distributed, expected, rtol=1e-5, atol=1e-6)


def test_resume_from_checkpoint_gives_the_uninterrupted_losses(two_rank_run):
    for rank in range(WORLD_SIZE):
        uninterrupted = load(two_rank_run, f"fixed-rank{rank}.pt")["losses"][SAVE_AT:]
        resumed = load(two_rank_run / "resume", f"fixed-resumed-rank{rank}.pt")["losses"]
        assert len(resumed) == STEPS - SAVE_AT
        torch.testing.assert_close(torch.stack(resumed), torch.stack(uninterrupted), rtol=0, atol=0)


def test_mismatched_embedding_widths_raise_on_every_rank(tmp_path):
    spawn(mismatched_width, WORLD_SIZE, str(tmp_path))
    for rank in range(WORLD_SIZE):
        message = (tmp_path / f"error-{rank}.txt").read_text()
        assert "same widths" in message and "(16, 2)" in message and "(17, 2)" in message


def test_distributed_true_without_a_process_group_raises():
    criterion = annloss.MemoryBankSpatialLoss(
        embedding_dim=4, distance_threshold=10.0, distributed=True
    )
    with pytest.raises(RuntimeError, match="init_process_group"):
        criterion(torch.randn(2, 4), torch.tensor([[0.0, 0.0], [1.0, 1.0]]))
