"""An answer that comes before the request's end, through terminated TLS
(``egress_tls.Terminated._answer_arrived`` / ``_answer_early`` / ``_linger``).

One agent (ea34) with L7 rules ``POST early.test:443/*`` and ``GET early.test:443/*``
(terminated). ``early.test`` is a TLS server that, on ``POST /limited``, reads the head,
answers ``413`` at once and then reads nothing more for 40 s (as a server with a body
limit that does not drain: Python's http.server, a Go or Node handler that returns
early); ``POST /auth`` answers ``401`` the same way; ``POST /drain`` answers 413 and reads
(and drops) the rest; ``POST /partial`` sends half an answer and waits.
``[egress] stall_seconds`` = STALL (8).

Before: the proxy read the answer only after the request's end, so its write of a 4 MiB
body blocked on a server that took nothing, until the stall ended the connection: the
cage saw a reset after 8 s (60 s by default), never the 413. Now the answer is relayed
within about a second of the write blocking, and the cage's unsent rest is read and
dropped until it stops (or 30 s), so the answer is not lost to a reset.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from hive_fixture import probe_result
from testnet import TestNet

from .egress_kit import TLS_SERVER_HEAD, TLS_SERVER_LOOP, egress_hive
from .test_red_recheck33 import OPEN_TLS
from .test_secrets_egress import cert_dir

AGENT = "ea34"
STALL = 8
BODY = 4 << 20
NET = TestNet(135, prefix="hvea34")
SERVER = NET.address(2)

ANSWER = r"""
import time
def answer(t, head):
    if head.startswith(b"POST /limited"):
        t.sendall(b"HTTP/1.1 413 Content Too Large\r\nContent-Length: 9\r\nConnection: close\r\n\r\ntoo large")
        time.sleep(40)  # reads nothing more
    elif head.startswith(b"POST /auth"):
        t.sendall(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 7\r\n\r\nno auth")
        time.sleep(40)
    elif head.startswith(b"POST /drain"):
        t.sendall(b"HTTP/1.1 413 Content Too Large\r\nContent-Length: 7\r\n\r\ndrained")
        t.settimeout(20)
        while t.recv(65536):
            pass
    elif head.startswith(b"POST /partial"):  # half an answer, then nothing
        t.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nhalf")
        time.sleep(40)
    elif head.startswith(b"GET /ok"):
        t.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        time.sleep(1)
"""

# In the cage, for each P["cases"] item (path, mode): a POST of BODY bytes to early.test.
# mode "all": send the whole body, then read (Python's http.client, requests); "duplex":
# read while sending and stop sending once an answer comes (curl). What came back, how it
# ended and when.
CLIENT = OPEN_TLS + r"""
import select, threading
def post(path, mode, n):
    t0 = time.monotonic()
    t = open_tls("early.test")
    t.settimeout(60)
    method, _, path = path.rpartition(" ")
    t.sendall(b"%s %s HTTP/1.1\r\nHost: early.test\r\nContent-Length: %d\r\n\r\n" % ((method or "POST").encode(), path.encode(), n))
    data, err, sent = b"", None, 0
    block = b"x" * 65536
    try:
        if mode == "all":
            while sent < n:
                sent += t.send(block[:n - sent])
        else:
            t.setblocking(False)
            while sent < n and not data:
                r, w, _ = select.select([t], [t], [], 1)
                if r or t.pending():
                    try:
                        data += t.recv(65536)
                    except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                        pass
                elif w:
                    try:
                        sent += t.send(block[:n - sent])
                    except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                        pass
                if time.monotonic() - t0 > 60:
                    break
            t.setblocking(True)
            t.settimeout(60)
        while b"\r\n\r\n" not in data or len(data.partition(b"\r\n\r\n")[2]) < 7:
            c = t.recv(65536)
            if not c:
                break
            data += c
    except (OSError, ssl.SSLError) as e:
        err = type(e).__name__ + ": " + str(e)[:80]
    return dict(status=data[9:12].decode(errors="replace"), answer=data.decode(errors="replace")[-40:],
                closes=b"connection: close" in data.lower(), err=err, sent=sent, took=round(time.monotonic() - t0, 1))
out = {}
def run(k, path, mode):
    out[k] = post(path, mode, P["n"])
threads = [threading.Thread(target=run, args=(k, *v)) for k, v in P["cases"].items()]
for th in threads:
    th.start()
for th in threads:
    th.join()
result(**out)
"""

# In the cage: a plain-HTTP POST of P["n"] bytes through the proxy to a host no rule
# allows, the whole body sent first; what came back.
PLAIN = r"""
import socket, time
t0 = time.monotonic()
s = socket.create_connection(("127.0.0.1", 3128), timeout=60)
s.sendall(b"POST http://nothere.test/up HTTP/1.1\r\nHost: nothere.test\r\nContent-Length: %d\r\n\r\n" % P["n"])
data, err = b"", None
try:
    s.sendall(b"p" * P["n"])
    while c := s.recv(65536):
        data += c
except OSError as e:
    err = type(e).__name__
result(status=data[9:12].decode(errors="replace"), answer=data.decode(errors="replace")[-120:], err=err,
       took=round(time.monotonic() - t0, 1))
"""

CASES = {
    "limited-all": ("/limited", "all"),
    "limited-duplex": ("/limited", "duplex"),
    "auth-all": ("/auth", "all"),
    "drain-all": ("/drain", "all"),
    "partial-duplex": ("/partial", "duplex"),
    "refused-all": ("PUT /limited", "all"),
}


@pytest.fixture(scope="module")
def answers() -> Iterator[dict[str, Any]]:
    with cert_dir("hvea34", "ea34 upstream CA", "ea34 servers", ["early.test"]) as (certs, _), NET as net:
        net.serve(SERVER, 443, [sys.executable, "-c", TLS_SERVER_HEAD + ANSWER + TLS_SERVER_LOOP, SERVER, "443",
                                str(certs / "server.pem")])
        for hv in egress_hive(AGENT, ["POST early.test:443/*", "GET early.test:443/*", f"{SERVER}:443"],
                              {"hosts": {"early.test": SERVER}, "upstream_ca": str(certs / "ca.pem"),
                               "stall_seconds": STALL}):
            out = probe_result(hv.probe(AGENT, CLIENT, timeout=150, n=BODY, cases=CASES))
            out["plain-refused"] = probe_result(hv.probe(AGENT, PLAIN, timeout=90, n=BODY))
            # (a kept-alive one, drain's, is pooled for IDLE_REUSE, then swept)
            out["held"] = wait_for_zero(lambda: established(net, SERVER, 443), 8.0)
            print(json.dumps(out, indent=1))
            yield out


@pytest.mark.timeout(200)
@pytest.mark.attack("egress.relay", ref="session 33's note: an early 413 reached the cage as a reset after stall_seconds")
@pytest.mark.parametrize("case", ["limited-all", "limited-duplex", "auth-all", "drain-all"])
def test_an_answer_before_the_request_end_reaches_the_cage(answers: dict[str, Any], case: str) -> None:
    """A 4 MiB POST to a server that answers on the head and takes no more (or drains
    the rest): the cage gets the server's own answer, whole, well before the stall would
    have ended the connection, whether it sends its whole body first (http.client) or
    stops once the answer comes (curl). The answer says the connection closes."""
    out = answers[case]
    want = {"limited": ("413", "too large"), "auth": ("401", "no auth"), "drain": ("413", "drained")}
    status, body = want[case.split("-")[0]]
    assert out["status"] == status and out["answer"].endswith(body), out
    assert out["took"] < STALL - 1, out
    if case != "drain-all":  # (one that drains took it all and need not close)
        assert out["closes"], out


def established(net: TestNet, address: str, port: int) -> int:
    """Established TCP connections the server at ``address`` holds (its side)."""
    out = subprocess.run(["ip", "netns", "exec", net.ns, "ss", "-Htn", "state", "established",
                          f"( src {address} and sport = :{port} )"], capture_output=True, text=True).stdout
    return len([line for line in out.splitlines() if line.strip()])


def wait_for_zero(count: Callable[[], int], seconds: float) -> int:
    """``count()`` once it is 0, or what it is after ``seconds``."""
    end = time.monotonic() + seconds
    while (n := count()) and time.monotonic() < end:
        time.sleep(0.25)
    return n


@pytest.mark.timeout(200)
@pytest.mark.attack("egress.relay", ref="relay.reset_on_close: a close behind unsent bytes left the connection established")
def test_no_upstream_connection_outlives_an_early_answer(answers: dict[str, Any]) -> None:
    """The servers that answered early sleep 40 s reading nothing, with the proxy's
    unsent request body queued to them. Safe: once the cage has its answers, the proxy
    holds no connection to early.test (each cut short is reset, not left to the kernel
    behind bytes the server never takes)."""
    assert answers["held"] == 0, answers


@pytest.mark.timeout(200)
@pytest.mark.attack("egress.l7-bypass", ref="Terminated._refused: the refusal of a request whose body is still coming")
def test_a_refusal_of_an_upload_reaches_the_cage(answers: dict[str, Any]) -> None:
    """A 4 MiB PUT that no rule allows (the rules allow POST and GET): the proxy refuses
    it on its head (403, saying why) and never sends it on. Safe, and usable: the cage
    that sends its whole body first still reads the refusal (the body is read and
    dropped), not a reset."""
    out = answers["refused-all"]
    assert out["status"] == "403" and out["closes"], out
    assert out["err"] is None and out["took"] < STALL, out


@pytest.mark.timeout(200)
@pytest.mark.attack("egress.l7-bypass", ref="egress._linger: a plain request refused while its body is still coming")
def test_a_refusal_of_a_plain_upload_reaches_the_cage(answers: dict[str, Any]) -> None:
    """The same through the plain-HTTP proxy: a 4 MiB POST to a host no rule allows,
    sent whole before reading. Safe, and usable: the cage reads the 403 that says why
    (the proxy reads and drops the body), not a reset."""
    out = answers["plain-refused"]
    assert out["status"] == "403" and "nothere.test" in out["answer"] and out["err"] is None, out
    assert out["took"] < STALL, out


@pytest.mark.timeout(200)
@pytest.mark.attack("budget.exhaustion", ref="Terminated._client_left after an early answer")
def test_a_half_answer_before_the_request_end_still_ends(answers: dict[str, Any]) -> None:
    """A server that sends half an answer on the head, then neither reads nor sends. An
    answer not whole is not taken as the server's last word (an upload's progress stream
    looks the same until the server reads again: re-check of session 34), so the request's
    write goes on and ends at the stall. Safe: the connection ends (the cage sees the end)
    within the stall and a little, not when the server likes."""
    out = answers["partial-duplex"]
    assert out["status"] in ("", "200"), out
    assert out["took"] < STALL + 6, out
