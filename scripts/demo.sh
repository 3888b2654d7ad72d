#!/usr/bin/env bash
# Sets everything up, then runs the hive in the foreground with the demo swarm.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/hive up --config examples/demo/hive.toml "$@"
