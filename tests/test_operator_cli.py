"""The operator's ``hive`` command line as the README uses it (issue 15 item 6): ``hive``
on the PATH after setup, every README ``hive …`` line a valid command, every verb
with ``--json``, ``hive events`` one readable line per event (and NDJSON with
``--json``), ``hive inbox`` a page at a time, and ``hive reset`` starting fresh.
One hive (``hive up``, two caged agents) serves the module; the reset test comes last
(it stops the hive, resets it and starts it again)."""

from __future__ import annotations

import contextlib
import json
import os
import pty
import re
import select
import shlex
import signal
import subprocess
import time
import warnings
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import click
import pytest

from hive_fixture import HIVE, REPO, HiveProcess, running_hive
from hyperhive.cli.event_lines import event_line
from hyperhive.cli.main import cli as hive_cli
from hyperhive.client import Client
from hyperhive.display import visible
from hyperhive.priv.cgroups import hive_dirs, hive_key

AGENTS = {
    "alice": {"runtime": "command", "command": ["true"], "peers": ["bob"]},
    "bob": {"runtime": "command", "command": ["true"]},
}
NARROW = "60"  # COLUMNS: an event line longer than this must still come whole


@pytest.fixture(scope="module")
def hive() -> Iterator[HiveProcess]:
    yield from running_hive(HiveProcess(AGENTS))


def run_hive(h: HiveProcess | None, *args: str, stdin: Any = subprocess.DEVNULL) -> subprocess.CompletedProcess[str]:
    run = ["--run-dir", str(h.run_dir)] if h else []
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "COLUMNS": NARROW}
    return subprocess.run([str(HIVE), *run, *args], capture_output=True, text=True, timeout=60,
                          check=False, env=env, stdin=stdin)


def ok(reply: dict[str, Any]) -> dict[str, Any]:
    assert reply.get("ok") is True, reply
    return reply


# -- the command tree and the README ---------------------------------------------------

# Leaf verbs that can't take --json, and why.
NO_JSON = {
    "mcp": "an MCP server on stdio: its stdout is the JSON-RPC stream itself",
}


def leaves(group: click.Group, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], click.Command]]:
    ctx = click.Context(group)  # list_commands: the top group imports its verbs when asked (main.LazyGroup)
    for name in group.list_commands(ctx):
        cmd = group.get_command(ctx, name)
        assert cmd is not None, name
        if isinstance(cmd, click.Group):
            yield from leaves(cmd, (*path, name))
        else:
            yield (*path, name), cmd


def test_every_leaf_verb_has_json() -> None:
    found = list(leaves(hive_cli))
    assert len(found) > 30, [p for p, _ in found]  # the walk reached every group
    missing = [
        " ".join(path) for path, cmd in found
        if " ".join(path) not in NO_JSON
        and not any(isinstance(p, click.Option) and "--json" in p.opts for p in cmd.params)
    ]
    assert missing == [], f"verbs without --json: {missing}"
    for verb in NO_JSON:  # the allowlist names real verbs only
        assert any(" ".join(p) == verb for p, _ in found), verb


def readme_hive_lines() -> list[list[str]]:
    """Every ``hive …`` command in the README's code blocks, as words (continuations
    joined, ``a; b`` split, comments dropped)."""
    blocks, block, lang = [], [], None
    for line in (REPO / "README.md").read_text().splitlines():
        if line.startswith("```"):
            if lang is None:
                lang = line[3:].strip()
            else:
                if lang in ("sh", "bash"):
                    blocks.append("\n".join(block))
                block, lang = [], None
        elif lang is not None:
            block.append(line)
    out = []
    for text in blocks:
        for line in text.replace("\\\n", " ").splitlines():
            lex = shlex.shlex(line, posix=True, punctuation_chars=";|&<>")
            lex.whitespace_split, lex.commenters = True, "#"
            words: list[str] = []
            tokens = [*lex, ";"]
            for i, word in enumerate(tokens):
                if word and set(word) <= set("<>"):  # a redirection: it and its target go
                    tokens[i + 1] = ""
                    continue
                if word not in (";", "|", "||", "&", "&&"):
                    if word:
                        words.append(word)
                    continue
                if words[:1] == ["hive"]:
                    out.append(words)
                words = []
    return out


def parse(words: list[str]) -> click.Command:
    """Resolve and parse ``words`` (after ``hive``) as click would, without running it."""
    with warnings.catch_warnings():  # click 8.2 deprecates protected_args; 8.1 needs it
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx = hive_cli.make_context("hive", list(words))
        cmd: click.Command = hive_cli
        args = ctx.protected_args + ctx.args
        while isinstance(cmd, click.Group) and args:
            name, sub, args = cmd.resolve_command(ctx, args)
            assert sub is not None, words
            cmd, ctx = sub, sub.make_context(name or "", args, parent=ctx)
            args = ctx.protected_args + ctx.args if isinstance(sub, click.Group) else []
    return cmd


def test_every_readme_hive_line_is_a_valid_command() -> None:
    lines = readme_hive_lines()
    assert len(lines) > 30 and any(words[1] == "reset" for words in lines), lines
    for words in lines:
        try:
            parse(words[1:])
        except click.UsageError as e:
            raise AssertionError(f"README: `{shlex.join(words)}`: {e.format_message()}") from None
    # The README's story starts after its setup command: `hive`, not .venv/bin/hive.
    assert ".venv/bin/hive " not in (REPO / "README.md").read_text()


def test_setup_puts_hive_on_the_path(tmp_path: Path) -> None:
    assert "bash scripts/link-hive.sh" in (REPO / "scripts" / "setup.sh").read_text()
    env = {"PATH": "/usr/bin:/bin", "HIVE_BIN_DIR": str(tmp_path)}

    def link() -> subprocess.CompletedProcess[str]:
        return subprocess.run(["bash", str(REPO / "scripts" / "link-hive.sh")], capture_output=True,
                              text=True, timeout=30, env=env, cwd="/")

    made = link()
    assert made.returncode == 0, made.stderr
    assert os.readlink(tmp_path / "hive") == str(HIVE) and (tmp_path / "hive").resolve() == HIVE.resolve()
    version = subprocess.run(["hive", "--version"], capture_output=True, text=True, timeout=30,
                             env={"PATH": f"{tmp_path}:/usr/bin:/bin"})
    assert version.returncode == 0 and version.stdout.startswith("hive, version"), version
    assert link().stdout.strip().endswith("(already)")
    # An earlier checkout's link is replaced; a file of another install is left alone.
    (tmp_path / "hive").unlink()
    (tmp_path / "hive").symlink_to("/nonexistent/.venv/bin/hive")
    assert "(was -> /nonexistent/.venv/bin/hive)" in link().stdout
    assert os.readlink(tmp_path / "hive") == str(HIVE)
    (tmp_path / "hive").unlink()
    (tmp_path / "hive").write_text("#!/bin/sh\n")
    kept = link()
    assert kept.returncode == 0 and f'export PATH="{REPO}/.venv/bin:$PATH"' in kept.stdout, kept.stdout
    assert (tmp_path / "hive").read_text() == "#!/bin/sh\n"


# -- hive events -----------------------------------------------------------------------

AT = datetime(2026, 11, 23, 22, 24, 21)
LINES = [  # (event, its line after the time) for the kinds the live test doesn't make
    ({"kind": "approval", "approval": {"id": 1, "agent": "alice", "kind": "custom", "status": "pending",
      "description": "Rotate the staging API key", "payload": {"key": "staging"}, "payload_sha256": "c7"}},
     "approval     alice  #1 custom pending: Rotate the staging API key"),
    ({"kind": "approval", "approval": {"id": 2, "agent": "bob", "kind": "spawn", "status": "denied",
      "note": "not now", "description": "d" * 300, "truncated": {"description": 9000}}},
     f"approval     bob  #2 spawn denied (not now): {'d' * 200} … [cut: 9000 bytes in all; hive show approval 2]"),
    ({"kind": "reminder", "agent": "alice", "reminder_id": 4, "text": "already due"},
     "reminder     alice  reminder 4 due: already due"),
    ({"kind": "agent_status", "name": "carol", "destroyed": True}, "agent_status carol  destroyed"),
    ({"kind": "agent_status", "agent": {"name": "bob", "running": True, "paused": True, "failed": False}},
     "agent_status bob  paused"),
    ({"kind": "transcript", "agent": "bob", "entries": [{"id": 2, "turn": 1, "kind": "stderr", "data": "x"},
      {"id": 3, "turn": 1, "kind": "exit", "data": {}}]}, "transcript   bob  2 entries (turn 1: stderr, exit)"),
    ({"kind": "egress", "agent": "alice", "rules": ["pypi.org:443", "*.pypi.org:443"]},
     "egress       alice  rules now: pypi.org:443, *.pypi.org:443"),
    ({"kind": "egress", "agent": "alice", "entry": {"id": 9, "host": "pypi.org", "port": 443, "allowed": False,
      "reason": "no rule", "bytes_up": 0, "bytes_down": 0}},
     "egress       alice  pypi.org:443 REFUSED (no rule), 0 up / 0 down bytes"),
    ({"kind": "message", "message": {"id": 7, "unreadable": "bad row"}}, "message        message 7 unreadable: bad row"),
    ({"kind": "future", "what": "\x1b[2J"}, 'future         {"what": "\\u001b[2J"}'),  # unknown: its JSON
]


@pytest.mark.parametrize(("event", "line"), LINES, ids=[e["kind"] + str(i) for i, (e, _) in enumerate(LINES)])
def test_event_line_of_each_kind(event: dict[str, Any], line: str) -> None:
    assert event_line(event, AT) == f"2026-11-23 22:24:21 {line}"




def _interruptible() -> None:
    """SIGINT at its default in the child: a suite run as a shell's background job
    ignores it, and Python then leaves it ignored (the test's SIGINT would do nothing)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Follow:
    """``hive events ARGS`` on a pipe, read line by line as they come."""

    def __init__(self, h: HiveProcess, *args: str) -> None:
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "COLUMNS": NARROW}
        self.proc = subprocess.Popen([str(HIVE), "--run-dir", str(h.run_dir), "events", *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                                     stdin=subprocess.DEVNULL, preexec_fn=_interruptible)
        assert self.proc.stdout is not None
        self.fd = self.proc.stdout.fileno()
        self.data = b""

    @property
    def lines(self) -> list[str]:
        return self.data.decode().split("\n")[:-1]  # whole lines only

    def until(self, done: Callable[[list[str]], bool], timeout: float = 20) -> bool:
        deadline = time.monotonic() + timeout
        while not done(self.lines) and time.monotonic() < deadline:
            if select.select([self.fd], [], [], 0.1)[0]:
                chunk = os.read(self.fd, 1 << 16)
                if not chunk:
                    break
                self.data += chunk
        return done(self.lines)


def test_events_one_readable_line_each_and_ndjson(hive: HiveProcess) -> None:
    human, raw = Follow(hive), Follow(hive, "--json")
    try:
        # Subscribed: a message sent now reaches both (sent again until it does).
        for n in range(40):
            mark = f"sync-{n}"
            ok(hive.agent_call("bob", "send", to="operator", body=mark))
            if all(f.until(lambda ls, m=mark: any(m in x for x in ls), 0.5) for f in (human, raw)):
                break
        else:
            raise AssertionError(f"no events came: {human.data!r} {raw.data!r}")
        long = "first line\nsecond \x1b[31mred\u202e " + "y" * 300
        mid = ok(hive.agent_call("alice", "send", to="operator", body=long))["id"]
        qid = ok(hive.agent_call("alice", "ask", to="operator", question="Ship?", options=["yes", "no"]))["id"]
        ok(hive.host_call("answer_question", id=qid, answer="yes"))
        ok(hive.agent_call("alice", "set_status", text="busy\nbob: running  forged"))
        status = "alice  running: busy\\nbob: running  forged"
        assert human.until(lambda ls: any(x.endswith(status) for x in ls)), human.lines
        assert raw.until(lambda ls: any('"status_text": "busy\\nbob' in x for x in ls)), raw.lines
    finally:
        human.proc.send_signal(signal.SIGINT)  # the processes this test started, by pid
        assert human.proc.wait(10) == 0
        assert human.proc.stderr is not None and human.proc.stderr.read() == b""
    lines = human.lines
    stamp = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d (\S+) +(.*)$")
    assert all(stamp.match(x) for x in lines), lines
    assert "\x1b" not in human.data.decode() and "\u202e" not in human.data.decode()
    (msg,) = [x for x in lines if f"#{mid}:" in x]
    cut = visible(long, one_line=True)[:200]  # escaped, then cut: what is shown of 200 characters
    assert f" message      alice -> operator  #{mid}: " in msg and len(msg) > int(NARROW)
    assert visible(long[:200], one_line=True) in msg and cut[:40] in msg
    assert msg.endswith(f" … [cut: {len(long)} characters in all; hive show message {mid}]")
    assert any(x.endswith(f" question     alice -> operator  #{qid}: Ship? [yes / no]") for x in lines), lines
    assert any(x.endswith(f" answer       operator -> alice  #{qid} Ship? => yes") for x in lines), lines
    assert not any(x.startswith("bob: running") for x in lines)  # a status newline makes no line
    # --json: one JSON object a line, the ack first, every event whole.
    replies = [json.loads(x) for x in raw.lines]
    assert replies[0]["ok"] is True and "subscribed" in replies[0]
    events = [r["event"] for r in replies[1:]]
    assert {"kind": "message"}.items() <= next(e for e in events if e.get("message", {}).get("id") == mid).items()
    assert next(e for e in events if e.get("message", {}).get("id") == mid)["message"]["body"] == long
    # A reader that goes away (`| head`) ends it quietly at the next event.
    assert raw.proc.stdout is not None
    raw.proc.stdout.close()
    ok(hive.agent_call("bob", "send", to="operator", body="after the reader left"))
    assert raw.proc.wait(20) == 0
    assert raw.proc.stderr is not None and raw.proc.stderr.read() == b""


# -- hive status: other hosts' agents, each with its incarnation ------------------------

# As a swarm host's core answers ``agent_status`` (docs/protocol.md): this host's agents and
# the roster's rows of the other hosts' (one from an older host, with no created_at).
SWARM_ROWS = [
    {"name": "bob", "host": "b", "running": True, "paused": False, "status_text": "reviewing PR 12",
     "created_at": 1764739001.2345679, "reachable": True},
    {"name": "carol", "host": "c", "running": False, "paused": True, "status_text": None,
     "created_at": 1764739002.0, "reachable": False},
    {"name": "dave", "host": "d", "running": True, "paused": False, "status_text": None, "reachable": True},
]  # fmt: skip


@contextlib.contextmanager
def fake_host_sock(run_dir: Path, answer: Callable[[dict[str, Any]], dict[str, Any]]) -> Iterator[list[dict[str, Any]]]:
    """A host.sock in ``run_dir`` answering each request line with ``answer(request)``:
    a swarm host's replies without a swarm. Yields the requests it was sent."""
    import socket
    import threading

    seen: list[dict[str, Any]] = []
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(run_dir / "host.sock"))
    server.listen()

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:  # closed: the test is done
                return
            with conn, conn.makefile("rwb") as f:
                for line in f:
                    seen.append(json.loads(line))
                    f.write(json.dumps({"version": 1, **answer(seen[-1])}).encode() + b"\n")
                    f.flush()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield seen
    finally:
        server.shutdown(socket.SHUT_RDWR)
        server.close()
        thread.join(10)


def cells(table: str, name: str) -> dict[str, str]:
    """The row of agent ``name`` in a rich table printed by the CLI, as {column: cell}
    (a cell folded over lines joined, with a space)."""
    heads = [line.split("┃")[1:-1] for line in table.splitlines() if line.startswith("┃")]
    columns = ["".join(c.strip() for c in col) for col in zip(*heads, strict=True)]  # folded: no space
    body = [line.split("│")[1:-1] for line in table.splitlines() if line.startswith("│")]
    rows: list[list[str]] = []
    for line in body:
        if line[columns.index("name")].strip() or not rows:
            rows.append([c.strip() for c in line])
        else:  # the rest of the row above, folded
            rows[-1] = [f"{a} {b.strip()}".strip() for a, b in zip(rows[-1], line, strict=True)]
    return next(dict(zip(columns, r, strict=True)) for r in rows if r[columns.index("name")] == name)


def test_status_shows_each_other_hosts_agents_created_at_to_paste(tmp_path: Path) -> None:
    """``hive status``'s table of the other hosts' agents has each one's ``created_at``
    (issue 18): the text ``--json`` prints for it, whole on a narrow terminal, and pasted
    into ``--created-at`` it binds the verb to that very number; an older host's row
    without one shows nothing."""

    def answer(req: dict[str, Any]) -> dict[str, Any]:
        if req["cmd"] == "agent_status":
            return {"ok": True, "agent_statuses": [], "swarm_agents": SWARM_ROWS}
        return {"ok": True, "host": req["host"], "action": "a1", "applied": True, "created_at": req["created_at"]}

    with fake_host_sock(tmp_path, answer) as seen:
        raw = run_hive(None, "--run-dir", str(tmp_path), "status", "--json")
        human = run_hive(None, "--run-dir", str(tmp_path), "status")
        assert raw.returncode == human.returncode == 0 and raw.stderr == human.stderr == "", (raw, human)
        listed = {r["name"]: r for r in json.loads(raw.stdout)["swarm_agents"]}
        shown = human.stdout[human.stdout.index("other hosts' agents"):]
        bob, carol, dave = (cells(shown, n) for n in ("bob", "carol", "dave"))
        # Exactly what --json gives, as text: the same characters
        as_json = {n: re.search(r'"created_at": ?([^,}]+)', json.dumps(listed[n]))[1] for n in ("bob", "carol")}  # type: ignore[index]
        assert (bob["created_at"], carol["created_at"], dave["created_at"]) == (as_json["bob"], as_json["carol"], ""), shown
        assert bob["created_at"] in raw.stdout
        states = [r["state"].replace(" ", "") for r in (bob, carol)]  # the rest is folded at NARROW
        assert (bob["host"], states) == ("b", ["running", "unreachable"]), shown
        pasted = run_hive(None, "--run-dir", str(tmp_path), "restart", "--host", "b", "--created-at", bob["created_at"], "bob")
        assert pasted.returncode == 0 and pasted.stderr == "", pasted
    assert seen[-1] == {"cmd": "restart", "name": "bob", "host": "b", "created_at": SWARM_ROWS[0]["created_at"]}, seen[-1]


def test_status_gives_this_hosts_agents_created_at_too(hive: HiveProcess) -> None:
    """This host's agents' rows carry ``created_at`` as the other hosts' do (issue 18
    gave only those one): in ``hive status --json`` (``agent_statuses``) the number the
    store holds, in ``hive status``'s table the same text, whole; pasted into
    ``--created-at`` it binds a local verb to that agent, and another number is refused
    with nothing done. Before, a local row had none, and nothing showed what to pass."""
    raw = run_hive(hive, "status", "--json")
    human = run_hive(hive, "status")
    assert raw.returncode == human.returncode == 0 and raw.stderr == human.stderr == "", (raw, human)
    rows = {r["name"]: r for r in json.loads(raw.stdout)["agent_statuses"]}
    assert all(type(r.get("created_at")) is float for r in rows.values()), rows
    as_json = re.search(r'"created_at": ?([^,}]+)', json.dumps(rows["bob"]))[1]  # type: ignore[index]
    assert cells(human.stdout, "bob")["created_at"] == as_json, human.stdout
    pasted = run_hive(hive, "interrupt", "--created-at", as_json, "bob")
    assert (pasted.returncode, pasted.stdout, pasted.stderr) == (0, "bob: interrupt sent\n", ""), pasted
    other = run_hive(hive, "interrupt", "--created-at", str(rows["bob"]["created_at"] + 1), "bob")
    assert other.returncode == 1 and "is not the one acted on" in other.stderr, other
    on_the_socket = {r["name"]: r for r in ok(hive.host_call("agent_status"))["agent_statuses"]}
    assert {n: r["created_at"] for n, r in on_the_socket.items()} == {n: r["created_at"] for n, r in rows.items()}


# -- hive inbox --------------------------------------------------------------------------


def test_core_stats_prints_the_cores_commits(hive: HiveProcess, tmp_path: Path) -> None:
    """``hive core-stats``: host.sock's ``core_stats``, its commits growing with what the
    hive stores; one line of error, exit 1, when no hive serves the run dir."""
    raw = run_hive(hive, "core-stats", "--json")
    assert raw.returncode == 0 and raw.stderr == "", raw
    before = ok(json.loads(raw.stdout))
    assert set(before) == {"version", "ok", "commits"} and type(before["commits"]) is int, before
    ok(hive.host_call("send", to="bob", body="core-stats: a message stored is a commit"))
    human = run_hive(hive, "core-stats")
    assert human.returncode == 0 and human.stderr == "", human
    m = re.fullmatch(r"commits: (\d+)\n", human.stdout)
    assert m and int(m[1]) > before["commits"], (human.stdout, before)
    down = run_hive(None, "--run-dir", str(tmp_path), "core-stats")
    assert (down.returncode, down.stdout) == (1, ""), down
    assert down.stderr == (f"hive: the hive is not running: can't connect to {tmp_path}/host.sock"
                           " (No such file or directory)\n"), down.stderr


def test_inbox_is_a_page_with_all_and_after(hive: HiveProcess) -> None:
    with Client(hive.agent_sock("bob"), timeout=30) as bob:
        for i in range(55):
            ok(bob.call("send", to="operator", body=f"page test {i}"))
    every = ok(hive.host_call("inbox", max=10_000))["messages"]
    assert len(every) > 55
    page = json.loads(run_hive(hive, "inbox", "--json").stdout)
    assert page["ok"] is True and page["more"] is True
    assert [m["id"] for m in page["messages"]] == [m["id"] for m in every[:50]]  # oldest first
    last = page["messages"][-1]["id"]
    shown = run_hive(hive, "inbox")
    assert shown.returncode == 0 and shown.stdout.rstrip().endswith(
        f"50 shown; next page: hive inbox --after {last} (or --all)"), shown.stdout[-300:]
    rest = json.loads(run_hive(hive, "inbox", "--json", "--all", "--after", str(last)).stdout)
    assert rest["messages"] == every[50:] and not rest.get("more")


def test_show_question_says_a_destroyed_askers_question_is_cancelled(hive: HiveProcess) -> None:
    """Red team round 24 noticed: ``hive show question`` of a question cancelled with its
    asker printed it as an open one. Now its last line says so, and ``--json`` carries
    ``cancelled``; an open question has neither."""
    ok(hive.host_call("spawn", name="qkid", spec={"runtime": "command", "command": ["true"]}))
    with Client(hive.agent_sock("qkid"), timeout=30) as kid:
        qid = ok(kid.call("ask", to="operator", question="deploy?", options=["yes", "no"]))["id"]
    with Client(hive.agent_sock("bob"), timeout=30) as bob:
        open_id = ok(bob.call("ask", to="operator", question="still open?"))["id"]
    ok(hive.host_call("destroy", name="qkid"))
    shown = run_hive(hive, "show", "question", str(qid))
    assert shown.returncode == 0 and shown.stderr == "", shown
    assert shown.stdout.splitlines()[-1] == (
        "cancelled: its asker or the agent it asked was destroyed; it takes no answer"), shown.stdout
    assert json.loads(run_hive(hive, "show", "question", "--json", str(qid)).stdout)["question"]["cancelled"] is True
    still = run_hive(hive, "show", "question", str(open_id))
    assert still.returncode == 0 and "cancelled" not in still.stdout, still
    assert "cancelled" not in json.loads(run_hive(hive, "show", "question", "--json", str(open_id)).stdout)["question"]


# -- hive reset (last: it stops and restarts the module's hive) ------------------------


def test_reset_refuses_while_running_then_starts_fresh(hive: HiveProcess) -> None:
    for question in ("before?", "again?"):
        asked = ok(hive.agent_call("alice", "ask", to="operator", question=question))["id"]
    assert asked > 1
    args = ("reset", "--state-dir", str(hive.state_dir))
    busy = run_hive(hive, *args, "--yes")
    assert busy.returncode == 1 and busy.stdout == "", busy
    assert busy.stderr == f"hive: {hive.run_dir} is in use by hive up (pid {hive.proc.pid}); stop it first (nothing was removed)\n"
    refused = json.loads(run_hive(hive, *args, "--yes", "--json").stdout)
    assert refused["ok"] is False and "in use by hive up" in refused["error"]
    up = [*up_args(hive), "--json"]
    second = run_hive(hive, *up)  # hive up --json: its refusal is a JSON line too
    assert second.returncode == 1 and json.loads(second.stdout) == {
        "version": 1, "ok": False, "phase": "error",
        "error": f"{hive.run_dir} is in use by hive up (pid {hive.proc.pid})"}
    assert (hive.state_dir / "hive.db").exists()
    hive.stop_clean()
    unasked = run_hive(hive, *args)  # no terminal to ask on, no --yes
    assert unasked.returncode == 1 and "add --yes" in unasked.stderr and len(unasked.stderr.splitlines()) == 1
    asked_on_a_tty = on_a_terminal(hive, *args, answer=b"n\n")
    assert f"delete {hive.state_dir / 'hive.db'}, " in asked_on_a_tty and "? [y/N]" in asked_on_a_tty
    assert (hive.state_dir / "hive.db").exists()  # said no: nothing removed
    tops = hive_dirs(hive_key(hive.state_dir))
    assert all((top / name).is_dir() for top in tops for name in AGENTS), tops  # kept at stop
    done = run_hive(hive, *args, "--yes", "--json")
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["ok"] is True and str(hive.state_dir / "hive.db") in out["removed"]
    assert str(hive.state_dir / "agents") in out["removed"] and str(hive.run_dir / "agents") in out["removed"]
    assert str(hive.state_dir / "ca") in out["removed"]  # the hive CA: made again at start
    # The cages' cgroups went too (a stopped cage keeps them; nothing else removes them):
    # each agent's, in each hierarchy, and the hive's own directory.
    assert out["cgroups"] == len(tops) * (len(AGENTS) + 1), out
    assert not any(top.exists() for top in tops), tops
    # Only the operator's secrets are kept (hive secret rm removes them), and the ids of
    # the core they belong to.
    assert sorted(p.name for p in hive.state_dir.iterdir()) in (["core.id"], ["core.id", "secrets"])
    assert sorted(p.name for p in hive.run_dir.iterdir()) == []
    # Up again, with --json: its progress as JSON lines, `ready` with the login URL.
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
    with open(hive.log_path, "ab") as log:
        hive.proc = subprocess.Popen([str(HIVE), "--run-dir", str(hive.run_dir), *up], env=env,
                                     stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL)
    assert hive.proc.stdout is not None
    phases = []
    for raw in hive.proc.stdout:
        phases.append(json.loads(raw))
        if phases[-1]["phase"] in ("ready", "error"):
            break
    # (address_shared: another test's hive on 127.0.0.1 too, said in a line of its own)
    shown = [p["phase"] for p in phases if p["phase"] not in ("waiting", "address_shared")]
    assert shown == ["starting", "ready"], phases
    assert all(p["ok"] is True and p["version"] == 1 for p in phases)
    ready = phases[-1]
    assert ready["login"].startswith(f"http://127.0.0.1:{hive.port}/login?token=")
    assert ready["host_sock"] == str(hive.host_sock)
    hive.wait_running()
    assert ok(hive.agent_call("alice", "ask", to="operator", question="fresh?"))["id"] == 1
    assert ok(hive.host_call("inbox"))["messages"] == []
    hive.stop_clean()
    rest = [json.loads(line) for line in hive.proc.stdout]
    assert [p["phase"] for p in rest] == ["stopping", "stopped"], rest


def on_a_terminal(h: HiveProcess, *args: str, answer: bytes) -> str:
    """``hive ARGS`` on a pty of its own, typing ``answer``; all it printed. Exit 1."""
    master, slave = pty.openpty()
    proc = subprocess.Popen([str(HIVE), "--run-dir", str(h.run_dir), *args], stdin=slave,
                            stdout=slave, stderr=slave, env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"})
    os.close(slave)
    out = b""
    try:
        while b"[y/N]" not in out and select.select([master], [], [], 30)[0]:
            out += os.read(master, 1 << 16)
        os.write(master, answer)
        assert proc.wait(30) == 1
        with contextlib.suppress(OSError):  # EIO: the other side is closed
            while select.select([master], [], [], 0.5)[0] and (chunk := os.read(master, 1 << 16)):
                out += chunk
    finally:
        os.close(master)
    return out.decode(errors="replace")


def up_args(h: HiveProcess) -> list[str]:
    return ["up", "--config", str(h.config_path), "--state-dir", str(h.state_dir),
            "--listen", f"127.0.0.1:{h.port}"]
