"""hive-core's main: open the store, serve host.sock and every agent.sock,
deliver reminders, and shut down cleanly on SIGINT / SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from hyperhive.client import priv_call
from hyperhive.config import CONFIG_REFUSED, HiveConfig, origin_of
from hyperhive.core import received_fds
from hyperhive.core.agent_socket import AgentSockets, SocketsOnly
from hyperhive.core.budget import Budget, plan, raise_nofile, task_limit
from hyperhive.core.cages import CageLifecycle
from hyperhive.core.events import EventBus
from hyperhive.core.hive import Hive, Lifecycle
from hyperhive.core.host_socket import serve_host_socket
from hyperhive.core.refusals import Refused
from hyperhive.core.reminders import ReminderScheduler
from hyperhive.core.sessions import Sessions, load_or_create_token
from hyperhive.core.store import Store, StoreError
from hyperhive.core.store.agents import DeclaredNameTaken
from hyperhive.paths import RunDir, StateDir
from hyperhive.wire import priv as wp
from hyperhive.wire.secrets import parse_destination

log = logging.getLogger("hive.core")
HOST_SOCK, CORE_SOCK = "host.sock", "core.sock"  # LISTEN_FDNAMES of the handed listeners
PRUNE_EVERY = 60.0  # seconds between two prunes of the per-agent logs


@dataclass
class CoreOptions:
    config: HiveConfig
    run_dir: RunDir
    state_dir: StateDir
    synchronous: str = "NORMAL"
    priv_sock: Path | None = None  # with it, agents run in cages started by hive-priv
    # host.sock and core.sock as `hive up` or systemd bound them (socket activation);
    # empty: the core binds its own.
    handed: dict[str, socket.socket] = field(default_factory=dict)


def _own_dir(path: Path, mode: int) -> None:
    """Create ``path`` if missing; set its mode only if it is ours (hive up may own it)."""
    path.mkdir(parents=True, exist_ok=True)
    if path.stat().st_uid == os.geteuid():
        os.chmod(path, mode)


def check_budget(opts: CoreOptions) -> Budget:
    """Raise our descriptor limit to the hard one and check that every agent's budget
    adds up below it (and below the task limit); BudgetError (one line) if not."""
    budget = plan(opts.config, raise_nofile(), task_limit())
    log.info("%s", budget.line())
    print(f"hive-core: {budget.line()}", file=sys.stderr, flush=True)
    return budget


async def run_core(opts: CoreOptions) -> None:
    check_budget(opts)
    # Before any agent can hand anything over: a close that would wait on a sender's
    # linger is cut short (the main thread: Python installs handlers only there).
    received_fds.arm()
    _own_dir(opts.state_dir.root, 0o750)
    _own_dir(opts.run_dir.root, 0o755)
    if opts.priv_sock is None:
        _own_dir(opts.run_dir.agents, 0o755)

    store = Store(opts.state_dir.db, synchronous=opts.synchronous)
    removed, created = store.agents.sync_config(opts.config.agents)
    for name in removed:
        log.info("agent %s is no longer in hive.toml: deleted", name)
    store.bindings.replace_config(
        [
            (b.secret, list(b.agents), *parse_destination(b.to), b.header, b.env)
            for b in opts.config.secret_binding
        ]
    )
    limits = opts.config.limits
    sockets = AgentSockets(
        opts.run_dir, limits.agent_connections, manage_dirs=opts.priv_sock is None
    )
    lifecycle: Lifecycle = (
        SocketsOnly(sockets)
        if opts.priv_sock is None
        else CageLifecycle(sockets, opts.priv_sock, limits.disk_mib)
    )
    bus = EventBus()
    hive = Hive(store, opts.config, lifecycle, bus)
    # From the watchdog's thread: a close its cage holds for good is ended by a restart.
    core_loop = asyncio.get_running_loop()
    received_fds.when_stuck(
        lambda name: core_loop.call_soon_threadsafe(hive.cage_holds_a_close, name)
    )
    scheduler = ReminderScheduler(hive, bus)
    notifier = None
    if opts.config.notify.webhooks:  # listening before any agent can ask anything
        from hyperhive.core.notify import Notifier  # httpx: only for a hive with webhooks

        base_url = opts.config.notify.base_url or origin_of(opts.config.hive.listen)
        notifier = Notifier(opts.config.notify, base_url, store.links, bus)
        notifier.start()
        log.info(
            "notify: %d webhook(s), links to %s/n/…", len(opts.config.notify.webhooks), base_url
        )

    host = await serve_host_socket(hive, opts.run_dir.host_sock, opts.handed.get(HOST_SOCK))
    # The cages still running (a restart of the core) are served again before anything
    # else: every agent waits for it, the dashboard can wait half a second. Its code
    # (FastAPI, pydantic's schemas for it) is imported only then: a third of the start-up.
    # hive.toml's new agents first: what hive-priv holds of their names is a gone agent's.
    try:
        await hive.clear_leftovers(created)
    except Refused as e:  # that agent fails to start, as any start that fails
        log.error("%s", e)
    to_start = await hive.resume_running()
    leftovers = asyncio.create_task(hive.destroy_leftovers())
    from hyperhive.core.http import create_app, serve_http

    sessions = Sessions(
        load_or_create_token(opts.state_dir.root / "operator.token"), store.sessions
    )
    http_task, http_server = await serve_http(
        create_app(hive, sessions), opts.run_dir.core_sock, opts.handed.get(CORE_SOCK)
    )
    if (
        len(store.agents.all()) > opts.config.limits.max_agents
    ):  # spawned before the limit was lowered
        log.error(
            "%d agents exist, more than [limits] max_agents = %d: no more spawns until some are"
            " destroyed",
            len(store.agents.all()),
            opts.config.limits.max_agents,
        )
    await hive.resume_agents(to_start)
    scheduling = asyncio.create_task(scheduler.run())
    checkpointer = asyncio.create_task(checkpoint_loop(store))
    pruner = asyncio.create_task(prune_loop(store))
    limit_watch = asyncio.create_task(hive.watch_limits())
    swarm_task: asyncio.Task[None] | None = None
    if opts.config.swarm is not None:
        # Only here is nats imported: a hive without [swarm] never loads it.
        from hyperhive.swarm.bridge import Bridge

        bridge = Bridge(hive, opts.config.swarm)
        hive.swarm = bridge
        swarm_task = asyncio.create_task(bridge.run())

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    n = len(store.agents.all())
    log.info(
        "ready: host.sock at %s, %d agent(s), schema v%d",
        opts.run_dir.host_sock,
        n,
        store.schema_version,
    )
    print(f"hive-core: ready host.sock={opts.run_dir.host_sock} agents={n}", flush=True)
    # What start-up made (modules, templates, the app) lives as long as the core: out of
    # the collector's sight, a full collection no longer walks it (at 1,000 agents those
    # pauses were the dashboard's p99).
    gc.freeze()

    await stop.wait()
    log.info("shutting down (cages keep running)")
    scheduling.cancel()
    checkpointer.cancel()
    pruner.cancel()
    limit_watch.cancel()
    leftovers.cancel()
    if swarm_task is not None:
        swarm_task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await swarm_task
    if notifier is not None:
        await notifier.close()
    http_server.stop()
    try:
        await asyncio.wait_for(http_task, 5)
    except (TimeoutError, asyncio.CancelledError):
        http_task.cancel()
    if CORE_SOCK not in opts.handed:  # a handed one is root's: it outlives us (a restart)
        opts.run_dir.core_sock.unlink(missing_ok=True)
    host.close()
    await sockets.close_all()
    await hive.write_pending_egress()
    if HOST_SOCK not in opts.handed:
        opts.run_dir.host_sock.unlink(missing_ok=True)
    store.close()
    log.info("stopped")


async def checkpoint_loop(store: Store, every: float = 1.0) -> None:
    """Keep the WAL short without ever checkpointing inside a request."""
    while True:
        await asyncio.sleep(every)
        try:
            await asyncio.to_thread(store.checkpoint)
        except Exception as e:  # a full disk, say: requests will report it; keep trying
            log.warning("WAL checkpoint failed: %s", e)


async def prune_loop(store: Store, every: float = PRUNE_EVERY) -> None:
    """Keep each agent's logs to ``[limits] history_keep`` rows (see Store.prune_history);
    the egress log is also pruned as it grows."""
    while True:
        try:
            for row in store.agents.all():
                store.history.prune(row.name)
                await asyncio.sleep(0)  # one agent at a time: requests go on in between
        except StoreError as e:  # a full disk, say: keep trying
            log.warning("pruning the logs failed: %s", e)
        await asyncio.sleep(every)


def setup_logging() -> None:
    logging.basicConfig(
        level=os.environ.get("HIVE_LOG_LEVEL", "INFO").upper(),
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop]:
    """uvloop's event loop where it imports (libuv: the loop's turn and the sockets' I/O
    in C, which the 64-pair profile showed as a large share of the core's time); asyncio's
    own otherwise, which behaves the same, only slower."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop
    return uvloop.new_event_loop


def main_with(opts: CoreOptions) -> int:
    setup_logging()
    try:
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            runner.run(run_core(opts))
    except DeclaredNameTaken as e:  # hive.toml is refused: no start succeeds until it changes
        print(f"hive-core: {e}", file=sys.stderr)
        return CONFIG_REFUSED
    except Exception as e:  # one line for the operator; the traceback goes to the log
        log.debug("fatal", exc_info=True)
        print(f"hive-core: {e}", file=sys.stderr)
        return 1
    finally:
        release_held_cages(opts.priv_sock)
    return 0


HELD_GRACE = 0.5  # s for closes under way at the exit to end on their own
HELD_AFTER_STOP = 3.0  # s for them to end once their cages are stopped


def release_held_cages(priv_sock: Path | None) -> None:
    """Before the process exits (the loop is gone, whatever ended it): a thread asleep
    uninterruptibly on a lock a cage holds is not killed with the process, and keeps it
    from exiting (red team re-check of session 29: a core stopped while a cage held a close
    stayed for as long as the cage chose, and `hive down` with it). The cages of agents
    whose letting go is still under way are stopped from here, through hive-priv, their
    rows untouched: the next core starts them again."""
    if received_fds.wait_idle(HELD_GRACE):
        return
    for name in sorted(received_fds.held_by()):
        log.warning(
            "agent %s: a close of what its cage handed over is still under way at the"
            " core's exit: its cage is stopped (started again with the next core)",
            name,
        )
        if priv_sock is not None:
            try:
                reply = priv_call(str(priv_sock), wp.StopCage(name=name, timeout=0.0))
            except (OSError, ValueError) as e:
                reply = {"ok": False, "error": str(e)}
            if not reply.get("ok"):
                log.warning("agent %s: stopping its cage failed: %s", name, reply.get("error"))
    if not received_fds.wait_idle(HELD_AFTER_STOP):
        log.warning("closes still under way at the exit: %s", sorted(received_fds.held_by()))


def default_paths(run_dir: Path | None, state_dir: Path | None) -> tuple[RunDir, StateDir]:
    return RunDir(run_dir) if run_dir else RunDir(), StateDir(
        state_dir
    ) if state_dir else StateDir()
