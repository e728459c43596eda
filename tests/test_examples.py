import subprocess
import sys
from pathlib import Path

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
