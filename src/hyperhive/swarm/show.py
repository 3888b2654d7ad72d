"""Another host's pending approval or open question, whole (docs/swarm.md, "Whole items
from other hosts"). Imports ``nats``; loaded only by ``swarm/bridge.py``.

The roster carries summaries (agent text cut at 2,048 bytes, a payload up to 8 KiB). For
the whole item, host a publishes a request on ``hive.show.<b>.from.a``; only b may
subscribe to ``hive.show.b.from.*`` (NATS's permissions), and b answers on
``hive.shown.a.from.b``, which only b may publish and only a may read. The answer's
subject names who gave it; neither side uses NATS reply subjects, so no host is ever
allowed to publish to a subject another names.

b answers only hosts whose operator it obeys (``[swarm] operators``: the ones that may
act on its items; any other host reads the summaries only), and only about what its
roster already lists (a pending approval, an open question to the operator). a checks
what comes back: the id it asked for and, for an approval, that its payload's sha256 is
its ``payload_sha256`` and the one a's roster shows, so the payload shown is the one an
approval from here is bound to (``operator.py``: an approve for another host carries
that sha256).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from nats.aio.msg import Msg

from hyperhive.core.approvals import shown
from hyperhive.core.listing import row_out
from hyperhive.core.refusals import Busy, Conflict, NotFound, Unavailable
from hyperhive.core.store import Unreadable
from hyperhive.core.store.common import canonical_json, sha256_hex
from hyperhive.names import NAME_RE, OPERATOR
from hyperhive.swarm import jsontext
from hyperhive.swarm import subjects as s
from hyperhive.swarm.operator import REFUSALS, approval_row, question_row

if TYPE_CHECKING:
    from hyperhive.swarm.bridge import Bridge

log = logging.getLogger("hive.swarm")

WAIT = 5.0  # seconds a request waits for its host's answer
IN_FLIGHT = 64  # requests waiting at once (each holds an operator's request open)
ITEMS = ("approval", "question")
MAX_ID = (1 << 63) - 1


def pushed_by_the_bus(m: Msg) -> bool:
    """A JetStream consumer's delivery, not a host's publish. Any host may make a push
    consumer on a roster bucket (to watch it) and its deliver subject is the host's to
    choose; NATS (2.9) checks no publish permission on it, so a host can have the server
    deliver its own bucket's values to a's subscription on ``hive.show.a.*``. The delivery
    keeps the subject it was stored under (the host's own, so the sender read from it
    could not be another host), but it is dropped here first: it has a ``$JS.ACK`` reply
    subject (and maybe headers), which a host's own publish here has not."""
    if not ((m.reply or "").startswith("$JS.") or m.headers):
        return False
    now = time.monotonic()
    if now - _dropped_said_at[0] > 10:  # a host could push many: one line in 10 s
        _dropped_said_at[0] = now
        log.warning("swarm: dropped a delivery by the bus on %s: not a host's publish", m.subject)
    return True


_dropped_said_at = [-1e9]


class ShowRelay:
    """Asks other hosts for their items whole, and answers their requests for this
    host's. Lives in the bridge (``bridge.show``) and shares its connection."""

    def __init__(self, bridge: Bridge) -> None:
        self.bridge = bridge
        self.hive = bridge.hive
        self.host = bridge.host
        self._waiting: dict[str, tuple[str, asyncio.Future[dict[str, Any]]]] = {}
        self.answered = 0  # requests from other hosts answered (found or not)

    def loops(self) -> list[Callable[[], Awaitable[None]]]:
        return [self._serve]

    async def _serve(self) -> None:
        """Both subscriptions, for as long as the connection lives (nats-py renews them
        on each reconnect)."""
        nc = self.bridge.nc
        assert nc is not None
        subs = [
            await nc.subscribe(s.show_subject(self.host, "*"), cb=self._request),
            await nc.subscribe(s.shown_subject(self.host, "*"), cb=self._answer),
        ]
        try:
            await asyncio.Event().wait()
        finally:
            for sub in subs:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()

    # -- asking ------------------------------------------------------------------------

    async def fetch(self, host: str, kind: str, ident: int) -> dict[str, Any]:
        """``host``'s pending approval or open question ``ident``, whole and checked."""
        bridge = self.bridge
        if host not in set(bridge.heartbeats) | {h for h, _ in bridge.rows}:
            raise NotFound(f"no host {host!r} in the swarm")
        nc = bridge.nc
        if nc is None or not nc.is_connected:
            raise Unavailable(f"the swarm's bus is unreachable: can't ask host {host}")
        if len(self._waiting) >= IN_FLIGHT:
            raise Busy("too many requests to other hosts at once; try again")
        rid = uuid.uuid4().hex
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[rid] = (host, future)
        try:
            request = {"rid": rid, "kind": kind, "id": ident}
            await nc.publish(s.show_subject(host, self.host), json.dumps(request).encode())
            try:
                answer = await asyncio.wait_for(future, WAIT)
            except TimeoutError:
                raise Unavailable(f"host {host} did not answer within {WAIT:g} s") from None
        finally:
            self._waiting.pop(rid, None)
        if answer.get("ok") is not True:
            status, error = answer.get("status"), answer.get("error")
            refusal = REFUSALS.get(status, NotFound) if type(status) is int else NotFound
            text = error[:200] if isinstance(error, str) else "not found"
            raise refusal(f"host {host}: {text}")
        row = answer.get(kind)
        if not isinstance(row, dict) or row.get("id") != ident:
            raise Conflict(f"host {host} answered with something else than {kind} {ident}")
        if kind == "question":
            return question_row(host, ident, row, whole=True)
        return self._checked(host, ident, row)

    def _checked(self, host: str, aid: int, row: dict[str, Any]) -> dict[str, Any]:
        """An approval shown only if its payload is the one its sha256 (and so what an
        approval from here is bound to) was taken of."""
        sha = sha256_hex(canonical_json(row.get("payload")))
        if row.get("payload_sha256") != sha:
            raise Conflict(f"host {host}: approval {aid}'s payload is not its payload_sha256")
        listed = self.bridge.operator.rows["approvals"].get((host, aid))
        if listed is not None and listed["payload_sha256"] != sha:
            raise Conflict(f"host {host}: approval {aid} is not the one the roster lists")
        return approval_row(host, aid, row, whole=True)

    async def _answer(self, m: Msg) -> None:
        """An answer to one of this host's requests: only from the host it went to."""
        if pushed_by_the_bus(m):
            return
        from_host = s.sender_of(s.SHOWN_ROOT, m.subject)
        with contextlib.suppress(ValueError, RecursionError):
            answer = jsontext.loads(m.data)
            rid = answer.get("rid") if isinstance(answer, dict) else None
            waiting = self._waiting.get(rid) if isinstance(rid, str) else None
            if waiting is not None and waiting[0] == from_host and not waiting[1].done():
                waiting[1].set_result(answer)

    # -- answering -----------------------------------------------------------------------

    async def _request(self, m: Msg) -> None:
        """Another host asks for one of this host's items: answered to that host only."""
        nc = self.bridge.nc
        if pushed_by_the_bus(m):
            return
        from_host = s.sender_of(s.SHOW_ROOT, m.subject)
        if nc is None or from_host is None or not NAME_RE.fullmatch(from_host):
            return
        try:
            req = jsontext.loads(m.data)
        except (ValueError, RecursionError):
            return
        req = req if isinstance(req, dict) else {}
        rid, kind, ident = req.get("rid"), req.get("kind"), req.get("id")
        if not (isinstance(rid, str) and len(rid) <= 64 and kind in ITEMS
                and type(ident) is int and 0 < ident <= MAX_ID):  # fmt: skip
            log.info("swarm: a malformed request for an item from host %s", from_host)
            return
        if from_host in self.bridge.operator.operators:
            answer = self.local(kind, ident)
        else:  # its operator can't act on them here: it needs no more than the summaries
            why = f"host {self.host} shows its items whole only to hosts whose operator it obeys"
            answer = {"ok": False, "status": 403, "error": why}
        data = json.dumps({"rid": rid, **answer}).encode()
        if len(data) > nc.max_payload:
            why = f"{kind} {ident} is too large to carry"
            data = json.dumps({"rid": rid, "ok": False, "status": 503, "error": why}).encode()
        self.answered += 1
        with contextlib.suppress(Exception):  # the bus went away: the asker times out
            await nc.publish(s.shown_subject(from_host, self.host), data)

    def local(self, kind: str, ident: int) -> dict[str, Any]:
        """This host's item as its roster lists it (pending, or open and to the
        operator), whole; or why not."""
        store = self.hive.store
        if kind == "approval":
            a = store.approvals.get(ident)
            if a is None or isinstance(a, Unreadable) or a.status != "pending":
                return {"ok": False, "status": 404, "error": f"no pending approval {ident}"}
            return {"ok": True, "approval": shown(a)}
        is_open = store.db.conn.execute(
            "SELECT 1 FROM questions WHERE id=? AND target=? AND answer IS NULL AND cancelled=0",
            (ident, OPERATOR),
        ).fetchone()
        q = store.questions.get(ident) if is_open else None
        if q is None or isinstance(q, Unreadable):
            why = f"no open question {ident} to the operator"
            return {"ok": False, "status": 404, "error": why}
        return {"ok": True, "question": row_out(q)}
