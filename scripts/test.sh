#!/usr/bin/env bash
# Sets everything up, runs the gates (scripts/lint.sh), then runs the whole test suite
# (as root: cages, mounts and users are real).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/lint.sh
exec .venv/bin/pytest "$@"
