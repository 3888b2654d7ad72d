"""The parsing of L7 rules, egress approval payloads and hive.toml bindings. The secret
store's verbs, what a cage sees, TLS termination and the attacks on them are in
tests/redteam/test_secrets_egress.py (one hive with real cages)."""

from __future__ import annotations

import os
from typing import Any

import pytest

from hyperhive.config import ConfigError, load_config
from hyperhive.wire.egress import EgressPayload, PathError, RuleError, normal_path, parse_rule


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
