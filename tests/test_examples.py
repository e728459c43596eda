import subprocess
import sys
from pathlib import Path

import pytest

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
    # Two ranks of 64 places per step: the bank holds 128 rows per step taken.
    assert "step 4: loss" in first.stdout and "bank 512 entries" in first.stdout
    assert checkpoint.exists()

    second = run_distributed_example(checkpoint, 6, extra)
    assert second.returncode == 0, second.stderr
    assert "resumed at step 4 with 512 bank entries" in second.stdout
    assert "step 6: loss" in second.stdout and "bank 768 entries" in second.stdout
    if extra:
        assert sorted(path.name for path in tmp_path.glob("checkpoint.rank*.pt")) == [
            "checkpoint.rank0.pt",
            "checkpoint.rank1.pt",
        ]
