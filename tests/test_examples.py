import subprocess
import sys
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_quickstart_runs_and_mines_from_bank():
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "quickstart.py")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "mined negatives" in result.stdout
    # The stats describe the 20th call, scored before its batch entered the bank: 19 x 128 rows.
    assert "bank 2432 entries" in result.stdout


def run_distributed_example(
    checkpoint: Path, steps: int, extra: list[str]
) -> subprocess.CompletedProcess:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(EXAMPLES / "distributed_training.py"),
        "--steps",
        str(steps),
        "--save-every",
        "2",
        "--batch-size",
        "64",
        "--checkpoint",
        str(checkpoint),
        *extra,
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)


@pytest.mark.parametrize("extra", [[], ["--shard"]], ids=["shared", "sharded"])
def test_distributed_example_trains_on_two_ranks_and_resumes(tmp_path, extra):
    checkpoint = tmp_path / "checkpoint.pt"
    first = run_distributed_example(checkpoint, 4, extra)
    assert first.returncode == 0, first.stderr
    # Two ranks of 64 places per step: the bank gains 128 rows per step.
    assert "step 4: loss" in first.stdout
    assert "bank 512 entries" in first.stdout
    assert checkpoint.exists()

    second = run_distributed_example(checkpoint, 6, extra)
    assert second.returncode == 0, second.stderr
    assert "resumed at step 4 with 512 bank entries" in second.stdout
    assert "step 6: loss" in second.stdout
    assert "bank 768 entries" in second.stdout
    if extra:
        assert sorted(path.name for path in tmp_path.glob("checkpoint.rank*.pt")) == [
            "checkpoint.rank0.pt",
            "checkpoint.rank1.pt",
        ]


def run_geolm_loop(checkpoint: Path, steps: int) -> subprocess.CompletedProcess:
    command = [
        sys.executable,
        str(EXAMPLES / "geolm_loop.py"),
        "--steps",
        str(steps),
        "--batch-size",
        "16",
        "--save-every",
        "3",
        "--checkpoint",
        str(checkpoint),
        "--device",
        "cpu",
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)


def test_geolm_loop_sums_three_losses_and_resumes(tmp_path):
    checkpoint = tmp_path / "geolm.pt"
    first = run_geolm_loop(checkpoint, steps=3)
    assert first.returncode == 0, first.stderr
    assert "step 3: mlm" in first.stdout
    assert "bank 48 entries" in first.stdout  # 3 steps of 16 places

    state = torch.load(checkpoint, weights_only=True)
    assert set(state) == {"model", "optimizer", "scaler", "spatial_loss", "step"}
    assert state["step"] == 3
    # The bank of [geo, text] embeddings: 128 + 128 wide with the example's default model.
    assert tuple(state["spatial_loss"]["bank.embeddings"].shape) == (16384, 256)
    assert int(state["spatial_loss"]["bank.size"]) == 48

    second = run_geolm_loop(checkpoint, steps=4)
    assert second.returncode == 0, second.stderr
    assert "resumed at step 3 with 48 bank entries" in second.stdout
    assert "step 4: mlm" in second.stdout
    assert "bank 64 entries" in second.stdout
