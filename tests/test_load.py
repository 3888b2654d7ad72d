"""Load: 10,000 messages across 100 agents in real cages, with no loss, each
sender's order kept, and hive-core's memory flat.

Each agent ``ldNNN`` has a ``command`` runtime whose turn program (below) runs
in its cage as the agent: told by the operator to run round R with N messages,
it sends N messages to the next agent over /run/hive/agent.sock, then receives
(and acks) the N messages the previous agent sent it, and writes what it sent
and got to ``$HOME/round-R.json``, which the test reads from the host.

Rounds: a warm-up (20 each, 2,000 in all), then the load round (100 each,
10,000 in all), then the load round again (to show that memory doesn't creep
from one 10,000 to the next). hive-core's RSS (VmRSS) is read after each and
may not grow by more than ``RSS_TOLERANCE_KIB`` over its value after the
warm-up. Each agent sends 220 messages in all, under the default per-agent
burst (``[limits] message_burst`` = 500), so no send may be refused.
"""

from __future__ import annotations

import functools
import json
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from hive_fixture import HiveFactory, HiveProcess, proc_status, wait_until

N_AGENTS = 100
AGENTS = [f"ld{i:03d}" for i in range(N_AGENTS)]
WARMUP, LOAD = 20, 100  # messages per agent per round
# hive-core's RSS may grow by at most this much from after the warm-up to after each
# 10,000 messages (SQLite's page cache, up to 2 MiB, and the allocator settle; a leak
# of 400 bytes a message would be 8 MiB over the two load rounds).
RSS_TOLERANCE_KIB = 8 * 1024

TURN = textwrap.dedent(r"""
    import json, os, socket, sys, time

    msg = json.load(sys.stdin)
    task = json.loads(msg["body"])
    r, n = task["round"], task["n"]
    errors = []


    class Conn:
        def __init__(self):
            self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.s.settimeout(60)
            self.s.connect(os.environ["HIVE_SOCKET"])
            self.f = self.s.makefile("rb")

        def call(self, **req):
            self.s.sendall(json.dumps(req).encode() + b"\n")
            return json.loads(self.f.readline())


    conn = Conn()
    started = time.time()
    sent = []
    for k in range(n):
        rep = conn.call(cmd="send", to=task["to"], body=f"{r}:{k}")
        if not rep.get("ok"):
            errors.append(rep)
            break
        sent.append(rep["id"])
    sent_done = time.time()
    got = []
    deadline = time.time() + 150
    while sum(1 for g in got if g[1] == task["from"] and g[2].startswith(f"{r}:")) < n:
        if time.time() > deadline:
            errors.append(f"only {len(got)} of {n} messages arrived")
            break
        rep = conn.call(cmd="recv", wait=5, max=1000)
        if not rep.get("ok"):
            errors.append(rep)
            break
        got += [[m["id"], m["from"], m["body"]] for m in rep["messages"]]
        if rep["messages"]:
            a = conn.call(cmd="ack", ids=[m["id"] for m in rep["messages"]])
            if not a.get("ok"):
                errors.append(a)
    out = {"sent": sent, "got": got, "errors": errors, "started": started, "sent_done": sent_done,
           "finished": time.time()}
    path = os.path.join(os.environ["HOME"], f"round-{r}.json")
    with open(path + ".tmp", "w") as f:
        json.dump(out, f)
    os.rename(path + ".tmp", path)
    print(f"round {r}: sent {len(sent)}, got {len(got)}, errors {len(errors)}", flush=True)
""")


def ok(reply: dict[str, Any]) -> dict[str, Any]:
    assert reply.get("ok") is True, reply
    return reply


def rss_kib(pid: int) -> int:
    value = proc_status(pid).get("VmRSS")
    assert value and value.endswith(" kB"), value
    return int(value.split()[0])


def result_file(hive: HiveProcess, name: str, round_: int) -> Path:
    return hive.home(name) / f"round-{round_}.json"


def run_round(hive: HiveProcess, round_: int, n: int) -> dict[str, Any]:
    """Every agent sends ``n`` to the next one and receives ``n`` from the previous one."""
    for name in AGENTS:  # paused, the "go" messages all queue before any peer's message
        ok(hive.host_call("set_paused", name=name, paused=True))
    for i, name in enumerate(AGENTS):
        task = {"round": round_, "n": n, "to": AGENTS[(i + 1) % N_AGENTS], "from": AGENTS[i - 1]}
        ok(hive.host_call("send", to=name, body=json.dumps(task)))
    t0 = time.time()
    for name in AGENTS:
        ok(hive.host_call("set_paused", name=name, paused=False))
    wait_until(lambda: all(result_file(hive, a, round_).exists() for a in AGENTS), 240,
               f"every agent to finish round {round_}", interval=0.2)
    results = {a: json.loads(result_file(hive, a, round_).read_text()) for a in AGENTS}
    all_ids: list[int] = []
    for i, name in enumerate(AGENTS):
        res, sender = results[name], AGENTS[i - 1]
        assert res["errors"] == [], (name, res["errors"])
        sent = res["sent"]
        assert len(sent) == n and sent == sorted(set(sent)), (name, sent)
        all_ids += sent
        # No loss, nothing extra, nothing twice, in the sender's order, under the ids it was given.
        assert [(g[1], g[2]) for g in res["got"]] == [(sender, f"{round_}:{k}") for k in range(n)], name
        assert [g[0] for g in res["got"]] == results[sender]["sent"], name
    assert len(set(all_ids)) == N_AGENTS * n
    elapsed = max(r["finished"] for r in results.values()) - t0
    sending = max(r["sent_done"] for r in results.values()) - min(r["started"] for r in results.values())
    return {"messages": N_AGENTS * n, "elapsed": elapsed, "sending": sending}


@pytest.mark.timeout(600)
def test_10k_messages_across_100_agents_no_loss_order_kept_memory_flat(hive_factory: HiveFactory) -> None:
    agents = {
        name: {"runtime": "command", "command": ["python3", "-c", TURN], "peers": [AGENTS[(i + 1) % N_AGENTS]]}
        for i, name in enumerate(AGENTS)
    }
    t = time.monotonic()
    hive = hive_factory(agents, start=False)
    hive.wait_running = functools.partial(HiveProcess.wait_running, hive, timeout=180)  # type: ignore[method-assign]
    hive.start()
    startup = time.monotonic() - t
    core = hive.core_pid()
    assert core is not None
    rss_start = rss_kib(core)

    warm = run_round(hive, 1, WARMUP)
    time.sleep(1.0)
    rss_warm = rss_kib(core)
    load = run_round(hive, 2, LOAD)
    time.sleep(1.0)
    rss_load = rss_kib(core)
    again = run_round(hive, 3, LOAD)
    time.sleep(1.0)
    rss_again = rss_kib(core)

    assert hive.core_pid() == core, "hive-core restarted during the load"
    for name in AGENTS:  # nothing left unacked anywhere
        assert ok(hive.agent_call(name, "recv", wait=0, max=1000))["messages"] == [], name
    rows = hive.agent_status()
    assert all(rows[a]["running"] and not rows[a]["failed"] for a in AGENTS)
    print(
        f"\nload: {N_AGENTS} cages up in {startup:.1f} s; "
        f"warm-up {warm['messages']} messages in {warm['elapsed']:.1f} s; "
        f"load {load['messages']} messages in {load['elapsed']:.1f} s "
        f"({load['messages'] / load['elapsed']:.0f} msg/s end to end, sends all done in {load['sending']:.1f} s: "
        f"{load['messages'] / load['sending']:.0f} msg/s); again {again['messages']} in {again['elapsed']:.1f} s "
        f"({again['messages'] / again['elapsed']:.0f} msg/s); "
        f"hive-core VmRSS {rss_start / 1024:.1f} MiB at start, {rss_warm / 1024:.1f} MiB after the warm-up, "
        f"{rss_load / 1024:.1f} MiB after the load ({(rss_load - rss_warm) / 1024:+.1f} MiB), "
        f"{rss_again / 1024:.1f} MiB after the load again ({(rss_again - rss_warm) / 1024:+.1f} MiB; "
        f"tolerance {RSS_TOLERANCE_KIB / 1024:.0f} MiB)"
    )
    assert rss_load - rss_warm <= RSS_TOLERANCE_KIB, (rss_start, rss_warm, rss_load)
    assert rss_again - rss_warm <= RSS_TOLERANCE_KIB, (rss_start, rss_warm, rss_load, rss_again)
