#!/usr/bin/env bash
# Sets everything up, then runs the whole test suite (as root: cages, mounts and users are real).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/pytest "$@"
