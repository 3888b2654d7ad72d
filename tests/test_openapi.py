"""Schemathesis against the core's own OpenAPI document (``/api/openapi.json``),
through the real gateway of a real hive, logged in: with a valid session cookie,
the session's CSRF token (``X-CSRF-Token``) and a same-origin ``Origin`` on every
request, no response is a 5xx and every response conforms to the schema (status
code declared, content type, body schema, headers).

Path parameters naming an agent are drawn half the time from the hive's real
agents (and the actions from the real ones), so the positive paths are taken too,
not only "no such agent". Keeps to about a minute on the small machine.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from schemathesis.specs.openapi import checks as oa_checks

from web_fixture import Login, Web, web_hive

AGENTS: dict[str, dict[str, Any]] = {
    # Echoes each message it gets; peer of nobody.
    "oa-echo": {"runtime": "command", "command": ["python3", "-c", "import sys; print(sys.stdin.read())"]},
    "oa-idle": {"runtime": "command", "command": ["true"]},
}
SPAWNED = "oa-spawned"
SECRET = "oakey"
ACTIONS = ["start", "stop", "restart", "pause", "resume", "interrupt", "destroy"]
SEEN: dict[str, list[int]] = {}  # "METHOD /path" -> status codes, for test_api_covered
CHECKS = [
    schemathesis.checks.not_a_server_error,
    oa_checks.status_code_conformance,
    oa_checks.content_type_conformance,
    oa_checks.response_headers_conformance,
    oa_checks.response_schema_conformance,
]


@pytest.fixture(scope="module")
def web() -> Iterator[Web]:
    with web_hive(AGENTS, extra_names=(SPAWNED,)) as w:
        yield w


@pytest.fixture(scope="module")
def login(web: Web) -> Login:
    login = web.login()
    # Something to answer, approve (1-3) and deny (4-6), so those paths can succeed too.
    for i in range(6):
        web.hive.agent_call("oa-echo", "ask", to="operator", question=f"question {i}?")
        web.hive.agent_call("oa-echo", "request_approval", kind="custom", description=f"decision {i}",
                            payload={"n": i})
    # Messages to show whole (/api/messages/{mid}: 1-3).
    for i in range(3):
        assert web.hive.host_call("send", to="oa-idle", body=f"message {i}")["ok"]
    # A secret to bind and unbind (its value is never part of any of these calls).
    assert web.hive.host_call("secret_set", name=SECRET, value="oa-value-never-shown")["ok"]
    # Egress rules to remove (egress/remove succeeds once per agent and rule).
    for name in AGENTS:
        for n in (1, 2, 3):
            assert web.hive.host_call("egress_allow", name=name, rule=egress_rule(n))["ok"]
    return login


def egress_rule(n: int) -> str:
    return f"oa{n}.test:443"


@pytest.fixture(scope="module")
def api_schema(web: Web, login: Login) -> schemathesis.BaseSchema:
    schema = schemathesis.openapi.from_url(web.url("/api/openapi.json"), headers=login.cookies, timeout=30)
    assert schema.raw_schema["paths"], "the OpenAPI document lists no paths"
    return schema


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@schema.given(agent=st.sampled_from([None, *AGENTS]), action=st.sampled_from([None, *ACTIONS]),
              n=st.sampled_from([None, 1, 2, 3]), spawn=st.booleans())
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_api_conforms(case: schemathesis.Case, web: Web, login: Login, agent: str | None, action: str | None,
                      n: int | None, spawn: bool) -> None:
    params = case.path_parameters or {}
    if agent is not None and "name" in params:
        params["name"] = agent
    if action is not None and "action" in params:
        params["action"] = action
    if n is not None and "qid" in params:
        params["qid"] = n
    if n is not None and "mid" in params:
        params["mid"] = n
    if n is not None and "aid" in params:
        params["aid"] = n + 3 if case.path.startswith("/deny/") else n
    if n is not None and case.path.startswith("/api/agents/{name}/egress/") and isinstance(case.body, dict):
        case.body = {"rule": egress_rule(n)}
    if n is not None and case.path.startswith("/api/secrets/") and isinstance(case.body, dict):
        params["name"] = SECRET
        case.body = ({"agents": agent or "oa-echo", "to": egress_rule(n), "header": "x-api-key: {}"}
                     if case.path.endswith("/bind") else {})
    if spawn and case.path == "/api/spawn" and isinstance(case.body, dict):
        case.body = {"name": SPAWNED, "spec": '{"runtime": "command", "command": ["true"]}'}
    response = case.call_and_validate(
        base_url=web.base,
        headers={**login.cookies, "X-CSRF-Token": login.csrf, "Origin": web.origin, "Accept": "application/json"},
        checks=CHECKS,
        timeout=60,
    )
    SEEN.setdefault(f"{case.method} {case.path}", []).append(response.status_code)


def test_api_covered(api_schema: schemathesis.BaseSchema) -> None:
    """The run above reached every operation, logged in (never refused for want of a
    session, a CSRF token or the origin), and took the success path of each."""
    ops = {f"{method.upper()} {path}" for path, item in api_schema.raw_schema["paths"].items() for method in item}
    print({op: sorted(set(codes)) for op, codes in SEEN.items()})
    assert set(SEEN) == ops, f"operations not exercised: {ops - set(SEEN)}"
    for op, codes in SEEN.items():
        assert not {401, 403} & set(codes), f"{op} was refused as not logged in / cross-site: {codes}"
        assert 200 in codes, f"{op} never succeeded: {sorted(set(codes))}"
