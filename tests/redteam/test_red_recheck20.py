"""Re-check of session 20's fixes (diff 3f990dd..3bfce93): terminated TLS's CPU metered from
each connection's thread start and charged to a per-agent share of the hive's total
(``egress_tls.CpuMeter``, ``CpuPacer``), and names (a declared name can't be spawned,
``DeclaredNameTaken`` at start, ``Hive.destroy_leftovers`` at each start, spawns waiting
for it, bindings deleted with a row, the spawn grants line).

Broke:
- ``destroy_leftovers`` is the only guard, and a spawn passes it whenever the sweep is not
  running. (1) ``_leftovers_done`` starts *set*, and host.sock is served (``hive up``
  hands it over already bound, so a client's connect waits in its backlog) before
  ``resume_running`` and the sweep: in a real hive, the operator takes RACE_GONE (a Claude
  Code login in its home) out of hive.toml, starts the hive, and a ``spawn`` of RACE_GONE
  sent as soon as host.sock takes it (``hive up &`` then ``hive spawn``) starts on the old
  home, same uid, the login readable (3 runs of 3); the sweep then reads it as an agent
  and leaves it (medium: round 24's high break behind a start-up race any script hits).
  (2) hive-priv refusing the sweep's one ``status``: nothing asks again in this core's
  life, and every later spawn of the name starts on the gone agent's home (in-process).
  (3) a leftover whose ``destroy`` fails is logged and skipped: its name is free and a
  spawn starts on what is left (in-process; ``processes survived SIGKILL``, a file it
  could not remove).
- ``CpuPacer``'s "active" is "charged anything in the last second": an agent that opens a
  small terminated connection every half second (~4 ms of CPU: 0.008 CPU) halves another
  agent's download (1.05 -> 0.52 CPU), three such to 0.26; the share they don't use is
  given to nobody (low: needs agents of one's own; "a single download alone is never
  slowed" is false beside an idle agent).
- ``hive pending`` (the CLI) prints no ``grants`` (nor ``allows``): a spawn's egress rule
  and model behind a 12 KB ``command`` are cut out of its payload column, and the line
  that now names them is printed by ``hive show approval`` only (low).

Held: a ``hive.toml`` declaring a spawned name is refused with nothing changed (the removed
agent's row, the operator's binding of it, the spawned row) in one line naming the
parent; under ``hive up`` a killed core's restarts are refused with that line each time,
no traceback, the cages run on, ``hive up`` retries (backoff to 10 s: agents unreachable
until hive.toml is fixed) and the core comes back on the next try once it is; a pending
spawn approved after hive.toml came to declare its name is refused and stays pending;
names are ``[a-z][a-z0-9-]{0,30}``, so no case variant or look-alike passes
``check_not_declared``; the sweep destroys a gone name only (a running and a stopped
agent left) and a later spawn starts fresh; a spawn while the sweep waits on hive-priv
waits for it and starts fresh, its row and rules intact; the grants line of a hostile payload (a
``model`` imitating the line with CR and CSI, 1,000 peers, an octal rule) shows every
real grant before any agent text; NaN/inf/huge/bool turn timeouts never reach it; a
config binding naming an undeclared agent is refused at load; a meter charges a relay
that raises, and a woken one never sleeps; a debt survives the sweep and is not carried
once paid. By reading: hive-priv's ids table is per hive (``priv/ids.json``), so the
sweep never sees another hive's names; ``refuse`` on a failed cage handshake still joins
the helper thread and charges its upstream handshake.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from helpers import assert_ok
from hive_fixture import HIVE, HiveProcess, running_hive, wait_until
from hyperhive.client import Client
from hyperhive.config import HiveConfig
from hyperhive.core import approvals
from hyperhive.core.actors import OPERATOR
from hyperhive.core.egress_tls import CpuMeter, CpuPacer
from hyperhive.core.events import EventBus
from hyperhive.core.grants import grants_of
from hyperhive.core.hive import Hive, Lifecycle
from hyperhive.core.refusals import Conflict, Refused, Unavailable
from hyperhive.core.store import Store
from hyperhive.core.store.agents import DeclaredNameTaken
from hyperhive.names import check_name
from hyperhive.wire.common import AgentSpec, SpawnPayload

from .conftest import cage_run

SPEC = AgentSpec.model_validate({"runtime": "command", "command": ["true"]})
GONE = "rc20gone"  # taken out of hive.toml: hive-priv still holds its cage, home and ids
KEEP = "rc20keep"  # an agent that stays


class Leftovers(Lifecycle):
    """hive-priv as the sweep sees it: ``held`` is its ids table (a cage, home and ids per
    name); a start of a name it still holds starts on the old home (``starts`` records it).
    ``found_running`` takes ``resume_delay`` (serving the running cages again)."""

    def __init__(self, held: set[str], resume_delay: float = 0.0) -> None:
        self.held = set(held)
        self.resume_delay = resume_delay
        self.starts: list[tuple[str, str]] = []
        self.destroyed: list[str] = []
        self.away = False  # the sweep's status refused
        self.sweep_delay = 0.0
        self.stuck: set[str] = set()  # their destroy fails

    async def found_running(self, names: list[str], hive: Hive) -> list[str]:
        await asyncio.sleep(self.resume_delay)
        return [n for n in names if n in self.held]

    async def leftovers(self, agents: set[str]) -> list[str]:
        await asyncio.sleep(self.sweep_delay)
        if self.away:
            raise Unavailable("hive-priv: connection refused")
        return sorted(self.held - agents)

    async def holding(self, names: list[str]) -> list[str]:
        await asyncio.sleep(self.sweep_delay)
        if self.away:
            raise Unavailable("hive-priv: connection refused")
        return [n for n in names if n in self.held]

    async def destroy(self, name: str) -> None:
        if name in self.stuck:
            raise Unavailable(f"cage {name}: processes survived SIGKILL")
        self.destroyed.append(name)
        self.held.discard(name)

    async def start(self, name: str, hive: Hive) -> None:
        self.starts.append((name, "old home" if name in self.held else "fresh"))
        self.held.add(name)


def _hive(tmp_path: Path, lifecycle: Lifecycle, agents: dict[str, Any] | None = None) -> Hive:
    store = Store(tmp_path / "hive.db")
    config = HiveConfig.model_validate({"agents": agents or {}})
    store.agents.sync_config(config.agents)
    return Hive(store, config, lifecycle, EventBus())


async def _start_core(hive: Hive) -> None:
    """What run_core does once host.sock is served (daemon.py): the sweep in the
    background (retried, here every 50 ms, while hive-priv is away or a destroy fails)."""
    await hive.resume_running()
    sweep = asyncio.create_task(hive.destroy_leftovers(retry_every=0.05))
    await asyncio.wait([sweep], timeout=0.5)


# -- names: the sweep is the only guard, and spawns pass it when it isn't running ------------


@pytest.mark.attack(
    "ids.reuse",
    ref="re-check of session 20: a spawn while the restarted core is in resume_running starts on a gone agent's home",
)
def test_a_spawn_during_resume_running_does_not_start_on_a_gone_agents_home(
    tmp_path: Path,
) -> None:
    """**Broke, fixed (session 20: ``after_create`` destroys its own name's leftovers
    first, ``Hive.clear_leftovers``).** ``_leftovers_done`` was set until ``destroy_leftovers`` clears it, and
    host.sock is served before ``resume_running`` (which waits on hive-priv for every
    running cage): a spawn of GONE meanwhile creates the row, passes ``after_create``'s wait
    and starts on GONE's old cage and home; the sweep then reads GONE as an agent."""
    life = Leftovers({KEEP, GONE}, resume_delay=0.3)
    hive = _hive(tmp_path, life, {KEEP: {"runtime": "command", "command": ["true"]}})

    async def scenario() -> None:
        async def operator() -> None:
            await asyncio.sleep(0.05)  # host.sock is up; the core is still resuming
            await hive.spawn(OPERATOR, GONE, SPEC)

        await asyncio.gather(_start_core(hive), operator())

    try:
        asyncio.run(scenario())
        observed = {"starts": life.starts, "destroyed": life.destroyed}
        print(observed)
        assert life.starts == [(GONE, "fresh")], observed
    finally:
        hive.store.close()


@pytest.mark.attack(
    "ids.reuse",
    ref="re-check of session 20: hive-priv not answering the sweep: later spawns of a gone name start on its home",
)
def test_a_sweep_hive_priv_did_not_answer_does_not_let_later_spawns_reuse_a_home(
    tmp_path: Path,
) -> None:
    """**Broke, fixed (session 20: a new agent's own leftovers are destroyed first, and the
    sweep is retried).** The sweep's one ``status`` refused (hive-priv restarting, say): it logs and
    returns, ``_leftovers_done`` is set, and nothing asks again until the next start of the
    core. A spawn of GONE an hour later (an agent's request approved: grants "nothing")
    starts on GONE's home, ids and processes: round 24's high break, for the whole run."""
    life = Leftovers({KEEP, GONE})
    hive = _hive(tmp_path, life, {KEEP: {"runtime": "command", "command": ["true"]}})

    async def scenario() -> None:
        life.away = True
        await _start_core(hive)
        life.away = False  # hive-priv is back (socket activation) for everything later
        await hive.spawn(OPERATOR, GONE, SPEC)

    try:
        asyncio.run(scenario())
        observed = {"starts": life.starts, "destroyed": life.destroyed}
        print(observed)
        assert life.starts == [(GONE, "fresh")], observed
    finally:
        hive.store.close()


@pytest.mark.attack(
    "ids.reuse",
    ref="re-check of session 20: a leftover whose destroy failed is skipped; its name spawned starts on it",
)
def test_a_leftover_whose_destroy_failed_is_not_handed_to_a_spawn(tmp_path: Path) -> None:
    """**Broke, fixed (session 20: the spawn's start is refused while its name's leftovers
    can't be destroyed).** A leftover whose ``destroy`` fails (``processes survived SIGKILL``, a file
    it could not remove) is logged and skipped; its name is free, and a spawn of it starts
    on what is left. It should be refused (or the leftover destroyed first) until it is
    gone."""
    life = Leftovers({KEEP, GONE})
    life.stuck.add(GONE)
    hive = _hive(tmp_path, life, {KEEP: {"runtime": "command", "command": ["true"]}})

    async def scenario() -> str | None:
        await _start_core(hive)
        try:
            await hive.spawn(OPERATOR, GONE, SPEC)
        except Refused as e:
            return str(e)
        return None

    try:
        refused = asyncio.run(scenario())
        observed = {"starts": life.starts, "refused": refused}
        print(observed)
        assert (GONE, "old home") not in life.starts, observed
    finally:
        hive.store.close()


@pytest.mark.attack(
    "ids.reuse",
    ref="re-check of session 20: the control: a spawn after the sweep starts fresh, a live agent is never swept",
)
def test_the_sweep_destroys_the_gone_agent_only_and_a_later_spawn_starts_fresh(
    tmp_path: Path,
) -> None:
    """Held (the control): the sweep destroys GONE only (KEEP, an agent, and a stopped one,
    are left), and a spawn of GONE afterwards starts from nothing."""
    life = Leftovers({KEEP, GONE, "rc20stopped"})
    hive = _hive(
        tmp_path,
        life,
        {n: {"runtime": "command", "command": ["true"]} for n in (KEEP, "rc20stopped")},
    )
    hive.store.agents.set_flag("rc20stopped", "stopped", True)

    async def scenario() -> None:
        await _start_core(hive)
        await hive.spawn(OPERATOR, GONE, SPEC)

    try:
        asyncio.run(scenario())
        assert life.destroyed == [GONE]
        assert life.starts == [(GONE, "fresh")]
    finally:
        hive.store.close()


@pytest.mark.attack(
    "ids.reuse",
    ref="re-check of session 20: a spawn of a gone name while the sweep runs",
)
def test_a_spawn_while_the_sweep_runs_waits_for_it_and_starts_fresh(tmp_path: Path) -> None:
    """Held: a spawn of GONE while the sweep waits on hive-priv's ``status`` (its agents
    read before the spawn's row) waits in ``after_create``; the sweep destroys GONE's old
    cage, and the new GONE then starts from nothing with its row and spec intact."""
    life = Leftovers({KEEP, GONE})
    life.sweep_delay = 0.3
    hive = _hive(tmp_path, life, {KEEP: {"runtime": "command", "command": ["true"]}})
    spec = AgentSpec.model_validate(
        {"runtime": "command", "command": ["true"], "egress": ["pypi.org:443"]}
    )

    async def scenario() -> None:
        async def operator() -> None:
            await asyncio.sleep(0.1)  # the sweep has read the agents, waits on hive-priv
            await hive.spawn(OPERATOR, GONE, spec)

        await asyncio.gather(_start_core(hive), operator())

    try:
        asyncio.run(scenario())
        assert life.destroyed == [GONE]
        assert life.starts == [(GONE, "fresh")]
        row = hive.store.agents.get(GONE)
        assert row is not None and row.spec == spec
        assert [r["rule"] for r in hive.store.egress.rules(GONE).get(GONE, [])] == ["pypi.org:443"]
    finally:
        hive.store.close()


@pytest.mark.attack(
    "approval.hidden-grant",
    ref="re-check of session 20: hive.toml declaring a spawned name: refused, nothing changed",
)
def test_a_hive_toml_declaring_a_spawned_name_changes_nothing(tmp_path: Path) -> None:
    """Held: the start that declares a spawned agent's name (and, in the same edit, takes
    another agent out of hive.toml) is refused in one line naming the parent; the removed
    agent's row and the operator's binding of it stay, the spawned row is untouched."""
    store = Store(tmp_path / "hive.db")
    try:
        store.agents.sync_config({"rc20a": SPEC, "rc20b": SPEC})
        store.agents.create("rc20kid", SPEC, "rc20a", "spawn")
        store.bindings.replace_config([])
        store.bindings.bind(
            "rc20s", ["rc20b"], "deploy.example", 443, "x-k: {}", "K", "operator", "PH"
        )
        before = (
            sorted((r.name, r.origin, r.parent) for r in store.agents.all()),
            store.db.conn.execute("SELECT secret, agent FROM secret_bindings").fetchall(),
        )
        with pytest.raises(DeclaredNameTaken) as e:
            store.agents.sync_config({"rc20a": SPEC, "rc20kid": SPEC})  # rc20b taken out
        assert str(e.value) == (
            "hive.toml declares agent 'rc20kid', but 'rc20kid' is an agent spawned by 'rc20a',"
            " not one hive.toml made: rename it in hive.toml, or take it out, start the hive"
            " and `hive destroy rc20kid` first; nothing was changed"
        )
        store.agents.invalidate()
        after = (
            sorted((r.name, r.origin, r.parent) for r in store.agents.all()),
            store.db.conn.execute("SELECT secret, agent FROM secret_bindings").fetchall(),
        )
        assert after == before
        assert "\n" not in str(e.value)
    finally:
        store.close()


@pytest.mark.attack(
    "approval.hidden-grant",
    ref="re-check of session 20: a spawn requested before hive.toml declared its name, approved after",
)
def test_a_spawn_requested_before_hive_toml_declared_its_name_is_refused_at_approval(
    tmp_path: Path,
) -> None:
    """Held: an agent asks to spawn ``rc20later`` (free then); the operator then declares
    ``rc20later`` in hive.toml and restarts; approving the old request is refused with the
    declared line, and it stays pending (to be denied)."""
    life = Leftovers(set())
    hive = _hive(tmp_path, life, {"rc20asker": {"runtime": "command", "command": ["true"]}})
    payload = {"name": "rc20later", "spec": {"runtime": "command", "command": ["true"]}}
    a = approvals.request(hive, "rc20asker", "spawn", "a helper", payload)
    store = hive.store
    declared = {n: {"runtime": "command", "command": ["true"]} for n in ("rc20asker", "rc20later")}
    config = HiveConfig.model_validate({"agents": declared})
    store.agents.sync_config(config.agents)  # the restart with the new hive.toml
    later = Hive(store, config, life, EventBus())
    try:
        with pytest.raises(Conflict) as e:
            asyncio.run(approvals.resolve(later, a.id, "approved", sha256=a.payload_sha256))
        assert str(e.value) == (
            "'rc20later' is declared in hive.toml: only hive.toml makes it (a destroyed one"
            " is created again, empty, when the hive next starts)"
        )
        got = store.approvals.get(a.id)
        assert got is not None and getattr(got, "status", None) == "pending"
        assert store.agents.get("rc20later").parent is None  # hive.toml's, not the asker's
        assert life.starts == []
    finally:
        store.close()


@pytest.mark.attack(
    "identity.forge-agent",
    ref="re-check of session 20: a case variant of a declared name",
)
@pytest.mark.parametrize("name", ["Lead", "LEAD", "lead ", "le\u0430d", "lead\n", "ĺead"])
def test_no_spelling_of_a_declared_name_passes_as_another(name: str) -> None:
    """Held: names are ``[a-z][a-z0-9-]{0,30}``: no case variant, padding or look-alike of
    a declared ``lead`` is a name at all (``check_not_declared`` compares exactly)."""
    with pytest.raises(ValueError):
        check_name(name)


# -- the same in a real hive: `hive up`, then at once `hive spawn` of a gone name ------------

RACE_KEEP, RACE_GONE = "rc20rk", "rc20rg"
RACE_AGENTS: dict[str, dict[str, Any]] = {
    RACE_KEEP: {"runtime": "command", "command": ["true"]},
    RACE_GONE: {"runtime": "command", "command": ["true"]},
}
RACE_FILE = "/home/agent/.claude/.credentials.json"
RACE_SECRET = '{"claudeAiOauth": {"accessToken": "sk-ant-oat01-rc20-race-token"}}'


@pytest.fixture(scope="module")
def race_hive() -> Iterator[HiveProcess]:
    yield from running_hive(HiveProcess(RACE_AGENTS))


@pytest.mark.attack(
    "ids.reuse",
    ref="re-check of session 20: a spawn sent as `hive up` starts gets a gone agent's home",
)
def test_a_spawn_sent_as_the_hive_starts_does_not_get_a_gone_agents_home(
    race_hive: HiveProcess,
) -> None:
    """**Broke.** The operator takes RACE_GONE (a Claude Code login in its home) out of
    hive.toml and starts the hive, and a script spawns a new agent of that name as soon as
    host.sock answers (``hive up &`` then ``hive spawn``; an approval the same). host.sock
    is served before ``resume_running`` and the sweep, and ``after_create`` doesn't wait
    then: the new agent starts on the old home, the login readable, and the sweep leaves it
    (an agent now)."""
    h = race_hive
    old_uid = cage_run(
        h,
        RACE_GONE,
        f"""
        import os
        os.makedirs(os.path.dirname("{RACE_FILE}"), exist_ok=True)
        open("{RACE_FILE}", "w").write({RACE_SECRET!r})
        result(uid=os.getuid())
    """,
    )["uid"]
    h.stop_clean()
    h.write_config({RACE_KEEP: RACE_AGENTS[RACE_KEEP]})
    replies: list[dict[str, Any]] = []
    stop = threading.Event()

    def spawn_at_once() -> None:
        while not stop.is_set():
            try:
                with Client(h.host_sock, timeout=60) as c:
                    replies.append(c.call("spawn", name=RACE_GONE, spec=RACE_AGENTS[RACE_GONE]))
                return
            except (OSError, ValueError, Exception):  # not there yet
                time.sleep(0.002)

    spawner = threading.Thread(target=spawn_at_once, daemon=True)
    spawner.start()
    try:
        h.start()
    finally:
        stop.set()
        spawner.join(60)
    assert replies and replies[0].get("ok"), replies
    h.agents[RACE_GONE] = RACE_AGENTS[RACE_GONE]  # (a cage of this hive: teardown's)
    h.wait_running()
    seen = cage_run(
        h,
        RACE_GONE,
        f"""
        import os
        try:
            text = open("{RACE_FILE}").read()
        except OSError as e:
            text = errname(e)
        result(uid=os.getuid(), text=text)
    """,
    )
    observed = {"old_uid": old_uid, "new_uid": seen["uid"], "old_home_file": seen["text"]}
    print(json.dumps(observed))
    assert seen["text"] == "ENOENT", observed


@pytest.mark.attack(
    "approval.hidden-grant",
    ref="re-check of session 20: `hive pending` (the CLI) shows no grants line: egress and model behind a 12 KB command",
)
def test_hive_pending_shows_the_grants_of_a_spawn_behind_a_long_command(
    race_hive: HiveProcess,
) -> None:
    """**Broke (low, the CLI).** Round 24's model and turn timeout behind a 12 KB ``command``
    are now in the ``grants`` line, which the ``pending`` verb carries whole; but ``hive
    pending`` prints id, agent, kind, requested, description, the cut payload and sha256:
    no grants (nor ``allows``). The operator who approves from that listing (its sha256 is
    there to copy) sees neither the egress rule nor the model. Only ``hive show approval``
    prints the line."""
    h = race_hive
    spec = {
        "runtime": "command",
        "command": ["x" * 4000] * 3,
        "egress": ["exfil.rc20.example:443"],
        "model": "rc20-model-behind-the-cut",
        "turn_timeout": 86400,
    }
    req = cage_run(
        h,
        RACE_KEEP,
        f"""
        result(reply=call({{"cmd": "request_approval", "kind": "spawn", "description": "a helper",
                           "payload": {{"name": "rc20big", "spec": {spec!r}}}}}))
    """,
    )["reply"]
    assert req["ok"], req
    [row] = [a for a in h.host_call("pending")["approvals"] if a["id"] == req["id"]]
    assert "exfil.rc20.example:443" in row["grants"]  # the verb carries it
    out = subprocess.run(
        [str(HIVE), "--run-dir", str(h.run_dir), "pending", "--all"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "400"},
    )
    assert out.returncode == 0, out.stderr
    flat = "".join(out.stdout.split())
    assert f"{req['id']}" in flat and req["payload_sha256"][:12] in flat, out.stdout[-2000:]
    h.host_call("deny", id=req["id"], note="re-check")
    assert "exfil.rc20.example:443" in flat and "rc20-model-behind-the-cut" in flat, out.stdout[
        -3000:
    ]


# -- hive.toml edited to declare a spawned agent, then the core restarted by `hive up` -------

LOOP_LEAD, LOOP_KID = "rc20lp", "rc20kd"
LOOP_AGENTS: dict[str, dict[str, Any]] = {LOOP_LEAD: {"runtime": "command", "command": ["true"]}}


@pytest.fixture(scope="module")
def loop_hive() -> Iterator[HiveProcess]:
    yield from running_hive(HiveProcess(LOOP_AGENTS))


@pytest.mark.attack(
    "launcher.readiness",
    ref="re-check of session 20: DeclaredNameTaken when `hive up` restarts a killed core",
)
def test_a_core_restart_refused_by_declared_name_taken_says_so_in_one_line(
    loop_hive: HiveProcess,
) -> None:
    """Held (with a note): LOOP_LEAD's spawn of LOOP_KID is approved (the operator's own
    spawn of a declared name is adopted since: it remade that agent), then LOOP_KID is
    added to hive.toml while the
    hive runs (to keep it); the core is killed (kill -9) and `hive up` restarts it: the
    start is refused with the one line (no traceback) and exit status 78, and `hive up`
    says once that it waits for hive.toml to change (session 22: it retried every 10 s
    before, a core start each time), agents unreachable meanwhile, their cages running.
    hive.toml rewritten as it was: one more refusal, no more. Put back: the core comes
    back with both agents."""
    h = loop_hive
    req = assert_ok(
        h.agent_call(
            LOOP_LEAD,
            "request_approval",
            kind="spawn",
            description="a helper",
            payload={"name": LOOP_KID, "spec": {"command": ["true"]}},
        )
    )
    assert_ok(h.host_call("approve", id=req["id"], payload_sha256=req["payload_sha256"]))
    h.agents[LOOP_KID] = {"command": ["true"]}
    h.wait_running()
    lead_pids = h.cage_procs(LOOP_LEAD)
    log_at = h.log_path.stat().st_size
    h.write_config({**LOOP_AGENTS, LOOP_KID: {"runtime": "command", "command": ["true"]}})
    pid = h.core_pid()
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    line = (
        f"hive-core: hive.toml declares agent {LOOP_KID!r}, but {LOOP_KID!r} is an agent"
        f" spawned by {LOOP_LEAD!r}, not one hive.toml made: rename it in hive.toml, or take"
        f" it out, start the hive and `hive destroy {LOOP_KID}` first; nothing was changed"
    )

    def refusals() -> list[str]:
        with open(h.log_path, "rb") as f:
            f.seek(log_at)
            return [ln for ln in f.read().decode(errors="replace").splitlines() if line in ln]

    waiting = f"hive-core refused {h.config_path} (see its line above); it starts again once"

    def log_text() -> str:
        with open(h.log_path, "rb") as f:
            f.seek(log_at)
            return f.read().decode(errors="replace")

    wait_until(lambda: waiting in log_text(), 20, "the refusal and the wait")
    time.sleep(2.5)  # the old backoff (0.2, 0.4, 0.8 s, …) would have started it 3 times
    text = log_text()
    assert len(refusals()) == 1, text[-3000:]  # no start again while hive.toml is the same
    assert text.count(waiting) == 1, text[-3000:]
    assert "status 78" in text and "Traceback" not in text, text[-3000:]
    assert h.proc is not None and h.proc.poll() is None  # `hive up` runs on
    assert h.cage_procs(LOOP_LEAD) == lead_pids  # the cages run on
    h.write_config({**LOOP_AGENTS, LOOP_KID: {"runtime": "command", "command": ["true"]}})
    wait_until(lambda: len(refusals()) == 2, 20, "a second refusal after the rewrite")
    wait_until(lambda: log_text().count(waiting) == 2, 20, "waiting again")
    h.write_config({**LOOP_AGENTS})
    h.agents[LOOP_KID] = {"command": ["true"]}
    h.wait_running(timeout=30)
    assert sorted(h.agent_status()) == sorted([LOOP_LEAD, LOOP_KID])
    assert len(refusals()) == 2


# -- the grants line ----------------------------------------------------------------------


@pytest.mark.attack(
    "approval.hidden-grant",
    ref="re-check of session 20: the grants line against hostile model, peers and egress",
)
def test_the_grants_line_puts_every_real_grant_before_any_agent_text() -> None:
    """Held: a ``model`` that imitates the line (``; peers none; egress none``) and carries
    control characters comes after the real egress and peers and ahead of ``already a peer
    of``, which it can't remove; 1,000 peers are listed whole (bounded by the spec); an
    octal rule is shown as stored."""
    model = "m; egress none; peers none\r\x1b[2Kagent x: runtime command; egress none"
    peers = [f"p{i}" for i in range(1000)]
    payload = {
        "name": "rc20g",
        "spec": {
            "runtime": "command",
            "command": ["x" * 4096],
            "egress": ["010.0.0.1:443"],
            "peers": peers,
            "model": model,
            "turn_timeout": 86400,
        },
    }
    SpawnPayload.model_validate(payload)  # a payload the agent may ask for
    line = grants_of("spawn", payload, ["rc20lead"])
    assert line is not None
    head = f"agent rc20g: runtime command; egress 8.0.0.1:443; peers {', '.join(peers)};"
    assert line.startswith(head)
    assert line.endswith(f"; model {model}; turns up to 86400 s; already a peer of rc20lead")
    assert len(line) < 16_000


@pytest.mark.attack(
    "approval.hidden-grant",
    ref="re-check of session 20: NaN, inf, huge and bool turn timeouts",
)
@pytest.mark.parametrize("value", [math.nan, math.inf, -1, 0, 86400.5, 1e308, True])
def test_hostile_turn_timeouts_never_reach_a_grants_line(value: Any) -> None:
    """Held: the spawn payload's check refuses them (strict, 0 < t <= 24 h)."""
    payload = {"name": "rc20t", "spec": {"command": ["true"], "turn_timeout": value}}
    with pytest.raises(ValidationError):
        SpawnPayload.model_validate(payload)


@pytest.mark.attack(
    "config.hostile",
    ref="re-check of session 20: a hive.toml binding naming an undeclared (spawned later) agent",
)
def test_a_config_binding_for_an_agent_hive_toml_does_not_declare_is_refused() -> None:
    """Held: a ``[[secret_binding]]`` naming an agent hive.toml does not declare (one taken
    out, or one a hostile agent could spawn later under that name) is refused at load."""
    with pytest.raises(ValidationError) as e:
        HiveConfig.model_validate(
            {
                "agents": {"rc20a": {"runtime": "command", "command": ["true"]}},
                "secret_binding": [
                    {
                        "secret": "k",
                        "agents": ["rc20later"],
                        "to": "deploy.example:443",
                        "header": "x-k: {}",
                        "env": "K",
                    }
                ],
            }
        )
    assert "rc20later" in str(e.value)


# -- the CPU pacer ------------------------------------------------------------------------


def _drain(
    pacer: CpuPacer, agent: str, cpu: float, seconds: float, idle: dict[str, float]
) -> float:
    """``agent`` charges ``cpu`` seconds of CPU a second for ``seconds`` (simulated in 10 ms
    steps, sleeping its debt off as a relay does), while each of ``idle`` charges its
    amount once every 0.5 s; the CPU seconds ``agent`` got."""
    got = 0.0
    t = time.monotonic()
    end = t + seconds
    next_idle = t
    orig = time.monotonic
    clock = [t]
    time.monotonic = lambda: clock[0]  # type: ignore[assignment]
    try:
        while clock[0] < end:
            if clock[0] >= next_idle:
                for other, amount in idle.items():
                    pacer.owed(other, amount)
                next_idle += 0.5
            spent = cpu * 0.01
            wait = pacer.owed(agent, spent)
            got += spent
            clock[0] += 0.01 + wait
    finally:
        time.monotonic = orig  # type: ignore[assignment]
    return got / seconds


@pytest.mark.attack(
    "budget.exhaustion",
    ref="re-check of session 20: an agent near idle counted active halves another's CPU share",
)
def test_an_idle_agent_does_not_halve_another_agents_terminated_cpu() -> None:
    """**Broke (low), fixed (session 20: an agent counts as using some past 10 ms of CPU in
    the last second, or while it owes).** With ``terminated_cpu = 1`` and ``terminated_cpu_total = 1`` (the
    2-CPU defaults), an agent downloading alone gets 1 CPU; another that opens one small
    terminated connection every half second (4 ms of CPU: 0.008 CPU) drops it to 0.5, and
    three such to 0.25: the share an idle agent doesn't use is given to nobody."""
    alone = _drain(CpuPacer(1.0, 1.0), "rc20dl", 2.0, 20.0, {})
    beside_one = _drain(CpuPacer(1.0, 1.0), "rc20dl", 2.0, 20.0, {"rc20idle": 0.004})
    beside_three = _drain(
        CpuPacer(1.0, 1.0), "rc20dl", 2.0, 20.0, {f"rc20idle{i}": 0.004 for i in range(3)}
    )
    observed = {"alone": alone, "beside_one": beside_one, "beside_three": beside_three}
    print(observed)
    assert alone == pytest.approx(1.0, rel=0.1), observed
    # the idle agents use 0.008 CPU each: the downloader should keep (nearly) all the rest
    assert beside_one > 0.9, observed
    assert beside_three > 0.9, observed


@pytest.mark.attack(
    "budget.exhaustion",
    ref="re-check of session 20: a debt is never forgotten, and never carried forever",
)
def test_a_debt_survives_the_sweep_and_is_paid_off_once_the_agent_stops() -> None:
    """Held: an agent 3 s in debt at 1 CPU is kept by the sweep while in debt (its next
    charge still waits), and once its debt has been refilled and a second passed it is
    forgotten: the next charge waits nothing (no debt carried forever)."""
    pacer = CpuPacer(1.0, 1.0)
    clock = [1000.0]
    orig = time.monotonic
    time.monotonic = lambda: clock[0]  # type: ignore[assignment]
    try:
        pacer._swept = clock[0]
        assert pacer.owed("rc20d", 4.0) == pytest.approx(3.0)
        clock[0] += 1.5  # a sweep runs (another agent's charge): rc20d still owes 1.5 s
        pacer.owed("rc20o", 0.0)
        assert "rc20d" in pacer._buckets
        # 1.5 s refilled: 1.5 owed, 1.5 s to wait (rc20o's charges of nothing don't make
        # it an agent using some: rc20d keeps the whole share, session 20's fix)
        assert pacer.owed("rc20d", 0.0) == pytest.approx(1.5, abs=0.01)
        clock[0] += 10.0
        pacer.owed("rc20o", 0.0)
        assert "rc20d" not in pacer._buckets
        assert pacer.owed("rc20d", 0.01) == 0.0
    finally:
        time.monotonic = orig  # type: ignore[assignment]


@pytest.mark.attack(
    "budget.exhaustion",
    ref="re-check of session 20: a meter's charge when its relay raises, and a woken meter",
)
def test_a_meter_charges_a_relay_that_raises_and_a_woken_meter_never_sleeps() -> None:
    """Held: the CPU a thread spent before an exception is charged by the ``finally``'s
    ``pace``; once woken (the connection ended), a pause of any length returns at once,
    and the debt stays the agent's."""
    pacer = CpuPacer(0.1, 0.1)
    meter = CpuMeter(pacer, "rc20m")
    end = time.thread_time() + 0.15
    with pytest.raises(RuntimeError):
        try:
            while time.thread_time() < end:
                pass
            raise RuntimeError("bad record mac")
        finally:
            meter.wake()
            t0 = time.monotonic()
            meter.pace()
            assert time.monotonic() - t0 < 0.05
    tokens, _, _ = pacer._buckets["rc20m"]
    assert tokens < -0.04  # a burst of 0.1 less the 0.15 s spent: in debt
