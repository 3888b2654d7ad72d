"""What every repository shares: the two errors and the JSON helpers."""

from __future__ import annotations

import hashlib
import json
from typing import Any


class ApplyError(Exception):
    """Applying an approved payload failed; the approval becomes ``failed`` with this note."""


class StoreError(Exception):
    """A storage failure, phrased for the caller (e.g. a full disk)."""


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def sha256_hex(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def dump_options(options: list[str] | None) -> str | None:
    return None if options is None else json.dumps(options)


def load_options(raw: str | None) -> list[str] | None:
    if raw is None:
        return None
    options: list[str] = json.loads(raw)
    return options
