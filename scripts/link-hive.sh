#!/usr/bin/env bash
# Puts `hive` on the PATH (scripts/setup.sh runs this): a symlink
# $HIVE_BIN_DIR/hive (default /usr/local/bin/hive) -> this checkout's .venv/bin/hive.
# /usr/local/bin is on every login's PATH on Debian, root's and sudo's secure_path
# included, and the venv's entry point finds its own interpreter through its #! line,
# so the link needs nothing else. A symlink there (an earlier checkout's) is
# replaced and named; anything else (a file of another install) is left alone.
# Where the link can't be made (not root, or the file is not ours), it prints the
# exact line that puts this checkout's hive on the PATH instead.
set -euo pipefail
cd "$(dirname "$0")/.." && cd "$(pwd -P)"
target="$PWD/.venv/bin/hive"
bin_dir="${HIVE_BIN_DIR:-/usr/local/bin}"
link="$bin_dir/hive"
if [[ ! -x $target ]]; then
    echo "setup: $target is missing (the venv is not built)" >&2
    exit 1
fi
instead() {
    echo "setup: $1; put hive on your PATH with:"
    echo "    export PATH=\"$PWD/.venv/bin:\$PATH\""
    exit 0
}
if [[ -e $link && ! -L $link ]]; then
    instead "$link exists and is not a link setup made"
fi
old=$(readlink "$link" 2>/dev/null || true)
if [[ $old == "$target" ]]; then
    echo "setup: $link -> $target (already)"
    exit 0
fi
if [[ ! -d $bin_dir || ! -w $bin_dir ]]; then
    instead "can't write $bin_dir"
fi
# A new link renamed over the old one: there is always a hive at $link.
tmp="$bin_dir/.hive.$$"
ln -s "$target" "$tmp"
mv -T "$tmp" "$link"
echo "setup: $link -> $target${old:+ (was -> $old)}"
