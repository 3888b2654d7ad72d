"""Attacks on the service-layer refactor (core/hive.py behind translation tables,
typed refusals, per-listener connection limits, recv_fds/send_fds, bind with fchmod,
priv verb tables per caller).

From inside a real cage (rtmule, as its runtime uid): harness verbs, odd ``cmd``
values, operator verbs and actor fields on agent.sock, the per-listener connection
cap, the socket directory's modes, descriptors handed over on egress-handover.sock. As the
``hive-core`` user on priv.sock: descriptors on verbs that take none, descriptors
split from their line, pipelined lines, SCM_CREDENTIALS, the root-only verb, two
requests on one name at once. Each probe runs once (module fixtures); each case
checks one reply. Nothing changes in the hive (``unchanged``), and hive-priv's
descriptor table is where it was."""

from __future__ import annotations

import json
import os
import stat
import subprocess
from typing import Any, get_args

import pytest

from hive_fixture import HIVE, HiveProcess
from hyperhive.config import LimitsSection
from hyperhive.wire import harness as wh
from hyperhive.wire import host as whost

from .conftest import cage_run, unchanged

IDENTITY_REF = "Matrix CVE-2022-31052 style sender spoofing; conventions §1 (identity = socket)"
HARNESS = sorted(wh.HARNESS_VERBS)
HOST_VERBS = sorted(get_args(m.model_fields["cmd"].annotation)[0] for m in whost.HOST_MODELS)
AGENT_VERBS_WITH_ARGS: dict[str, dict[str, Any]] = {
    "whoami": {}, "peers": {}, "send": {"to": "operator", "body": "x"}, "recv": {"wait": 0},
    "ack": {"ids": [1]}, "ask": {"to": "operator", "question": "q"},
    "answer": {"id": 1, "answer": "a"}, "set_status": {"text": "t"},
    "remind": {"in_seconds": 60, "text": "t"}, "loose_ends": {},
    "request_approval": {"kind": "custom", "description": "d", "payload": {}},
}
ACTOR_FIELDS = ["from", "as", "agent", "sender", "actor", "harness", "operator", "name"]
ODD_CMDS: dict[str, bytes] = {
    "list": b'{"cmd": ["turn_done"]}',
    "object": b'{"cmd": {"turn_done": 1}}',
    "null": b'{"cmd": null}',
    "number": b'{"cmd": 1}',
    "bool": b'{"cmd": true}',
    "missing": b'{"turn": 1}',
    "upper": b'{"cmd": "TURN_DONE"}',
    "space": b'{"cmd": "turn_done "}',
    "nul": b'{"cmd": "turn_done\\u0000"}',
    "unicode-lookalike": b'{"cmd": "turn\\u2010done"}',
    "dup-key-harness-last": b'{"cmd": "whoami", "cmd": "turn_done"}',
    "dup-key-harness-first": b'{"cmd": "turn_done", "cmd": "whoami"}',
    "empty": b'{"cmd": ""}',
    "huge": b'{"cmd": "' + b"a" * 60000 + b'"}',
}

AGENT_PROBE = r'''
import array, json, os, socket, stat
rcall = call_when_free

def conn_retry(seconds=20.0):
    deadline = time.monotonic() + seconds
    while True:
        try:
            c = Conn()
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
            continue
        return c

def held_conn():
    while True:
        c = conn_retry()
        r = c.call({"cmd": "whoami"})
        if r and r.get("ok"):
            return c
        c.close()
        time.sleep(0.1)

out = {}
out["uid"] = os.getuid()
for v in HARNESS:
    out["harness:" + v] = rcall({"cmd": v})
    out["harness-junk:" + v] = rcall({"cmd": v, "from": "operator", "turn": "x", "zz": [1]})
for label, raw in ODD.items():
    rcall({"cmd": "whoami"})
    c = conn_retry()
    try:
        c.send(raw.encode("latin-1") + b"\n")
        first = c.f.readline()
        out["odd:" + label] = [first.decode(), c.call({"cmd": "whoami"})]
    finally:
        c.close()
for v in HOST_VERBS:
    out["host:" + v] = rcall({"cmd": v})
for v, args in AGENT_ARGS.items():
    for f in ACTOR_FIELDS:
        out["actor:%s:%s" % (v, f)] = rcall(dict(args, cmd=v, **{f: "rtalice"}))

# the per-listener cap: hold CAP, one more is refused, the held ones still work
rcall({"cmd": "whoami"})
time.sleep(1)
held = [held_conn() for _ in range(CAP)]
extra = conn_retry()
try:
    out["cap:extra"] = extra.line()
finally:
    extra.close()
out["cap:held"] = held[0].call({"cmd": "whoami"})
for c in held:
    c.close()
out["cap:after"] = call_when_free({"cmd": "whoami"})

# the socket directory as the cage sees it
for n in ("agent.sock", "egress.sock", "egress-handover.sock"):
    st = os.lstat("/run/hive/" + n)
    out["mode:" + n] = [stat.S_IFMT(st.st_mode) == stat.S_IFSOCK, oct(stat.S_IMODE(st.st_mode)), st.st_uid]
for label, fn in (("unlink", lambda: os.unlink("/run/hive/agent.sock")),
                  ("rename", lambda: os.rename("/run/hive/agent.sock", "/run/hive/x")),
                  ("create", lambda: open("/run/hive/planted", "w")),
                  ("chmod", lambda: os.chmod("/run/hive/agent.sock", 0o777))):
    try:
        fn()
        out["dir:" + label] = "done"
    except OSError as e:
        out["dir:" + label] = errname(e)

# descriptors handed over on egress-handover.sock that are not one connected stream socket
def handover(data, make, path="/run/hive/egress-handover.sock"):
    fds = make()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(20)
    s.connect(path)
    try:
        socket.send_fds(s, [data], fds)
        for fd in fds:
            os.close(fd)
        return s.makefile("rb").readline().decode(errors="replace").strip()
    except OSError as e:
        return errname(e)
    finally:
        s.close()

KEEP = []  # the originals stay open until the probe ends

def kept(*socks):
    KEEP.extend(socks)
    return [os.dup(socks[0].fileno())]
def lst():
    l = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM); l.bind(""); l.listen(1)
    return kept(l)
def udp():
    return kept(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
def seq():
    return kept(*socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET))
def pipe():
    r, w = os.pipe(); os.close(w); return [r]
def pair():
    return kept(*socket.socketpair())
def two():
    return pair() + pair()
def five():
    return [fd for _ in range(5) for fd in pair()]
def dirfd():
    return [os.open("/", os.O_RDONLY)]
def unconnected():
    return kept(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
def agent_conn():
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM); s.connect("/run/hive/agent.sock")
    return kept(s)
for label, data, make in (("listening", b"\0", lst), ("udp", b"\0", udp), ("seqpacket", b"\0", seq),
                          ("pipe", b"\0", pipe), ("two", b"\0", two), ("five", b"\0", five),
                          ("dir", b"\0", dirfd), ("wrong-byte", b"GET", pair),
                          ("unconnected", b"\0", unconnected), ("agent-sock", b"\0", agent_conn)):
    out["egress:" + label] = handover(data, make)
out["egress:after"] = handover(b"GET http://127.0.0.1:1/ HTTP/1.1\r\nHost: 127.0.0.1:1\r\n\r\n", lambda: [],
                              "/run/hive/egress.sock")
out["final"] = rcall({"cmd": "whoami"})
result(**out)
'''


@pytest.fixture(scope="module")
def agent_side(rt: HiveProcess) -> dict[str, Any]:
    script = (
        f"HARNESS = {HARNESS!r}\nHOST_VERBS = {HOST_VERBS!r}\nAGENT_ARGS = {AGENT_VERBS_WITH_ARGS!r}\n"
        f"ACTOR_FIELDS = {ACTOR_FIELDS!r}\nCAP = {LimitsSection().agent_connections}\n"
        f"ODD = {({k: v.decode('latin-1') for k, v in ODD_CMDS.items()})!r}\n" + AGENT_PROBE
    )
    with unchanged(rt):
        out = cage_run(rt, "rtmule", script, timeout=180)
    assert out.pop("final") == {"version": 1, "ok": True, "name": "rtmule"}
    return out


def refusal(text: str) -> dict[str, Any]:
    return {"version": 1, "ok": False, "error": text}


def one_refusal_line(raw: str) -> dict[str, Any]:
    assert raw.endswith("\n") and raw.count("\n") == 1, raw[:200]
    reply = json.loads(raw)
    assert set(reply) == {"version", "ok", "error"} and reply["ok"] is False, reply
    assert "internal error" not in reply["error"], reply
    return reply


# -- identity: harness verbs, operator verbs, actor fields -----------------------------------


@pytest.mark.attack("identity.forge-agent", ref=IDENTITY_REF)
@pytest.mark.parametrize("verb", HARNESS)
def test_harness_verb_from_the_runtime_uid_refused(agent_side: dict[str, Any], verb: str) -> None:
    assert agent_side[f"harness:{verb}"] == refusal(f"{verb!r} is for the agent's harness only")


@pytest.mark.attack("identity.forge-agent", ref=IDENTITY_REF)
@pytest.mark.parametrize("verb", HARNESS)
def test_harness_check_comes_before_decoding(agent_side: dict[str, Any], verb: str) -> None:
    # Bad fields must not leak the harness models' shape to the runtime either.
    assert agent_side[f"harness-junk:{verb}"] == refusal(f"{verb!r} is for the agent's harness only")


@pytest.mark.attack("identity.forge-operator", ref="conventions §2; OpenHands#1691")
@pytest.mark.parametrize("verb", HOST_VERBS)
def test_operator_verb_on_agent_sock_is_unknown(agent_side: dict[str, Any], verb: str) -> None:
    reply = agent_side[f"host:{verb}"]
    if verb in AGENT_VERBS_WITH_ARGS:  # same name, the agent's own verb (send): its own fields
        assert (reply["ok"] is False and "operator" not in reply["error"]) or reply["ok"] is False
        return
    assert reply == refusal(f"unknown command {verb!r}")


@pytest.mark.attack("identity.forge-agent", ref=IDENTITY_REF)
@pytest.mark.parametrize("field", ACTOR_FIELDS)
@pytest.mark.parametrize("verb", sorted(AGENT_VERBS_WITH_ARGS))
def test_actor_field_refused(agent_side: dict[str, Any], verb: str, field: str) -> None:
    assert agent_side[f"actor:{verb}:{field}"] == refusal(f"unknown field {field!r}")


# -- odd cmd values: one line, never an internal error, the connection stays usable ----------


@pytest.mark.attack("wire.malformed", ref="tinyproxy#627; pydantic discriminated unions")
@pytest.mark.parametrize("label", sorted(ODD_CMDS))
def test_odd_cmd_one_line_refusal_and_connection_usable(agent_side: dict[str, Any], label: str) -> None:
    first, after = agent_side[f"odd:{label}"]
    if label == "dup-key-harness-first":  # JSON: the last key wins, for the check and the decode alike
        assert json.loads(first) == {"version": 1, "ok": True, "name": "rtmule"}
    else:
        reply = one_refusal_line(first)
        if label == "dup-key-harness-last":
            assert reply == refusal("'turn_done' is for the agent's harness only")
    assert after == {"version": 1, "ok": True, "name": "rtmule"}


# -- the per-listener connection cap ----------------------------------------------------------


@pytest.mark.attack("budget.core-descriptors", ref="CVE-2023-44487 style connection exhaustion")
def test_connection_over_the_cap_refused_with_one_line(agent_side: dict[str, Any]) -> None:
    cap = LimitsSection().agent_connections
    uid = agent_side["uid"]
    assert agent_side["cap:extra"] == refusal(
        f"too many connections: uid {uid} may have at most {cap} open on this socket at once;"
        " closing connection")


@pytest.mark.attack("budget.core-descriptors", ref="CVE-2023-44487 style connection exhaustion")
@pytest.mark.parametrize("when", ["held", "after"])
def test_connections_within_the_cap_keep_working(agent_side: dict[str, Any], when: str) -> None:
    assert agent_side[f"cap:{when}"] == {"version": 1, "ok": True, "name": "rtmule"}


# -- socket modes ------------------------------------------------------------------------------


@pytest.mark.attack("reach.other-surfaces", ref="bubblewrap#330; CVE-2019-5736 style socket swap")
@pytest.mark.parametrize("sock", ["agent.sock", "egress.sock", "egress-handover.sock"])
def test_agent_sockets_seen_from_the_cage(agent_side: dict[str, Any], sock: str) -> None:
    is_sock, mode, owner = agent_side[f"mode:{sock}"]
    assert is_sock and mode == "0o660" and owner != agent_side["uid"]


@pytest.mark.attack("fs.traversal-symlink", ref="firejail CVE-2017-5180")
@pytest.mark.parametrize("op", ["unlink", "rename", "create", "chmod"])
def test_socket_directory_read_only_in_the_cage(agent_side: dict[str, Any], op: str) -> None:
    assert agent_side[f"dir:{op}"] in ("EROFS", "EACCES", "EPERM")


@pytest.mark.attack("reach.other-surfaces", ref="CVE-2016-9962 style listener swap")
@pytest.mark.parametrize("which", ["host.sock", "core.sock", "priv.sock", "agents/rtmule/agent.sock",
                                   "agents/rtmule/egress.sock", "agents/rtmule/egress-handover.sock"])
def test_listener_modes_on_the_host(rt: HiveProcess, which: str) -> None:
    st = os.lstat(rt.run_dir / which)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) & 0o007 == 0, oct(st.st_mode)  # nobody else
    assert stat.S_IMODE(st.st_mode) & 0o660 == 0o660
    parent = os.lstat((rt.run_dir / which).parent)
    assert stat.S_IMODE(parent.st_mode) & 0o002 == 0 or parent.st_mode & stat.S_ISVTX


# -- egress handover with the wrong descriptors -------------------------------------------------

BAD_HANDOVER = "HTTP/1.1 400"


@pytest.mark.attack("wire.malformed", ref="OpenShell#1498; CVE-2021-3156-like fd confusion")
@pytest.mark.parametrize("label", ["listening", "udp", "seqpacket", "pipe", "two", "five", "dir",
                                   "wrong-byte", "unconnected", "agent-sock"])
def test_egress_bad_handover_refused(agent_side: dict[str, Any], label: str) -> None:
    reply = agent_side[f"egress:{label}"]
    assert reply.startswith("HTTP/1.1 4") or reply in ("", "EPIPE", "ECONNRESET"), reply


@pytest.mark.attack("egress.private-ranges", ref="CVE-2021-21315 style SSRF to loopback")
def test_egress_still_serves_after_bad_handovers(agent_side: dict[str, Any]) -> None:
    assert agent_side["egress:after"].startswith("HTTP/1.1 403"), agent_side["egress:after"]


# -- priv.sock as the hive-core user ------------------------------------------------------------

PRIV_CALLER = r"""
import array, json, os, socket, sys, threading, time
path = sys.argv[1]

def conn():
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(30)
    s.connect(path)
    return s

def lines(s, n):
    f = s.makefile("rb")
    out = []
    for _ in range(n):
        l = f.readline()
        out.append(json.loads(l) if l else {"closed": True})
    return out

def nulls(n):
    return [os.open("/dev/null", os.O_RDONLY) for _ in range(n)]

def send(s, parts):
    for data, n in parts:
        if data == b"EOF":
            s.shutdown(socket.SHUT_WR)
            continue
        fds = nulls(n)
        try:
            if fds:
                socket.send_fds(s, [data], fds)
            else:
                s.sendall(data)
        finally:
            for fd in fds:
                os.close(fd)
        time.sleep(0.05)

out = {"uid": os.getuid()}
cases = json.loads(sys.stdin.read())
for label, parts, nreplies in cases:
    s = conn()
    try:
        try:
            send(s, [(p.encode("latin-1"), n) for p, n in parts])
        except OSError:
            pass  # hive-priv hung up: its last line says why
        out[label] = lines(s, nreplies)
    except OSError as e:
        out[label] = [{"oserror": type(e).__name__}]
    finally:
        s.close()

# SCM_CREDENTIALS (our own, the only ones the kernel lets us send) with a request
s = conn()
creds = array.array("i", [os.getpid(), os.getuid(), os.getgid()])
s.sendmsg([b'{"cmd":"status","names":[]}\n'], [(socket.SOL_SOCKET, socket.SCM_CREDENTIALS, creds)])
out["creds"] = lines(s, 1)
s.close()

# two requests on one name at once, from two connections, repeatedly: no deadlock
res = {}
def worker(i):
    s = conn()
    try:
        for j in range(10):
            s.sendall(b'{"cmd":"stop","name":"rtghost","timeout":0}\n')
        res[i] = lines(s, 10)
    finally:
        s.close()
ts = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
t0 = time.monotonic()
[t.start() for t in ts]
[t.join(60) for t in ts]
out["lock:seconds"] = time.monotonic() - t0
out["lock:replies"] = [r for i in sorted(res) for r in res[i]]
out["lock:alive"] = [t.is_alive() for t in ts]
print(json.dumps(out))
"""

STATUS = '{"cmd":"status","names":[]}\n'
PRIV_CASES: dict[str, tuple[list[tuple[str, int]], int, list[str]]] = {
    # label: ([(bytes, fds), ...], replies expected, exact errors (or "OK"))
    **{f"fds-on-{v}": ([(line, 1)], 1, [f"{v} takes 0 file descriptors, got 1"]) for v, line in {
        "status": STATUS,
        "reload_gateway": '{"cmd":"reload_gateway"}\n',
        "stop": '{"cmd":"stop","name":"rtghost"}\n',
        "destroy": '{"cmd":"destroy","name":"rtghost"}\n',
        "prepare": '{"cmd":"prepare","name":"rtghost"}\n',
        "start": '{"cmd":"start","name":"rtghost"}\n',
    }.items()},
    "three-fds-on-status": ([(STATUS, 3)], 1, ["status takes 0 file descriptors, got 3"]),
    "exec-with-3-fds": ([('{"cmd":"exec","name":"rtmule","argv":["id"]}\n', 3)], 1,
                        ["permission denied: exec is not allowed for core"]),
    "exec-without-fds": ([('{"cmd":"exec","name":"rtmule","argv":["id"]}\n', 0)], 1,
                         ["permission denied: exec is not allowed for core"]),
    "four-fds": ([(STATUS, 4)], 1, ["more than 3 file descriptors with one request; closing connection"]),
    "fds-with-partial-line": ([('{"cmd":"sta', 1), ('tus","names":[]}\n', 0)], 1,
                              ["status takes 0 file descriptors, got 1"]),
    "fds-split-over-partials": ([('{"cmd":', 2), ('"status",', 2), ('"names":[]}\n', 0)], 1,
                                ["more than 3 file descriptors with one request; closing connection"]),
    "fds-then-pipelined": ([(STATUS + STATUS, 1)], 2, ["status takes 0 file descriptors, got 1", "OK"]),
    "fds-on-second-line": ([(STATUS, 0), (STATUS, 1)], 2, ["OK", "status takes 0 file descriptors, got 1"]),
    "fds-without-bytes-then-close": ([("\0", 3), ("EOF", 0)], 1, ["closed"]),
    "bad-json-with-fds": ([("{nope\n", 2)], 1, ["malformed JSON: Expecting property name enclosed in "
                                                "double quotes at column 2"]),
    "unknown-verb-with-fds": ([('{"cmd":"mount","name":"rtmule"}\n', 3)], 1,
                              ["unknown command 'mount'"]),
}


@pytest.fixture(scope="module")
def core_side(rt: HiveProcess) -> dict[str, Any]:
    cases = [[label, parts, n] for label, (parts, n, _) in PRIV_CASES.items()]
    pid = rt.priv_pid()
    assert pid is not None
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    with unchanged(rt):
        proc = subprocess.run(
            [str(HIVE.parent / "python"), "-c", PRIV_CALLER, str(rt.priv_sock)], input=json.dumps(cases),
            capture_output=True, text=True, timeout=180, **rt.as_core(),
        )
    assert proc.returncode == 0, proc.stderr
    out: dict[str, Any] = json.loads(proc.stdout)
    assert out.pop("uid") == rt.core_ids[0]
    out["fds-before"], out["fds-after"] = fds, len(os.listdir(f"/proc/{pid}/fd"))
    return out


@pytest.mark.attack("privsep.core-misuse", ref="OpenSSH monitor.c mon_table; CVE-2016-10009")
@pytest.mark.parametrize("label", sorted(PRIV_CASES))
def test_priv_descriptor_misuse_refused(core_side: dict[str, Any], label: str) -> None:
    want = PRIV_CASES[label][2]
    got = core_side[label]
    assert len(got) == len(want), got
    for reply, text in zip(got, want, strict=True):
        if text == "OK":
            assert reply.get("ok") is True, reply
        elif text == "closed":
            assert reply == {"closed": True}, reply
        else:
            assert reply == refusal(text), reply


@pytest.mark.attack("budget.core-descriptors", ref="OpenSSH monitor.c; issue 11 descriptor flood")
def test_priv_descriptor_table_unchanged(core_side: dict[str, Any]) -> None:
    assert core_side["fds-after"] == core_side["fds-before"]


@pytest.mark.attack("privsep.core-misuse", ref="CVE-2018-15686 style credential confusion")
def test_priv_scm_credentials_ignored(core_side: dict[str, Any]) -> None:
    assert core_side["creds"] == [{"version": 1, "ok": True, "cages": {}}]


@pytest.mark.attack("privsep.core-misuse", ref="OpenSSH monitor.c; lock-order deadlocks (CWE-833)")
def test_priv_same_name_requests_never_deadlock(core_side: dict[str, Any]) -> None:
    assert core_side["lock:alive"] == [False] * 4
    assert len(core_side["lock:replies"]) == 40
    assert len({json.dumps(r, sort_keys=True) for r in core_side["lock:replies"]}) == 1
    assert core_side["lock:seconds"] < 30


# -- the operator's HTTP API: a refusal's class gives its status, and nothing changes -------------

SPEC = '{"runtime":"command","command":["true"]}'
HTTP_REFUSALS: list[tuple[str, dict[str, str], int, str]] = [
    ("/approve/999999", {}, 404, "no approval 999999"),
    ("/deny/999999", {}, 404, "no approval 999999"),
    ("/approve/0", {}, 422, "field 'aid': Input should be greater than or equal to 1"),
    ("/approve/99999999999999999999999", {}, 422, "field 'aid': Input should be less than 9223372036854775808"),
    ("/answer-question/999999", {"answer": "x"}, 404, "no question 999999 addressed to operator"),
    ("/answer-question/1", {}, 422, "an answer is required (answer, or option)"),
    ("/api/agents/nosuch/send", {"body": "x"}, 404, "no agent named 'nosuch'"),
    ("/api/agents/operator/send", {"body": "x"}, 422, "field 'to': agent name 'operator' is reserved"),
    ("/api/agents/nosuch/stop", {}, 404, "no agent named 'nosuch'"),
    ("/api/agents/nosuch/destroy", {}, 404, "no agent named 'nosuch'"),
    ("/api/agents/nosuch/pause", {}, 404, "no agent named 'nosuch'"),
    ("/api/agents/nosuch/interrupt", {}, 404, "no agent named 'nosuch'"),
    ("/api/agents/BAD/restart", {}, 422,
     "field 'name': bad agent name 'BAD': must match ^[a-z][a-z0-9-]{0,30}$"),
    ("/api/agents/nosuch/egress/allow", {"rule": "example.com:443"}, 404, "no agent named 'nosuch'"),
    ("/api/agents/rtmule/egress/allow", {"rule": "not a rule"}, 422,
     "field 'rule': an L7 rule starts with an upper-case method or '*': 'not a rule'"),
    ("/api/agents/rtmule/egress/remove", {"rule": "nope.example:443"}, 409,
     "rtmule has no egress rule 'nope.example:443'"),
    ("/api/spawn", {"name": "rtmule", "spec": SPEC}, 409, "an agent named 'rtmule' already exists"),
    ("/api/spawn", {"name": "operator", "spec": SPEC}, 422, "field 'name': agent name 'operator' is reserved"),
    ("/api/spawn", {"name": "rtx", "spec": "[]"}, 422, "spec: request must be a JSON object, got list"),
    ("/api/spawn", {"name": "rtx", "spec": '{"runtime":"command","command":["true"],"memory_mib":1}'}, 422,
     "field 'spec.memory_mib': Input should be greater than or equal to 32"),
]


@pytest.fixture(scope="module")
def http_side(rt: HiveProcess) -> list[tuple[int, str]]:
    from web_fixture import Web, reason

    web = Web(rt)
    login = web.login()
    with unchanged(rt):
        out = []
        for path, data, _, _ in HTTP_REFUSALS:
            r = web.post(path, login, data=data)
            out.append((r.status_code, reason(r)))
        for path in ("/", "/api/state"):
            out.append((web.get(path, login=login).status_code, path))
    return out


@pytest.mark.attack("identity.forge-operator", ref="conventions §4 (refusals); OWASP API3 status confusion")
@pytest.mark.parametrize("i", range(len(HTTP_REFUSALS)), ids=[f"{p}:{s}" for p, _, s, _ in HTTP_REFUSALS])
def test_http_refusal_status_from_its_class(http_side: list[tuple[int, str]], i: int) -> None:
    _, _, status, text = HTTP_REFUSALS[i]
    assert http_side[i] == (status, text)


@pytest.mark.attack("identity.forge-operator", ref="conventions §4 (refusals)")
@pytest.mark.parametrize("path", ["/", "/api/state"])
def test_dashboard_still_answers_after_refusals(http_side: list[tuple[int, str]], path: str) -> None:
    assert (200, path) in http_side[len(HTTP_REFUSALS):]


# -- boundary values on agent verbs: a one-line refusal, never an internal error -------------------

BIG = 2**63 - 1
BOUNDARY: dict[str, dict[str, Any]] = {
    "ack-10000-missing": {"cmd": "ack", "ids": list(range(10**9, 10**9 + 10_000))},
    "ack-10000-same": {"cmd": "ack", "ids": [BIG] * 10_000},
    "ack-empty": {"cmd": "ack", "ids": []},
    "ack-too-many": {"cmd": "ack", "ids": [1] * 10_001},
    "answer-max-id": {"cmd": "answer", "id": BIG, "answer": "a"},
    "answer-bool-id": {"cmd": "answer", "id": True, "answer": "a"},
    "answer-float-id": {"cmd": "answer", "id": 1.0, "answer": "a"},
    "send-nosuch": {"cmd": "send", "to": "rtnosuch", "body": "x"},
    "send-self": {"cmd": "send", "to": "rtmule", "body": "x"},
    "send-all": {"cmd": "send", "to": "all", "body": "x"},
    "send-hive": {"cmd": "send", "to": "hive", "body": "x"},
    "send-not-a-peer": {"cmd": "send", "to": "rtalice", "body": "x"},
    "ask-not-a-peer": {"cmd": "ask", "to": "rtbob", "question": "q", "options": ["a"] * 50},
    "ask-too-many-options": {"cmd": "ask", "to": "operator", "question": "q", "options": ["a"] * 51},
    "remind-far": {"cmd": "remind", "at": "9999-12-31T23:59:59+00:00", "text": "t"},
    "remind-huge-float": {"cmd": "remind", "at": 1e308, "text": "t"},
    "remind-both": {"cmd": "remind", "at": 1.0, "in_seconds": 1, "text": "t"},
    "remind-naive": {"cmd": "remind", "at": "2030-01-01T00:00:00", "text": "t"},
    "remind-bad-date": {"cmd": "remind", "at": "2030-13-01T00:00:00+00:00", "text": "t"},
    "remind-zero": {"cmd": "remind", "in_seconds": 0, "text": "t"},
    "approval-unknown-kind": {"cmd": "request_approval", "kind": "k" * 64, "description": "d"},
    "approval-long-kind": {"cmd": "request_approval", "kind": "k" * 65, "description": "d"},
    "spawn-existing": {"cmd": "request_approval", "kind": "spawn", "description": "d",
                       "payload": {"name": "rtalice", "spec": {"runtime": "command", "command": ["true"]}}},
    "spawn-reserved": {"cmd": "request_approval", "kind": "spawn", "description": "d",
                       "payload": {"name": "operator", "spec": {"runtime": "command", "command": ["true"]}}},
    "spawn-list": {"cmd": "request_approval", "kind": "spawn", "description": "d", "payload": []},
    "spawn-deep-spec": {"cmd": "request_approval", "kind": "spawn", "description": "d",
                        "payload": {"name": "rtdeep", "spec": [[[[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]]]}},
    "egress-private": {"cmd": "request_approval", "kind": "egress", "description": "d",
                       "payload": {"host": "10.0.0.1", "port": 0}},
    "egress-string": {"cmd": "request_approval", "kind": "egress", "description": "d", "payload": "x:1"},
    "recv-max-too-big": {"cmd": "recv", "max": 1001},
    "recv-wait-too-long": {"cmd": "recv", "wait": 3601},
}
BOUNDARY_PROBE = r'''
out = {}
for label, req in CASES.items():
    out[label] = call_when_free(req)
result(**out)
'''


@pytest.fixture(scope="module")
def boundary_side(rt: HiveProcess) -> dict[str, Any]:
    with unchanged(rt):
        return cage_run(rt, "rtmule", f"CASES = {BOUNDARY!r}\n" + BOUNDARY_PROBE, timeout=180)


@pytest.mark.attack("wire.malformed", ref="tinyproxy#627; conventions §4 (one line, nothing changes)")
@pytest.mark.parametrize("label", sorted(BOUNDARY))
def test_boundary_value_refused_in_one_line(boundary_side: dict[str, Any], label: str) -> None:
    reply = boundary_side[label]
    if label == "ack-empty":
        assert reply == {"version": 1, "ok": True, "acked": 0}
        return
    assert set(reply) == {"version", "ok", "error"} and reply["ok"] is False, reply
    assert "internal error" not in reply["error"] and "storage error" not in reply["error"], reply
