"""Agents in cages: starting an agent asks hive-priv (over priv.sock) to
prepare and start its cage; the agent counts as running while its harness is
connected to its socket. hive-core never does root work itself."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

from hyperhive.client import priv_call
from hyperhive.core.agent_socket import AgentSockets
from hyperhive.core.hive import Hive, Lifecycle
from hyperhive.core.limit_hits import COUNTERS
from hyperhive.core.refusals import Conflict, Refused, Unavailable
from hyperhive.wire import priv as wp

log = logging.getLogger("hive.core")
START_GRACE = 10.0  # seconds a harness may take to connect before the agent counts as failed


class CageLifecycle(Lifecycle):
    def __init__(self, sockets: AgentSockets, priv_sock: Path, disk_mib: int = 1024) -> None:
        self.sockets = sockets
        self.priv_sock = priv_sock
        self.disk_mib = disk_mib
        self._wanted: dict[str, float] = {}  # name -> when we asked for it to run
        self._errors: dict[str, str] = {}
        self._seen_harness: set[str] = set()

    async def priv(self, request: wp.PrivModel) -> dict[str, Any]:
        try:
            reply = await asyncio.to_thread(priv_call, str(self.priv_sock), request)
        except (OSError, ValueError) as e:
            raise Unavailable(f"hive-priv unavailable at {self.priv_sock}: {e}") from None
        if not reply.get("ok"):
            raise Conflict(f"hive-priv: {reply.get('error')}")
        return reply

    async def start(self, name: str, hive: Hive) -> None:
        self._wanted[name] = time.monotonic()
        self._errors.pop(name, None)
        self._seen_harness.discard(name)
        try:
            ids = await self.priv(wp.Prepare(name=name))
            self.sockets.set_uids(name, ids["uid"], ids["harness_uid"])
            await self.sockets.start(name, hive)  # the socket exists before the harness looks
            await self.priv(self._start_request(name, hive))
        except Refused as e:
            self._errors[name] = str(e)
            log.error("agent %s: %s", name, e)
            raise

    async def found_running(self, names: list[str], hive: Hive) -> list[str]:
        """One ``status`` request for every cage (hive-priv answers for all of them with
        their uids): each that runs gets its sockets back here, with no per-agent request
        (a harness reconnects as soon as its socket is back). Prepare's directories exist
        while a cage runs: they are bind-mounted in it."""
        if not names:
            return []
        cages = (await self.priv(wp.CageStatus(names=names)))["cages"]
        found = []
        now = time.monotonic()
        for name in names:
            c = cages.get(name) or {}
            if not (c.get("running") and "uid" in c and "harness_uid" in c):
                continue
            self._wanted[name] = now
            self._errors.pop(name, None)
            self._seen_harness.discard(name)
            self.sockets.set_uids(name, c["uid"], c["harness_uid"])
            try:
                await self.sockets.start(name, hive)
            except Refused as e:  # its socket directory refused: this agent, not the core
                self._errors[name] = str(e)
                log.error("agent %s: %s", name, e)
                continue
            found.append(name)
        log.info("found %d of %d cages running", len(found), len(names))
        return found

    async def still_running(self, names: list[str]) -> list[str]:
        if not names:
            return []
        cages = (await self.priv(wp.CageStatus(names=names)))["cages"]
        return [name for name in names if (cages.get(name) or {}).get("running")]

    async def leftovers(self, agents: set[str]) -> list[str]:
        """One ``status`` of every cage hive-priv knows (its ids table: every name prepared
        and not destroyed); those that are no agent."""
        cages = (await self.priv(wp.CageStatus(names=None)))["cages"]
        return sorted(name for name in cages if name not in agents)

    async def holding(self, names: list[str]) -> list[str]:
        """One ``status`` of ``names``: those with ids (prepared, not destroyed) or a cage."""
        if not names:
            return []
        cages = (await self.priv(wp.CageStatus(names=names)))["cages"]
        return [n for n in names if (c := cages.get(n)) and (c.get("running") or "uid" in c)]

    async def limit_hits(self, names: list[str]) -> dict[str, dict[str, int]]:
        if not names:
            return {}
        hits = wp.limit_hits_reply.validate_python(
            (await self.priv(wp.CageLimitHits(names=names)))["hits"]
        )
        out = {}
        for name, row in hits.items():
            counts = {k: v for k in COUNTERS if (v := getattr(row, k)) is not None}
            if counts:
                out[name] = counts
        return out

    def _start_request(self, name: str, hive: Hive) -> wp.StartCage:
        """hive-priv's start, with the agent's own limits where its spec sets them
        (``set_resource_limits``), hive-priv's defaults otherwise."""
        row = hive.store.agents.get(name)
        default = wp.StartCage(name=name, disk_mib=self.disk_mib)
        if row is None:
            return default
        return wp.StartCage(
            name=name,
            disk_mib=self.disk_mib,
            memory_mib=row.spec.memory_mib or default.memory_mib,
            pids_max=row.spec.pids_max or default.pids_max,
        )

    async def stop(self, name: str, graceful: bool) -> None:
        self._wanted.pop(name, None)
        self._errors.pop(name, None)
        await self.priv(wp.StopCage(name=name, timeout=5.0 if graceful else 0.0))
        await self.sockets.stop(name)

    async def destroy(self, name: str) -> None:
        await self.stop(name, graceful=False)
        await self.priv(wp.DestroyCage(name=name))

    def running(self, name: str) -> bool:
        up = self.sockets.harness_connected(name)
        if up:
            self._seen_harness.add(name)
        return up

    def failed(self, name: str) -> bool:
        if name not in self._wanted or self.running(name):
            return False
        # Down after having been up, or never came up in time, or couldn't start.
        return (
            name in self._errors
            or name in self._seen_harness
            or time.monotonic() - self._wanted[name] > START_GRACE
        )
