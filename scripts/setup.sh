#!/usr/bin/env bash
# Sets up everything hyperhive needs on a fresh Debian machine, idempotently:
# the system packages, then the Python environment in .venv from uv.lock.
set -euo pipefail
cd "$(dirname "$0")/.."

# System packages the hive uses (cages, gateway, egress and its test networks
# (iproute2, curl), browser tests, the swarm's NATS server (docs/swarm.md), and PHP's
# own server for the egress red team (header names as PHP reads them)).
APT_PACKAGES=(bubblewrap python3.11 util-linux iproute2 curl nginx-light wrk chromium nats-server php-cli)

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
    if [[ $(id -u) -ne 0 ]]; then
        echo "setup: need root to install: ${missing[*]}" >&2
        exit 1
    fi
    echo "setup: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# Debian's interpreter, not one under /root: hive-core runs as its own user and
# the cages run /usr/bin/python3.11, so the venv must be readable by them.
PYTHON=/usr/bin/python3.11
if ! command -v uv >/dev/null 2>&1; then
    echo "setup: installing uv"
    python3 -m pip install -q uv 2>/dev/null || "$PYTHON" -m pip install -q --break-system-packages uv
fi
UV=$(command -v uv)
export UV_PYTHON_DOWNLOADS=never
if [[ -x .venv/bin/python ]] && [[ "$(readlink -f .venv/bin/python)" != "$(readlink -f "$PYTHON")" ]]; then
    rm -rf .venv  # made with another interpreter
fi
"$UV" sync --frozen --python "$PYTHON" -q

# Claude Code (the `claude` runtime), pinned, from the npm registry. Its global
# bin must land under /usr: a cage sees /usr read-only and nothing of /root,
# /opt or /home, and runs `claude` from PATH=/opt/hive/bin:/usr/local/bin:/usr/bin:/bin.
CLAUDE_CODE_VERSION=2.1.330
if ! command -v npm >/dev/null 2>&1; then
    echo "setup: npm is needed to install Claude Code (apt-get install nodejs npm)" >&2
    exit 1
fi
NPM_PREFIX=$(npm prefix -g 2>/dev/null)
case "$NPM_PREFIX" in
    /usr|/usr/*) ;;
    *) NPM_PREFIX=/usr/local ;;
esac
CLAUDE="$NPM_PREFIX/bin/claude"
if [[ "$("$CLAUDE" --version 2>/dev/null)" != "$CLAUDE_CODE_VERSION "* ]]; then
    if [[ $(id -u) -ne 0 ]]; then
        echo "setup: need root to install Claude Code $CLAUDE_CODE_VERSION into $NPM_PREFIX" >&2
        exit 1
    fi
    echo "setup: installing Claude Code $CLAUDE_CODE_VERSION into $NPM_PREFIX"
    # The package's postinstall puts the native binary in place of its bin/claude.exe stub.
    npm install -g -q --no-fund --no-audit --prefix "$NPM_PREFIX" \
        --allow-scripts=@anthropic-ai/claude-code "@anthropic-ai/claude-code@$CLAUDE_CODE_VERSION"
    version=$("$CLAUDE" --version 2>/dev/null || true)
    if [[ "$version" != "$CLAUDE_CODE_VERSION "* ]]; then
        echo "setup: $CLAUDE --version says '${version:-nothing}', expected $CLAUDE_CODE_VERSION" >&2
        exit 1
    fi
fi
# `hive` on the PATH (the README's commands are `hive ...`).
bash scripts/link-hive.sh
echo "setup: ready ($(.venv/bin/hive --version), claude $("$CLAUDE" --version))"
