"""Egress from inside real cages: the proxy behind agents/<name>/egress.sock,
the harness's bridge on the cage's loopback, the allowlist, DNS and the log.

Test servers live in a network namespace made here (tests/testnet.py) on
198.18.41.0/24; the proxy learns their names from hive.toml ``[egress] hosts``.
198.18.0.0/15 is not the public internet, so a name rule alone never reaches it:
each agent that reaches a test server by name also has an IP rule for its address
(as an operator must for a private network).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from hive_fixture import HiveProcess, probe_result, running_hive, wait_until
from hyperhive.client import HiveUnavailable
from testnet import TestNet

SUBNET = 41
NET = TestNet(SUBNET, prefix="hveg")
ALLOWED, OTHER, THIRD, PORT_SERVER = NET.address(2), NET.address(3), NET.address(4), NET.address(5)
STREAM = NET.address(6)  # a raw TCP server on 8080 (inside egal's CIDR rule) for the tunnel's byte tests
HOSTS = {
    "allowed.test": ALLOWED, "other.test": OTHER, "third.test": THIRD,
    "sneaky.test": "127.0.0.1", "gateway.test": NET.host_address,
}
AGENTS: dict[str, dict[str, Any]] = {
    # egress rules: a name (and its address), a CIDR (with the host's own .1 inside it), names
    # that lead back home
    "egal": {"runtime": "command", "command": ["true"],
             "egress": ["allowed.test:80", f"{ALLOWED}:80", f"198.18.{SUBNET}.0/24:8080", "sneaky.test:80",
                        "gateway.test:80"]},
    "egbob": {"runtime": "command", "command": ["true"]},  # default: nothing
}


# One line says what the connection is for. "sum": read to the end of stream (the
# client's half-close), answer with the count and sha256, then 8 MiB of a known pattern,
# then close. "flood": send until the peer goes away, then close. A plain-HTTP GET (the
# proxy's forwarded head) for a body that goes wrong: "/cut" announces 4 MiB, sends 1 MiB
# and closes; "/long" announces 1000 bytes and sends 3 MiB; "/stall" announces 4 MiB,
# sends 1 MiB and then waits, reading, until the proxy ends its side ("/stalled" then
# says how that went: the bytes it read after the head, and whether the end came).
STREAM_SERVER = r"""
import hashlib, socket, sys, threading
MIB = bytes(range(256)) * 4096
stalled = {}
def http(c, f, line):
    while f.readline() not in (b"\r\n", b""):
        pass
    path = line.split()[1].decode()
    if path == "/stalled":
        body = repr(stalled).encode()
        c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        return
    length = 1000 if path == "/long" else 4 << 20
    c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % length)
    c.sendall(MIB * (3 if path == "/long" else 1))
    if path == "/stall":
        stalled["state"] = "stalling"
        n = 0
        c.settimeout(60)
        try:
            while chunk := c.recv(65536):
                n += len(chunk)
            stalled["state"] = "ended"
        except OSError as e:
            stalled["state"] = "error " + type(e).__name__
        stalled["read"] = n
def serve(c):
    with c:
        f = c.makefile("rb")
        mode = f.readline().strip()
        if mode.startswith(b"GET "):
            http(c, f, mode)
        elif mode == b"sum":
            h, n = hashlib.sha256(), 0
            while chunk := f.read1(1 << 16):
                h.update(chunk); n += len(chunk)
            c.sendall(b"%d %s\n" % (n, h.hexdigest().encode()))
            c.sendall(bytes(range(256)) * (8 << 12))
        elif mode == b"flood":
            try:
                while True:
                    c.sendall(b"y" * (1 << 16))
            except OSError:
                pass
s = socket.create_server((sys.argv[1], int(sys.argv[2])))
while True:
    conn, _ = s.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
"""


@pytest.fixture(scope="module")
def net() -> Iterator[TestNet]:
    with NET as n:
        for address in (ALLOWED, OTHER, THIRD):
            n.serve(address, 80)
        n.serve(PORT_SERVER, 8080)
        n.serve(ALLOWED, 8080)
        n.serve(STREAM, 8080, [sys.executable, "-c", STREAM_SERVER, STREAM, "8080"])
        yield n


@pytest.fixture(scope="module")
def hive(net: TestNet) -> Iterator[HiveProcess]:
    yield from running_hive(HiveProcess(AGENTS, sections={"egress": {"hosts": HOSTS}}))


def curl(hive: HiveProcess, name: str, *args: str) -> tuple[int, str, str]:
    """curl inside NAME's cage, with the cage's own environment (the proxy variables)."""
    proc = hive.exec(name, "curl", "-sS", "-m", "10", "-o", "-", "-w", "\n%{http_code}", *args, timeout=60)
    body, _, code = proc.stdout.rpartition("\n")
    return int(code or 0), body.rstrip("\n"), proc.stderr


def core_fds(hive: HiveProcess) -> int:
    pid = hive.core_pid()
    assert pid is not None
    return len(os.listdir(f"/proc/{pid}/fd"))


def log_entries(hive: HiveProcess, name: str) -> list[dict[str, Any]]:
    reply = hive.host_call("egress_log", name=name, limit=200)
    assert reply["ok"], reply
    return reply["entries"]


def test_the_runtime_sees_only_the_proxy(hive: HiveProcess) -> None:
    res = probe_result(hive.probe("egal", """
        result(env={k: os.environ.get(k) for k in ("HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY", "https_proxy")},
               resolv=os.path.exists("/etc/resolv.conf"),
               egress_sock=os.path.exists("/run/hive/egress.sock"))
    """))
    assert set(res["env"].values()) == {"http://127.0.0.1:3128"}
    assert res["resolv"] is False and res["egress_sock"] is True


def test_an_allowed_host_answers_through_the_proxy(hive: HiveProcess) -> None:
    code, body, err = curl(hive, "egal", "http://allowed.test/")
    assert (code, body) == (200, f"hello from {ALLOWED}:80"), err
    # and as a tunnel (CONNECT), which is how HTTPS goes
    code, body, err = curl(hive, "egal", "--proxytunnel", "http://allowed.test/")
    assert (code, body) == (200, f"hello from {ALLOWED}:80"), err
    entries = log_entries(hive, "egal")
    tunnel = next(e for e in entries if e["reason"] == "CONNECT" and e["host"] == "allowed.test")
    assert tunnel["allowed"] and tunnel["address"] == ALLOWED and tunnel["port"] == 80
    wait_until(lambda: next(e for e in log_entries(hive, "egal") if e["id"] == tunnel["id"])["closed_at"],
               10, "the tunnel's close to be logged")
    closed = next(e for e in log_entries(hive, "egal") if e["id"] == tunnel["id"])
    assert closed["bytes_down"] > len("hello from") and closed["bytes_up"] > 0


TUNNEL = """
def tunnel(line):
    s = socket.create_connection(("127.0.0.1", 3128), timeout=30)
    s.sendall(("CONNECT %s HTTP/1.1\\r\\nHost: %s\\r\\n\\r\\n" % (P["target"], P["target"])).encode())
    head = b""
    while not head.endswith(b"\\r\\n\\r\\n"):
        head += s.recv(1)
    assert head.startswith(b"HTTP/1.1 200"), head
    s.sendall(line)
    return s
"""


def test_a_tunnel_carries_bulk_both_ways_and_a_half_close(hive: HiveProcess) -> None:
    """16 MiB up, the cage's half-close through to the server, whose answer (its sum of
    what came, then 8 MiB) still comes back, then the end: the relay's buffers grow
    and every byte arrives, in order, once."""
    res = probe_result(hive.probe("egal", TUNNEL + """
import hashlib
s = tunnel(b"sum\\n")
data = hashlib.sha256(b"cage").digest() * (1 << 19)  # 16 MiB
s.sendall(data)
s.shutdown(socket.SHUT_WR)
got = b""
while chunk := s.recv(1 << 20):
    got += chunk
line, _, rest = got.partition(b"\\n")
result(line=line.decode(), want="%d %s" % (len(data), hashlib.sha256(data).hexdigest()),
       rest_ok=rest == bytes(range(256)) * (8 << 12), rest_len=len(rest))
""", target=f"{STREAM}:8080"))
    assert res["line"] == res["want"] and res["rest_ok"], res
    entry = next(e for e in log_entries(hive, "egal") if e["host"] == STREAM and e["reason"] == "CONNECT")
    wait_until(lambda: next(e for e in log_entries(hive, "egal") if e["id"] == entry["id"])["closed_at"],
               10, "the tunnel's close to be logged")
    closed = next(e for e in log_entries(hive, "egal") if e["id"] == entry["id"])
    assert closed["bytes_up"] == len(b"sum\n") + (16 << 20)
    assert closed["bytes_down"] == len(res["want"]) + 1 + (8 << 20)


def test_a_cage_that_never_reads_holds_its_tunnel_only_until_it_closes(hive: HiveProcess) -> None:
    """The server floods, the cage reads nothing and then closes: the proxy's relay,
    stuck on a full window meanwhile, ends at once and logs the close."""
    before = {e["id"] for e in log_entries(hive, "egal")}
    probe_result(hive.probe("egal", TUNNEL + """
import time
s = tunnel(b"flood\\n")
time.sleep(1)  # every buffer between the server and this socket fills
s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\\1\\0\\0\\0\\0\\0\\0\\0")
s.close()
result(ok=True)
""", target=f"{STREAM}:8080"))
    entry = next(e for e in log_entries(hive, "egal") if e["id"] not in before and e["host"] == STREAM)
    wait_until(lambda: next(e for e in log_entries(hive, "egal") if e["id"] == entry["id"])["closed_at"],
               10, "the flooded tunnel's close to be logged")
    closed = next(e for e in log_entries(hive, "egal") if e["id"] == entry["id"])
    assert closed["bytes_up"] == len(b"flood\n") and closed["bytes_down"] > 0


PLAIN_GET = """
def get(path, timeout=30):
    s = socket.create_connection(("127.0.0.1", 3128), timeout=timeout)
    s.sendall(("GET http://%s%s HTTP/1.1\\r\\nHost: %s\\r\\n\\r\\n" % (P["target"], path, P["target"])).encode())
    return s
def read_all(s):
    got = b""
    while chunk := s.recv(1 << 20):
        got += chunk
    return got
HEAD_LEN = len(b"HTTP/1.1 200 OK\\r\\nContent-Length: 4194304\\r\\n\\r\\n")
MIB = bytes(range(256)) * 4096
"""


def _closed_entry(hive: HiveProcess, before: set[int]) -> dict[str, Any]:
    entry = next(e for e in log_entries(hive, "egal") if e["id"] not in before and e["host"] == STREAM)
    wait_until(lambda: next(e for e in log_entries(hive, "egal") if e["id"] == entry["id"])["closed_at"],
               15, "the connection's close to be logged")
    return next(e for e in log_entries(hive, "egal") if e["id"] == entry["id"])


def test_an_answer_cut_short_upstream_ends_at_the_cage_with_what_came(hive: HiveProcess) -> None:
    """The server announces 4 MiB, sends 1 MiB and closes: the cage gets that 1 MiB and
    then the end (not a hang), and the log counts exactly what came."""
    before = {e["id"] for e in log_entries(hive, "egal")}
    res = probe_result(hive.probe("egal", PLAIN_GET + """
got = read_all(get("/cut"))
result(n=len(got), body_ok=got[HEAD_LEN:] == MIB, head=got[:HEAD_LEN].decode())
""", target=f"{STREAM}:8080"))
    assert res["head"].startswith("HTTP/1.1 200") and res["body_ok"], res
    closed = _closed_entry(hive, before)
    assert closed["bytes_down"] == res["n"] == len("HTTP/1.1 200 OK\r\nContent-Length: 4194304\r\n\r\n") + (1 << 20)


def test_a_body_longer_than_its_content_length_is_relayed_as_bytes_and_counted(hive: HiveProcess) -> None:
    """A plain-HTTP answer is not parsed past the request: 3 MiB behind a Content-Length
    of 1000 reach the cage byte for byte, and the log counts every one."""
    before = {e["id"] for e in log_entries(hive, "egal")}
    res = probe_result(hive.probe("egal", PLAIN_GET + """
got = read_all(get("/long"))
head, _, body = got.partition(b"\\r\\n\\r\\n")
result(n=len(got), head=head.decode(), body_ok=body == MIB * 3)
""", target=f"{STREAM}:8080"))
    assert "Content-Length: 1000" in res["head"] and res["body_ok"], res
    assert _closed_entry(hive, before)["bytes_down"] == res["n"]


def test_an_upstream_that_stalls_mid_body_is_ended_when_the_cage_gives_up(hive: HiveProcess) -> None:
    """The server sends 1 MiB of 4 and stalls, the connection open: the cage has that
    1 MiB (nothing held back in the relay's pipe), gives up and closes. The proxy passes
    the end on upstream (the server reads its end of stream), the server closes, and the
    connection ends: logged with exactly what came, no descriptor of it left."""
    fds = core_fds(hive)
    before = {e["id"] for e in log_entries(hive, "egal")}
    res = probe_result(hive.probe("egal", PLAIN_GET + """
s = get("/stall")
got = b""
while len(got) < HEAD_LEN + len(MIB):
    chunk = s.recv(1 << 20)
    assert chunk, "ended early"
    got += chunk
s.settimeout(1.0)
try:
    more = s.recv(1 << 20)
    stalled = False
except TimeoutError:
    stalled = True
s.close()
result(n=len(got), stalled=stalled, body_ok=got[HEAD_LEN:] == MIB)
""", target=f"{STREAM}:8080"))
    assert res["stalled"] and res["body_ok"], res
    closed = _closed_entry(hive, before)
    assert closed["bytes_down"] == res["n"]
    code, body, _ = curl(hive, "egal", f"http://{STREAM}:8080/stalled")
    assert code == 200 and "'state': 'ended'" in body and "'read': 0" in body, body
    wait_until(lambda: core_fds(hive) <= fds, 10, "the core's descriptors back to where they were")


def test_a_cidr_rule_allows_addresses_in_it_on_its_port_only(hive: HiveProcess) -> None:
    code, body, _ = curl(hive, "egal", f"http://{PORT_SERVER}:8080/")
    assert (code, body) == (200, f"hello from {PORT_SERVER}:8080")
    code, body, _ = curl(hive, "egal", f"http://{PORT_SERVER}:80/")
    assert code == 403 and "not in this agent's egress allowlist" in body


@pytest.mark.parametrize("url", ["http://other.test/", f"http://{OTHER}/", "http://third.test:80/"])
def test_any_other_host_gets_403_and_the_refusal_is_logged(hive: HiveProcess, url: str) -> None:
    before = {e["id"] for e in log_entries(hive, "egal")}
    code, body, _ = curl(hive, "egal", url)
    assert code == 403, body
    assert body.startswith("hive egress: ") and "not in this agent's egress allowlist" in body
    new = [e for e in log_entries(hive, "egal") if e["id"] not in before]
    assert len(new) == 1 and new[0]["allowed"] is False and new[0]["bytes_down"] == 0
    assert new[0]["host"] in url


def test_an_agent_without_rules_reaches_nothing(hive: HiveProcess) -> None:
    code, body, _ = curl(hive, "egbob", "http://allowed.test/")
    assert code == 403 and "egbob" not in body  # egbob has no rules; the answer names the destination only
    assert log_entries(hive, "egbob")[0]["host"] == "allowed.test"
    assert all(e["agent"] == "egal" for e in log_entries(hive, "egal"))


def test_dns_lookups_fail_inside_the_cage(hive: HiveProcess) -> None:
    res = probe_result(hive.probe("egal", """
        out = {}
        for name in ("allowed.test", "localhost.localdomain", "example.com"):
            try:
                out[name] = socket.getaddrinfo(name, 80)[0][4][0]
            except socket.gaierror as e:
                out[name] = "gaierror"
        # a resolver reached by hand: no route to anywhere but loopback
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            s.sendto(b"x", ("198.18.41.2", 53)); out["udp53"] = "sent"
        except OSError as e:
            out["udp53"] = e.errno
        result(out=out)
    """))
    import errno
    assert res["out"] == {"allowed.test": "gaierror", "localhost.localdomain": "gaierror",
                          "example.com": "gaierror", "udp53": errno.ENETUNREACH}


@pytest.mark.parametrize("address", [ALLOWED, OTHER, NET.host_address, "1.1.1.1"])
def test_direct_tcp_without_the_proxy_fails(hive: HiveProcess, address: str) -> None:
    res = probe_result(hive.probe("egal", """
        s = socket.socket()
        s.settimeout(5)
        try:
            s.connect((P["address"], 80)); result(connected=True)
        except OSError as e:
            result(connected=False, errno=e.errno)
    """, address=address))
    import errno
    assert res == {"connected": False, "errno": errno.ENETUNREACH}


CONNECT = """
s = socket.create_connection(("127.0.0.1", 3128), timeout=10)
s.sendall(("CONNECT %s HTTP/1.1\\r\\nHost: %s\\r\\n\\r\\n" % (P["target"], P["target"])).encode())
data = b""
while b"\\r\\n\\r\\n" not in data:
    chunk = s.recv(4096)
    if not chunk:
        break
    data += chunk
head, _, body = data.partition(b"\\r\\n\\r\\n")
rest = s.recv(4096) if head.split(b" ")[1:2] != [b"200"] else b""
result(status=int(head.split(b" ")[1]), body=(body + rest).decode(errors="replace"))
"""


def gateway_targets(hive: HiveProcess) -> list[tuple[str, str]]:
    return [
        (f"127.0.0.1:{hive.port}", "not in this agent's egress allowlist"),  # the gateway
        (f"localhost:{hive.port}", "not in this agent's egress allowlist"),
        ("sneaky.test:80", "resolves to 127.0.0.1, loopback"),  # allowlisted, but leads home
        ("gateway.test:80", f"resolves to {NET.host_address}, one of this host's own addresses"),
        (f"{NET.host_address}:8080", "one of this host's own addresses"),  # inside the allowed CIDR
        ("[::1]:80", "not in this agent's egress allowlist"),
        ("0.0.0.0:80", "not in this agent's egress allowlist"),
    ]


def test_connect_to_the_gateway_the_core_or_loopback_is_refused(hive: HiveProcess) -> None:
    for target, why in gateway_targets(hive):
        res = probe_result(hive.probe("egal", CONNECT, target=target))
        assert res["status"] == 403 and why in res["body"], (target, res)
    # Even an operator rule for loopback can't open the way back into the host.
    for rule in (f"127.0.0.1:{hive.port}", "[::1]:80", "169.254.169.254:80", "0.0.0.0:80"):
        assert hive.host_call("egress_allow", name="egbob", rule=rule)["ok"]
        _host, _, _port = rule.rpartition(":")
        res = probe_result(hive.probe("egbob", CONNECT, target=rule))
        assert res["status"] == 403 and "never reachable through the proxy" in res["body"], (rule, res)
        assert hive.host_call("egress_remove", name="egbob", rule=rule)["ok"]


@pytest.mark.parametrize("request_head, status, why", [
    ("GET /relative HTTP/1.1\r\nHost: allowed.test\r\n\r\n", 400, "absolute http:// URI"),
    ("GET https://allowed.test/ HTTP/1.1\r\n\r\n", 400, "absolute http:// URI"),
    ("CONNECT allowed.test HTTP/1.1\r\n\r\n", 400, "expected HOST:PORT"),
    ("CONNECT allowed.test:99999 HTTP/1.1\r\n\r\n", 400, "port must be 1-65535"),
    ("CONNECT bad_name!:80 HTTP/1.1\r\n\r\n", 400, "not a valid hostname"),
    ("garbage\r\n\r\n", 400, "malformed request line"),
    # One reading only (red team round 22): what a server might split or read otherwise.
    ("GET http://allowed.test/ HTTP/1.1\r\nX: a\nHost: other.test\r\n\r\n", 400, "a bare CR or LF"),
    ("GET http://allowed.test/ HTTP/1.1\r\nX: a\rHost: other.test\r\n\r\n", 400, "a bare CR or LF"),
    ("GET http://allowed.test/ HTTP/1.1\nHost: other.test\r\n\r\n", 400, "a bare CR or LF"),
    ("GET http://allowed.test/ HTTP/1.2\r\n\r\n", 400, "unsupported protocol"),
    ("G(T http://allowed.test/ HTTP/1.1\r\n\r\n", 400, "the method is not a token"),
    ("GET http://allowed.test/a\tb HTTP/1.1\r\n\r\n", 400, "a control character in the request target"),
    ("GET http://allowed.test/a\x7f HTTP/1.1\r\n\r\n", 400, "a control character in the request target"),
    ("GET http://allowed.test/ HTTP/1.1\r\nX: a\x00b\r\n\r\n", 400, "a control character in a header value"),
    ("GET http://allowed.test/ HTTP/1.1\r\nX: " + "a" * 20000 + "\r\n\r\n", 431, "request head over"),
])
def test_malformed_proxy_requests_get_one_line_errors(hive: HiveProcess, request_head: str, status: int,
                                                      why: str) -> None:
    res = probe_result(hive.probe("egal", """
        s = socket.create_connection(("127.0.0.1", 3128), timeout=15)
        s.sendall(P["head"].encode())
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        head, _, body = data.partition(b"\\r\\n\\r\\n")
        result(status=int(head.split(b" ")[1]), body=body.decode())
    """, head=request_head))
    assert res["status"] == status and why in res["body"] and res["body"].count("\n") == 1, res
    code, _body, _ = curl(hive, "egal", "http://allowed.test/")  # and the proxy goes on serving
    assert code == 200


def agent_call_in_cage(hive: HiveProcess, name: str, *args: str) -> dict[str, Any]:
    proc = hive.exec(name, "hive", "agent", *args, "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_an_egress_approval_opens_exactly_that_host(hive: HiveProcess) -> None:
    # other.test's address is a test range: the operator opens it by address (a name rule never does)
    assert hive.host_call("egress_allow", name="egal", rule=f"{OTHER}:80")["ok"]
    assert curl(hive, "egal", "http://other.test/")[0] == 403
    req = agent_call_in_cage(hive, "egal", "request-approval", "egress", "fetch from other.test",
                             "--payload", json.dumps({"host": "other.test", "port": 80}))
    assert curl(hive, "egal", "http://other.test/")[0] == 403  # not before the operator says so
    approved = hive.host_call("approve", id=req["id"])
    assert approved["ok"] and approved["approval"]["status"] == "approved", approved
    code, body, _ = curl(hive, "egal", "http://other.test/")
    assert (code, body) == (200, f"hello from {OTHER}:80")
    # only that host, only that port
    assert curl(hive, "egal", "http://third.test/")[0] == 403
    assert curl(hive, "egal", "http://other.test:81/")[0] == 403
    assert curl(hive, "egbob", "http://other.test/")[0] == 403
    rules = hive.host_call("egress_rules", name="egal")["rules"]["egal"]
    assert {"rule": "other.test:80", "source": "approval"} in [
        {k: r[k] for k in ("rule", "source")} for r in rules]
    # the operator takes it back: refused again at once
    assert hive.host_call("egress_remove", name="egal", rule="other.test:80")["ok"]
    assert curl(hive, "egal", "http://other.test/")[0] == 403
    assert hive.host_call("egress_remove", name="egal", rule=f"{OTHER}:80")["ok"]


@pytest.mark.parametrize("payload, why", [
    ({"host": "other.test"}, "port"),
    ({"host": "other.test", "port": 0}, "port"),
    ({"host": "no spaces.test", "port": 80}, "not a valid hostname"),
    ({"host": "other.test", "port": 80, "also": "x"}, "also"),
    ("other.test:80", "egress payload"),
])
def test_bad_egress_payloads_are_refused_at_request_time(hive: HiveProcess, payload: Any, why: str) -> None:
    with hive.unchanged():
        proc = hive.exec("egal", "hive", "agent", "request-approval", "egress", "x", "--payload", json.dumps(payload))
        assert proc.returncode != 0 and why in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr


def test_operator_rules_persist_across_a_core_restart(hive: HiveProcess) -> None:
    assert hive.host_call("egress_allow", name="egbob", rule="third.test:80")["ok"]
    assert hive.host_call("egress_allow", name="egbob", rule=f"{THIRD}:80")["ok"]
    assert curl(hive, "egbob", "http://third.test/")[0] == 200
    pid = hive.core_pid()
    assert pid is not None
    subprocess.run(["kill", "-9", str(pid)], check=True)

    def core_back() -> bool:
        try:
            return hive.core_pid() not in (None, pid) and hive.host_call("egress_rules")["ok"]
        except HiveUnavailable:
            return False

    wait_until(core_back, 30, "hive-core to come back")
    hive.wait_running()
    rules = hive.host_call("egress_rules", name="egbob")["rules"]["egbob"]
    assert sorted(r["rule"] for r in rules) == sorted(["third.test:80", f"{THIRD}:80"])
    wait_until(lambda: curl(hive, "egbob", "http://third.test/")[0] == 200, 20, "egress after the restart")
    assert hive.host_call("egress_remove", name="egbob", rule="third.test:80")["ok"]
    assert hive.host_call("egress_remove", name="egbob", rule=f"{THIRD}:80")["ok"]


@pytest.mark.parametrize("rule, why", [
    ("third.test", "expected HOST:PORT"),
    ("third.test:http", "port must be 1-65535"),
    ("::1:80", "needs brackets"),
    ("198.18.0.1/15:80", "host bits set"),
])
def test_operator_rules_are_checked(hive: HiveProcess, rule: str, why: str) -> None:
    with hive.unchanged():
        reply = hive.host_call("egress_allow", name="egbob", rule=rule)
        assert not reply["ok"] and why in reply["error"], reply
    assert not hive.host_call("egress_remove", name="egbob", rule="nothing.test:80")["ok"]


@pytest.mark.parametrize("toml, why", [
    ('[agents.a]\ncommand = ["true"]\negress = ["pypi.org"]\n', "expected HOST:PORT"),
    ('[agents.a]\ncommand = ["true"]\negress = ["*.:443"]\n', "not a valid hostname"),
    ('[egress]\nhosts = {"x.test" = "not-an-ip"}\n', "hosts"),
    ('[egress]\nhosts = {"bad name" = "198.18.0.1"}\n', "not a valid hostname"),
    ('[egress]\nproxy = "x"\n', "proxy"),
])
def test_bad_egress_configuration_is_one_line(tmp_path: Any, toml: str, why: str) -> None:
    from hyperhive.config import ConfigError, load_config

    path = tmp_path / "hive.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert why in str(e.value) and "\n" not in str(e.value)


def test_the_hive_egress_command(hive: HiveProcess) -> None:
    from hive_fixture import HIVE

    def hive_cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(HIVE), "--run-dir", str(hive.run_dir), "egress", *args],
                              capture_output=True, text=True, timeout=30, env={**os.environ, "COLUMNS": "200"})

    out = hive_cli("allow", "egbob", "Third.Test:80")
    assert out.returncode == 0 and out.stdout.strip() == "egbob: third.test:80 allowed", out
    assert curl(hive, "egbob", "http://third.test/")[0] == 403  # its address is not the internet
    assert hive_cli("allow", "egbob", f"{THIRD}:80").returncode == 0
    assert curl(hive, "egbob", "http://third.test/")[0] == 200
    rules = json.loads(hive_cli("ls", "egbob", "--json").stdout)["rules"]["egbob"]
    assert sorted((r["rule"], r["source"]) for r in rules) == sorted([("third.test:80", "operator"),
                                                                      (f"{THIRD}:80", "operator")])
    table = hive_cli("log", "egbob", "--limit", "5").stdout
    assert "third.test:80" in table and "allowed" in table
    entries = json.loads(hive_cli("log", "egbob", "--json").stdout)["entries"]
    assert entries[0]["host"] == "third.test" and entries[0]["allowed"] is True
    assert hive_cli("rm", "egbob", "third.test:80").returncode == 0
    assert hive_cli("rm", "egbob", f"{THIRD}:80").returncode == 0
    again = hive_cli("rm", "egbob", "third.test:80")
    assert again.returncode == 1 and again.stderr.strip() == "hive: error: egbob has no egress rule 'third.test:80'"
    assert curl(hive, "egbob", "http://third.test/")[0] == 403
    bad = hive_cli("allow", "egbob", "third.test")
    assert bad.returncode == 1 and "expected HOST:PORT" in bad.stderr and bad.stderr.count("\n") == 1
