#!/usr/bin/env bash
# Create (or reuse) the virtual environment .venv and install annloss with the given extra.
# Usage: source scripts/setup_env.sh EXTRA   (EXTRA is "demo" or "test")
set -euo pipefail
extra="${1:?usage: source scripts/setup_env.sh demo|test}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python_bin="${PYTHON:-python3}"

if [ ! -x "$root/.venv/bin/python" ]; then
    "$python_bin" -m venv "$root/.venv"
fi
# shellcheck disable=SC1091
. "$root/.venv/bin/activate"
python -m pip install --quiet --upgrade pip
# Install the pinned CPU build of torch first: a bare "torch" requirement with no torch
# installed would pull a multi-GB CUDA build. pyproject.toml accepts any torch >= 2.1.
if ! python -c "import torch" 2>/dev/null; then
    python -m pip install --quiet "torch==${ANNLOSS_TORCH_VERSION:-2.13.0}"
fi
python -m pip install --quiet -e "$root[$extra]"
