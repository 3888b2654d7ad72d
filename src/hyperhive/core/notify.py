"""Notifications (``[notify]`` in hive.toml): each new question to the operator and each
new approval request goes to the operator's webhooks (ntfy, Matrix, Slack-compatible),
carrying a one-use link to that item; so does each limit hit of a cage (the ``trouble``
line of the agent's ``agent_status`` event, core/limit_hits.py), one line linking to the
agent's page.

Fed by the event bus, it never blocks the hive: the bus's listener only puts the item on
a bounded queue per webhook (memory only; no I/O, no database); a worker task per webhook
makes the link and sends, with retries. What can go wrong stays here:

- A slow or dead receiver delays only its own queue: up to ``[notify] queue`` items wait
  (nothing lost); past that new items are dropped, counted, logged, and the next
  notification that goes out says how many.
- Retries: ``attempts`` in all, waiting ``backoff_seconds`` and twice as long each time
  (at most ``MAX_BACKOFF``) after a transport error, a timeout, a 5xx or a 429 (whose
  Retry-After is honoured, within the same bound); any other status is final. A redirect
  is never followed (the URL is the operator's; no receiver can send the hive elsewhere).
  Every failure is one log line; the URL is never logged (it holds a secret).
- An agent controls only text inside the notification: cut to ``CUT`` characters,
  controls and bidi marks shown as escapes (``hyperhive.display``), JSON-encoded, and for
  Slack ``&``, ``<``, ``>`` escaped (no ``<!channel>``, no forged ``<url|label>``); Matrix
  messages carry an empty ``m.mentions`` (no ``@room`` ping). Never a header or the URL.
- Flooding: per agent, ``agent_burst`` notifications, then one per
  ``agent_interval_seconds``; the rest are coalesced into one "N more" notification.

The link is ``base_url/n/<token>``: 32 random bytes, stored as its sha256 (store/links.py),
bound to the question or to the approval and its ``payload_sha256``, good once, until
``link_ttl_hours``. It only navigates (core/http.py ``/n/{token}``); acting still needs
the operator's session and CSRF token."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import secrets
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

import httpx

from hyperhive.config import NotifySection, Webhook
from hyperhive.core.approvals import allows_of
from hyperhive.core.events import EventBus
from hyperhive.core.store.links import LinkRepo, LinkTarget
from hyperhive.display import visible
from hyperhive.names import OPERATOR

log = logging.getLogger("hive.notify")
# httpx logs every request's URL at INFO: a webhook's URL holds its secret (a Matrix
# access token, an ntfy topic). The core uses httpx for nothing else.
logging.getLogger("httpx").setLevel(logging.WARNING)

CUT = 200  # characters of agent-written text a notification shows, at most
MAX_BACKOFF = 300.0  # seconds between two attempts, at most
MATRIX_SEND = "/send/m.room.message"
# What a digest counts of each kind ("2 question(s), 1 limit hit(s)").
NOUNS = {"question": "question", "approval": "approval", "limit": "limit hit"}
# What a Slack message's link opens, by the item's kind.
LABELS = {"question": "question", "approval": "approval", "limit": "agent", "digest": "digest"}


@dataclass(frozen=True, slots=True)
class Item:
    """Something that needs the operator: a question or an approval, a limit hit of the
    agent's cage (``id`` 0, hive-written text, a link to the agent's page), or a digest of
    an agent's items that were coalesced (``id`` 0, a link to the dashboard)."""

    kind: Literal["question", "approval", "limit", "digest"]
    id: int
    agent: str
    text: str  # agent-written: the question, the approval's description; a limit's: the hive's
    payload_sha256: str | None = None
    detail: str | None = None  # hive-written: an approval's kind and what it allows/grants


@dataclass(slots=True)
class Note:
    """One notification, ready to send (the same transaction id on every attempt)."""

    item: Item
    title: str
    text: str
    link: str
    txn: str = field(default_factory=lambda: uuid.uuid4().hex)


def cut(text: str, limit: int = CUT) -> str:
    """Agent text as a notification shows it: one line, controls escaped, at most
    ``limit`` characters (then "…")."""
    shown = visible(text, one_line=True)
    return shown if len(shown) <= limit else shown[:limit] + "…"


def slack_escape(text: str) -> str:
    """Slack's own escaping: nothing can become a link, a mention or a <!channel>."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


class _Failed(Exception):
    def __init__(self, reason: str, retry: bool, after: float | None = None) -> None:
        super().__init__(reason)
        self.retry = retry
        self.after = after


@dataclass
class _Bucket:
    tokens: float
    at: float
    held: dict[str, int] = field(default_factory=lambda: defaultdict(int))


class Notifier:
    """The bus listener and one sending worker per webhook."""

    def __init__(
        self, config: NotifySection, base_url: str, links: LinkRepo, bus: EventBus | None = None
    ) -> None:
        self.config = config
        self.base_url = base_url.rstrip("/")
        self.links = links
        self.queues: list[asyncio.Queue[Item]] = [
            asyncio.Queue(config.queue) for _ in config.webhooks
        ]
        self.dropped = [0] * len(config.webhooks)
        self.sent = [0] * len(config.webhooks)  # delivered notifications (for tests, logs)
        self._buckets: dict[str, _Bucket] = {}
        self._client: httpx.AsyncClient | None = None
        self._tasks: list[asyncio.Task[None]] = []
        if bus is not None:
            bus.listen("question", self.on_event)
            bus.listen("approval", self.on_event)
            bus.listen("agent_status", self.on_event)  # only those with a limit hit's line

    # -- the bus's side: memory only, never raises ------------------------------------

    def on_event(self, event: dict[str, Any]) -> None:
        try:
            item = self._item(event)
            if item is not None and self._admit(item):
                self._enqueue(item)
        except Exception:  # a notification must never break the verb that caused it
            log.exception("notify: an event could not be queued")

    @staticmethod
    def _item(event: dict[str, Any]) -> Item | None:
        if event.get("kind") == "agent_status":
            trouble, agent = event.get("trouble"), event.get("agent") or {}
            if trouble is None or "name" not in agent:
                return None  # a start, a stop, a status text: not the operator's to hear of
            return Item("limit", 0, str(agent["name"]), str(trouble))
        if event.get("kind") == "question":
            q = event.get("question") or {}
            if q.get("to") != OPERATOR or q.get("answer") is not None:
                return None
            return Item("question", int(q["id"]), str(q["asker"]), str(q.get("question", "")))
        a = event.get("approval") or {}
        if a.get("status") != "pending" or a.get("agent") == OPERATOR or "unreadable" in a:
            return None  # a resolution, or the operator's own request_spawn
        detail = str(a.get("kind"))
        extra = a.get("grants") or a.get("allows")
        if extra is None:  # the rule an egress approval would add
            extra = allows_of(a.get("kind"), a.get("payload"))
        if extra:
            extra = f"{'allows ' if a.get('kind') == 'egress' else ''}{extra}"
            detail += f": {cut(extra, 2 * CUT)}"
        return Item(
            "approval",
            int(a["id"]),
            str(a["agent"]),
            str(a.get("description", "")),
            str(a.get("payload_sha256")),
            detail,
        )

    def _admit(self, item: Item) -> bool:
        """The agent's rate: True to send ``item`` now; False: it is counted for a digest."""
        interval = self.config.agent_interval_seconds
        if interval <= 0:
            return True
        now = time.monotonic()
        b = self._buckets.get(item.agent)
        if b is None:
            b = self._buckets[item.agent] = _Bucket(float(self.config.agent_burst), now)
        b.tokens = min(float(self.config.agent_burst), b.tokens + (now - b.at) / interval)
        b.at = now
        if b.tokens >= 1 and not b.held:
            b.tokens -= 1
            return True
        b.held[item.kind] += 1
        return False

    def _enqueue(self, item: Item) -> None:
        for i, queue in enumerate(self.queues):
            try:
                queue.put_nowait(item)
            except asyncio.QueueFull:
                self.dropped[i] += 1
                log.warning(
                    "notify: %s queue full (%d waiting): dropped %s %d of %s (%d dropped so far)",
                    self._hook_name(i),
                    queue.qsize(),
                    item.kind,
                    item.id,
                    item.agent,
                    self.dropped[i],
                )

    # -- the workers ------------------------------------------------------------------

    def start(self) -> None:
        self._client = httpx.AsyncClient(
            follow_redirects=False,  # the operator's URL only; a receiver can't redirect us
            trust_env=False,  # nor can the core's environment (HTTP_PROXY) reroute it
            timeout=self.config.timeout_seconds,
            limits=httpx.Limits(max_connections=len(self.queues) + 1),
        )
        self._tasks = [
            asyncio.create_task(self._worker(i), name=f"notify-{i}")
            for i in range(len(self.queues))
        ]
        if self.config.agent_interval_seconds > 0:
            self._tasks.append(asyncio.create_task(self._digests(), name="notify-digests"))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._client is not None:
            await self._client.aclose()

    async def _digests(self) -> None:
        """Once an agent's rate allows, one notification for all it held back."""
        tick = min(max(self.config.agent_interval_seconds / 4, 0.5), 15.0)
        while True:
            await asyncio.sleep(tick)
            now = time.monotonic()
            for agent, b in list(self._buckets.items()):
                b.tokens = min(
                    float(self.config.agent_burst),
                    b.tokens + (now - b.at) / self.config.agent_interval_seconds,
                )
                b.at = now
                if b.held and b.tokens >= 1:
                    b.tokens -= 1
                    counts = ", ".join(
                        f"{n} {NOUNS.get(kind, kind)}(s)" for kind, n in sorted(b.held.items())
                    )
                    b.held.clear()
                    self._enqueue(Item("digest", 0, agent, counts))
                elif not b.held and b.tokens >= self.config.agent_burst:
                    del self._buckets[agent]  # back to a full burst: nothing to remember

    async def _worker(self, i: int) -> None:
        queue = self.queues[i]
        while True:
            item = await queue.get()
            try:
                note = self.note(item, self.dropped[i])
                self.dropped[i] = 0
                await self._deliver(i, note)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # e.g. the database: this notification only
                log.warning(
                    "notify: %s: %s %d not sent: %s", self._hook_name(i), item.kind, item.id, e
                )

    def note(self, item: Item, dropped: int = 0) -> Note:
        """The notification for ``item``, with a fresh one-use link (a digest links to the
        dashboard itself, a limit hit to the agent's page: nothing there to act on once)."""
        if item.kind == "digest":
            title = f"hive: {item.agent} has more waiting"
            text = f"{item.agent}: {item.text} more (rate-limited, not sent one by one)"
            link = f"{self.base_url}/"
        elif item.kind == "limit":
            title = f"hive: {item.agent} hit a limit of its cage"
            text = cut(item.text)
            link = f"{self.base_url}/agent/{item.agent}/"
        else:
            token = secrets.token_urlsafe(32)
            target = LinkTarget(item.kind, item.id, item.payload_sha256)
            expires = time.time() + self.config.link_ttl_hours * 3600
            self.links.save(hashlib.sha256(token.encode()).hexdigest(), target, expires)
            link = f"{self.base_url}/n/{token}"
            if item.kind == "question":
                title = f"hive: question {item.id} from {item.agent}"
                text = f"{item.agent} asks (question {item.id}): {cut(item.text)}"
            else:
                title = f"hive: approval {item.id} requested by {item.agent}"
                text = f"{item.agent} requests approval {item.id} ({item.detail}): {cut(item.text)}"
        if dropped:
            text += f" ({dropped} earlier notification(s) dropped: the queue was full)"
        return Note(item, title, text, link)

    async def _deliver(self, i: int, note: Note) -> None:
        hook = self.config.webhooks[i]
        attempts = self.config.attempts
        for attempt in range(1, attempts + 1):
            try:
                await self._send(hook, note)
                self.sent[i] += 1
                if attempt > 1:
                    log.info(
                        "notify: %s: %s %d sent on attempt %d",
                        self._hook_name(i),
                        note.item.kind,
                        note.item.id,
                        attempt,
                    )
                return
            except _Failed as e:
                final = not e.retry or attempt == attempts
                wait = min(
                    MAX_BACKOFF,
                    e.after
                    if e.after is not None
                    else self.config.backoff_seconds * 2 ** (attempt - 1),
                )
                log.warning(
                    "notify: %s: %s %d of %s: attempt %d/%d failed (%s); %s",
                    self._hook_name(i),
                    note.item.kind,
                    note.item.id,
                    note.item.agent,
                    attempt,
                    attempts,
                    e,
                    "giving up" if final else f"retrying in {wait:.1f} s",
                )
                if final:
                    return
                await asyncio.sleep(wait)

    def _hook_name(self, i: int) -> str:
        hook = self.config.webhooks[i]
        return f"webhook {i + 1} ({hook.format}, {urlsplit(hook.url).hostname})"

    async def _send(self, hook: Webhook, note: Note) -> None:
        assert self._client is not None, "start() first"
        method, url, headers, body = request_for(hook, note)
        try:
            resp = await self._client.request(method, url, headers=headers, content=body)
        except httpx.TransportError as e:  # refused, reset, timed out
            reason = f"{type(e).__name__}: {e}".replace(hook.url, "<url>")
            raise _Failed(" ".join(reason.split())[:200], retry=True) from None
        if 200 <= resp.status_code < 300:
            return
        after = None
        if resp.status_code == 429:
            with contextlib.suppress(ValueError):
                after = float(resp.headers.get("retry-after", ""))
        retry = resp.status_code >= 500 or resp.status_code == 429
        what = "redirect not followed" if 300 <= resp.status_code < 400 else "refused"
        raise _Failed(f"HTTP {resp.status_code}, {what}", retry=retry, after=after)


def request_for(hook: Webhook, note: Note) -> tuple[str, str, dict[str, str], bytes]:
    """Method, URL, headers and body of ``note`` in ``hook``'s format. Agent text goes
    only into the body, JSON-encoded (or, for ntfy, as the plain-text body itself)."""
    if hook.format == "ntfy":
        headers = {
            "Title": note.title,  # hive-written: a name (a-z0-9-) and an id
            "Click": note.link,
            "Content-Type": "text/plain; charset=utf-8",
        }
        return "POST", hook.url, headers, f"{note.text}\n{note.link}".encode()
    json_headers = {"Content-Type": "application/json"}
    if hook.format == "slack":
        body = {
            "text": f"{slack_escape(note.text)}\n<{note.link}|open {LABELS[note.item.kind]}>",
            "unfurl_links": False,
            "unfurl_media": False,
        }
        return "POST", hook.url, json_headers, json.dumps(body).encode()
    # matrix: plain text only (no formatted_body, so no HTML), no mentions
    body = {"msgtype": "m.text", "body": f"{note.text}\n{note.link}", "m.mentions": {}}
    parts = urlsplit(hook.url)
    if parts.path.endswith(MATRIX_SEND):  # the client-server API: PUT with a txn id
        url = urlunsplit(parts._replace(path=f"{parts.path}/{note.txn}"))
        return "PUT", url, json_headers, json.dumps(body).encode()
    return "POST", hook.url, json_headers, json.dumps(body).encode()
