"""The secret store and its bindings on host.sock and the CLI (a core without cages),
and the parsing of L7 rules and binding templates. What a cage sees, TLS termination
and the attacks on them are in tests/redteam/test_secrets_egress.py."""

from __future__ import annotations

import json
import os
import stat
import subprocess
from typing import Any

import pytest

from helpers import CoreProcess, assert_ok
from hive_fixture import VENV_BIN
from hyperhive.client import Client
from hyperhive.config import ConfigError, load_config
from hyperhive.wire.egress import EgressPayload, PathError, RuleError, normal_path, parse_rule

VALUE = "sk-ant-test-0123456789abcdef"


def hive_cli(core: CoreProcess, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(VENV_BIN / "hive"), "--run-dir", str(core.run_dir), *args], input=stdin,
                          capture_output=True, text=True, timeout=30, check=False)


def agent_call(core: CoreProcess, agent: str, cmd: str, **fields: Any) -> dict[str, Any]:
    with Client(core.agent_sock(agent), timeout=10) as c:
        return c.call(cmd, **fields)


def test_secret_set_ls_rm_never_show_the_value(module_core: CoreProcess) -> None:
    core = module_core
    proc = hive_cli(core, "secret", "set", "anthropic", stdin=VALUE + "\n")  # never argv
    assert proc.returncode == 0 and proc.stdout.strip() == "secret anthropic set", proc
    assert assert_ok(core.host_call("secret_set", name="anthropic", value=VALUE))["new"] is False
    # kept 0600 in a 0700 directory beside the database, one trailing newline dropped
    path = core.state_dir / "secrets" / "anthropic"
    assert path.read_text() == VALUE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE((core.state_dir / "ca" / "ca.key").stat().st_mode) == 0o600

    bind = assert_ok(core.host_call(
        "secret_bind", name="anthropic", agents=["alice", "bob"], to="API.Anthropic.com.:443",
        header="x-api-key: {}", env="ANTHROPIC_API_KEY"))
    assert bind["to"] == "api.anthropic.com:443"
    listing = assert_ok(core.host_call("secret_ls"))
    [row] = [s for s in listing["secrets"] if s["name"] == "anthropic"]
    assert row["set"] is True and row["set_at"].endswith("Z")
    assert [(b["agent"], b["to"], b["header"], b["env"]) for b in row["bindings"]] == [
        ("alice", "api.anthropic.com:443", "x-api-key: {}", "ANTHROPIC_API_KEY"),
        ("bob", "api.anthropic.com:443", "x-api-key: {}", "ANTHROPIC_API_KEY"),
    ]
    for out in (listing, proc.stdout, bind, core.log_tail(400)):
        assert VALUE not in json.dumps(out)

    assert assert_ok(core.host_call("secret_unbind", name="anthropic", agents=["bob"]))["removed"] == 1
    assert_ok(core.host_call("secret_rm", name="anthropic"))
    assert not path.exists()
    gone = core.host_call("secret_rm", name="anthropic")
    assert gone == {"version": 1, "ok": False, "error": "no secret named 'anthropic'"}


@pytest.mark.parametrize(("fields", "error"), [
    ({"name": "x", "value": "a\nb"}, "printable ASCII"),
    ({"name": "x", "value": ""}, "empty"),
    ({"name": "x", "value": "k" * 20000}, "over 16384 bytes"),
    ({"name": "../x", "value": "v"}, "field 'name'"),
])
def test_a_bad_secret_is_refused_in_one_line_without_its_value(
    module_core: CoreProcess, fields: dict[str, Any], error: str,
) -> None:
    reply = module_core.host_call("secret_set", **fields)
    assert reply["ok"] is False and error in reply["error"], reply
    assert fields["value"][:8] not in reply["error"] or not fields["value"]
    assert not (module_core.state_dir / "secrets" / "x").exists()


@pytest.mark.parametrize(("fields", "error"), [
    ({"to": "10.0.0.1:443"}, "NAME:PORT"),
    ({"to": "api.anthropic.com"}, "HOST:PORT"),
    ({"header": "x-api-key: nothing"}, "exactly one {}"),
    ({"header": "Host: {}"}, "cannot go in the 'host' header"),
    ({"env": "PATH"}, "reserved"),
    ({"agents": ["zed"]}, "no agent named 'zed'"),
])
def test_a_bad_binding_is_refused_and_changes_nothing(
    module_core: CoreProcess, fields: dict[str, Any], error: str,
) -> None:
    req = {"name": "tok", "agents": ["alice"], "to": "api.anthropic.com:443", "header": "x-api-key: {}", **fields}
    reply = module_core.host_call("secret_bind", **req)
    assert reply["ok"] is False and error in reply["error"], reply
    assert all(s["name"] != "tok" for s in assert_ok(module_core.host_call("secret_ls"))["secrets"])


def test_secret_verbs_do_not_exist_on_agent_sock(module_core: CoreProcess) -> None:
    for cmd, fields in [("secret_set", {"name": "x", "value": "v"}), ("secret_ls", {}),
                        ("secret_bind", {"name": "x"}), ("secret_rm", {"name": "x"})]:
        reply = agent_call(module_core, "alice", cmd, **fields)
        assert reply == {"version": 1, "ok": False, "error": f"unknown command {cmd!r}"}


def test_l7_rules_parse_canonically_and_refuse_ambiguity() -> None:
    r = parse_rule("GET api.github.com.:443/repos/acme/*")
    assert r.text == "GET api.github.com:443/repos/acme/*" and r.l7
    assert r.allows("GET", normal_path("/repos/acme/widget/issues?state=open"))
    assert not r.allows("GET", normal_path("/repos/acmeevil"))
    assert not r.allows("POST", normal_path("/repos/acme/x"))
    assert normal_path("/repos/%61cme/x") == "/repos/acme/x"  # an escaped letter is that letter
    for bad in ["/repos/acme/%2e%2e/x", "/repos/acme/../x", "/repos//acme", "/repos/acme;x/y",
                "/repos/acme/%2fx", "http://evil/x", "/a/./b", "/a%5cb", "/a%zz"]:
        with pytest.raises(PathError):
            normal_path(bad)
    for bad in ["get a.test:443/x", "GET 10.0.0.1:443/x", "GET *.a.test:443/x", "GET a.test:443/x/../y",
                "GET a.test:443/x;y", "GET a.test:443/%2e"]:
        with pytest.raises(RuleError):
            parse_rule(bad)
    payload = EgressPayload.model_validate({"host": "api.github.com", "port": 443, "method": "GET",
                                            "path": "/repos/acme/*"})
    assert payload.rule() == "GET api.github.com:443/repos/acme/*"


def test_hive_toml_bindings_are_checked(tmp_path: Any) -> None:
    path = tmp_path / "hive.toml"
    path.write_text('[agents.alice]\nruntime = "claude"\n\n[[secret_binding]]\nsecret = "anthropic"\n'
                    'agents = ["alice"]\nto = "api.anthropic.com:443"\nheader = "x-api-key: {}"\n'
                    'env = "ANTHROPIC_API_KEY"\n')
    assert load_config(path).secret_binding[0].to == "api.anthropic.com:443"
    path.write_text(path.read_text().replace('["alice"]', '["bob"]'))
    with pytest.raises(ConfigError, match="no agent named 'bob'"):
        load_config(path)
    assert os.path.exists(path)
