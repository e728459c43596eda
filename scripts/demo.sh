#!/usr/bin/env bash
# Install annloss with the demo dependencies into .venv and run the GeoNames demo.
# Extra arguments go to `annloss demo` (for example --quick, or --output-dir DIR).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
# shellcheck disable=SC1091
source scripts/setup_env.sh demo
annloss demo "$@"
