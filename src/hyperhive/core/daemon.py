"""hive-core's main: open the store, serve host.sock and every agent.sock,
deliver reminders, and shut down cleanly on SIGINT / SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

from hyperhive.config import HiveConfig
from hyperhive.core.agent_socket import AgentSockets
from hyperhive.core.hive import Hive
from hyperhive.core.host_socket import serve_host_socket
from hyperhive.core.reminders import ReminderScheduler
from hyperhive.core.store import Store
from hyperhive.paths import RunDir, StateDir

log = logging.getLogger("hive.core")


@dataclass
class CoreOptions:
    config: HiveConfig
    run_dir: RunDir
    state_dir: StateDir
    synchronous: str = "NORMAL"


async def run_core(opts: CoreOptions) -> None:
    opts.state_dir.root.mkdir(parents=True, exist_ok=True)
    os.chmod(opts.state_dir.root, 0o750)
    opts.run_dir.root.mkdir(parents=True, exist_ok=True)
    os.chmod(opts.run_dir.root, 0o755)
    opts.run_dir.agents.mkdir(exist_ok=True)

    store = Store(opts.state_dir.db, synchronous=opts.synchronous)
    store.sync_config_agents(opts.config.agents)
    sockets = AgentSockets(opts.run_dir)
    hive = Hive(store, opts.config, sockets)
    sockets.hive = hive

    host = await serve_host_socket(hive, opts.run_dir.host_sock)
    for row in store.agents():
        if not row["stopped"]:
            await sockets.start(row["name"])
    scheduler = asyncio.create_task(ReminderScheduler(hive).run())

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    n = len(store.agents())
    log.info("ready: host.sock at %s, %d agent(s), schema v%d", opts.run_dir.host_sock, n, store.schema_version)
    print(f"hive-core: ready host.sock={opts.run_dir.host_sock} agents={n}", flush=True)

    await stop.wait()
    log.info("shutting down")
    scheduler.cancel()
    host.close()
    await sockets.close_all()
    opts.run_dir.host_sock.unlink(missing_ok=True)
    store.close()
    log.info("stopped")


def setup_logging() -> None:
    logging.basicConfig(
        level=os.environ.get("HIVE_LOG_LEVEL", "INFO").upper(),
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )


def main_with(opts: CoreOptions) -> int:
    setup_logging()
    try:
        asyncio.run(run_core(opts))
    except Exception as e:  # one line for the operator; the traceback goes to the log
        log.debug("fatal", exc_info=True)
        print(f"hive-core: {e}", file=sys.stderr)
        return 1
    return 0


def default_paths(run_dir: Path | None, state_dir: Path | None) -> tuple[RunDir, StateDir]:
    return RunDir(run_dir) if run_dir else RunDir(), StateDir(state_dir) if state_dir else StateDir()
