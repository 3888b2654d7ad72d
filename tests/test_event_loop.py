"""The core's event loop: uvloop's where it imports, asyncio's own where it doesn't."""

from __future__ import annotations

import asyncio
import sys

import pytest

from hyperhive.core.daemon import _loop_factory


def test_uvloop_when_installed() -> None:
    loop = _loop_factory()()
    try:
        assert type(loop).__module__.startswith("uvloop"), type(loop)
    finally:
        loop.close()


def test_asyncio_when_uvloop_cannot_import(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # `import uvloop` raises ImportError
    loop = _loop_factory()()
    try:
        assert isinstance(loop, asyncio.BaseEventLoop) and loop.run_until_complete(
            asyncio.sleep(0, "ran")
        ) == "ran"
    finally:
        loop.close()
