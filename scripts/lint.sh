#!/usr/bin/env bash
# The gates: ruff's lint rules (src, tests and bench), ruff's format (src and bench) and mypy strict (src,
# from pyproject). Stops at the first gate that fails, saying which.
set -uo pipefail
cd "$(dirname "$0")/.."

gate() {
    local name=$1
    shift
    echo "lint: $name ($*)"
    if ! "$@"; then
        echo "lint: FAILED: $name; fix the above (ruff format src applies the format)" >&2
        exit 1
    fi
}

gate "ruff check" .venv/bin/ruff check src tests bench
gate "ruff format" .venv/bin/ruff format --check src bench
gate "mypy" .venv/bin/mypy
echo "lint: all gates pass"
