#!/usr/bin/env bash
# Install annloss with its test dependencies into .venv and run the test suite.
# Extra arguments go to pytest. pytest exits 5 when it collects no test, which fails this script.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
# shellcheck disable=SC1091
source scripts/setup_env.sh test
python -m pytest "$@"
