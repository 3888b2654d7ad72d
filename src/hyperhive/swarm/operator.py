"""One roster for the operator across the swarm (docs/swarm.md, "The operator's roster
and actions"). Imports ``nats``; loaded only by ``swarm/bridge.py``.

- Each host publishes its agents' open questions to the operator and pending approvals
  (their summaries, as listings show them) as roster keys ``questions.<host>.<id>`` and
  ``approvals.<host>.<id>``; every host keeps a cache of them from the bridge's KV watch.
- The operator on host A acting on host B's item (an answer, an approval bound to its
  payload_sha256, a denial, a spawn or a spawn request) or steering one of B's agents (a
  message as the operator, start, stop, restart, pause or resume, interrupt, destroy) is
  a host.sock request, signed with
  A's operator key
  (``swarm/signing.py``) and published on ``hive.action.B.from.A`` (stream
  ``HIVE_ACTIONS``; what an older host published on ``hive.op.B.from.A``, stream
  ``HIVE_OPS``, is read first after an upgrade).
- B takes it from its own consumer, checks it (its pinned key for A, its time, its id
  never seen before from A), carries it out through host.sock's own table (one code
  path, one set of refusals), and writes the outcome to ``results.B.A-<action id>``,
  which A waits for. Actions for different agents are carried out at once, each
  agent's in order (``swarm/lanes.py``); each is carried out once across a crash of B's
  core: its row in ``swarm_ops`` (``swarm/opstore.py``) is marked applied in the
  transaction of its effect, and a delivery again gets the recorded outcome.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import nats.errors
import nats.js.errors
from nats.aio.msg import Msg

from hyperhive import faults
from hyperhive.core.approvals import shown
from hyperhive.core.host_socket import HOST, OperatorSession
from hyperhive.core.listing import rows_out
from hyperhive.core.refusals import (
    BadRequest,
    Busy,
    Conflict,
    Forbidden,
    Gone,
    NotFound,
    Refused,
    Unavailable,
)
from hyperhive.core.store import StoreError
from hyperhive.core.store.db import riding
from hyperhive.core.summary import PAGE_MAX, PER_AGENT_SHOWN
from hyperhive.names import NAME_RE, OPERATOR
from hyperhive.swarm import jsontext
from hyperhive.swarm import subjects as s
from hyperhive.swarm.lanes import Lanes
from hyperhive.swarm.opstore import Applied, OpsSeen, Taken
from hyperhive.swarm.pull import Puller
from hyperhive.swarm.signing import (
    ActionError,
    canonical,
    check_fresh,
    load_or_create_key,
    open_sealed,
    parse_public,
    public_b64,
    seal,
)
from hyperhive.wire.common import SHORT_TEXT_CHARS, TEXT_CHARS

if TYPE_CHECKING:
    from hyperhive.swarm.bridge import Bridge

log = logging.getLogger("hive.swarm")

AT_ONCE = 8  # actions carried out at a time (each agent's in order: lanes.py)
IN_FLIGHT = 64  # actions taken from the bus and not finished; the rest wait in the stream
# The lifecycle verbs: bound to the incarnation of each agent they name (its created_at,
# as the roster showed it when the operator acted), and marked applied by the write that
# completes each (core/hive.py's ``completing``: a destroy's row deletion, a restart's
# start, a stop once its cage is stopped), not by their first: cut short by a crash before
# it, one is carried out again, each step leaving the agent as asked whatever it finds.
LIFECYCLE = frozenset({"start", "stop", "restart", "set_paused", "interrupt", "destroy"})
ROWS_EVERY = 1.0  # seconds between two looks at this host's questions and approvals
CARRY_WAIT = 10.0  # seconds the operator's request waits for the other host's outcome
PUBLISH_TRIES_SECONDS = 5.0  # how long an action is offered to the bus before "not taken"
RESULT_KEEP = 600.0  # seconds this host's outcomes stay in the roster
LEGACY_EVERY = 30.0  # seconds between two looks at a pair's consumer on HIVE_OPS
MAX_PAYLOAD_SHOWN = 8192  # bytes of an approval's (summary) payload kept from another host
KEY_FILE = "swarm-operator.key"
HEX = frozenset("0123456789abcdef")
HEX0 = "0" * 64
KINDS = ("questions", "approvals")
REPLY_FIELDS = ("id", "payload_sha256")  # what a carried request_spawn's outcome gives back
REPLY_VERBS = frozenset({"request_spawn", "send"})  # the verbs whose outcome gives them back
REFUSALS: dict[int, type[Refused]] = {
    c.status: c for c in (BadRequest, NotFound, Conflict, Gone, Forbidden, Busy, Unavailable)
}


def _text(value: object, limit: int = SHORT_TEXT_CHARS) -> str | None:
    return value[:limit] if isinstance(value, str) else None


def _truncated(value: object) -> dict[str, int] | None:
    if not isinstance(value, dict):
        return None
    out = {k[:32]: v for k, v in list(value.items())[:8] if isinstance(v, int)}
    return out or None


def _sha(value: object) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in HEX for c in value)


def _name(value: object) -> str | None:
    return value if isinstance(value, str) and NAME_RE.fullmatch(value) else None


def question_row(host: str, qid: int, row: dict[str, Any], whole: bool = False) -> dict[str, Any]:
    """An open question as another host published it: its host and id are the key's
    (what NATS's permissions vouch for), each field of the type and size a listing's is
    (``whole``: its text as long as a question may be; swarm/show.py)."""
    options = row.get("options")
    if isinstance(options, list):
        options = [o[:SHORT_TEXT_CHARS] for o in options[:64] if isinstance(o, str)]
    else:
        options = None
    return {
        "host": host,
        "id": qid,
        "asker": _name(row.get("asker")),
        "to": OPERATOR,
        "question": _text(row.get("question"), TEXT_CHARS if whole else SHORT_TEXT_CHARS) or "",
        "options": options,
        "asked_at": _text(row.get("asked_at"), 64),
        "truncated": None if whole else _truncated(row.get("truncated")),
    }


def approval_row(host: str, aid: int, row: dict[str, Any], whole: bool = False) -> dict[str, Any]:
    """A pending approval as another host published it (see ``question_row``); its
    payload_sha256 is what an approval from here is bound to (``whole``: the payload
    whole, which swarm/show.py checks against that sha256)."""
    payload = row.get("payload")
    if not whole and len(json.dumps(payload)) > MAX_PAYLOAD_SHOWN:
        payload = "(payload too long to show here; see it on its host)"
    sha = row.get("payload_sha256")
    return {
        "host": host,
        "id": aid,
        "agent": _name(row.get("agent")),
        "kind": _text(row.get("kind"), 64) or "",
        "status": "pending",
        "description": _text(row.get("description")) or "",
        "payload": payload,
        "payload_sha256": sha if isinstance(sha, str) and len(sha) == 64 else "",
        "requested_at": _text(row.get("requested_at"), 64),
        "grants": _text(row.get("grants")),
        "allows": _text(row.get("allows")),
        "truncated": None if whole else _truncated(row.get("truncated")),
    }


class OperatorRelay:
    """This host's part of the operator's roster: its rows out, others' rows in, actions
    both ways. Lives in the bridge (``bridge.operator``) and shares its connection."""

    def __init__(self, bridge: Bridge) -> None:
        self.bridge = bridge
        self.hive = bridge.hive
        self.host = bridge.host
        settings = bridge.settings
        path = settings.operator_key or self.hive.store.path.parent / KEY_FILE
        self.key = load_or_create_key(path)
        self.public = public_b64(self.key)
        self.operators = {h: parse_public(k) for h, k in settings.operators.items()}
        self.seen = OpsSeen(self.hive.store.db)
        self.rows: dict[str, dict[tuple[str, int], dict[str, Any]]] = {k: {} for k in KINDS}
        self._published: dict[str, str] = {}  # this host's keys -> their values
        self._missing_said_at = -1e9  # when "no stream HIVE_OPS yet" was last logged
        self._waiting: dict[str, tuple[str, asyncio.Future[dict[str, Any]]]] = {}
        self._results: dict[str, float] = {}  # this host's results' <from>-<id> -> when seen
        self.applied = 0  # actions carried out here (what the hive made of them: outcome)
        self.refused = 0  # actions refused before anything was done (forged, replayed, ...)
        self.recovered = 0  # delivered again after a crash: their recorded outcome published
        self._lanes = Lanes(AT_ONCE)  # the actions taken, in order per agent (lanes.py)
        # (from host, action id) -> its message's stream sequence: taken, not finished
        self._carrying: dict[tuple[str, str], int] = {}

    def loops(self) -> list[Callable[[], Awaitable[None]]]:
        # One reader per host whose operator this host obeys, each on that pair's own
        # consumer: no other host's actions are read at all (each would be refused), and
        # none queue ahead of an obeyed operator's (red team round 11).
        hosts = sorted(h for h in self.operators if h != self.host)
        return [self._rows_loop, *(functools.partial(self._consume_loop, h) for h in hosts)]

    # -- what this host shows ---------------------------------------------------------

    def listed(self, kind: str, others_only: bool = True) -> list[dict[str, Any]]:
        """Every host's (or only the other hosts') open questions or pending approvals."""
        rows = self.rows[kind]
        return [rows[k] for k in sorted(rows) if not (others_only and k[0] == self.host)][
            : PAGE_MAX * 16
        ]

    def status(self) -> dict[str, Any]:
        return {
            "operator_key": self.public,
            "operators": sorted(self.operators),
            "questions": self.listed("questions", others_only=False),
            "approvals": self.listed("approvals", others_only=False),
            "actions_applied": self.applied,
            "actions_refused": self.refused,
            "actions_recovered": self.recovered,
            "actions_carrying": len(self._carrying),
        }

    def watched(self, parts: list[str], value: bytes | None, deleted: bool) -> bool:
        """A roster key this module keeps (the bridge's watch hands each one here first)."""
        if len(parts) != 3 or parts[0] not in (*KINDS, "results"):
            return False
        kind, host, ident = parts
        if not NAME_RE.fullmatch(host):
            return True
        if kind == "results":
            self._result(host, ident, value, deleted)
            return True
        if not ident.isdigit() or len(ident) > 18:
            return True
        key = (host, int(ident))
        table = self.rows[kind]
        if host != self.host:  # this host's own changes have events of their own
            # The cockpit draws "On other hosts" again (core/cockpit.py's TOUCHES).
            self.hive.bus.publish("swarm", {"host": host, "what": kind})
        if deleted or value is None:
            table.pop(key, None)
            return True
        try:
            row = jsontext.loads(value)
        except (ValueError, RecursionError):  # nesting too deep must not stop the watch
            return True
        # A host shows at most PAGE_MAX of each (as it publishes them): a hostile one can't
        # grow every other host's cache past that.
        if isinstance(row, dict) and (
            key in table or sum(1 for k in table if k[0] == host) < PAGE_MAX
        ):
            make = question_row if kind == "questions" else approval_row
            table[key] = make(host, key[1], row)
        return True

    def _result(self, host: str, ident: str, value: bytes | None, deleted: bool) -> None:
        """``results.<host>.<ident>``, ident ``<from>-<action id>``: what ``host`` made of
        an action; the one this host's operator waits for if ``from`` is this host."""
        if deleted or value is None:
            return
        if host == self.host:
            self._results[ident] = time.monotonic()
        waiting = self._waiting.get(ident)
        if waiting is None or waiting[0] != host or waiting[1].done():
            return  # only the host the action went to says what became of it
        with contextlib.suppress(ValueError, RecursionError):
            outcome = jsontext.loads(value)
            if isinstance(outcome, dict):
                waiting[1].set_result(outcome)

    # -- carrying the operator's action to another host -------------------------------

    async def _below_window(self, host: str) -> None:
        """Refuse an action while ``host`` has ACTIONS_WINDOW of ours unread: its pair keeps
        only its newest ACTIONS_PAIR_MSGS (bus.py), and an action the bus took must not be
        dropped for a later one (the slack above the window covers carries at once). If the
        bus can't say (an older config without the permission), the action goes."""
        try:
            info = await self.bridge._js().consumer_info(
                s.OPS_STREAM, s.ops_consumer(host, self.host)
            )
        except (nats.errors.Error, TimeoutError, nats.js.errors.Error) as e:
            log.info("swarm: can't see how far host %s has read our actions: %s", host, e)
            return
        unread = (info.num_pending or 0) + (info.num_ack_pending or 0)
        if unread >= s.ACTIONS_WINDOW:
            raise Unavailable(
                f"host {host} has not read this host's last {unread} actions: nothing was"
                " carried, try again once it has"
            )

    async def carry(self, host: str, request: dict[str, Any]) -> dict[str, Any]:
        """Sign ``request`` (a host.sock request) as this host's operator, carry it to
        ``host`` and wait for what it made of it: applied, refused (raised, with its
        reason), or not heard of yet (``applied: false``: it is in the stream)."""
        known = set(self.bridge.heartbeats) | {h for h, _ in self.bridge.rows}
        if host not in known:
            raise NotFound(f"no host {host!r} in the swarm")
        request = dict(request)
        bound: dict[str, Any] = {}  # the incarnation(s) a lifecycle verb was bound to
        if request["cmd"] in LIFECYCLE:
            self._bind(host, request)
            # Said back (the CLI's --json prints it): which agent the action was for,
            # whether the operator gave it or this host's roster did.
            if request.get("created_at") is not None:
                bound["created_at"] = request["created_at"]
        if request["cmd"] in ("approve", "deny") and request.get("payload_sha256") is None:
            row = self.rows["approvals"].get((host, request["id"]))
            if row is None:
                raise NotFound(f"no pending approval {request['id']} on host {host}")
            request["payload_sha256"] = row["payload_sha256"]  # the one the roster shows
        nc = self.bridge.nc
        if nc is None or not nc.is_connected:
            raise Unavailable(f"the swarm's bus is unreachable: nothing was carried to {host}")
        await self._below_window(host)
        action_id, data = seal(self.key, self.host, host, request)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        ident = s.result_ident(self.host, action_id)  # its outcome's key: results.<host>.<ident>
        self._waiting[ident] = (host, future)
        try:
            # Tried again for a few seconds (a stream electing its leader answers no one
            # meanwhile): the same Nats-Msg-Id, so JetStream keeps one copy whatever
            # the tries, and the owner carries out one action id once anyway.
            deadline = time.monotonic() + PUBLISH_TRIES_SECONDS
            while True:
                try:
                    await self.bridge._js().publish(
                        s.op_subject(host, self.host),
                        data,
                        timeout=2.0,
                        headers={"Nats-Msg-Id": action_id},
                    )
                    break
                except (nats.errors.Error, TimeoutError, nats.js.errors.Error) as e:
                    if time.monotonic() < deadline:
                        await asyncio.sleep(0.25)
                        continue
                    raise Unavailable(
                        f"the bus did not take the action for host {host} ({type(e).__name__});"
                        " it may or may not be carried out"
                    ) from None
            log.info("swarm: operator action %s (%s) to %s", action_id, request["cmd"], host)
            try:
                outcome = await asyncio.wait_for(future, CARRY_WAIT)
            except TimeoutError:
                return {"host": host, "action": action_id, "applied": False, **bound}
        finally:
            self._waiting.pop(ident, None)
        if outcome.get("ok") is True:
            # Only as its types are (the outcome is the other host's to say).
            extra = {k: outcome[k] for k in REPLY_FIELDS if k in outcome}
            if not (type(extra.get("id", 1)) is int and _sha(extra.get("payload_sha256", HEX0))):
                extra = {}
            return {"host": host, "action": action_id, "applied": True, **extra, **bound}
        status = outcome.get("status")
        refusal = REFUSALS.get(status, Conflict) if isinstance(status, int) else Conflict
        raise refusal(f"host {host}: {_text(outcome.get('error')) or 'refused'}")

    def _bind(self, host: str, request: dict[str, Any]) -> None:
        """Bind a lifecycle verb to the incarnation of each agent it names: the created_at
        the operator gave, else the one the roster shows now (what the operator saw
        listed). Carried out there only if that agent is still the one created then: a
        destroy that waited in the stream (its host down) or was delivered again after a
        crash never hits an agent spawned under the name since. A stop or start of every
        agent there names none: it acts on those there when it arrives."""
        if request["cmd"] in ("start", "stop"):
            names = request.get("scope", {}).get("agent_names") or []
            given = dict(request.get("created_at") or {})
            if names:
                request["created_at"] = {
                    n: given[n] if n in given else self._created_at(host, n) for n in names
                }
        elif request.get("created_at") is None:
            request["created_at"] = self._created_at(host, request["name"])

    def _created_at(self, host: str, name: str) -> float:
        row = self.bridge.rows.get((host, name))
        if row is None:
            raise NotFound(
                f"no agent {name!r} on host {host} in the swarm's roster: nothing was carried"
            )
        created_at = row.get("created_at")
        if not isinstance(created_at, float):
            raise Conflict(
                f"host {host}'s roster row of {name!r} has no created_at (an older hive?):"
                " nothing was carried"
            )
        return created_at

    # -- this host's rows -------------------------------------------------------------

    async def _rows_loop(self) -> None:
        kv = await self.bridge._bucket()
        while True:
            await self._publish_rows(kv)
            await self._prune_results(kv)
            await asyncio.sleep(ROWS_EVERY)

    def _local_rows(self) -> dict[str, str]:
        store = self.hive.store
        # The oldest, at most PER_AGENT_SHOWN of any one agent (as this host's dashboard):
        # one agent's 200 kept every later one off the other hosts' (re-check of session 18).
        questions = store.questions.first_screen(
            target=OPERATOR, per_agent=PER_AGENT_SHOWN, limit=PAGE_MAX
        )
        pending = store.approvals.first_screen(per_agent=PER_AGENT_SHOWN, limit=PAGE_MAX)
        out: dict[str, str] = {}
        for row in rows_out(questions.items):
            if "unreadable" not in row:
                out[s.question_key(self.host, row["id"])] = json.dumps(row, sort_keys=True)
        for a in pending.items:
            row = shown(a)
            if "unreadable" not in row:
                out[s.approval_key(self.host, row["id"])] = json.dumps(row, sort_keys=True)
        return out

    async def _publish_rows(self, kv: Any) -> None:
        now = self._local_rows()
        for key, data in now.items():
            if self._published.get(key) != data:
                await kv.put(key, data.encode())
                self._published[key] = data
        # Gone here: answered, resolved; also this host's rows from before a restart,
        # which the watch shows and nothing here published.
        mine = {f"{k}.{self.host}.{i}" for k in KINDS for h, i in self.rows[k] if h == self.host}
        for key in (set(self._published) | mine) - set(now):
            await kv.delete(key)
            self._published.pop(key, None)

    async def _prune_results(self, kv: Any) -> None:
        cutoff = time.monotonic() - RESULT_KEEP
        for ident in [a for a, t in self._results.items() if t < cutoff]:
            await kv.delete(s.results_key(self.host, ident))
            del self._results[ident]
        self.seen.prune()

    # -- actions carried here ---------------------------------------------------------

    async def _consume_loop(self, from_host: str) -> None:
        """The actions ``from_host``'s operator carries here, one at a time."""
        js = self.bridge._js()
        prefix = s.inbox_prefix(self.host)
        consumer = s.ops_consumer(self.host, from_host)
        try:
            await js.consumer_info(s.OPS_STREAM, consumer)
        except nats.js.errors.NotFoundError:
            # A swarm set up before the operator's actions: the admin has to run
            # ensure_streams again (and the nodes need the new permissions). Until then
            # nothing is carried here; look again every second (the admin may be making
            # them right now, as a new swarm starts), saying so every 30 s.
            if time.monotonic() - self._missing_said_at > 30:
                self._missing_said_at = time.monotonic()
                log.warning("swarm: no stream %s or consumer %s yet", s.OPS_STREAM, consumer)
            await asyncio.sleep(1)
            return
        # Read raw, not with nats-py's fetch: a stored action's own Status header is not
        # the server's (pull.py; red team round 10's jam of this one consumer).
        assert self.bridge.nc is not None
        puller = Puller(self.bridge.nc, s.OPS_STREAM, consumer, prefix)
        await puller.start()
        legacy_left, legacy_at = True, -1e9
        try:
            while True:
                # What that host's operator carried here on the stream of before, first
                # (an upgrade from HIVE_OPS: subjects.py), and again now and then while
                # its consumer there is left.
                if legacy_left and time.monotonic() - legacy_at >= LEGACY_EVERY:
                    legacy_left = await self._drain_legacy(from_host)
                    legacy_at = time.monotonic()
                await self._room()
                m = await puller.next(wait=1.0)
                if m is not None:
                    await self._take(m)
        finally:
            with contextlib.suppress(Exception):
                await puller.stop()

    async def _room(self) -> None:
        """Bounded: beyond IN_FLIGHT taken and not finished, the rest wait in the stream (a
        carried-out action goes on if its loop restarts: it acks itself)."""
        while len(self._lanes.jobs) >= IN_FLIGHT:
            await asyncio.wait(set(self._lanes.jobs), return_when=asyncio.FIRST_COMPLETED)

    async def _drain_legacy(self, from_host: str) -> bool:
        """Take what ``from_host``'s operator carried here on the limits-retention stream
        of before (``HIVE_OPS``, its pair's consumer ``ops-<this>_<from>``) to its end,
        ahead of its actions on ``HIVE_ACTIONS``: an action published there and not yet
        applied when this host was upgraded is carried out, checked as any (``_take``: the
        subject's host, the pinned key's signature, its time, once only by its row in
        ``swarm_ops``). No host may publish there any more (natsconf.py). False once there
        is no such stream or consumer (nothing to read, ever: stop looking); True if it
        is read to its end for now, or the bus could not say (looked at again after
        LEGACY_EVERY seconds, as for ``HIVE_MSGS``: bridge.py)."""
        assert self.bridge.nc is not None
        js, durable = self.bridge._js(), s.ops_consumer(self.host, from_host)
        puller: Puller | None = None
        try:
            while True:
                try:
                    info = await js.consumer_info(s.LEGACY_OPS_STREAM, durable)
                except nats.js.errors.NotFoundError:
                    return False
                except (nats.errors.Error, TimeoutError, nats.js.errors.Error) as e:
                    log.info("swarm: can't read %s on %s yet: %s", durable, s.LEGACY_OPS_STREAM, e)
                    return True
                # Taken and being carried out (acked once done): not waiting for us.
                in_hand = sum(
                    1 for (h, _), seq in self._carrying.items() if h == from_host and seq < -1
                )
                if not info.num_pending and (info.num_ack_pending or 0) <= in_hand:
                    return True
                if puller is None:
                    log.info(
                        "swarm: reading host %s's actions on %s", from_host, s.LEGACY_OPS_STREAM
                    )
                    puller = Puller(
                        self.bridge.nc, s.LEGACY_OPS_STREAM, durable, s.inbox_prefix(self.host)
                    )
                    await puller.start()
                await self._room()
                m = await puller.next(wait=1.0)
                if m is not None:
                    await self._take(m)
        finally:
            if puller is not None:
                with contextlib.suppress(Exception):
                    await puller.stop()

    async def _take(self, m: Msg) -> None:
        """One delivery: refused (logged, counted, acked) unless it is sealed by a pinned
        operator, recent and new, or the same message again; a new one is recorded as
        taken and queued in its agent's lane (``_carry_out``); one delivered again after
        this host died gets its recorded outcome, or is carried out if nothing of it was
        committed (opstore.py)."""
        from_host = s.op_from_host_of(m.subject) or ""
        try:
            # Its time is checked below: a delivery again of one taken is answered anyway.
            action = open_sealed(m.data, from_host, self.host, self.operators, check_time=False)
        except ActionError as e:
            return await self._refuse(m, str(e))
        action_id = action["id"]
        # Bound to what was signed and to the one message that brought it: a replay (a new
        # message, even of the same bytes) or another action under its id is refused.
        digest = hashlib.sha256(canonical(action)).hexdigest()
        seq = _stream_seq(m)
        if self._carrying.get((from_host, action_id)) == seq:
            return  # delivered again while being carried out: acked once it is
        try:
            row = self.seen.get(from_host, action_id)
            if row is None:
                check_fresh(action)
                # Recorded before it is carried out (see opstore.py for after a crash).
                if not self.seen.claim(from_host, action_id, digest, seq):
                    raise ActionError(f"action {action_id} was taken before")
            elif row.digest != digest or row.stream_seq != seq:
                raise ActionError(f"action {action_id} was carried out before (a replay)")
            elif row.state != "taken":
                return await self._recovered(m, from_host, row)
            else:  # this host died carrying it out, before anything of it was committed
                try:
                    check_fresh(action)
                except ActionError as e:  # too late now: said so, once, as its outcome
                    outcome = {"ok": False, "status": 409,
                               "error": f"{e} (this host was down): nothing was done"}  # fmt: skip
                    return await self._finish(m, from_host, action_id, outcome)
        except ActionError as e:
            return await self._refuse(m, str(e))
        except StoreError as e:
            log.warning("swarm: can't record operator action %s yet: %s", action_id, e)
            return  # not acked: the bus hands it over again
        self._carrying[(from_host, action_id)] = seq
        self._lanes.run(
            self._lane_keys(action["request"]), lambda: self._carry_out(m, from_host, action)
        )

    def _lane_keys(self, request: dict[str, Any]) -> list[str] | None:
        """The agents ``request`` acts on (None: every agent), whose earlier actions it
        follows; none if it doesn't decode (its refusal waits for nothing)."""
        try:
            req: Any = HOST.decode(request)
        except Exception:
            return []
        cmd = request["cmd"]
        if cmd in ("start", "stop"):
            targets: list[str] | None = req.scope.agent_targets()
            return targets
        if cmd == "send":
            return [req.to]
        if cmd == "answer_question":
            asker = getattr(self.hive.store.questions.get(req.id), "asker", None)
            return [asker if isinstance(asker, str) else f"#question {req.id}"]
        if cmd in ("approve", "deny"):
            agent = getattr(self.hive.store.approvals.get(req.id), "agent", None)
            return [agent if isinstance(agent, str) else f"#approval {req.id}"]
        return [req.name]  # spawn, request_spawn, restart, set_paused, interrupt, destroy

    async def _carry_out(self, m: Msg, from_host: str, action: dict[str, Any]) -> None:
        """Carry ``action`` out (its turn in its lanes came), record and publish what it
        made, ack. The bus is told it is in progress meanwhile (a stop may take longer
        than the consumer's ack wait, and must not be handed over again meanwhile)."""
        action_id, request = action["id"], action["request"]
        try:
            progress = asyncio.get_running_loop().create_task(_in_progress(m))
            rider = self.seen.rider(from_host, action_id)
            try:
                outcome = await self._apply(request, rider)
            finally:
                progress.cancel()
                rider.end()
            # A crash here (tests/test_swarm_actions.py): applied, its outcome not recorded.
            faults.point(self.hive.store.path.parent, "carried-applied")
            self.applied += 1
            log.info(
                "swarm: operator action %s from host %s (%s): %s",
                action_id, from_host, request["cmd"],
                "applied" if outcome["ok"] else outcome["error"],
            )  # fmt: skip
            await self._finish(m, from_host, action_id, outcome)
        except Exception:  # one action's failure is its own: the lanes go on
            log.exception("swarm: operator action %s failed", action_id)
        finally:
            self._carrying.pop((from_host, action_id), None)

    async def _recovered(self, m: Msg, from_host: str, row: Taken) -> None:
        """The same message again, once this host carried it out (it died before the ack):
        its outcome as recorded, nothing carried out again. One applied whose outcome was
        not recorded yet was applied: so it says (a send's message id is not known)."""
        self.recovered += 1
        outcome = row.outcome if row.state == "done" and row.outcome else {"ok": True}
        log.info(
            "swarm: operator action %s from host %s delivered again: was %s, not carried out"
            " again", row.action_id, from_host, row.state,
        )  # fmt: skip
        await self._finish(m, from_host, row.action_id, outcome)

    async def _finish(
        self, m: Msg, from_host: str, action_id: str, outcome: dict[str, Any]
    ) -> None:
        """Record the outcome, publish it where its sender waits for it, then ack: a crash
        anywhere before the ack hands the same message over again, which finds it here."""
        try:
            self.seen.done(from_host, action_id, outcome)
        except StoreError as e:
            log.warning("swarm: can't record operator action %s's outcome: %s", action_id, e)
            return  # not acked: delivered again, it is found applied (or taken) then
        kv = await self.bridge._bucket()
        data = json.dumps({**outcome, "at": time.time()}).encode()
        for _ in range(20):  # its sender waits for this; the bus may be changing leaders
            try:
                await kv.put(s.result_key(self.host, from_host, action_id), data)
                break
            except (nats.errors.Error, TimeoutError, nats.js.errors.Error):
                await asyncio.sleep(0.25)
        await m.ack()

    async def _refuse(self, m: Msg, why: str) -> None:
        self.refused += 1
        log.warning("swarm: refused an operator action on %s: %s", m.subject, why)
        await m.ack()

    async def _apply(self, request: dict[str, Any], rider: Applied) -> dict[str, Any]:
        """The request as if the operator had made it on this host's host.sock; ``rider``
        marks it applied in the transaction of its effect (a lifecycle verb's: the one
        that completes it)."""
        cmd = request["cmd"]
        if cmd in ("approve", "deny") and not request.get("payload_sha256"):
            return {"ok": False, "status": 422, "error": "an approval from another host"
                    " must be bound to its payload_sha256"}  # fmt: skip
        try:
            req: Any = HOST.decode(request)
            if cmd in LIFECYCLE and not _bound(req):
                return {"ok": False, "status": 422, "error": f"a {cmd} from another host must"
                        " be bound to the created_at of each agent it names"}  # fmt: skip
            with riding(rider, at_completion=cmd in LIFECYCLE):
                reply = await HOST.call(OperatorSession(self.hive), req)
        except Refused as e:
            return {"ok": False, "status": e.status, "error": str(e)[:SHORT_TEXT_CHARS]}
        except Exception as e:  # its id is taken: say what happened rather than lose it
            log.exception("swarm: operator action %s failed", request["cmd"])
            return {"ok": False, "status": 503, "error": f"internal error: {type(e).__name__}"}
        # A request_spawn's approval, as its host numbered it (what the operator approves);
        # a send's message id there.
        made = reply if isinstance(reply, dict) and request["cmd"] in REPLY_VERBS else {}
        return {"ok": True, **{k: made[k] for k in REPLY_FIELDS if k in made}}


def _bound(req: Any) -> bool:
    """A lifecycle request (decoded) names each agent's incarnation (a stop or start of
    every agent names none)."""
    scope = getattr(req, "scope", None)
    if scope is None:  # restart, set_paused, interrupt, destroy: one agent
        return req.created_at is not None
    names = scope.agent_names
    return not names or (req.created_at is not None and set(req.created_at) >= set(names))


def _stream_seq(m: Msg) -> int:
    """The stream sequence of a stored message (the same in each of its deliveries). The
    stream of before (``HIVE_OPS``) numbers its own messages: its are kept apart as
    ``-1 - seq`` (at most -2), so an action there and one of the same bytes on
    ``HIVE_ACTIONS`` are two messages (the second refused as a replay), never taken for
    one message delivered again."""
    try:
        meta = m.metadata
        seq = int(meta.sequence.stream)
    except Exception:  # no $JS.ACK reply: never handed here by the Puller
        return -1
    return -1 - seq if meta.stream == s.LEGACY_OPS_STREAM else seq


async def _in_progress(m: Msg) -> None:
    """Tell the bus every half ack wait that ``m`` is still being carried out."""
    while True:
        await asyncio.sleep(s.ACK_WAIT_SECONDS / 2)
        with contextlib.suppress(Exception):
            await m.in_progress()
