"""A stand-in for the Anthropic Messages API (``POST /v1/messages``, streamed as
server-sent events), on 127.0.0.1, so the real Claude Code CLI can run whole
turns without a model or a network: ``ANTHROPIC_BASE_URL`` points at it and
``ANTHROPIC_API_KEY`` is any string.

The "model" follows a script: each agent-loop request (one that offers tools)
whose last message is not a tool result takes the next ``(tool_name, input)``
from ``actions`` and answers with that ``tool_use``; every other request gets a
short text answer (``reply``). Every request body is kept in ``requests``.

A ``script`` instead answers by what the turn is about, so that several agents (and
retries) can share one stand-in in any order: the turn's prompt is the conversation's
last user text holding the harness's ``{"hive_item": …, "body": …}``; the first rule
whose ``when`` fields (``kind``, ``from``, and ``body_has``: a substring of the body) all
match it gives the tool calls, one per agent-loop request (each tool_use id names the
item, so the n-th call comes after n calls for it). In a tool's input, the string ``"$ref"`` (``"$id"``) becomes the
hive_item's ``ref`` (``id``): a question is answered by its id."""

from __future__ import annotations

import json
import ssl
import threading
import time
from collections.abc import Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self


class FakeAnthropic:
    def __init__(self, actions: Iterable[tuple[str, dict[str, Any]]] = (), reply: str = "Done.",
                 address: tuple[str, int] = ("127.0.0.1", 0), api_key: str | None = None,
                 seen: list[dict[str, Any]] | None = None,
                 script: list[dict[str, Any]] | None = None) -> None:
        """``api_key``: answer 401 unless the request carries it (x-api-key or a bearer
        token); what each request carried is noted in ``seen`` (never the key itself)."""
        self.actions = list(actions)
        self.script = script or []
        self.reply = reply
        self.api_key = api_key
        self.seen = seen if seen is not None else []
        self.requests: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _send(self, status: int, ctype: str, body: bytes) -> None:
                self.send_response(status)
                self.send_header("content-type", ctype)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _key_ok(self) -> bool:
                got = [self.headers.get("x-api-key") or "",
                       (self.headers.get("authorization") or "").removeprefix("Bearer ")]
                fake.seen.append({
                    "method": self.command, "path": self.path, "host": self.headers.get("host"),
                    "key_ok": fake.api_key is not None and fake.api_key in got,
                    "placeholder": any(g.startswith("hive-placeholder-") for g in got),
                    "at": round(time.time(), 2),
                })
                if fake.api_key is None or fake.api_key in got:
                    return True
                self._send(401, "application/json", json.dumps(
                    {"type": "error", "error": {"type": "authentication_error", "message": "invalid x-api-key"}}
                ).encode())
                return False

            def do_GET(self) -> None:
                if not self._key_ok():
                    return
                if self.path.startswith("/api/"):  # the CLI's side calls (settings, limits): none here
                    self._send(404, "application/json", json.dumps(
                        {"type": "error", "error": {"type": "not_found_error", "message": "not here"}}).encode())
                    return
                self._send(200, "application/json", json.dumps({"path": self.path}).encode())

            def do_POST(self) -> None:
                if not self._key_ok():
                    self.rfile.read(int(self.headers.get("content-length") or 0))
                    return
                length = int(self.headers.get("content-length") or 0)
                try:
                    req = json.loads(self.rfile.read(length) or b"{}")
                except ValueError:
                    req = {}
                if not self.path.startswith("/v1/messages") or "count_tokens" in self.path:
                    self._send(200, "application/json", json.dumps({"input_tokens": 10}).encode())
                    return
                block, stop = fake.answer(req)
                if req.get("stream"):
                    self._send(200, "text/event-stream", fake.sse(req, block, stop))
                else:
                    self._send(200, "application/json", json.dumps(fake.message(req, [block], stop)).encode())

        self.server = ThreadingHTTPServer(address, Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def serve_tls(self, certfile: str) -> None:
        """Serve HTTPS with ``certfile`` (key and chain in one PEM), in this thread."""
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(certfile)
        self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
        self.server.serve_forever()

    @property
    def base_url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> Self:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    # -- the "model" ------------------------------------------------------------------

    @staticmethod
    def _is_tool_result(message: dict[str, Any]) -> bool:
        content = message.get("content")
        return isinstance(content, list) and any(
            isinstance(b, dict) and b.get("type") == "tool_result" for b in content
        )

    def answer(self, req: dict[str, Any]) -> tuple[dict[str, Any], str]:
        messages = req.get("messages") or [{}]
        with self.lock:
            self.requests.append(req)
            agent_loop = bool(req.get("tools"))
            scripted = self.scripted(messages) if agent_loop and self.script else None
            if scripted is not None:
                return {"type": "tool_use", "id": scripted[0], "name": scripted[1], "input": scripted[2]}, "tool_use"
            if agent_loop and not self._is_tool_result(messages[-1]) and self.actions:
                name, tool_input = self.actions.pop(0)
                n = sum(1 for r in self.requests if r.get("tools"))
                return {"type": "tool_use", "id": f"toolu_fake{n}", "name": name, "input": tool_input}, "tool_use"
        return {"type": "text", "text": self.reply}, "end_turn"

    @staticmethod
    def _prompt(text: str) -> dict[str, Any] | None:
        """The harness's prompt in a user message's text (the CLI may add text around it)."""
        at = text.find('{"hive_item"')
        if at < 0:
            return None
        try:
            prompt, _ = json.JSONDecoder().raw_decode(text[at:])
        except ValueError:
            return None
        return prompt if isinstance(prompt, dict) else None

    def scripted(self, messages: list[dict[str, Any]]) -> tuple[str, str, dict[str, Any]] | None:
        """The script's next tool call for this conversation (its tool_use id, name and
        input), or None (a text answer). The turn's prompt is the conversation's last text
        block with a hive_item; the calls already made for it are the tool_use blocks whose
        id names its item (Claude Code merges and reorders a resumed session's messages,
        so counting by position is not reliable)."""
        prompt: dict[str, Any] | None = None
        used: list[str] = []
        for message in messages:
            content = message.get("content")
            blocks = [{"type": "text", "text": content}] if isinstance(content, str) else content or []
            for block in blocks:
                if not isinstance(block, dict):
                    continue
                if block.get("type") == "tool_use":
                    used.append(str(block.get("id")))
                elif block.get("type") == "text" and message.get("role") == "user":
                    prompt = self._prompt(str(block.get("text", ""))) or prompt
        if prompt is None:
            return None
        item, body = prompt.get("hive_item") or {}, str(prompt.get("body", ""))
        tag = f"toolu_item{item.get('id')}_"
        done = sum(1 for u in used if u.startswith(tag))
        for rule in self.script:
            when = rule["when"]
            if all(item.get(k) == when[k] for k in ("kind", "from") if k in when) and \
                    when.get("body_has", "") in body:
                if done >= len(rule["do"]):
                    return None
                name, tool_input = rule["do"][done]
                fill = {"$ref": item.get("ref"), "$id": item.get("id")}
                return f"{tag}{done}", name, {k: fill.get(v, v) if isinstance(v, str) else v
                                             for k, v in tool_input.items()}
        return None

    @staticmethod
    def message(req: dict[str, Any], content: list[dict[str, Any]], stop: str | None) -> dict[str, Any]:
        return {
            "id": "msg_fake", "type": "message", "role": "assistant", "model": req.get("model", "fake"),
            "content": content, "stop_reason": stop, "stop_sequence": None,
            "usage": {"input_tokens": 10, "output_tokens": 5},
        }

    def sse(self, req: dict[str, Any], block: dict[str, Any], stop: str) -> bytes:
        if block["type"] == "tool_use":
            start = dict(block, input={})
            delta = {"type": "input_json_delta", "partial_json": json.dumps(block["input"])}
        else:
            start = dict(block, text="")
            delta = {"type": "text_delta", "text": block["text"]}
        events = [
            ("message_start", {"type": "message_start", "message": self.message(req, [], None)}),
            ("content_block_start", {"type": "content_block_start", "index": 0, "content_block": start}),
            ("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": delta}),
            ("content_block_stop", {"type": "content_block_stop", "index": 0}),
            ("message_delta", {"type": "message_delta", "delta": {"stop_reason": stop, "stop_sequence": None},
                               "usage": {"output_tokens": 5}}),
            ("message_stop", {"type": "message_stop"}),
        ]
        return b"".join(f"event: {name}\ndata: {json.dumps(data)}\n\n".encode() for name, data in events)


def main() -> None:
    """In a test network namespace: ``fake_anthropic.py ADDR PORT CERT KEY SEEN ACTIONS``
    (KEY ``-``: none needed; ACTIONS a JSON list of actions, or ``{"script": [...]}``);
    each request's notes go to SEEN as JSON lines (flushed)."""
    import sys

    addr, port, cert, key, seen_path, actions = sys.argv[1:7]

    class Seen(list[dict[str, Any]]):
        def append(self, item: dict[str, Any]) -> None:
            super().append(item)
            with open(seen_path, "a") as f:
                f.write(json.dumps(item) + "\n")

    plan = json.loads(actions)
    script = plan.get("script") if isinstance(plan, dict) else None
    fake = FakeAnthropic([] if script is not None else [tuple(a) for a in plan],  # type: ignore[misc]
                         address=(addr, int(port)), api_key=None if key == "-" else key, seen=Seen(),
                         script=script)
    fake.serve_tls(cert)


if __name__ == "__main__":
    main()
