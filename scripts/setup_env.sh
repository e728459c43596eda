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

# Install torch first: with no torch installed, the "torch>=2.1" requirement of pyproject.toml
# would take the newest release, a multi-GB CUDA build. This project's machines keep the CPU build
# of 2.13.0 on disk; elsewhere set PIP_EXTRA_INDEX_URL to PyTorch's CPU wheel index.
if ! python -c "import torch" 2>/dev/null; then
    python -m pip install --quiet --upgrade pip
    python -m pip install --quiet "torch==${ANNLOSS_TORCH_VERSION:-2.13.0}"
fi

# Reinstall annloss only when pyproject.toml or the extra changed since the last install.
stamp="$root/.venv/.annloss-installed-$extra"
checksum="$(sha256sum "$root/pyproject.toml" | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$checksum" ]; then
    python -m pip install --quiet -e "$root[$extra]"
    echo "$checksum" > "$stamp"
fi
