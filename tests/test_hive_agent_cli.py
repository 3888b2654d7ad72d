"""``hive agent --socket SOCK <verb>``: every agent verb from the command line against a
core-only hive (alice -> bob, bob -> alice and carol, carol with no peers), the
human output and ``--json``; refusals exit 1 with one line; a hive that isn't
running is named by its socket."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from helpers import REPO, CoreProcess, assert_ok, wire_time

HIVE = REPO / ".venv" / "bin" / "hive"


def run_hive(*args: str | Path, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    base = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8", "COLUMNS": "200"}
    return subprocess.run(
        [str(HIVE), *map(str, args)], capture_output=True, text=True, timeout=timeout, check=False,
        env={**base, **(env or {})},
    )


def agent(core: CoreProcess, name: str, *args: str) -> subprocess.CompletedProcess[str]:
    return run_hive("agent", "--socket", core.agent_sock(name), *args)


def ok_out(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout: {proc.stdout}\nstderr: {proc.stderr}"
    assert proc.stderr == "", proc.stderr
    return proc.stdout


def ok_json(proc: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    resp = json.loads(ok_out(proc))
    assert resp["version"] == 1 and resp["ok"] is True, resp
    return resp


def one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    """Exit 1, nothing on stdout, one line on stderr (no traceback)."""
    assert proc.returncode == 1, f"exit {proc.returncode}\nstdout: {proc.stdout}\nstderr: {proc.stderr}"
    assert proc.stdout == "", proc.stdout
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("hive: "), proc.stderr
    return lines[0]


def refused_json(proc: subprocess.CompletedProcess[str]) -> str:
    """``--json`` refusal: the response on stdout, exit 1."""
    assert proc.returncode == 1, f"exit {proc.returncode}\nstdout: {proc.stdout}\nstderr: {proc.stderr}"
    resp = json.loads(proc.stdout)
    assert resp["version"] == 1 and resp["ok"] is False, resp
    assert isinstance(resp["error"], str) and "\n" not in resp["error"]
    return resp["error"]


def sha256_of(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


# -- whoami / peers ----------------------------------------------------------------------


def test_whoami(module_core: CoreProcess) -> None:
    core = module_core  # shared: only looked at
    for name in ("alice", "bob", "carol"):
        assert ok_out(agent(core, name, "whoami")) == f"{name}\n"
        assert ok_json(agent(core, name, "whoami", "--json")) == {"version": 1, "ok": True, "name": name}


def test_socket_from_hive_socket_env(module_core: CoreProcess) -> None:
    core = module_core  # shared: only looked at
    proc = run_hive("agent", "whoami", env={"HIVE_SOCKET": str(core.agent_sock("bob"))})
    assert ok_out(proc) == "bob\n"


def test_peers(module_core: CoreProcess) -> None:
    core = module_core  # shared: only looked at
    assert ok_out(agent(core, "alice", "peers")) == "bob\n"
    assert ok_out(agent(core, "bob", "peers")) == "alice\ncarol\n"
    assert ok_out(agent(core, "carol", "peers")) == ""
    assert ok_json(agent(core, "bob", "peers", "--json"))["peers"] == ["alice", "carol"]


# -- send / recv / ack ----------------------------------------------------------------------


def test_send_to_operator_and_peer(core: CoreProcess) -> None:
    out = ok_out(agent(core, "alice", "send", "operator", "status: green"))
    m = re.fullmatch(r"sent message (\d+) to operator\n", out)
    assert m, out
    resp = ok_json(agent(core, "alice", "send", "bob", "hi bob", "--json"))
    inbox = assert_ok(core.host_call("inbox"))["messages"]
    assert [(x["id"], x["from"], x["body"]) for x in inbox] == [(int(m[1]), "alice", "status: green")]
    got = assert_ok(core.agent_call("bob", "recv", wait=5))["messages"]
    assert [(x["id"], x["from"], x["body"]) for x in got] == [(resp["id"], "alice", "hi bob")]


def test_recv_human_json_and_ack(core: CoreProcess) -> None:
    assert ok_out(agent(core, "alice", "recv")) == "messages: none\n"
    ids = [assert_ok(core.host_call("send", to="alice", body=b))["id"] for b in ("first [b]note[/b]", "second")]
    out = ok_out(agent(core, "alice", "recv"))
    assert "first [b]note[/b]" in out and "second" in out and "operator" in out  # agent text is not markup
    # Not acked: the next connection gets them again.
    resp = ok_json(agent(core, "alice", "recv", "--json"))
    assert [(m["id"], m["from"], m["kind"], m["body"]) for m in resp["messages"]] == [
        (ids[0], "operator", "message", "first [b]note[/b]"), (ids[1], "operator", "message", "second"),
    ]
    assert [m["id"] for m in ok_json(agent(core, "alice", "recv", "--max", "1", "--json"))["messages"]] == ids[:1]
    assert ok_out(agent(core, "alice", "ack", str(ids[0]))) == "acked 1\n"
    assert ok_json(agent(core, "alice", "ack", str(ids[0]), "--json"))["acked"] == 0  # already acked
    assert [m["id"] for m in ok_json(agent(core, "alice", "recv", "--ack", "--json"))["messages"]] == ids[1:]
    assert ok_out(agent(core, "alice", "recv")) == "messages: none\n"


def test_recv_waits_for_a_message(core: CoreProcess) -> None:
    cmd = [str(HIVE), "agent", "--socket", str(core.agent_sock("bob")), "recv", "--wait", "30", "--ack", "--json"]
    waiting = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # Until bob's connection is there, a send would just be queued: fine either way.
        sent = assert_ok(core.agent_call("alice", "send", to="bob", body="wake up"))["id"]
        out, err = waiting.communicate(timeout=40)
    finally:
        if waiting.poll() is None:
            waiting.kill()
            waiting.wait()
    assert waiting.returncode == 0, err
    assert [(m["id"], m["body"]) for m in json.loads(out)["messages"]] == [(sent, "wake up")]
    assert assert_ok(core.agent_call("bob", "recv", wait=0))["messages"] == []  # --ack acked it


# -- ask / answer ------------------------------------------------------------------------------


def test_ask_operator(core: CoreProcess) -> None:
    out = ok_out(agent(core, "alice", "ask", "operator", "deploy now?", "--option", "yes", "--option", "no"))
    m = re.fullmatch(r"question (\d+) asked\n", out)
    assert m, out
    resp = ok_json(agent(core, "alice", "ask", "bob", "lunch?", "--json"))
    questions = assert_ok(core.host_call("questions"))["questions"]
    assert [(q["id"], q["asker"], q["question"], q["options"]) for q in questions] == [
        (int(m[1]), "alice", "deploy now?", ["yes", "no"])
    ]
    got = assert_ok(core.agent_call("bob", "recv", wait=5))["messages"]
    assert [(x["kind"], x["ref"], x["body"]) for x in got] == [("question", resp["id"], "lunch?")]


def test_answer_a_peers_question(core: CoreProcess) -> None:
    qid = assert_ok(core.agent_call("bob", "ask", to="alice", question="ready?"))["id"]
    assert ok_out(agent(core, "alice", "answer", str(qid), "yes, ready")) == f"answered question {qid}\n"
    got = assert_ok(core.agent_call("bob", "recv", wait=5))["messages"]
    assert [(x["kind"], x["from"], x["ref"], x["body"]) for x in got] == [("answer", "alice", qid, "yes, ready")]
    qid2 = assert_ok(core.agent_call("bob", "ask", to="alice", question="again?"))["id"]
    assert ok_json(agent(core, "alice", "answer", str(qid2), "no", "--json"))["id"] == qid2
    # Answered once: a second answer is refused.
    assert "ready?" not in ok_out(agent(core, "alice", "loose-ends"))
    one_line_error(agent(core, "alice", "answer", str(qid), "changed my mind"))


# -- request-approval ----------------------------------------------------------------------------


def test_request_approval_custom(core: CoreProcess) -> None:
    payload = {"branch": "main", "force": False, "hosts": ["a", "b"]}
    out = ok_out(agent(core, "alice", "request-approval", "custom", "push to main?", "--payload", json.dumps(payload)))
    m = re.fullmatch(r"approval (\d+) requested \(payload sha256 ([0-9a-f]{64})\)\n", out)
    assert m, out
    assert m[2] == sha256_of(payload)
    rows = assert_ok(core.host_call("pending"))["approvals"]
    assert [(r["id"], r["agent"], r["kind"], r["payload"], r["payload_sha256"]) for r in rows] == [
        (int(m[1]), "alice", "custom", payload, m[2])
    ]
    resp = ok_json(agent(core, "alice", "request-approval", "custom", "no payload", "--json"))
    assert resp["payload_sha256"] == sha256_of(None)


def test_request_approval_spawn(core: CoreProcess) -> None:
    payload = {"name": "helper", "spec": {"command": ["python3", "/srv/helper.py"], "peers": ["alice"]}}
    resp = ok_json(agent(core, "alice", "request-approval", "spawn", "a helper", "--payload", json.dumps(payload), "--json"))
    [row] = assert_ok(core.host_call("pending"))["approvals"]
    assert (row["id"], row["kind"], row["payload"], row["payload_sha256"]) == (
        resp["id"], "spawn", payload, resp["payload_sha256"],
    )


def test_request_approval_bad_input(module_core: CoreProcess) -> None:
    core = module_core  # shared: a refusal changes nothing, and that is checked
    err = one_line_error(agent(core, "alice", "request-approval", "custom", "x", "--payload", "{not json"))
    assert "--payload is not valid JSON" in err
    bad_kind = agent(core, "alice", "request-approval", "root", "x")
    assert bad_kind.returncode == 2 and "root" in bad_kind.stderr  # click's usage error
    err = one_line_error(agent(core, "alice", "request-approval", "spawn", "x", "--payload", '{"name": "Bad Name"}'))
    assert err.startswith("hive: error: ")
    assert assert_ok(core.host_call("pending"))["approvals"] == []


# -- status / remind / loose-ends ----------------------------------------------------------------


def test_status(core: CoreProcess) -> None:
    assert ok_out(agent(core, "alice", "status", "reviewing PR 7")) == "status set\n"
    assert core.status("alice")["status_text"] == "reviewing PR 7"
    resp = ok_json(agent(core, "alice", "status", "idle", "--json"))
    row = core.status("alice")
    assert row["status_text"] == "idle" and row["status_set_at"] == resp["status_set_at"]


def test_remind(core: CoreProcess) -> None:
    out = ok_out(agent(core, "alice", "remind", "--in", "3600", "check CI"))
    m = re.fullmatch(r"reminder (\d+) due (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)\n", out)
    assert m, out
    due = datetime.strptime(m[2], "%Y-%m-%d %H:%M:%S")
    assert abs((due - datetime.now()).total_seconds() - 3600) < 120  # local time, like the rest of the CLI
    at = (datetime.now(UTC) + timedelta(days=1)).replace(microsecond=0)
    resp = ok_json(agent(core, "alice", "remind", "--at", at.isoformat(), "standup", "--json"))
    assert wire_time(resp["due_at"]) == at.timestamp()
    assert core.status("alice")["pending_reminders"] == 2


def test_loose_ends(core: CoreProcess) -> None:
    out = ok_out(agent(core, "alice", "loose-ends"))
    assert out.splitlines() == ["open questions: none", "pending approvals: none", "questions to answer: none"]
    q = assert_ok(core.agent_call("alice", "ask", to="operator", question="which branch?"))["id"]
    a = assert_ok(core.agent_call("alice", "request_approval", kind="custom", description="merge it?"))["id"]
    p = assert_ok(core.agent_call("bob", "ask", to="alice", question="status of PR 7?"))["id"]
    out = ok_out(agent(core, "alice", "loose-ends"))
    for text in ("open questions", "which branch?", "pending approvals", "merge it?", "questions to answer",
                 "status of PR 7?", "bob"):
        assert text in out, (text, out)
    resp = ok_json(agent(core, "alice", "loose-ends", "--json"))
    assert [x["id"] for x in resp["questions"]] == [q]
    assert [x["id"] for x in resp["approvals"]] == [a]
    assert [x["id"] for x in resp["to_answer"]] == [p]


# -- refusals and a hive that isn't running ---------------------------------------------------------

REFUSALS = [
    (("send", "carol", "psst"), "carol"),
    (("send", "nobody-here", "x"), "nobody-here"),
    (("ask", "carol", "secret?"), "carol"),
    (("answer", "4242", "yes"), "4242"),
    (("ack", "4242"), "4242"),
    (("remind", "no time given"), "in_seconds"),
    (("remind", "--at", "2030-01-01T09:00:00", "no timezone"), "timezone"),
    (("status", "x" * 5000), "text"),
    (("recv", "--max", "0"), "max"),
]


@pytest.mark.parametrize(("args", "needle"), REFUSALS, ids=[" ".join(a)[:30] for a, _ in REFUSALS])
def test_refusal_exits_1_with_one_line(module_core: CoreProcess, args: tuple[str, ...], needle: str) -> None:
    core = module_core  # shared: a refusal changes nothing, and that is checked
    before = {cmd: core.host_call(cmd) for cmd in ("inbox", "questions", "pending", "agent_status")}
    err = one_line_error(agent(core, "alice", *args))
    assert err.startswith("hive: error: ") and needle in err, err
    assert needle in refused_json(agent(core, "alice", *args, "--json"))
    assert {cmd: core.host_call(cmd) for cmd in before} == before


def test_hive_not_running_names_the_socket(tmp_path: Path) -> None:
    err = one_line_error(run_hive("--run-dir", "/nonexistent", "status"))
    assert "not running" in err and "/nonexistent/host.sock" in err, err
    err = one_line_error(run_hive("--run-dir", "/nonexistent", "status", "--json"))
    assert "/nonexistent/host.sock" in err
    sock = tmp_path / "agent.sock"
    for args in (("whoami",), ("recv",), ("recv", "--json"), ("send", "operator", "x")):
        err = one_line_error(run_hive("agent", "--socket", sock, *args))
        assert "not running" in err and str(sock) in err, (args, err)
