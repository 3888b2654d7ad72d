"""Red team of session 15's change (egress revalidation, pacing, batched decisions, the
plain-HTTP head's one reading, /proc read-only in cages, the harness's readline).

Broke (each case failed on the code it was written against; all fixed the same session:
``_track`` before any byte moves, with the rules asked again; ``_allows``: the same kind
of connection as the rules would make now; ``_shut``: the plain socket's shutdown;
``close_in`` writes what became of a tunnel refused at its first record):
- a tunnel whose CONNECT was decided before a rule was taken back, but whose relay starts
  after ``revalidate`` ran, is never tracked when revalidate looks: it outlives the rule
  (the agent holds the window open: a port with L7 rules makes the proxy wait up to 10 s
  for the tunnel's first record before it relays, and the bytes that come then go
  upstream before ``_track``); the same for a plain-HTTP request (a body as long as
  the agent likes) whose connect to a slow-accepting server outlasts the removal;
- a byte tunnel opened under a plain name rule outlives the operator narrowing that name
  to L7 rules (``still_allowed`` asks only whether some rule covers the name; an L7 rule
  does, but would never let a byte tunnel through);
- a terminated connection's request body that never ends goes on reaching the server
  after its L7 rule is taken back (``replan`` runs between requests only, and
  ``revalidate`` keeps it while another L7 rule covers the name);
- ``revalidate`` shuts a terminated connection's ``SSLSocket``s down with
  ``SSLSocket.shutdown``, which drops the SSL object before the descriptor is shut: a
  write of the connection's thread in between goes out in cleartext (the injected secret
  with it).

Held: see each case.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import os
import signal
import socket
import ssl
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from helpers import assert_ok
from hive_fixture import HiveProcess, proc_status, running_hive, wait_until
from hyperhive.cage import harness, wirejson
from hyperhive.core.egress import Decision, EgressProxy, _Open
from hyperhive.priv.cages import PROC_READ_ONLY
from hyperhive.wire.egress import parse_rules
from testnet import TestNet

from .conftest import cage_run, core_fds
from .egress_kit import seen, serve_recorder
from .test_red_round22 import CAP_KILL, CAP_SETGID, CAP_SETPCAP, CAP_SETUID, _as_init, _init_pid
from .test_secrets_egress import cert_dir

AGENT = "rtd15"
OTHER_AGENT = "rtd15b"
NET = TestNet(124, prefix="hvd15")
ADDR = NET.address(2)
NAME = "n.d15.test"  # a plain name rule's destination (our recorder)
L7_NAME = "l7.d15.test"  # a name with L7 rules on the same port (the same address)
UP_ADDR = NET.address(3)  # a TLS server that writes down every byte it is sent
UP_NAME = "up.d15.test"
HOSTS = {NAME: ADDR, L7_NAME: ADDR, UP_NAME: UP_ADDR}
READY, GO = "d15-ready", "d15-go"


# Appends every byte a connection sends (after TLS) to SEEN; answers nothing but
# ``GET /stream``, which gets an answer that never ends.
SINK = r"""
import socket, ssl, sys, threading, time
ADDR, CERT, SEEN = sys.argv[1:4]
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(CERT)
srv = socket.create_server((ADDR, 443))
def serve(c):
    try:
        t = ctx.wrap_socket(c, server_side=True)
        while True:
            d = t.recv(65536)
            if not d:
                break
            with open(SEEN, "ab") as f:
                f.write(d)
            if d.startswith(b"GET /stream"):  # an answer that never ends, a chunk each 20 ms
                t.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
                i = 0
                while True:
                    t.sendall(b"%x\r\n%s\r\n" % (len(b"tick%06d" % i), b"tick%06d" % i))
                    i += 1
                    time.sleep(0.02)
    except Exception:
        pass
while True:
    c, _ = srv.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"""
CERTS: dict[str, Path] = {}


@pytest.fixture(scope="module")
def d15() -> Iterator[HiveProcess]:
    with cert_dir("hvd15", "d15 upstream CA", "d15 server", [UP_NAME]) as (d, _), NET as net:
        CERTS["dir"] = d
        serve_recorder(net, ADDR, 80)
        serve_recorder(net, ADDR, 443)  # plain HTTP on 443: a byte tunnel carries the agent's
        sink = [sys.executable, "-c", SINK, UP_ADDR, str(d / "server.pem"), str(d / "sink")]
        net.serve(UP_ADDR, 443, sink)
        h = HiveProcess(
            {a: {"runtime": "command", "command": ["true"]} for a in (AGENT, OTHER_AGENT)},
            sections={"egress": {"hosts": HOSTS, "upstream_ca": str(d / "ca.pem")}},
        )
        yield from running_hive(h)


# In the cage: CONNECT P["target"]; once the 200 is in, say so (READY) and wait for GO;
# then a GET through the tunnel, and a fresh CONNECT to the same target.
HELD = r"""
import os
home = "/home/agent/"
def head(s):
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        if not chunk:
            return data, b""
        data += chunk
    top, _, rest = data.partition(b"\r\n\r\n")
    return top, rest
def answer(s, path, host):
    s.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    top, rest = head(s)
    if not top:
        return ("closed", "")
    n = int([l.split(b":")[1] for l in top.split(b"\r\n") if l.lower().startswith(b"content-length")][0])
    while len(rest) < n:
        rest += s.recv(65536)
    return top.split(b"\r\n")[0].decode(), rest.decode()
out = {}
t = socket.create_connection(("127.0.0.1", 3128), timeout=20)
t.sendall(f"CONNECT {P['target']} HTTP/1.1\r\n\r\n".encode())
out["opened"] = head(t)[0].split(b"\r\n")[0].decode()
if P.get("before"):
    out["before"] = answer(t, P["before"], P["host"])
open(home + P["ready"], "w").close()
deadline = time.monotonic() + 30
while not os.path.exists(home + P["go"]) and time.monotonic() < deadline:
    time.sleep(0.02)
out["go"] = os.path.exists(home + P["go"])
try:
    out["after"] = answer(t, P["after"], P["host"])
except (OSError, IndexError, ValueError) as e:
    out["after"] = ("cut", errname(e) if isinstance(e, OSError) else type(e).__name__)
n = socket.create_connection(("127.0.0.1", 3128), timeout=20)
n.sendall(f"CONNECT {P['target']} HTTP/1.1\r\n\r\n".encode())
out["fresh"] = head(n)[0].split(b"\r\n")[0].decode()
for f in (P["ready"], P["go"]):
    try:
        os.unlink(home + f)
    except OSError:
        pass
result(**out)
"""


def _held(h: HiveProcess, between: Any, **params: Any) -> dict[str, Any]:
    """Run HELD in the cage; ``between()`` (the operator's move) once the tunnel is open."""
    return _held_script(h, HELD, between, **params)


def _held_script(h: HiveProcess, script: str, between: Any, **params: Any) -> dict[str, Any]:
    """Run ``script`` in the cage; ``between()`` once it made READY, then GO."""
    holder: dict[str, Any] = {}

    def run() -> None:
        try:
            holder.update(cage_run(h, AGENT, script, ready=READY, go=GO, timeout=60, **params))
        except BaseException as e:  # shown by the caller
            holder["error"] = repr(e)[:2000]

    t = threading.Thread(target=run)
    t.start()
    try:
        wait_until(
            lambda: "error" in holder or (h.home(AGENT) / READY).exists(), 30, "the tunnel open"
        )
    finally:
        try:
            between()
        finally:
            with contextlib.suppress(OSError):
                (h.home(AGENT) / GO).write_text("go")
            t.join(60)
    return holder


def _allow(h: HiveProcess, *rules: str) -> None:
    for r in rules:
        assert_ok(h.host_call("egress_allow", name=AGENT, rule=r))


def _remove(h: HiveProcess, *rules: str) -> None:
    for r in rules:
        h.host_call("egress_remove", name=AGENT, rule=r)


# -- 1. revalidate races the relay's start ----------------------------------------------


@pytest.mark.attack(
    "egress.l7-bypass",
    ref="session 15 diff: EgressProxy.revalidate only sees connections _track registered; a CONNECT decided before the rule's removal whose relay starts after it escapes",
)
def test_a_tunnel_decided_before_the_removal_and_relayed_after_it_ends_too(
    d15: HiveProcess,
) -> None:
    """**Broke, fixed.** ``_serve`` checks the rules, connects, answers 200, and only then (for a
    port with L7 rules: after waiting up to HEAD_TIMEOUT for the tunnel's first record,
    the fronting check) calls ``_track``. ``revalidate`` run in that window sees nothing to
    end, and the relay that starts after it is never looked at again: a tunnel that
    outlives its rule, with no idle timeout. The agent holds the window open at will (it
    just sends nothing after the 200). Here: rules ``ADDR:80`` (the private address at
    all), ``n.d15.test:80`` and an L7 rule on port 80 for another name; the agent opens
    the tunnel and waits; the operator removes ``n.d15.test:80``; the agent then sends a
    GET through the tunnel. Fix: in ``_track``, after registering, check
    ``still_allowed(self.rules_for(agent), ...)`` again and shut the sockets down if not
    (reload_egress replaces the rules before it calls revalidate, so either revalidate
    sees the entry or ``_track`` sees the new rules)."""
    _allow(d15, f"{ADDR}:80", f"{NAME}:80", f"GET {L7_NAME}:80/only/*")
    seen(ADDR, 80)
    try:
        out = _held(
            d15,
            lambda: _remove(d15, f"{NAME}:80"),
            target=f"{NAME}:80",
            host=NAME,
            after="/d15-after-rm",
        )
        got = seen(ADDR, 80)
    finally:
        _remove(d15, f"{ADDR}:80", f"{NAME}:80", f"GET {L7_NAME}:80/only/*")
    print(f"in the cage: {out}; the server saw after the removal: {got}")
    assert "error" not in out, out["error"]
    assert out["opened"].startswith("HTTP/1.1 200"), out
    assert out["fresh"] == "HTTP/1.1 403 Forbidden", out  # a new connection is refused
    assert [r["path"] for r in got] == [], f"the removed rule's tunnel still carried {got}"


# -- 2. a rule narrowed to L7 while a byte tunnel is open ------------------------------------


@pytest.mark.attack(
    "egress.l7-bypass",
    ref="session 15 diff: still_allowed counts an L7 rule as covering a byte tunnel to its name",
)
def test_narrowing_a_name_to_l7_rules_ends_its_open_byte_tunnel(d15: HiveProcess) -> None:
    """**Broke, fixed.** The operator had ``n.d15.test:443`` (a byte tunnel: nothing inside is
    checked) and narrows it to ``GET n.d15.test:443/ok/*`` (add the L7 rule, remove the
    plain one): from now on the proxy terminates TLS to that name and checks each request.
    A fresh CONNECT gets that; but ``revalidate`` keeps the agent's open byte tunnel,
    because ``still_allowed`` asks only whether some rule covers the name, and the L7 rule
    does. The agent goes on sending whatever it likes to the name through it (here
    ``/admin/...``, which the L7 rule does not allow). Fix: for a byte tunnel (not a
    terminated connection, which replans), ``still_allowed`` must also find that no TLS
    termination would be planned now (``plan_for(...) is None``), i.e. a plain rule, not
    an L7 one, covers it; else shut it down."""
    _allow(d15, f"{ADDR}:443", f"{NAME}:443")
    seen(ADDR, 443)

    def narrow() -> None:
        _allow(d15, f"GET {NAME}:443/ok/*")
        _remove(d15, f"{NAME}:443")

    try:
        out = _held(
            d15,
            narrow,
            target=f"{NAME}:443",
            host=NAME,
            before="/ok/d15-before",
            after="/admin/d15-after-narrowing",
        )
        got = seen(ADDR, 443)
    finally:
        _remove(d15, f"{ADDR}:443", f"{NAME}:443", f"GET {NAME}:443/ok/*")
    print(f"in the cage: {out}; the server saw: {got}")
    assert "error" not in out, out["error"]
    assert out["before"][0] == "HTTP/1.1 200 OK", out
    late = [r["path"] for r in got if r["path"] != "/ok/d15-before"]
    assert late == [], f"the byte tunnel outlived the narrowing to L7 rules: {late}"


# -- 2b. an endless request body on a terminated connection, its L7 rule taken back ---------

UPLOAD = r"""
import os, ssl
home = "/home/agent/"
s = socket.create_connection(("127.0.0.1", 3128), timeout=20)
s.sendall(f"CONNECT {P['host']}:443 HTTP/1.1\r\n\r\n".encode())
head = b""
while b"\r\n\r\n" not in head:
    head += s.recv(4096)
t = ssl.create_default_context(cafile="/run/hive/ca-bundle.pem").wrap_socket(s, server_hostname=P["host"])
t.sendall(f"POST /up/d15 HTTP/1.1\r\nHost: {P['host']}\r\nTransfer-Encoding: chunked\r\n\r\n".encode())
def chunk(text):
    data = text.encode()
    t.sendall(b"%x\r\n" % len(data) + data + b"\r\n")
chunk("d15-BEFORE")
open(home + P["ready"], "w").close()
deadline = time.monotonic() + 30
while not os.path.exists(home + P["go"]) and time.monotonic() < deadline:
    time.sleep(0.02)
sent, why = 0, "all sent"
try:
    for i in range(20):
        chunk(f"d15-AFTER-{i}")
        sent += 1
        time.sleep(0.05)
except OSError as e:
    why = errname(e)
t.settimeout(3)
try:
    end = t.recv(4096).split(b"\r\n")[0].decode(errors="replace")
except (OSError, ssl.SSLError) as e:
    end = "recv: " + errname(e)
for f in (P["ready"], P["go"]):
    try:
        os.unlink(home + f)
    except OSError:
        pass
result(head=head.split(b"\r\n")[0].decode(), sent=sent, why=why, end=end)
"""


@pytest.mark.attack(
    "egress.l7-bypass",
    ref="session 15 diff: replan runs only between requests; revalidate's still_allowed asks whether some rule covers the name, not the request under way",
)
def test_an_endless_upload_ends_when_its_l7_rule_is_taken_back(d15: HiveProcess) -> None:
    """**Broke, fixed.** Rules: ``UP_ADDR:443`` (the private address), ``POST up.d15.test:443/up/*``
    and ``GET up.d15.test:443/status``. The agent opens a terminated connection and starts
    ``POST /up/d15`` with a chunked body it never ends; the operator takes the POST rule
    back. ``revalidate`` keeps the connection (the GET rule still covers the name), and
    ``replan`` runs only before the next request, which never comes: the body goes on
    reaching the server, as long as the agent likes, under a rule that is gone (a stream
    answer, SSE, the same downwards). Fix: ``revalidate`` asks each terminated connection
    whether the request under way is still allowed (its method and normalised path, kept
    by Terminated when it checks the request) and shuts it down if not; or, simpler, ends
    every terminated connection of the agent whose plan's L7 rules changed."""
    d = CERTS["dir"]
    sink = d / "sink"
    with contextlib.suppress(OSError):
        sink.unlink()
    rules = (f"{UP_ADDR}:443", f"POST {UP_NAME}:443/up/*", f"GET {UP_NAME}:443/status")
    _allow(d15, *rules)
    holder: dict[str, Any] = {}

    def run() -> None:
        try:
            holder.update(
                cage_run(d15, AGENT, UPLOAD, host=UP_NAME, ready=READY, go=GO, timeout=60)
            )
        except BaseException as e:
            holder["error"] = repr(e)[:2000]

    t = threading.Thread(target=run)
    t.start()
    try:
        wait_until(
            lambda: "error" in holder or (sink.exists() and b"d15-BEFORE" in sink.read_bytes()),
            30,
            "the upload's first chunk upstream",
        )
    finally:
        _remove(d15, f"POST {UP_NAME}:443/up/*")
        with contextlib.suppress(OSError):
            (d15.home(AGENT) / GO).write_text("go")
        t.join(60)
        _remove(d15, *rules)
    got = sink.read_bytes() if sink.exists() else b""
    late = got.count(b"d15-AFTER-")
    print(f"in the cage: {holder}; the server got {late} chunks sent after the rule was removed")
    assert "error" not in holder, holder["error"]
    assert b"POST /up/d15" in got and b"d15-BEFORE" in got, got[:300]
    assert late == 0, (
        f"{late} chunks of the upload reached the server after its rule was taken back"
    )


# -- 2e. an endless answer on a terminated connection when its last rule goes ----------------

STREAM = r"""
import os, ssl
home = "/home/agent/"
s = socket.create_connection(("127.0.0.1", 3128), timeout=20)
s.sendall(f"CONNECT {P['host']}:443 HTTP/1.1\r\n\r\n".encode())
head = b""
while b"\r\n\r\n" not in head:
    head += s.recv(4096)
t = ssl.create_default_context(cafile="/run/hive/ca-bundle.pem").wrap_socket(s, server_hostname=P["host"])
t.sendall(f"GET /stream HTTP/1.1\r\nHost: {P['host']}\r\n\r\n".encode())
got = b""
while got.count(b"tick") < 5:
    got += t.recv(65536)
open(home + P["ready"], "w").close()
deadline = time.monotonic() + 30
while not os.path.exists(home + P["go"]) and time.monotonic() < deadline:
    time.sleep(0.01)
t0, after, why = time.monotonic(), 0, "still streaming after 5 s"
t.settimeout(5)
while time.monotonic() - t0 < 5:
    try:
        d = t.recv(65536)
    except (OSError, ssl.SSLError) as e:
        why = "error " + type(e).__name__
        break
    if not d:
        why = "EOF"
        break
    after += d.count(b"tick")
for f in (P["ready"], P["go"]):
    try:
        os.unlink(home + f)
    except OSError:
        pass
result(before=got.count(b"tick"), after=after, why=why, seconds=time.monotonic() - t0)
"""


@pytest.mark.attack(
    "egress.l7-bypass",
    ref="session 15 diff: revalidate shuts down a terminated connection's SSL sockets from the loop thread while its thread relays",
)
def test_an_endless_answer_ends_when_the_last_rule_goes(d15: HiveProcess) -> None:
    """**Held.** A terminated connection relaying an answer that never ends (a chunk each
    20 ms); the operator takes back the only L7 rule for the name: ``revalidate`` shuts
    both SSL sockets down from the event loop while the connection's thread is in them,
    and the cage's stream ends (EOF or a TLS error) at once, a chunk or two after at most;
    the proxy's thread ends (the core's log has no traceback of it)."""
    rules = (f"{UP_ADDR}:443", f"GET {UP_NAME}:443/stream")
    _allow(d15, *rules)
    log_before = d15.log_path.stat().st_size
    try:
        out = _held_script(d15, STREAM, lambda: _remove(d15, rules[1]), host=UP_NAME)
    finally:
        _remove(d15, *rules)
    with open(d15.log_path, "rb") as f:
        f.seek(log_before)
        logged = f.read().decode(errors="replace")
    print(
        f"in the cage: {out}; logged: {[ln for ln in logged.splitlines() if 'egress' in ln][-4:]}"
    )
    assert "error" not in out, out["error"]
    assert out["before"] >= 5 and out["why"] in (
        "EOF",
        "error SSLError",
        "error ConnectionResetError",
    ), out
    assert out["after"] <= 5 and out["seconds"] < 1.0, out
    assert "Traceback" not in logged, logged[-3000:]


# -- 2c. a terminated connection whose rule goes while its handshake is held ------------------

LATE_HELLO = r"""
import os, ssl
home = "/home/agent/"
s = socket.create_connection(("127.0.0.1", 3128), timeout=20)
s.sendall(f"CONNECT {P['host']}:443 HTTP/1.1\r\n\r\n".encode())
head = b""
while b"\r\n\r\n" not in head:
    head += s.recv(4096)
open(home + P["ready"], "w").close()
deadline = time.monotonic() + 30
while not os.path.exists(home + P["go"]) and time.monotonic() < deadline:
    time.sleep(0.02)
t = ssl.create_default_context(cafile="/run/hive/ca-bundle.pem").wrap_socket(s, server_hostname=P["host"])
t.sendall(f"GET /status HTTP/1.1\r\nHost: {P['host']}\r\n\r\n".encode())
t.settimeout(5)
try:
    answer = t.recv(65536).decode(errors="replace")
except (OSError, ssl.SSLError) as e:
    answer = "recv: " + errname(e)
for f in (P["ready"], P["go"]):
    try:
        os.unlink(home + f)
    except OSError:
        pass
result(head=head.split(b"\r\n")[0].decode(), answer=answer)
"""


@pytest.mark.attack(
    "egress.l7-bypass",
    ref="session 15 diff: a terminated connection is tracked only after both handshakes; replan before its first request",
)
def test_a_rule_taken_back_during_the_handshake_refuses_the_first_request(
    d15: HiveProcess,
) -> None:
    """**Held.** The agent CONNECTs to ``up.d15.test:443`` (L7 rules: terminated), gets the
    200 and holds its ClientHello while the operator takes ``GET up.d15.test:443/status``
    back (``revalidate`` runs before the connection is tracked); then it handshakes and
    asks ``GET /status``: a 403 (``replan`` runs before the first request too: the POST
    rule left is the plan's only rule), and the server gets nothing of it."""
    sink = CERTS["dir"] / "sink"
    with contextlib.suppress(OSError):
        sink.unlink()
    rules = (f"{UP_ADDR}:443", f"POST {UP_NAME}:443/up/*", f"GET {UP_NAME}:443/status")
    _allow(d15, *rules)
    try:
        out = _held_script(d15, LATE_HELLO, lambda: _remove(d15, rules[2]), host=UP_NAME)
    finally:
        _remove(d15, *rules)
    got = sink.read_bytes() if sink.exists() else b""
    print(f"in the cage: {out}; the server got {got[:200]!r}")
    assert "error" not in out, out["error"]
    assert out["answer"].startswith("HTTP/1.1 403"), out
    assert b"/status" not in got, got[:300]


# -- 2d. what the cage reads in the host's /proc/sys binds --------------------------------

VIEW = r"""
import os
out = {"conf": sorted(os.listdir("/proc/sys/net/ipv4/conf")),
       "hostname": open("/proc/sys/kernel/hostname").read().strip(), "uname": os.uname().nodename,
       "ns_last_pid": int(open("/proc/sys/kernel/ns_last_pid").read()), "mypid": os.getpid(),
       "somaxconn": open("/proc/sys/net/core/somaxconn").read().strip()}
for p in ("/proc/sys/kernel/hostname", "/proc/sys/net/ipv4/ip_forward", "/proc/sys/fs/file-max"):
    try:
        open(p, "w").close()
        out[p] = "opened"
    except OSError as e:
        out[p] = errname(e)
result(**out)
"""


@pytest.mark.attack(
    "observe.host-activity",
    ref="session 15 diff: the cage's /proc/sys is the host's /proc/sys bound read-only; a sysctl answers for the reader's namespaces",
)
def test_the_bound_proc_sys_answers_for_the_cages_namespaces(d15: HiveProcess) -> None:
    """**Held.** Through the bind of the host's ``/proc/sys`` the cage reads its own
    namespaces' values, not the host's: ``net/ipv4/conf`` lists the cage's interfaces
    (``lo`` only, no host interface names), ``kernel/hostname`` is the cage's,
    ``kernel/ns_last_pid`` its pid namespace's (small); and nothing opens for writing
    (EROFS)."""
    out = cage_run(d15, AGENT, VIEW)
    print(out)
    assert out["conf"] == ["all", "default", "lo"], out
    assert out["hostname"] == out["uname"] != os.uname().nodename, out
    assert out["ns_last_pid"] < 1000 and out["mypid"] < 1000, out
    assert {k: v for k, v in out.items() if k.startswith("/proc")} == {
        "/proc/sys/kernel/hostname": "EROFS",
        "/proc/sys/net/ipv4/ip_forward": "EROFS",
        "/proc/sys/fs/file-max": "EROFS",
    }, out


# -- 3. the control: a tracked tunnel, a plain relay, many at once ---------------------------

MANY = r"""
import os
home = "/home/agent/"
socks, opened = [], []
for i in range(P["n"]):
    s = socket.create_connection(("127.0.0.1", 3128), timeout=20)
    s.sendall(f"CONNECT {P['target']} HTTP/1.1\r\n\r\n".encode())
    s.sendall(f"GET /d15-many-{i} HTTP/1.1\r\nHost: {P['host']}\r\n\r\n".encode())
    data = b""
    while data.count(b"\r\n\r\n") < 2 or not data.endswith(f"d15-many-{i}".encode()):
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    opened.append(data.split(b"\r\n")[0].decode())
    socks.append(s)
open(home + P["ready"], "w").close()
t0 = time.monotonic()
ended = []
for s in socks:
    s.settimeout(10)
    try:
        ended.append(s.recv(65536) == b"")
    except OSError as e:
        ended.append(errname(e))
result(opened=opened, ended=ended, seconds=time.monotonic() - t0)
"""


@pytest.mark.attack(
    "egress.l7-bypass",
    ref="session 15 diff: revalidate with every slot of the agent's open (tunnels relaying)",
)
def test_a_rule_taken_back_ends_every_open_tunnel_at_once(d15: HiveProcess) -> None:
    """**Held.** 14 tunnels open (under max_connections, 16), each relaying; the rule
    removed: every one ends (EOF in the cage) within a second or so, the core keeps
    answering meanwhile (revalidate shuts sockets down, it does not wait for threads), and
    its descriptors come back to where they were (none left behind)."""
    _allow(d15, f"{ADDR}:80", f"{NAME}:80")
    ready = d15.home(AGENT) / READY
    holder: dict[str, Any] = {}

    def run() -> None:
        try:
            holder.update(
                cage_run(d15, AGENT, MANY, n=14, target=f"{NAME}:80", host=NAME, ready=READY)
            )
        except BaseException as e:
            holder["error"] = repr(e)[:2000]

    fds = core_fds(d15)
    t = threading.Thread(target=run)
    t.start()
    try:
        wait_until(lambda: "error" in holder or ready.exists(), 60, "the tunnels open")
        t0 = time.monotonic()
        _remove(d15, f"{NAME}:80")
        took = time.monotonic() - t0
        status = assert_ok(d15.host_call("agent_status"))
    finally:
        _remove(d15, f"{ADDR}:80", f"{NAME}:80")
        t.join(60)
        with contextlib.suppress(OSError):
            ready.unlink()
    wait_until(lambda: core_fds(d15) <= fds, 10, "the core's descriptors back")
    print(
        f"egress_remove took {took:.3f} s; core fds {fds} -> {core_fds(d15)}; in the cage: {holder}"
    )
    assert "error" not in holder, holder["error"]
    assert all(o.startswith("HTTP/1.1 200") for o in holder["opened"]), holder
    assert holder["ended"] == [True] * 14, holder
    assert holder["seconds"] < 5, holder
    assert status["ok"]


# -- 4. the plain-HTTP head, still read two ways? --------------------------------------------

HEADS = r"""
out = {}
for key, head in P["heads"].items():
    s = socket.create_connection(("127.0.0.1", 3128), timeout=20)
    s.sendall(head.encode("latin-1"))
    data = b""
    while True:
        try:
            chunk = s.recv(65536)
        except OSError:
            break
        if not chunk:
            break
        data += chunk
    s.close()
    out[key] = data.split(b"\r\n")[0].decode("latin-1")
result(**out)
"""
# Each tries to get a Host other than the destination (or a second request) to the server.
ODD = {
    "obs-fold": "GET http://{a}/d15-fold HTTP/1.1\r\nX-A: 1\r\n Host: evil.d15.test\r\n\r\n",
    "tab-fold": "GET http://{a}/d15-tabfold HTTP/1.1\r\nX-A: 1\r\n\tHost: evil.d15.test\r\n\r\n",
    "space-before-colon": "GET http://{a}/d15-sp HTTP/1.1\r\nHost : evil.d15.test\r\n\r\n",
    "tab-in-name": "GET http://{a}/d15-tn HTTP/1.1\r\nHost\t: evil.d15.test\r\n\r\n",
    "nul-in-value": "GET http://{a}/d15-nul HTTP/1.1\r\nX-A: 1\x00Host: evil.d15.test\r\n\r\n",
    "vt-in-value": "GET http://{a}/d15-vt HTTP/1.1\r\nX-A: 1\x0bHost: evil.d15.test\r\n\r\n",
    "ff-in-value": "GET http://{a}/d15-ff HTTP/1.1\r\nX-A: 1\x0cHost: evil.d15.test\r\n\r\n",
    "fs-in-value": "GET http://{a}/d15-fs HTTP/1.1\r\nX-A: 1\x1cHost: evil.d15.test\r\n\r\n",
    "del-in-value": "GET http://{a}/d15-del HTTP/1.1\r\nX-A: 1\x7fHost: evil.d15.test\r\n\r\n",
    "lone-cr-end": "GET http://{a}/d15-cr HTTP/1.1\r\nHost: {a}\r\r\n\r\n",
    "version-lower": "GET http://{a}/d15-ver http/1.1\r\n\r\n",
    "version-2": "GET http://{a}/d15-ver2 HTTP/2.0\r\n\r\n",
    "method-slash": "G/ET http://{a}/d15-m HTTP/1.1\r\n\r\n",
    "method-empty": " http://{a}/d15-me HTTP/1.1\r\n\r\n",
    "two-spaces": "GET  http://{a}/d15-2sp HTTP/1.1\r\n\r\n",
    "tab-in-line": "GET\thttp://{a}/d15-tab HTTP/1.1\r\n\r\n",
    "empty-name": "GET http://{a}/d15-en HTTP/1.1\r\n: evil\r\n\r\n",
}
# The server must see these as the proxy read them: one request, Host the destination.
PASSED = {
    "latin1-in-value": "GET http://{a}/d15-l1 HTTP/1.1\r\nX-A: 1\x85Host: evil.d15.test\r\n\r\n",
    "tab-in-value": "GET http://{a}/d15-tv HTTP/1.1\r\nX-A: 1\tHost: evil.d15.test\r\n\r\n",
    "tab-in-target": "GET http://{a}/d15-tt\tHTTP/1.1 HTTP/1.1\r\n\r\n",
    "vt-in-target": "GET http://{a}/d15-vt\x0bhttp://evil.d15.test/ HTTP/1.1\r\n\r\n",
    "nul-del-in-target": "GET http://{a}/d15-n\x00\x7f HTTP/1.1\r\n\r\n",
}


@pytest.mark.attack(
    "egress.host-header",
    ref="session 15 diff: parse_request / _headers: obs-fold, tabs, control and 8-bit bytes, a lone CR at the head's end",
)
def test_the_plain_http_head_is_read_one_way(d15: HiveProcess) -> None:
    """**Held.** Folded lines (space or tab), a space or tab before the colon, NUL, VT,
    FF, FS, DEL in a value, a lone CR before the blank line, a lower-case or 2.0
    version, a method that is no token, two spaces or a tab in the request line, an empty
    header name: each a 400, and the server saw none of them. A tab or an 8-bit byte
    (0x85, NEL to a reader that splits lines as str.splitlines does) in a value, and a
    tab in the target, are forwarded, and the server (Python's http.server) read one
    request with one Host, the destination."""
    _allow(d15, f"{ADDR}:80")
    seen(ADDR, 80)
    try:
        bad = cage_run(d15, AGENT, HEADS, heads={k: v.format(a=ADDR) for k, v in ODD.items()})
        got_bad = seen(ADDR, 80)
        good = cage_run(d15, AGENT, HEADS, heads={k: v.format(a=ADDR) for k, v in PASSED.items()})
        got_good = seen(ADDR, 80)
    finally:
        _remove(d15, f"{ADDR}:80")
    print(f"refused: {bad}; server saw {got_bad}\nforwarded: {good}; server saw {got_good}")
    assert {k: v[:12] for k, v in bad.items()} == {k: "HTTP/1.1 400" for k in ODD}, bad
    assert got_bad == [], got_bad
    assert all(r["host"] == [ADDR] for r in got_good), got_good


# -- 5. pacing: one agent's flood and another's egress; the listener after a rest ------------

FLOOD = r"""
import threading
stop = time.monotonic() + P["seconds"]
count = [0]
def loop():
    while time.monotonic() < stop:
        try:
            s = socket.create_connection(("127.0.0.1", 3128), timeout=10)
            s.sendall(b"CONNECT d15-refused.invalid:443 HTTP/1.1\r\n\r\n")
            while s.recv(4096):
                pass
            s.close()
            count[0] += 1
        except OSError:
            pass
ts = [threading.Thread(target=loop) for _ in range(8)]
for t in ts: t.start()
for t in ts: t.join()
# the listener rested; a request after the flood is served at once
t0 = time.monotonic()
s = socket.create_connection(("127.0.0.1", 3128), timeout=10)
s.sendall(b"CONNECT d15-after.invalid:443 HTTP/1.1\r\n\r\n")
first = s.recv(4096).split(b"\r\n")[0].decode()
result(refused=count[0], after=first, after_s=time.monotonic() - t0)
"""
OTHER = r"""
lat = []
stop = time.monotonic() + P["seconds"]
while time.monotonic() < stop:
    t0 = time.monotonic()
    s = socket.create_connection(("127.0.0.1", 3128), timeout=10)
    s.sendall(b"CONNECT d15-other.invalid:443 HTTP/1.1\r\n\r\n")
    s.recv(4096)
    s.close()
    lat.append(time.monotonic() - t0)
    time.sleep(0.05)
result(n=len(lat), worst=max(lat), median=sorted(lat)[len(lat) // 2])
"""


def _flood_and_other(rt: HiveProcess) -> tuple[dict[str, Any], dict[str, Any]]:
    res: dict[str, Any] = {}

    def other() -> None:
        try:
            time.sleep(0.5)
            res.update(cage_run(rt, OTHER_AGENT, OTHER, seconds=3))
        except BaseException as e:
            res["error"] = repr(e)[:2000]

    t = threading.Thread(target=other)
    t.start()
    try:
        flood = cage_run(rt, AGENT, FLOOD, seconds=4, timeout=120)
    finally:
        t.join(60)
    return flood, res


@pytest.mark.attack(
    "core.cheap-verb-flood",
    ref="session 15 diff: [egress] connections_per_second per agent; the listener rests with call_later",
)
def test_pacing_is_per_agent_and_the_listener_reads_again(d15: HiveProcess) -> None:
    """**Held.** rtd15 floods refused CONNECTs from 8 threads for 4 s while rtd15b makes
    one every 50 ms: rtd15b's slowest stays under a second (the bucket is per agent: its
    listener never rests for rtd15's), rtd15 is paced (at most the burst and the rate),
    and after the flood rtd15's listener reads again (its next CONNECT answered in under
    2 s, not left resting)."""
    flood, other = _flood_and_other(d15)
    print(f"flood {flood}; the other agent {other}")
    assert "error" not in other, other["error"]
    assert flood["refused"] <= 200 + 100 * 5, flood
    assert flood["after"] == "HTTP/1.1 403 Forbidden" and flood["after_s"] < 2.0, flood
    assert other["n"] > 10 and other["worst"] < 1.0, other


# -- 6. the batched egress log: every decision shown by egress_log at once ------------------

BURST = r"""
out = []
for i in range(P["n"]):
    s = socket.create_connection(("127.0.0.1", 3128), timeout=10)
    s.sendall(f"CONNECT d15-log-{P['tag']}-{i}.invalid:443 HTTP/1.1\r\n\r\n".encode())
    out.append(s.recv(4096).split(b"\r\n")[0].decode())
    s.close()
# one allowed, opened and closed within a batch: its row must carry the close
s = socket.create_connection(("127.0.0.1", 3128), timeout=10)
s.sendall(f"GET http://{P['addr']}/d15-log-{P['tag']} HTTP/1.1\r\n\r\n".encode())
got = b""
while chunk := s.recv(65536):
    got += chunk
result(answers=out, allowed=got.split(b"\r\n")[0].decode(), size=len(got))
"""


@pytest.mark.attack(
    "core.cheap-verb-flood",
    ref="session 15 diff: record_egress batches (50 ms); host.sock egress_log writes what is pending first",
)
def test_egress_log_shows_every_decision_made_before_it(d15: HiveProcess) -> None:
    """**Held.** 30 refused CONNECTs in a row and an allowed GET (its open and its close
    in the same 50 ms batch), then at once (no sleep) ``egress_log`` on host.sock: all 30
    are there, one row each (the pending batch written before the read), and the allowed
    one is one row with its close (closed_at, bytes down to the byte the cage got)."""
    tag = f"{os.getpid()}{int(time.time())}"
    _allow(d15, f"{ADDR}:80")
    try:
        out = cage_run(d15, AGENT, BURST, n=30, tag=tag, addr=ADDR)
        rows = assert_ok(d15.host_call("egress_log", name=AGENT, limit=200))["entries"]
    finally:
        _remove(d15, f"{ADDR}:80")
    allowed = [r for r in rows if r["host"] == ADDR and r["allowed"]][:1]
    print(f"the allowed one: {out['allowed']} {out['size']} B; its row {allowed}")
    assert out["allowed"] == "HTTP/1.1 200 OK", out
    assert len(allowed) == 1 and allowed[0]["closed_at"] is not None, allowed
    assert allowed[0]["bytes_up"] > 0 and allowed[0]["bytes_down"] == out["size"], allowed
    mine = [r["host"] for r in rows if r["host"].startswith(f"d15-log-{tag}-")]
    print(f"{len(mine)} rows of 30: {mine[:3]}...")
    assert out["answers"] == ["HTTP/1.1 403 Forbidden"] * 30, out
    assert sorted(mine, key=lambda h: int(h.split("-")[-1].split(".")[0])) == [
        f"d15-log-{tag}-{i}.invalid" for i in range(30)
    ], mine


# -- 7. /proc read-only: the cage's root cannot uncover or remount it ------------------------

REMOUNT = r"""
import ctypes, errno, json, os, sys
init, mask = int(sys.argv[1]), int(sys.argv[2])
libc = ctypes.CDLL(None, use_errno=True)
out = {}
fd = os.open(f"/proc/{init}/ns/mnt", os.O_RDONLY)
if libc.setns(fd, 0x00020000) != 0:
    raise OSError(ctypes.get_errno(), "setns")
os.chdir("/")
class H(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]
class D(ctypes.Structure):
    _fields_ = [("e", ctypes.c_uint32), ("p", ctypes.c_uint32), ("i", ctypes.c_uint32)]
data = (D * 2)(D(mask & 0xFFFFFFFF, mask & 0xFFFFFFFF, 0), D(mask >> 32, mask >> 32, 0))
if libc.capset(ctypes.byref(H(0x20080522, 0)), data) != 0:
    raise OSError(ctypes.get_errno(), "capset")
def res(rc):
    return "ok" if rc == 0 else errno.errorcode.get(ctypes.get_errno(), "?")
MS_REMOUNT, MS_BIND, MNT_DETACH = 32, 4096, 2
for p in ("/proc/sys", "/proc/sysrq-trigger", "/proc/fs"):
    out["remount " + p] = res(libc.mount(None, p.encode(), None, MS_REMOUNT | MS_BIND, None))
    out["umount " + p] = res(libc.umount2(p.encode(), MNT_DETACH))
out["mount proc"] = res(libc.mount(b"proc", b"/tmp", b"proc", 0, None))
# A user namespace of its own (no seccomp filter here, unlike init) has every capability
# over a new mount namespace, but the binds it copies are locked read-only and together.
out["unshare user+mnt"] = res(libc.unshare(0x10000000 | 0x00020000))
if out["unshare user+mnt"] == "ok":
    for p in ("/proc/sys", "/proc/fs"):
        out["userns remount rw " + p] = res(libc.mount(None, p.encode(), None, MS_REMOUNT | MS_BIND, None))
        out["userns umount " + p] = res(libc.umount2(p.encode(), MNT_DETACH))
try:
    with open("/proc/sys/kernel/core_pattern", "w") as f:
        f.write("|/bin/false")
    out["core_pattern"] = "written"
except OSError as e:
    out["core_pattern"] = errno.errorcode.get(e.errno, str(e))
print(json.dumps(out))
"""


@pytest.mark.attack(
    "init.capabilities",
    ref="session 15 diff: PROC_READ_ONLY binds; can init's capabilities remount or uncover them",
)
def test_the_cages_root_cannot_remount_or_uncover_proc_sys(d15: HiveProcess) -> None:
    """**Held.** In the cage's mount namespace with exactly init's capabilities (setuid,
    setgid, setpcap, kill; no seccomp filter even, so stronger than init itself): a
    remount of ``/proc/sys``, ``/proc/sysrq-trigger``, ``/proc/fs`` is EPERM, so is
    unmounting them (which would uncover the cage's own writable ``/proc/sys``), mounting
    a fresh proc, and a user namespace; ``kernel/core_pattern`` stays unwritable."""
    import subprocess
    import sys

    init = _init_pid(d15, AGENT)
    mask = (1 << CAP_SETUID) | (1 << CAP_SETGID) | (1 << CAP_SETPCAP) | (1 << CAP_KILL)
    before = Path("/proc/sys/kernel/core_pattern").read_text()
    proc = subprocess.run(
        [sys.executable, "-I", "-c", REMOUNT, str(init), str(mask)],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    print(out)
    assert Path("/proc/sys/kernel/core_pattern").read_text() == before
    assert out["core_pattern"] == "EROFS", out
    done = {k: v for k, v in out.items() if v in ("ok", "written") and k != "unshare user+mnt"}
    status = Path(f"/proc/{init}/status").read_text()
    print(
        {
            k: v
            for k, v in (ln.split(":\t", 1) for ln in status.splitlines())
            if k in ("Seccomp", "NoNewPrivs")
        }
    )
    assert done == {}, out
    mounts = Path(f"/proc/{init}/mountinfo").read_text().splitlines()
    ro = {ln.split()[4]: "ro" in ln.split()[5].split(",") for ln in mounts}
    assert ro.get("/proc/sys") is True, ro


# -- 8. the harness's readline against a hostile core's chunking ------------------------------


class _Chunks:
    """A fake core's socket: ``recv`` hands out the chunks given, then b"" (EOF)."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = list(chunks)

    def recv(self, n: int) -> bytes:
        return self.chunks.pop(0)[:n] if self.chunks else b""

    def close(self) -> None:
        pass


def _lines_read(chunks: list[bytes]) -> list[bytes]:
    a, b = socket.socketpair()
    b.close()
    conn = harness.Conn("", fd=a.detach())
    conn.sock.close()
    conn.sock = _Chunks(chunks)  # type: ignore[assignment]
    out = []
    while True:
        line = conn.readline()
        if not line:
            return out
        out.append(line)


@pytest.mark.attack(
    "wire.malformed",
    ref="session 15 diff: harness Conn.readline keeps an offset into its last chunk; wirejson.loads type check",
)
def test_readline_against_hostile_chunking() -> None:
    """**Held.** A fake core's stream cut every way (a byte a chunk, lines ending at a
    chunk's end, many lines in one chunk, empty lines, a last line without its newline,
    empty chunks are EOF) is read back line for line as the bytes split at each LF; 64 KiB
    of 2-byte lines in one chunk read in well under a second; 8 MiB with no LF in 64 KiB
    chunks is one line. ``wirejson.loads`` of a non-string is json's TypeError."""
    stream = b'{"a":1}\n\n{"b":"x\\ny"}\nzz\n' + b"q\n" * 50 + b"tail-without-lf"
    want = stream.split(b"\n")
    want = [x + b"\n" for x in want[:-1]] + [want[-1]]
    cuts = {
        "whole": [stream],
        "bytes": [stream[i : i + 1] for i in range(len(stream))],
        "at-lf": [c + b"\n" for c in stream.split(b"\n")[:-1]] + [b"tail-without-lf"],
        "after-lf": [stream[:8], stream[8:9], stream[9:30], stream[30:]],
        "threes": [stream[i : i + 3] for i in range(0, len(stream), 3)],
    }
    for key, chunks in cuts.items():
        assert b"".join(chunks) == stream
        assert _lines_read(chunks) == want, key
    many = b"x\n" * 32768
    t0 = time.monotonic()
    lines = _lines_read([many])
    took = time.monotonic() - t0
    assert len(lines) == 32768 and took < 1.0, (len(lines), took)
    big = [b"y" * 65536] * 128
    assert _lines_read(big) == [b"y" * (65536 * 128)]
    for bad in (None, 1, memoryview(b"{}"), ["{}"]):
        with pytest.raises(TypeError):
            wirejson.loads(bad)  # type: ignore[arg-type]
    assert wirejson.loads(bytearray(b'{"a": 1}')) == {"a": 1}
    print(f"32768 lines from one chunk in {took * 1000:.1f} ms")


# -- 9. pacing across a listener closed and served again (a respawn) --------------------------


async def _answered(path: Path, n: int, within: float) -> int:
    """``n`` CONNECTs on ``path`` at once; how many got their answer within ``within`` s."""
    loop = asyncio.get_running_loop()

    async def one() -> bool:
        s = socket.socket(socket.AF_UNIX)
        s.setblocking(False)
        try:
            await loop.sock_connect(s, str(path))
            await loop.sock_sendall(s, b"CONNECT d15.invalid:443 HTTP/1.1\r\n\r\n")
            return (await asyncio.wait_for(loop.sock_recv(s, 4096), within)).startswith(
                b"HTTP/1.1 403"
            )
        except (OSError, TimeoutError):
            return False
        finally:
            s.close()

    return sum(await asyncio.gather(*(one() for _ in range(n))))


@pytest.mark.attack(
    "core.cheap-verb-flood",
    ref="session 15 diff: EgressProxy._accept_wait / call_later(_read_again) against close + listen of the same name",
)
def test_pacing_survives_a_listener_closed_and_served_again(tmp_path: Path) -> None:
    """**Held.** In-process, 2 connections a second (a burst of 4): 8 at once get 4
    answers at first (the rest wait, the listener resting with a ``_read_again`` pending);
    the agent's listener is closed and served again (a stop and start) while that call is
    pending: the new listener answers at once (a fresh bucket), the stale ``_read_again``
    that fires later on it accepts nothing past the bucket (at most 4 of 6 answered in 0.4 s
    after it), and once the backlog is drained the listener still reads (not left
    resting)."""

    async def main() -> list[int]:
        proxy = EgressProxy(lambda a: (), lambda d: None, connections_per_second=2.0)
        first, second = tmp_path / "a.sock", tmp_path / "b.sock"
        proxy.listen("a", first, 0o600)
        got = [await _answered(first, 8, 0.3)]
        proxy.close("a", first)  # the 4 left waiting go with it
        proxy.listen("a", second, 0o600)
        got.append(await _answered(second, 3, 0.3))  # a fresh burst of 4: 1 left
        await asyncio.sleep(0.6)  # the stale _read_again has fired by now (~0.5 s)
        got.append(await _answered(second, 6, 0.4))  # 1 token left + ~1.2 in the period
        # The ones given up on stay in the backlog, each accepted in turn at the rate (a
        # cage's abandoned connections delay its own next ones, no one else's): ~2 s.
        await asyncio.sleep(3.0)
        got.append(await _answered(second, 1, 1.0))
        proxy.close("a", second)
        return got

    got = asyncio.run(main())
    print(f"answered: {got}")
    assert got[0] == 4 and got[1] == 3, got
    assert 1 <= got[2] <= 4, got
    assert got[3] == 1, got


# -- 10. revalidate's shutdown of an SSL socket while its thread writes -----------------------

SECRET = b"authorization: Bearer sk-live-D15-plaintext"


@pytest.mark.attack(
    "secrets.placeholder-elsewhere",
    ref="session 15 diff: revalidate calls SSLSocket.shutdown from the loop thread: it drops _sslobj before the descriptor is shut down",
)
def test_revalidate_never_lets_a_terminated_connection_write_cleartext(tmp_path: Path) -> None:
    """**Broke, fixed.** ``revalidate`` ends a terminated connection with ``sock.shutdown()`` on
    its ``ssl.SSLSocket``s, from the event loop while the connection's own thread relays
    through them. ``SSLSocket.shutdown`` sets ``self._sslobj = None`` and only then shuts
    the descriptor down; an ``SSLSocket.send``/``sendall`` that runs between the two sees
    no SSL object and writes with the plain socket's ``send``: the request bytes (the
    secret the proxy injected among them) go to the server's address in cleartext. Seen
    without help: 1 run in 4,000 (``sys.setswitchinterval(1e-6)``, a writer thread and a
    shutdown from another). Here the loop thread is held 50 ms at that point (a tracer
    sleeping on ``super().shutdown(how)``: what a preemption there does) while the
    connection's thread writes: the server's raw stream must hold no cleartext. Fix: shut
    the descriptor down without the SSL object's help,
    ``socket.socket.shutdown(sock, socket.SHUT_RDWR)`` (the base class's method: the
    SSL object stays, a write after it fails inside TLS), or ``os`` level on ``fileno()``."""
    with cert_dir("hvd15r", "d15 race CA", "d15 race server", ["race.d15.test"]) as (d, _):
        sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        sctx.load_cert_chain(str(d / "server.pem"))
        cctx = ssl.create_default_context(cafile=str(d / "ca.pem"))
        srv = socket.create_server(("127.0.0.1", 0))
        raw: list[bytes] = []

        def server() -> None:
            c, _ = srv.accept()
            t = sctx.wrap_socket(c, server_side=True)
            under = socket.socket(fileno=os.dup(t.fileno()))  # the bytes as they come
            with contextlib.suppress(OSError):
                while d := under.recv(65536):
                    raw.append(d)
            under.close()
            t.close()

        st = threading.Thread(target=server, daemon=True)
        st.start()
        up = cctx.wrap_socket(
            socket.create_connection(srv.getsockname()), server_hostname="race.d15.test"
        )
        cage_end, proxy_end = socket.socketpair()
        rules = {"a": parse_rules(["race.d15.test:443", "192.0.2.0/24:443"])}
        proxy = EgressProxy(lambda a: rules[a], lambda d: None)
        decision = Decision("a", "race.d15.test", 443, True, "CONNECT (TLS terminated)")
        address = ipaddress.ip_address("192.0.2.7")
        opened = _Open("race.d15.test", 443, address, (proxy_end, up), "terminated", None)
        proxy._track("a", decision, opened)
        writes = {"tls": 0, "error": ""}

        def writer() -> None:  # the Terminated thread, forwarding a request
            try:
                while True:
                    up.sendall(SECRET)
                    writes["tls"] += 1
                    time.sleep(0.001)
            except (OSError, ValueError) as e:
                writes["error"] = type(e).__name__

        def held(frame: Any, event: str, arg: Any) -> Any:
            if event == "call":
                return held if frame.f_code is ssl.SSLSocket.shutdown.__code__ else None
            if event == "line" and frame.f_locals["self"]._sslobj is None:
                time.sleep(0.05)  # preempted between `_sslobj = None` and the shutdown
            return held

        wt = threading.Thread(target=writer, daemon=True)
        wt.start()
        time.sleep(0.05)
        rules["a"] = ()  # the operator takes the rules back
        sys.settrace(held)
        try:
            ended = proxy.revalidate("a")
        finally:
            sys.settrace(None)
        wt.join(5)
        st.join(5)
        for s in (up, cage_end, proxy_end, srv):
            s.close()
    stream = b"".join(raw)
    print(
        f"revalidate ended {ended}; {writes['tls']} writes, then {writes['error']}; "
        f"cleartext in the server's stream: {stream.count(SECRET)} times"
    )
    assert ended == 1 and writes["tls"] > 0, (ended, writes)
    assert SECRET not in stream, f"cleartext reached the server: {stream.count(SECRET)} writes"


# -- 11. the egress log's row for a tunnel refused after its open (fronting) ------------------

FRONT = r"""
import ssl
s = socket.create_connection(("127.0.0.1", 3128), timeout=20)
s.sendall(f"CONNECT {P['target']} HTTP/1.1\r\n\r\n".encode())
head = b""
while b"\r\n\r\n" not in head:
    head += s.recv(4096)
ctx = ssl.create_default_context()
try:  # TLS to the L7 name inside the plain name's tunnel: refused after the 200
    ctx.wrap_socket(s, server_hostname=P["sni"]).close()
    tls = "handshake done"
except (OSError, ssl.SSLError) as e:
    tls = type(e).__name__
result(head=head.split(b"\r\n")[0].decode(), tls=tls)
"""


@pytest.mark.attack(
    "egress.tls-sni-host",
    ref="session 15 diff: record_egress's close of an open row writes bytes and closed_at only (fronted_l7_name refuses after the open)",
)
def test_a_fronted_tunnel_is_logged_as_refused(d15: HiveProcess) -> None:
    """**Broke, fixed (before this change too; the batched write kept it).** A byte tunnel is
    logged as allowed when the proxy answers its 200; the fronting check (a ClientHello
    whose SNI names another name with L7 rules) refuses it after that, and emits the same
    decision again, now refused and closed. ``record_egress`` takes any decision whose key
    is open for its close and writes only the byte counts and ``closed_at``: the egress
    log keeps the row as allowed, ``CONNECT``, and the fronting attempt, which the check
    exists to catch, is nowhere in it (only a throttled log line). Fix: the close's write
    also sets ``allowed`` and ``reason`` when they changed (``close_in`` with them)."""
    rules = (f"{ADDR}:443", f"{NAME}:443", f"GET {L7_NAME}:443/only/*")
    _allow(d15, *rules)
    try:
        out = cage_run(d15, AGENT, FRONT, target=f"{NAME}:443", sni=L7_NAME)
        rows = assert_ok(d15.host_call("egress_log", name=AGENT, limit=5))["entries"]
    finally:
        _remove(d15, *rules)
    row = next(r for r in rows if r["host"] == NAME and r["port"] == 443)
    print(f"in the cage: {out}; its row: {row}")
    assert out["head"].startswith("HTTP/1.1 200"), out
    assert out["tls"] != "handshake done", out
    assert row["closed_at"] is not None, row
    assert not row["allowed"] and "L7" in row["reason"], row


# -- 12. kill -9 of the core mid-batch: which decisions are lost --------------------------------

KILLED = r"""
import threading
stop = time.monotonic() + P["seconds"]
answered, errors = [], []
def loop(k):
    i = 0
    while time.monotonic() < stop:
        n = f"{k}x{i}"
        i += 1
        try:
            s = socket.create_connection(("127.0.0.1", 3128), timeout=5)
            s.sendall(f"CONNECT d15-k9-{P['tag']}-{n}.invalid:443 HTTP/1.1\r\n\r\n".encode())
            if s.recv(4096).startswith(b"HTTP/1.1 403"):
                answered.append(n)
            s.close()
        except OSError as e:
            errors.append(errname(e))
            time.sleep(0.05)
ts = [threading.Thread(target=loop, args=(k,)) for k in range(4)]
for t in ts: t.start()
for t in ts: t.join()
result(answered=answered, errors=sorted(set(errors)))
"""


@pytest.mark.attack(
    "core.groupcommit",
    ref="session 15 diff: egress decisions wait up to EGRESS_LOG_BATCH (50 ms) for their write; kill -9 of the core",
)
def test_a_kill9_of_the_core_loses_at_most_a_batch_of_decisions(d15: HiveProcess) -> None:
    """**Held.** The agent makes refused CONNECTs from 4 threads (paced: ~100 a second)
    and the core is killed (SIGKILL) a second and a half in; ``hive up`` starts it again.
    Of the refusals the cage was answered, those missing from the egress log are what
    the last batch held (the reply goes before the decision is even queued): a few, never
    more than two batches' worth at the paced rate."""
    tag = f"{os.getpid() % 10000}{int(time.time()) % 100000}"
    holder: dict[str, Any] = {}

    def run() -> None:
        try:
            holder.update(cage_run(d15, AGENT, KILLED, tag=tag, seconds=3.0, timeout=90))
        except BaseException as e:
            holder["error"] = repr(e)[:2000]

    old = d15.core_pid()
    assert old is not None
    t = threading.Thread(target=run)
    t.start()
    time.sleep(1.5)
    os.kill(old, signal.SIGKILL)
    t.join(90)
    wait_until(
        lambda: (p := d15.core_pid()) not in (None, old) and p, 30, "hive up to restart hive-core"
    )
    d15.wait_running([AGENT], timeout=60)
    rows = assert_ok(d15.host_call("egress_log", name=AGENT, limit=2000))["entries"]
    logged = {r["host"].split("-")[-1].split(".")[0] for r in rows if f"d15-k9-{tag}-" in r["host"]}
    assert "error" not in holder, holder["error"]
    answered = set(holder["answered"])
    lost = answered - logged
    print(
        f"{len(answered)} refusals answered, {len(logged)} logged, {len(lost)} answered but not logged; cage errors {holder['errors']}"
    )
    assert len(answered) > 100, holder
    assert len(lost) <= 20, sorted(lost)


# -- 1b. the same window on a plain-HTTP request: an upstream slow to accept -----------------

SLOW = r"""
import os, socket, sys, threading, time
ADDR, PORT, GO, SEEN = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((ADDR, PORT))
s.listen(0)  # its queue is filled by the test: a SYN now is dropped, and retried 1 s later
while not os.path.exists(GO):
    time.sleep(0.01)
def serve(c):
    c.settimeout(5)
    try:
        while d := c.recv(65536):
            with open(SEEN, "ab") as f:
                f.write(d)
    except OSError:
        pass
    c.close()
while True:
    threading.Thread(target=serve, args=(s.accept()[0],), daemon=True).start()
"""
SLOW_PORT = 8080

UPLOAD_PLAIN = r"""
import os
home = "/home/agent/"
s = socket.create_connection(("127.0.0.1", 3128), timeout=20)
s.sendall(f"POST http://{P['host']}:{P['port']}/d15-up HTTP/1.1\r\nContent-Length: 100000\r\n\r\nd15-BEFORE".encode())
open(home + P["ready"], "w").close()
deadline = time.monotonic() + 30
while not os.path.exists(home + P["go"]) and time.monotonic() < deadline:
    time.sleep(0.02)
sent, why = 0, "all sent"
try:
    for i in range(10):
        s.sendall(f"d15-AFTER-{i}".encode())
        sent += 1
        time.sleep(0.05)
except OSError as e:
    why = errname(e)
for f in (P["ready"], P["go"]):
    try:
        os.unlink(home + f)
    except OSError:
        pass
result(sent=sent, why=why)
"""


@pytest.mark.attack(
    "egress.l7-bypass",
    ref="session 15 diff: _serve connects before it tracks; revalidate during the connect sees nothing",
)
def test_a_plain_request_whose_connect_outlasts_the_removal_is_ended(d15: HiveProcess) -> None:
    """**Broke, fixed** (the first case's window, without L7 rules: the upstream's connect). The
    agent's own server (its exfiltration endpoint, say) accepts slowly: its SYN queue is
    full, so the proxy's connect waits for a retry a second later. The agent sends a
    plain-HTTP POST with a 100 kB body, the proxy checks it and connects; meanwhile the
    operator takes the rule back; the connect completes after ``revalidate`` ran, and the
    head and the body after it reach the server. Fix: as the first case (``_track``
    before any byte goes upstream, checking the rules once more after it)."""
    d = CERTS["dir"]
    go, sink = d / "slow-go", d / "slow-seen"
    NET.serve(
        ADDR, SLOW_PORT, [sys.executable, "-c", SLOW, ADDR, str(SLOW_PORT), str(go), str(sink)]
    )
    fill = []
    for _ in range(3):  # the listen queue full (the test's own connections)
        f = socket.socket()
        f.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            f.connect((ADDR, SLOW_PORT))
        fill.append(f)
    time.sleep(0.2)
    rules = (f"{ADDR}:{SLOW_PORT}", f"{NAME}:{SLOW_PORT}")
    _allow(d15, *rules)

    def between() -> None:
        time.sleep(0.3)  # the proxy is in its connect by now
        _remove(d15, rules[1])
        go.write_text("go")  # the server accepts: the proxy's retried SYN gets through
        time.sleep(1.5)

    try:
        out = _held_script(d15, UPLOAD_PLAIN, between, host=NAME, port=SLOW_PORT)
    finally:
        _remove(d15, *rules)
        for f in fill:
            f.close()
    got = sink.read_bytes() if sink.exists() else b""
    rows = assert_ok(d15.host_call("egress_log", name=AGENT, limit=3))["entries"]
    print(f"in the cage: {out}; the server got {len(got)} B: {got[:120]!r}; log {rows[:2]}")
    assert "error" not in out, out["error"]
    assert b"d15-up" not in got and b"d15-AFTER" not in got, got[:300]


# -- 13. the rest of the cage's /proc: anything init's root may still open for writing ---------


@pytest.mark.attack(
    "init.capabilities",
    ref="session 15 diff: PROC_READ_ONLY is runc's read-only set; runc also masks files this change does not",
)
def test_init_opens_nothing_else_of_proc_for_writing(d15: HiveProcess) -> None:
    """**Held.** Every file of the cage's ``/proc`` outside the pid directories and the
    read-only binds (``/proc/scsi``, ``/proc/tty``, ``/proc/driver``, ``/proc/acpi``,
    ``/proc/sysvipc``, ``/proc/kmsg``, ``/proc/kcore``, ``/proc/timer_list``, ...) with a
    write bit, opened for writing (nothing written) with exactly init's capabilities as
    host uid 0: none opens but ``/proc/pressure/{cpu,io,memory}``, which are 0666 (any
    user may register a PSI trigger on them; the agent as much as init)."""
    init = _init_pid(d15, AGENT)
    eff = int(proc_status(init)["CapEff"], 16)
    root = Path(f"/proc/{init}/root/proc")
    skip = {p.removeprefix("/proc/") for p in PROC_READ_ONLY} | {"self", "thread-self"}
    paths: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        if rel == ".":
            dirnames[:] = [n for n in dirnames if not n.isdigit() and n not in skip]
        for n in filenames:
            p = os.path.join(dirpath, n)
            with contextlib.suppress(OSError):
                st = os.lstat(p)
                if st.st_mode & 0o222 and not n.isdigit() and (rel != "." or n not in skip):
                    paths.append(p)
    got = _as_init(eff, paths)
    opened = sorted(p.removeprefix(str(root)) for p in paths if got[p] == "opened")
    print(
        f"{len(paths)} writable-looking files of the cage's /proc; opened by init's root: {opened}"
    )
    assert len(paths) > 5, paths
    # /proc/pressure/* are 0666 by the kernel's design (a PSI trigger per open file, any
    # user's, the agent's too: not root's reach; runc leaves them as well).
    assert [p for p in opened if not p.startswith("/pressure/")] == [], opened
