"""``hive up``: the whole hive in the foreground, playing the part systemd plays
in production: it starts each process, restarts one that dies, and on SIGINT /
SIGTERM stops everything cleanly."""

from __future__ import annotations

import asyncio
import grp
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import click

from hyperhive.config import ConfigError, load_config
from hyperhive.paths import DEFAULT_RUN_DIR, DEFAULT_STATE_DIR

log = logging.getLogger("hive.up")
READY_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0
MAX_BACKOFF = 10.0
ADMIN_GROUP = "hive-admin"


def ensure_group(name: str) -> None:
    """Create a system group if it's missing (idempotent)."""
    try:
        grp.getgrnam(name)
    except KeyError:
        subprocess.run(["groupadd", "--system", name], check=True, capture_output=True)
        log.info("created group %s", name)


class Supervised:
    """One child process, restarted with backoff if it dies while the hive runs."""

    def __init__(self, name: str, argv: list[str], ready_prefix: str) -> None:
        self.name = name
        self.argv = argv
        self.ready_prefix = ready_prefix
        self.proc: asyncio.subprocess.Process | None = None
        self.stopping = False

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            *self.argv, stdout=asyncio.subprocess.PIPE, stdin=subprocess.DEVNULL
        )
        assert self.proc.stdout is not None
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            try:
                line = await asyncio.wait_for(self.proc.stdout.readline(), deadline - time.monotonic())
            except TimeoutError:
                self.proc.kill()
                raise RuntimeError(f"{self.name} did not become ready within {READY_TIMEOUT:.0f} s") from None
            if not line:
                code = await self.proc.wait()
                raise RuntimeError(f"{self.name} exited with status {code} before it was ready (its log is above)")
            if line.decode(errors="replace").startswith(self.ready_prefix):
                break
        asyncio.ensure_future(self._drain(self.proc.stdout))

    @staticmethod
    async def _drain(stream: asyncio.StreamReader) -> None:
        while await stream.readline():
            pass

    async def supervise(self) -> None:
        backoff = 0.5
        while not self.stopping:
            assert self.proc is not None
            code = await self.proc.wait()
            if self.stopping:
                return
            log.error("%s exited with status %s; restarting in %.1f s", self.name, code, backoff)
            print(f"hive: {self.name} exited with status {code}; restarting", file=sys.stderr, flush=True)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, MAX_BACKOFF)
            try:
                await self.start()
                backoff = 0.5
                print(f"hive: {self.name} is back", file=sys.stderr, flush=True)
            except RuntimeError as e:
                log.error("%s", e)

    async def stop(self) -> None:
        self.stopping = True
        if self.proc is None or self.proc.returncode is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.proc.wait(), STOP_TIMEOUT)
        except TimeoutError:
            log.warning("%s did not stop within %.0f s; killing it", self.name, STOP_TIMEOUT)
            self.proc.kill()
            await self.proc.wait()


async def run_hive(config: Path | None, state_dir: Path, run_dir: Path, listen: str) -> int:
    argv = [sys.executable, "-m", "hyperhive.core", "--run-dir", str(run_dir), "--state-dir", str(state_dir),
            "--listen", listen]
    if config is not None:
        argv += ["--config", str(config)]
    core = Supervised("hive-core", argv, "hive-core: ready")
    print(f"hive: starting hive-core (state {state_dir}, sockets {run_dir})", flush=True)
    try:
        await core.start()
    except RuntimeError as e:
        print(f"hive: {e}", file=sys.stderr)
        return 1
    print(f"hive: ready; operator socket {run_dir / 'host.sock'}; try: hive --run-dir {run_dir} status", flush=True)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    watcher = asyncio.ensure_future(core.supervise())
    await stop.wait()
    print("hive: stopping", flush=True)
    await core.stop()
    watcher.cancel()
    print("hive: stopped", flush=True)
    return 0


@click.command("up")
@click.option("--config", type=click.Path(path_type=Path, exists=True, dir_okay=False), help="hive.toml")
@click.option("--state-dir", type=click.Path(path_type=Path), default=DEFAULT_STATE_DIR, show_default=True)
@click.option("--run-dir", "up_run_dir", type=click.Path(path_type=Path), help=f"Sockets (default {DEFAULT_RUN_DIR}).")
@click.option("--listen", help="HOST:PORT for the gateway (default [hive] listen or 127.0.0.1:8080).")
@click.pass_context
def up(ctx: click.Context, config: Path | None, state_dir: Path, up_run_dir: Path | None, listen: str | None) -> None:
    """Run the whole hive in the foreground until SIGINT / SIGTERM."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    run_dir = up_run_dir or ctx.obj.get("run_dir") or DEFAULT_RUN_DIR
    try:
        cfg = load_config(config, listen)
    except ConfigError as e:
        raise click.ClickException(str(e)) from None
    if os.geteuid() == 0:
        ensure_group(ADMIN_GROUP)
    raise SystemExit(asyncio.run(run_hive(config, state_dir.absolute(), Path(run_dir).absolute(), cfg.hive.listen)))
