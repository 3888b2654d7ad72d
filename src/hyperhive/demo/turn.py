"""One turn of a demo agent: the message arrives as JSON on stdin.

The demo swarm (examples/demo/hive.toml) tells the whole story with no LLM:
the operator messages `lead`; lead asks its peer `scout`, which answers; lead
asks the operator and waits; on a "yes" it asks for approval to spawn `helper`;
once approved, helper starts in its own cage, does its job and reports back;
a reminder lead set fires. Standard library only: it talks to
/run/hive/agent.sock ($HIVE_SOCKET) directly.
"""

import json
import os
import socket
import sys
from collections.abc import Callable
from typing import Any, NotRequired, TypedDict

SOCKET = os.environ.get("HIVE_SOCKET", "/run/hive/agent.sock")
ME = os.environ.get("HIVE_AGENT", "?")
HERE = os.path.abspath(__file__)

# A message as the harness hands it over (DESIGN.md, `recv`); "from" is a keyword, hence
# the functional form.
Message = TypedDict(
    "Message",
    {
        "id": int,
        "from": str,
        "kind": str,
        "body": str,
        "sent_at": str,
        "ref": NotRequired[int],
    },
)


def hive(cmd: str, **fields: object) -> dict[str, Any]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(SOCKET)
        s.sendall(json.dumps({"cmd": cmd, **fields}).encode() + b"\n")
        reply: dict[str, Any] = json.loads(s.makefile("rb").readline())
    if not reply.get("ok"):
        raise SystemExit(f"{cmd}: {reply.get('error')}")
    return reply


def say(text: str) -> None:
    print(f"{ME}: {text}", flush=True)


def lead(msg: Message) -> None:
    kind, sender, body = msg["kind"], msg["from"], msg["body"]
    if kind == "message" and sender == "operator":
        q = hive(
            "ask",
            to="scout",
            question=f"The operator asks: {body!r}. Anything blocking the release?",
        )
        hive("set_status", text="asked scout; waiting for its answer")
        say(f"asked scout (question {q['id']})")
    elif kind == "answer" and sender == "scout":
        q = hive(
            "ask",
            to="operator",
            question=f"scout says: {body} Ship the release?",
            options=["yes", "no"],
        )
        hive("set_status", text="waiting for the operator's go-ahead")
        say(f"asked the operator (question {q['id']})")
    elif kind == "answer" and sender == "operator":
        if body.strip().lower().startswith("y"):
            spec = {"runtime": "command", "command": ["python3", HERE], "peers": ["lead"]}
            a = hive(
                "request_approval",
                kind="spawn",
                description="spawn helper to write the release notes",
                payload={"name": "helper", "spec": spec},
            )
            hive("set_status", text=f"waiting for approval {a['id']} to spawn helper")
            say(f"requested approval {a['id']} (payload sha256 {a['payload_sha256'][:12]}…)")
        else:
            hive("set_status", text="release on hold: the operator said no")
            hive("send", to="operator", body="Understood, holding the release.")
    elif kind == "approval":
        if body.startswith("approved"):
            hive("send", to="helper", body="Please write the release notes.")
            hive("remind", in_seconds=2, text="check that helper reported back")
            hive("set_status", text="helper spawned; waiting for its report")
            say("helper approved; asked it for the release notes")
        else:
            hive("set_status", text=f"spawn not approved: {body}")
    elif kind == "message" and sender == "helper":
        hive("send", to="operator", body=f"helper reports: {body}")
        hive("set_status", text="release notes done")
        say("forwarded helper's report to the operator")
    elif kind == "reminder":
        hive("set_status", text=f"reminder fired: {body}")
        hive("send", to="operator", body=f"Reminder fired: {body}")
        say("reminder fired")
    else:
        say(f"nothing to do for a {kind} from {sender}")


def scout(msg: Message) -> None:
    if msg["kind"] == "question":
        hive("answer", id=msg["ref"], answer="Nothing blocks it: all tests are green.")
        hive("set_status", text=f"answered question {msg['ref']}")
        say(f"answered question {msg['ref']}")
    else:
        say(f"noted a {msg['kind']} from {msg['from']}")


def helper(msg: Message) -> None:
    if msg["kind"] == "message" and msg["from"] == "lead":
        hive("set_status", text="writing the release notes")
        hive("send", to="lead", body="Release notes written: 3 features, 2 fixes.")
        hive("set_status", text="reported back to lead")
        say("reported back to lead")


def other(msg: Message) -> None:
    say(f"got {msg['kind']}")


TURNS: dict[str, Callable[[Message], None]] = {"lead": lead, "scout": scout, "helper": helper}


def main() -> None:
    msg: Message = json.load(sys.stdin)
    TURNS.get(ME, other)(msg)


if __name__ == "__main__":
    main()
