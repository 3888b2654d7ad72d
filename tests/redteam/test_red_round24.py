"""Red team round 24: what the 23 rounds before did not try.

The round went at what a name is worth across an agent's life: a spawn approval's grants
against what approving (and the next start) really gives, an agent's name taken out of
hive.toml or destroyed and then spawned again, a hostile agent's helper under a name
other agents already know; and at `hive mcp`, the MCP server a runtime uses in the cage.

Broke (each case failed on the code it was written against; all fixed in session 20, the
cases check the fixes):

- hive.toml adopts a spawned agent (``test_a_spawned_child_under_a_declared_name_...``):
  the operator destroys a declared agent (documented: "created again, empty, the next time
  hive-core starts"); a hostile agent's spawn of a helper under that name (grants: "egress
  none; peers none") is approved; at the next start ``sync_config`` updates the row's spec
  only, so hive.toml's agent is the hostile agent's child, on the helper's home (its planted
  files), with hive.toml's secret binding (the placeholder in its env, the key injected by
  the proxy), egress rule and peer, and a two-way channel to the hostile parent.
- an agent taken out of hive.toml (``test_an_agent_taken_out_of_hive_toml_...``): the core
  deletes its row at the next start (``sync_config`` -> ``_delete``) without hive-priv's
  ``destroy`` and without ``_forget``: its home image, its uid and the operator's secret
  binding stay, and the next agent of that name (here a hostile agent's approved helper)
  gets the old home (a Claude Code login written there), the same uid and the binding.
- the same removal with the cages running and the core restarted (kill -9; ``hive up``
  starts it again): the new core drops the row and the cage runs on, out of every verb's
  reach (``stop``/``destroy``: no agent named ...), until ``hive down``; a later spawn of
  the name is handed that running cage (hive-priv's ``start`` of a running cage is ok): the
  helper the operator approved is the old agent's cage with its processes still in it.
- grants that don't say what approving gives: a spawn under a name another agent declares
  as a peer reaches that agent (its messages and questions, answered as the expected
  helper, passed to the hostile parent) while the grants line says "peers none"; a spawn's
  ``model`` and ``turn_timeout`` (24-hour turns) are in no grants line and cut from every
  listing behind a long ``command``; a spawn's egress rules are shown as spelled
  (``010.0.0.1:443``, read as a private 10.0.0.1) while the rule stored is canonical
  (``8.0.0.1:443``, inet_aton's octal).

Held: `hive mcp` in the cage serves exactly its nine tools, each speaking as the agent
(extra ``from``/``sender``/``as``/``cmd``/``id`` arguments dropped by the SDK's argument
model, the message from rtalice), refuses recv/ack and every operator or harness verb as
unknown tools, and passes the socket's refusals through (non-peer, the operator's question,
a spawn with ``memory_mib``); a destroyed helper's name spawned again starts from nothing
(fresh home, another uid, no binding, no reminder delivered, its question cancelled).

The fixes (session 20): an agent's spawn of a name hive.toml declares is refused
(``Hive.check_not_declared``), and a start whose hive.toml declares a name an agent's
spawned child holds is refused in one line, nothing changed (``DeclaredNameTaken``); at each start the
core destroys every cage, home and block of ids hive-priv holds for a name that is no agent
(``Hive.destroy_leftovers``), and a spawn waits for it; deleting an agent's row deletes the
operator's secret bindings of it in the same transaction; the grants line shows the egress
rules as approving stores them, the model and a turn timeout other than 300 s, and the
agents that already name the spawn as a peer.

See docs/security.md's rounds table (red team round 24).
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from typing import Any

import pytest

from helpers import assert_ok
from hive_fixture import HiveProcess, running_hive, wait_until
from hyperhive.wire.common import SpawnPayload

from .conftest import World, cage_run, changes

# -- a spawned agent under a name hive.toml declares ------------------------------------------

ADOPT_HOSTILE = "rt24m"  # the hostile agent: no peers, no egress, no secret
ADOPT_DECLARED = "rt24d"  # declared in hive.toml: a secret, an egress rule, a peer
ADOPT_PEER = "rt24s"  # declared: only rt24d may message it
ADOPT_AGENTS: dict[str, dict[str, Any]] = {
    ADOPT_HOSTILE: {"runtime": "command", "command": ["true"]},
    ADOPT_DECLARED: {
        "runtime": "command",
        "command": ["true"],
        "peers": [ADOPT_PEER],
        "egress": ["deploy.example:443"],
    },
    ADOPT_PEER: {"runtime": "command", "command": ["true"]},
}
ADOPT_BINDING = f"""
[[secret_binding]]
secret = "rt24key"
agents = ["{ADOPT_DECLARED}"]
to = "deploy.example:443"
header = "authorization: Bearer {{}}"
env = "RT24_KEY"
"""


@pytest.fixture(scope="module")
def adopt_hive() -> Iterator[HiveProcess]:
    h = HiveProcess(ADOPT_AGENTS)
    h.config_path.write_text(h.config_path.read_text() + ADOPT_BINDING)
    h.write_config = lambda agents: None  # type: ignore[method-assign]  # keep the binding on restarts
    for hv in running_hive(h):
        assert_ok(hv.host_call("secret_set", name="rt24key", value="s3cr3t-rt24-value"))
        yield hv


def _row(h: HiveProcess, name: str) -> dict[str, Any]:
    return h.agent_status()[name]


@pytest.mark.attack(
    "approval.hidden-grant",
    ref="red team round 24: a spawn under a destroyed declared name, adopted by hive.toml at the next start",
)
def test_a_spawned_child_under_a_declared_name_is_not_adopted_by_hive_toml(
    adopt_hive: HiveProcess,
) -> None:
    """**Broke, fixed (session 20).** The operator destroys a declared agent (docs/protocol.md:
    it "is created again, empty, the next time hive-core starts"); the hostile agent asked
    to spawn a helper under that name, whose grants line said it got nothing (no egress, no
    peers), and the operator approved. At the next start hive.toml adopted it (``sync_config``
    updated the spec only): the hostile agent's child, on the helper's home (its planted
    file), with hive.toml's secret, egress rule and peer, which it could message. Now an
    agent's spawn of a name hive.toml declares is refused (and at approval, for one asked
    before), and the next start makes the declared agent again, empty: no parent. (The
    operator's own spawn of it remakes it at once: red team round 9's case does.)"""
    h = adopt_hive
    assert _row(h, ADOPT_DECLARED).get("parent") is None
    assert_ok(h.host_call("destroy", name=ADOPT_DECLARED))
    declared = (
        f"'{ADOPT_DECLARED}' is declared in hive.toml: only hive.toml makes it (a destroyed one"
        " is created again, empty, when the hive next starts)"
    )
    pending_before = assert_ok(h.host_call("pending"))["approvals"]
    req = cage_run(
        h,
        ADOPT_HOSTILE,
        f"""
        result(reply=call({{"cmd": "request_approval", "kind": "spawn", "description": "a helper",
                           "payload": {{"name": "{ADOPT_DECLARED}",
                                        "spec": {{"runtime": "command", "command": ["true"]}}}}}}))
    """,
    )["reply"]
    assert req == {"version": 1, "ok": False, "error": declared}, req
    assert assert_ok(h.host_call("pending"))["approvals"] == pending_before
    assert ADOPT_DECLARED not in h.agent_status()

    h.stop_clean()
    h.start()
    h.wait_running()
    row = _row(h, ADOPT_DECLARED)
    home = cage_run(
        h, ADOPT_DECLARED, 'import os\nresult(listing=sorted(os.listdir("/home/agent")))'
    )
    after = cage_run(
        h,
        ADOPT_HOSTILE,
        f'result(send=call({{"cmd": "send", "to": "{ADOPT_DECLARED}", "body": "hello"}}))',
    )
    assert row.get("parent") is None, row
    assert not any(n.startswith(".planted") for n in home["listing"]), home
    assert after["send"]["error"] == f"'{ADOPT_DECLARED}' is not one of {ADOPT_HOSTILE}'s peers", (
        after
    )


# -- an agent taken out of hive.toml, and its name spawned again ------------------------------

GONE_HOSTILE = "rt24n"
GONE = "rt24g"  # declared, then taken out of hive.toml
GONE_AGENTS: dict[str, dict[str, Any]] = {
    GONE_HOSTILE: {"runtime": "command", "command": ["true"]},
    GONE: {"runtime": "command", "command": ["true"]},
}
GONE_FILE = "/home/agent/.claude/.credentials.json"
GONE_SECRET = '{"claudeAiOauth": {"accessToken": "sk-ant-oat01-rt24-gone-agents-token"}}'


@pytest.fixture(scope="module")
def gone_hive() -> Iterator[HiveProcess]:
    yield from running_hive(HiveProcess(GONE_AGENTS))


@pytest.mark.attack(
    "ids.reuse",
    ref="red team round 24: an agent taken out of hive.toml keeps its home, ids and bindings; its name spawned again gets them",
)
def test_an_agent_taken_out_of_hive_toml_leaves_nothing_to_a_later_agent_of_its_name(
    gone_hive: HiveProcess,
) -> None:
    """**Broke, fixed (session 20: ``destroy_leftovers``, bindings deleted with the row).**
    The operator takes an agent out of hive.toml and starts the hive again: the core
    deletes its row (store ``sync_config``) but nobody asks hive-priv to destroy its cage,
    home and ids, and its operator-made secret bindings stay. A hostile agent then asks to
    spawn a helper of that name (grants: nothing). The helper must start on a fresh home,
    with no binding; it gets the old agent's home (its Claude Code login) and its binding."""
    h = gone_hive
    old_uid = cage_run(
        h,
        GONE,
        f"""
        import os
        os.makedirs(os.path.dirname("{GONE_FILE}"), exist_ok=True)
        open("{GONE_FILE}", "w").write({GONE_SECRET!r})
        result(uid=os.getuid())
    """,
    )["uid"]
    assert_ok(h.host_call("secret_set", name="rt24gone", value="s3cr3t-rt24-gone"))
    assert_ok(
        h.host_call(
            "secret_bind",
            name="rt24gone",
            agents=[GONE],
            to="deploy.example:443",
            header="authorization: Bearer {}",
            env="RT24_GONE_KEY",
        )
    )
    h.stop_clean()
    h.write_config({GONE_HOSTILE: GONE_AGENTS[GONE_HOSTILE]})
    h.start()
    h.wait_running()
    assert GONE not in h.agent_status()

    req = cage_run(
        h,
        GONE_HOSTILE,
        f"""
        result(reply=call({{"cmd": "request_approval", "kind": "spawn", "description": "a helper",
                           "payload": {{"name": "{GONE}", "spec": {{"runtime": "command", "command": ["true"]}}}}}}))
    """,
    )["reply"]
    assert req["ok"], req
    [shown] = [a for a in assert_ok(h.host_call("pending"))["approvals"] if a["id"] == req["id"]]
    assert (
        shown["grants"]
        == f"agent {GONE}: runtime command; egress none; peers none; memory default; pids default"
    )
    assert_ok(h.host_call("approve", id=req["id"], payload_sha256=req["payload_sha256"]))
    h.agents[GONE] = GONE_AGENTS[GONE]  # (for wait_running and teardown: a cage of this hive)
    h.wait_running()
    seen = cage_run(
        h,
        GONE,
        f"""
        import os
        try:
            text = open("{GONE_FILE}").read()
        except OSError as e:
            text = errname(e)
        result(uid=os.getuid(), text=text)
    """,
    )
    env = assert_ok(h.host_call("agent_env", name=GONE)).get("env", {})
    observed = {
        "old_uid": old_uid,
        "new_uid": seen["uid"],
        "old_home_file": seen["text"],
        "env": sorted(env),
    }
    print(json.dumps(observed))
    assert seen["text"] == "ENOENT", observed  # a fresh home
    assert env == {}, observed  # no binding the operator made for the agent before it


# -- an agent taken out of hive.toml while its cage runs, and the core restarted -------------

ORPHAN_KEEP = "rt24k"
ORPHAN = "rt24o"
ORPHAN_AGENTS: dict[str, dict[str, Any]] = {
    ORPHAN_KEEP: {"runtime": "command", "command": ["true"]},
    ORPHAN: {"runtime": "command", "command": ["true"]},
}


@pytest.fixture(scope="module")
def orphan_hive() -> Iterator[HiveProcess]:
    yield from running_hive(HiveProcess(ORPHAN_AGENTS))


@pytest.mark.attack(
    "exec.leftover-processes",
    ref="red team round 24: a cage whose agent a restarted core no longer has keeps running, out of every verb's reach",
)
def test_a_cage_whose_agent_the_restarted_core_dropped_does_not_keep_running(
    orphan_hive: HiveProcess,
) -> None:
    """**Broke, fixed (session 20: ``destroy_leftovers`` at each start).**
    hive.toml loses an agent while the hive runs; then the core dies (kill -9: `hive up`
    starts it again, docs/security.md "When a process dies") and the new core, reading
    hive.toml, deletes the agent's row. Its cage must not go on running where no verb
    reaches it: `stop`, `destroy`, `agent_status` all say there is no such agent, and the
    agent's processes (whatever it left running in there) go on."""
    h = orphan_hive
    # What the agent leaves running in its cage (a runtime's background job).
    cage_run(
        h,
        ORPHAN,
        """
        import os, subprocess
        subprocess.Popen(["sleep", "3600"], start_new_session=True, stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        result(ok=True)
    """,
    )
    before = h.cage_procs(ORPHAN)
    assert before
    h.write_config({ORPHAN_KEEP: ORPHAN_AGENTS[ORPHAN_KEEP]})
    h.agents[ORPHAN] = ORPHAN_AGENTS[ORPHAN]  # (teardown still looks at its cgroup)
    old = h.core_pid()
    assert old is not None
    os.kill(old, signal.SIGKILL)
    wait_until(
        lambda: (
            (p := h.core_pid()) is not None and p != old and h.host_call("agent_status").get("ok")
        ),
        60,
        "hive up to start the core again",
    )
    h.wait_running([ORPHAN_KEEP])
    assert ORPHAN not in h.agent_status()
    stop = h.host_call("stop", scope={"agent_names": [ORPHAN]})
    assert stop == {"version": 1, "ok": False, "error": f"no agent named {ORPHAN!r}"}, stop
    assert h.host_call("destroy", name=ORPHAN) == {
        "version": 1,
        "ok": False,
        "error": f"no agent named {ORPHAN!r}",
    }
    # The new core destroys what gone agents left in the background after its start
    # (Hive.destroy_leftovers): within seconds, more on a loaded machine.
    deadline = time.monotonic() + 60
    while (left := h.cage_procs(ORPHAN)) and time.monotonic() < deadline:
        time.sleep(0.5)
    init_pid = h.cage(ORPHAN).get("pid")
    # The name spawned again (the hostile agent's helper, grants: nothing): a new cage, or
    # the one still running with the old agent's processes in it?
    req = cage_run(
        h,
        ORPHAN_KEEP,
        f"""
        result(reply=call({{"cmd": "request_approval", "kind": "spawn", "description": "a helper",
                           "payload": {{"name": "{ORPHAN}", "spec": {{"runtime": "command", "command": ["true"]}}}}}}))
    """,
    )["reply"]
    assert req["ok"], req
    assert_ok(h.host_call("approve", id=req["id"], payload_sha256=req["payload_sha256"]))
    h.wait_running([ORPHAN_KEEP, ORPHAN])
    respawned = {
        "parent": h.agent_status()[ORPHAN].get("parent"),
        "init_pid": h.cage(ORPHAN).get("pid"),
        "old_processes_still_there": sorted(set(before) & set(h.cage_procs(ORPHAN))),
    }
    observed = {
        "procs_before": sorted(before),
        "procs_left": sorted(left),
        "orphan_init_pid": init_pid,
        "respawned": respawned,
    }
    print(json.dumps(observed, default=str))
    assert left == [], observed  # no cage outlives its agent's row
    assert respawned["parent"] == ORPHAN_KEEP
    assert respawned["old_processes_still_there"] == [], observed  # the child is not the old cage


# -- a spawn under a name another agent declares as its peer --------------------------------

DANGLE_HOSTILE = "rt24q"
DANGLE_LEAD = "rt24l"  # declares a helper it expects the operator to spawn one day
DANGLE_NAME = "rt24h"
DANGLE_AGENTS: dict[str, dict[str, Any]] = {
    DANGLE_HOSTILE: {"runtime": "command", "command": ["true"]},
    DANGLE_LEAD: {"runtime": "command", "command": ["true"], "peers": [DANGLE_NAME]},
}


@pytest.fixture(scope="module")
def dangle_hive() -> Iterator[HiveProcess]:
    yield from running_hive(HiveProcess(DANGLE_AGENTS))


@pytest.mark.attack(
    "approval.hidden-grant",
    ref="red team round 24: a spawn under a name another agent declares as a peer; the grants line does not say so",
)
def test_the_grants_line_names_who_already_reaches_a_spawned_name(dangle_hive: HiveProcess) -> None:
    """**Broke, fixed (session 20).** rt24l declares peer rt24h (not yet spawned). The
    hostile rt24q asks to spawn its
    helper as rt24h: the grants line says "peers none", and the operator approves a helper
    that reaches nobody. But rt24l already reaches it: rt24l's messages and questions to its
    expected helper go to rt24q's child, which answers them as rt24h and hands them to its
    parent: a channel rt24l <-> rt24q the operator's peer graph has no edge for. What the
    operator must see before approving: who declares the name (the grants line names rt24l)."""
    h = dangle_hive
    req = cage_run(
        h,
        DANGLE_HOSTILE,
        f"""
        result(reply=call({{"cmd": "request_approval", "kind": "spawn", "description": "a helper",
                           "payload": {{"name": "{DANGLE_NAME}", "spec": {{"runtime": "command", "command": ["true"]}}}}}}))
    """,
    )["reply"]
    assert req["ok"], req
    [shown] = [a for a in assert_ok(h.host_call("pending"))["approvals"] if a["id"] == req["id"]]
    grants = shown["grants"]
    assert_ok(h.host_call("approve", id=req["id"], payload_sha256=req["payload_sha256"]))
    h.agents[DANGLE_NAME] = {"runtime": "command", "command": ["true"]}  # (a cage of this hive)
    h.wait_running()
    q = cage_run(
        h,
        DANGLE_LEAD,
        f"""
        result(reply=call({{"cmd": "ask", "to": "{DANGLE_NAME}", "question": "the release key?"}}))
    """,
    )["reply"]
    assert q["ok"], q
    relay = cage_run(
        h,
        DANGLE_NAME,
        f"""
        [item] = call({{"cmd": "loose_ends"}})["to_answer"]
        result(
            answer=call({{"cmd": "answer", "id": item["id"], "answer": "ask me, your helper"}}),
            to_parent=call({{"cmd": "send", "to": "{DANGLE_HOSTILE}", "body": "rt24l asked: " + item["question"]}}))
    """,
    )
    observed = {
        "grants": grants,
        "answer_ok": relay["answer"].get("ok"),
        "to_parent_ok": relay["to_parent"].get("ok"),
    }
    print(json.dumps(observed))
    assert observed["answer_ok"] and observed["to_parent_ok"], observed  # the channel, as described
    # the operator is told who already reaches the name (session 20)
    assert grants == (
        f"agent {DANGLE_NAME}: runtime command; egress none; peers none; memory default;"
        f" pids default; already a peer of {DANGLE_LEAD}"
    ), observed


REUSED = "rt24r"


@pytest.mark.attack(
    "ids.reuse",
    ref="red team round 24: a destroyed helper's name spawned again (the control for the hive.toml removal case)",
)
def test_a_destroyed_helpers_name_spawned_again_starts_from_nothing(
    dangle_hive: HiveProcess,
) -> None:
    """What `destroy` does, and the hive.toml removal does not: the helper's home (a login
    written there), its uid, its secret binding, its reminder and its question to the
    operator are gone; the same name spawned again by the same parent starts from nothing."""
    h = dangle_hive

    def spawn() -> None:
        req = cage_run(
            h,
            DANGLE_HOSTILE,
            f"""
            result(reply=call({{"cmd": "request_approval", "kind": "spawn", "description": "a helper",
                               "payload": {{"name": "{REUSED}", "spec": {{"runtime": "command", "command": ["true"]}}}}}}))
        """,
        )["reply"]
        assert req["ok"], req
        assert_ok(h.host_call("approve", id=req["id"], payload_sha256=req["payload_sha256"]))
        h.agents[REUSED] = {"runtime": "command", "command": ["true"]}
        h.wait_running()

    spawn()
    first = cage_run(
        h,
        REUSED,
        f"""
        import os
        os.makedirs(os.path.dirname("{GONE_FILE}"), exist_ok=True)
        open("{GONE_FILE}", "w").write({GONE_SECRET!r})
        result(uid=os.getuid(),
               remind=call({{"cmd": "remind", "in_seconds": 2, "text": "rt24 reminder of the first"}}),
               ask=call({{"cmd": "ask", "to": "operator", "question": "rt24 question of the first"}}))
    """,
    )
    assert first["remind"]["ok"] and first["ask"]["ok"], first
    assert_ok(h.host_call("secret_set", name="rt24reused", value="s3cr3t-rt24-reused"))
    assert_ok(
        h.host_call(
            "secret_bind",
            name="rt24reused",
            agents=[REUSED],
            to="deploy.example:443",
            header="authorization: Bearer {}",
            env="RT24_REUSED_KEY",
        )
    )
    assert_ok(h.host_call("destroy", name=REUSED))
    spawn()
    time.sleep(3)  # past the first one's reminder
    second = cage_run(
        h,
        REUSED,
        f"""
        import os
        try:
            text = open("{GONE_FILE}").read()
        except OSError as e:
            text = errname(e)
        result(uid=os.getuid(), text=text, loose=call({{"cmd": "loose_ends"}}))
    """,
    )
    entries = assert_ok(h.host_call("transcript", name=REUSED))["entries"]
    assert second["text"] == "ENOENT"
    assert second["uid"] != first["uid"]
    assert assert_ok(h.host_call("agent_env", name=REUSED)).get("env", {}) == {}
    assert {k: second["loose"][k] for k in ("questions", "approvals", "to_answer")} == {
        "questions": [],
        "approvals": [],
        "to_answer": [],
    }
    assert h.agent_status()[REUSED]["pending_reminders"] == 0
    assert not any("rt24 reminder of the first" in json.dumps(e) for e in entries), entries
    question = assert_ok(h.host_call("show_question", id=first["ask"]["id"]))["question"]
    assert question.get("answer") is None and question["asker"] == REUSED
    assert question.get("cancelled") is True, question  # (session 21: it says so)
    refused = h.host_call("answer_question", id=first["ask"]["id"], answer="yes")
    assert refused == {
        "version": 1,
        "ok": False,
        "error": f"question {first['ask']['id']} was cancelled",
    }, refused


# -- `hive mcp` in the cage: what its tools let an agent do -----------------------------------

MCP_PROBE = r"""
import json, subprocess
p = subprocess.Popen(["/opt/hive/bin/hive", "mcp"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                     stderr=subprocess.PIPE, text=True, bufsize=1)
n = [0]
def rpc(method, params=None, note=False):
    msg = {"jsonrpc": "2.0", "method": method}
    if params is not None:
        msg["params"] = params
    if not note:
        n[0] += 1
        msg["id"] = n[0]
    p.stdin.write(json.dumps(msg) + "\n")
    p.stdin.flush()
    if note:
        return None
    while True:
        line = json.loads(p.stdout.readline())
        if line.get("id") == n[0]:
            return line
def tool(tool_name, /, **args):
    r = rpc("tools/call", {"name": tool_name, "arguments": args})
    if "error" in r:
        return {"rpc_error": r["error"]["message"]}
    res = r["result"]
    if res.get("isError"):
        return {"error": res["content"][0]["text"]}
    return res.get("structuredContent")
rpc("initialize", {"protocolVersion": "2025-06-18", "capabilities": {},
                   "clientInfo": {"name": "rt24", "version": "0"}})
rpc("notifications/initialized", note=True)
out = {"tools": sorted(t["name"] for t in rpc("tools/list")["result"]["tools"])}
out["forged"] = tool("send_message", to="rtbob", body="rt24 via mcp", **{
    "from": "operator", "sender": "rtcarol", "as": "rtcarol", "cmd": "answer_question", "id": 1})
out["nonpeer"] = tool("send_message", to="rtcarol", body="rt24 via mcp")
for name in ("recv", "ack", "answer_question", "approve", "spawn", "secret_ls", "turn_record"):
    out[name] = tool(name)
out["answer_operators"] = tool("answer", question_id=Q_OP, answer="yes")
out["spawn_limits"] = tool("request_approval", kind="spawn", description="x",
                           payload={"name": "rt24mcpkid", "spec": {"command": ["true"], "memory_mib": 16384}})
out["whoami_other"] = tool("whoami", name="rtcarol", agent="rtcarol")
p.stdin.close()
out["rc"] = p.wait(timeout=30)
out["traceback"] = "Traceback" in p.stderr.read()
result(**out)
"""


@pytest.mark.attack(
    "identity.forge-agent",
    ref="red team round 24: hive mcp's tools from the cage (extra identity arguments, verbs it does not serve)",
)
def test_hive_mcp_gives_an_agent_nothing_its_socket_does_not(rt: HiveProcess, world: World) -> None:
    """The MCP server the runtime uses runs in the cage as the runtime's uid against the
    same agent.sock, so every tool speaks as the agent; extra arguments naming another
    sender are dropped by the SDK's argument model (not passed on), and no tool reaches
    recv/ack or an operator verb."""
    with changes(rt) as ch:
        res = cage_run(rt, "rtalice", MCP_PROBE.replace("Q_OP", str(world.q_op)))
    forged = res.pop("forged")
    assert set(forged) == {"id"}, forged
    unknown = {
        name: res.pop(name)
        for name in (
            "recv",
            "ack",
            "answer_question",
            "approve",
            "spawn",
            "secret_ls",
            "turn_record",
        )
    }
    assert res == {
        "tools": sorted(
            [
                "whoami",
                "peers",
                "send_message",
                "ask",
                "answer",
                "request_approval",
                "set_status",
                "remind",
                "loose_ends",
            ]
        ),
        "nonpeer": {
            "error": "Error executing tool send_message: 'rtcarol' is not one of rtalice's peers"
        },
        "answer_operators": {
            "error": f"Error executing tool answer: no question {world.q_op} addressed to rtalice"
        },
        "spawn_limits": {
            "error": "Error executing tool request_approval: spawn payload: unknown field"
            " 'spec.memory_mib'"
        },
        "whoami_other": {"name": "rtalice"},
        "rc": 0,
        "traceback": False,
    }, res
    assert unknown == {name: {"error": f"Unknown tool: {name}"} for name in unknown}, unknown
    # The one message, from rtalice, to rtbob (its quota's row with it); nothing else.
    [msg] = ch.added["messages"]
    assert forged["id"] in msg and "rtalice" in msg and "rtbob" in msg and "rt24 via mcp" in msg, (
        msg
    )
    assert not ch.removed.get("messages") and set(ch.added) <= {"messages", "usage"}, ch.count()


# -- what the grants line leaves out ------------------------------------------------------------

HIDDEN_SPEC = {
    "runtime": "claude",
    # For a claude runtime only command[0] is run (the CLI's path): the rest pads the payload
    # so that a listing's 2048-byte cut falls before "model" and "turn_timeout".
    "command": ["claude", *["x" * 4000] * 3],
    "model": "claude-opus-4-1",
    "turn_timeout": 86400.0,
}


@pytest.mark.attack(
    "approval.hidden-grant",
    ref="red team round 24: a spawn's model and turn_timeout behind a long command, absent from the grants line",
)
def test_the_grants_line_shows_a_spawns_model_and_turn_timeout(
    rt: HiveProcess, world: World
) -> None:
    """**Broke, fixed (session 20).** A helper asked for with the dearest model and 24-hour
    turns (default 300 s): in
    every listing (host.sock ``pending``, the dashboard, notifications) the payload is cut
    before both, and the grants line, "always shown whole" so that a long ``command`` hides
    nothing approving gives, names neither."""
    req = cage_run(
        rt,
        "rtalice",
        f"""
        result(reply=call({{"cmd": "request_approval", "kind": "spawn", "description": "a helper",
                           "payload": {{"name": "rt24big", "spec": {json.dumps(HIDDEN_SPEC)}}}}}))
    """,
    )["reply"]
    assert req["ok"], req
    try:
        [row] = [
            a
            for a in assert_ok(rt.host_call("pending", limit=200))["approvals"]
            if a["id"] == req["id"]
        ]
        seen = row["payload"] if isinstance(row["payload"], str) else json.dumps(row["payload"])
        observed = {
            "grants": row["grants"],
            "cut": row.get("truncated"),
            "model_in_listing": "claude-opus" in seen or "claude-opus" in row["grants"],
            "timeout_in_listing": "86400" in seen or "86400" in row["grants"],
        }
        print(json.dumps(observed))
        assert "payload" in observed["cut"], observed
        assert observed["model_in_listing"] and observed["timeout_in_listing"], observed
    finally:
        assert_ok(rt.host_call("deny", id=req["id"]))


@pytest.mark.attack(
    "approval.hidden-grant",
    ref="red team round 24: a spawn's egress rules in the grants line as spelled, not as applied",
)
def test_the_grants_line_shows_the_egress_rules_approving_adds(
    rt: HiveProcess, world: World
) -> None:
    """**Broke, fixed (session 20).** An ``egress`` approval's ``allows`` is the rule the
    hive will store, worked out from
    the payload; a spawn's grants line shows the spec's egress as the agent spelled it.
    ``010.0.0.1:443`` reads as a private 10.0.0.1 and is stored (inet_aton's octal) as
    8.0.0.1:443, a public address; ``0x2d.041.8348`` is 45.33.32.156."""
    egress = ["010.0.0.1:443", "0x2d.041.8348:443"]
    payload = {
        "name": "rt24oct",
        "spec": {"runtime": "command", "command": ["true"], "egress": egress},
    }
    req = cage_run(
        rt,
        "rtalice",
        f"""
        result(reply=call({{"cmd": "request_approval", "kind": "spawn", "description": "a helper",
                           "payload": {json.dumps(payload)}}}))
    """,
    )["reply"]
    assert req["ok"], req
    try:
        applied = SpawnPayload.model_validate(payload).spec.egress
        assert applied == [
            "8.0.0.1:443",
            "45.33.32.156:443",
        ]  # what approving stores (agents' rules)
        [row] = [
            a
            for a in assert_ok(rt.host_call("pending", limit=200))["approvals"]
            if a["id"] == req["id"]
        ]
        whole = assert_ok(rt.host_call("show_approval", id=req["id"]))["approval"]["grants"]
        print(json.dumps({"listed": row["grants"], "shown": whole, "applied": applied}))
        for grants in (row["grants"], whole):
            assert f"egress {', '.join(applied)};" in grants, (grants, applied)
    finally:
        assert_ok(rt.host_call("deny", id=req["id"]))
