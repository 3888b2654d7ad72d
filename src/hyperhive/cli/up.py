"""``hive up``: the whole hive in the foreground, playing the part systemd plays
in production: it starts each process, restarts one that dies, and on SIGINT /
SIGTERM stops everything cleanly."""

from __future__ import annotations

import asyncio
import grp
import logging
import pwd
import socket
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from collections.abc import Awaitable, Callable
from typing import Any

import click

from hyperhive.client import priv_call
from hyperhive.config import ConfigError, load_config, parse_listen
from hyperhive.gateway import config as gateway_config
from hyperhive.unixsock import bind_listener
from hyperhive.paths import DEFAULT_RUN_DIR, DEFAULT_STATE_DIR

log = logging.getLogger("hive.up")
READY_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0
MAX_BACKOFF = 10.0
EXIT_POLL = 0.05  # seconds between looks at whether a supervised process has exited
ADMIN_GROUP = "hive-admin"


def ensure_group(name: str) -> None:
    """Create a system group if it's missing (idempotent)."""
    try:
        grp.getgrnam(name)
    except KeyError:
        subprocess.run(["groupadd", "--system", name], check=True, capture_output=True)
        log.info("created group %s", name)


CORE_USER = "hive-core"
GATEWAY_USER = "hive-gateway"  # the gateway's workers; its group may reach the agents' pages


def ensure_user(name: str) -> None:
    """Create a system user with its own group, no home, no shell (idempotent)."""
    try:
        pwd.getpwnam(name)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--user-group", "--no-create-home", "--home-dir", "/nonexistent",
             "--shell", "/usr/sbin/nologin", name],
            check=True, capture_output=True,
        )
        log.info("created user %s", name)


class Supervised:
    """One child process, restarted with backoff if it dies while the hive runs.

    With ``own_group`` it runs in a session (and process group) of its own, and
    whatever is left in that group when it exits is killed before it starts
    again: an nginx master killed with SIGKILL leaves its workers running, and
    they would keep the listening port (the new master could not bind it) and
    serve with the old configuration."""

    def __init__(self, name: str, argv: list[str], ready_prefix: str | None,
                 ready_check: Callable[[], Awaitable[bool]] | None = None, own_group: bool = False,
                 **popen: Any) -> None:
        self.name = name
        self.argv = argv
        self.ready_prefix = ready_prefix
        self.ready_check = ready_check
        self.own_group = own_group
        self.popen = popen
        self.proc: asyncio.subprocess.Process | None = None
        self.stopping = False

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            *self.argv, stdout=asyncio.subprocess.PIPE, stdin=subprocess.DEVNULL,
            start_new_session=self.own_group, **self.popen
        )
        assert self.proc.stdout is not None
        deadline = time.monotonic() + READY_TIMEOUT
        while self.ready_check is not None:
            if await self.ready_check():
                break
            if self.proc.returncode is not None or time.monotonic() > deadline:
                if self.proc.returncode is None:
                    self.proc.kill()
                code = await self.exited()
                raise RuntimeError(f"{self.name} did not become ready (status {code}; its log is above)")
            await asyncio.sleep(0.05)
        while self.ready_check is None:
            try:
                line = await asyncio.wait_for(self.proc.stdout.readline(), deadline - time.monotonic())
            except TimeoutError:
                self.proc.kill()
                await self.exited()
                raise RuntimeError(f"{self.name} did not become ready within {READY_TIMEOUT:.0f} s") from None
            if not line:
                code = await self.exited()
                raise RuntimeError(f"{self.name} exited with status {code} before it was ready (its log is above)")
            if self.ready_prefix and line.decode(errors="replace").startswith(self.ready_prefix):
                break
        asyncio.ensure_future(self._drain(self.proc.stdout))

    @staticmethod
    async def _drain(stream: asyncio.StreamReader) -> None:
        while await stream.readline():
            pass

    async def exited(self) -> int:
        """Its exit status, as soon as it has exited (and its group, if its own, is cleared).

        Not ``proc.wait()``: on Python 3.11 that also waits until the stdout pipe is
        closed, and a process left behind (an nginx worker whose master was killed)
        holds it open for as long as it lives, so the exit would go unnoticed."""
        assert self.proc is not None
        while self.proc.returncode is None:
            await asyncio.sleep(EXIT_POLL)
        self.kill_group()
        return self.proc.returncode

    def kill_group(self) -> None:
        """SIGKILL whatever is left in its own process group (nothing, unless it died abruptly)."""
        if self.own_group and self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)  # the group's id is the leader's pid
            except ProcessLookupError:
                pass  # the group is empty
            else:
                log.warning("%s: killed the processes it left behind", self.name)

    async def supervise(self) -> None:
        backoff = 0.5
        while not self.stopping:
            code = await self.exited()
            if self.stopping:
                return
            log.error("%s exited with status %s; restarting in %.1f s", self.name, code, backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, MAX_BACKOFF)
            try:
                await self.start()
                backoff = 0.5
                log.info("%s is back", self.name)
            except RuntimeError as e:
                log.error("%s", e)

    async def stop(self) -> None:
        self.stopping = True
        if self.proc is None or self.proc.returncode is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.exited(), STOP_TIMEOUT)
        except TimeoutError:
            log.warning("%s did not stop within %.0f s; killing it", self.name, STOP_TIMEOUT)
            self.proc.kill()
            await self.exited()


class SocketActivated(Supervised):
    """hive-priv, the way systemd runs it: we hold the listening socket; the
    service gets it as fd 3. When the service exits, the socket stays open and the
    next connection starts it again."""

    def __init__(self, name: str, argv: list[str], listener: socket.socket) -> None:
        self.listener = listener
        activate = [sys.executable, "-m", "hyperhive.cli.socket_activate", str(listener.fileno()), "--"]
        super().__init__(name, activate + argv, "hive-priv: ready", pass_fds=(listener.fileno(),))

    async def supervise(self) -> None:
        loop = asyncio.get_running_loop()
        while not self.stopping:
            code = await self.exited()
            if self.stopping:
                return
            log.warning("%s exited with status %s; it starts again on the next connection", self.name, code)
            pending = loop.create_future()
            loop.add_reader(self.listener.fileno(), lambda: pending.done() or pending.set_result(None))
            try:
                await pending
            finally:
                loop.remove_reader(self.listener.fileno())
            if self.stopping:
                return
            try:
                await self.start()
                log.info("%s activated by a connection", self.name)
            except RuntimeError as e:
                log.error("%s", e)
                await asyncio.sleep(1.0)


def bind_priv_socket(path: Path, group: str) -> socket.socket:
    """priv.sock exactly as hive-priv.socket makes it: root:hive-core 0660 (we are root)."""
    return bind_listener(path, grp.getgrnam(group).gr_gid, 0o660)


def prepare_dirs(state_dir: Path, run_dir: Path) -> None:
    """Root owns the state and run directories; hive-core may add its own files
    (the database, its token, its sockets) but, both being sticky, never rename or
    replace root's (``priv/``, ``agents/``, ``priv.sock``): hive-priv trusts those."""
    core = pwd.getpwnam(CORE_USER)
    state_dir.mkdir(parents=True, exist_ok=True)
    os.chown(state_dir, 0, core.pw_gid)
    os.chmod(state_dir, 0o1770)
    # Sockets only. hive-core creates its own there; sticky, so it can't remove priv.sock.
    run_dir.mkdir(parents=True, exist_ok=True)
    os.chown(run_dir, 0, core.pw_gid)
    os.chmod(run_dir, 0o1775)
    for sub in ("agents", "ui"):
        path = run_dir / sub
        if path.is_symlink() or (path.exists() and path.stat().st_uid != 0):
            raise click.ClickException(f"{path} is not root's: refusing to start (remove it)")
        path.mkdir(exist_ok=True)
        os.chown(path, 0, 0)
        os.chmod(path, 0o711)


def read_token(state_dir: Path) -> str:
    """The operator's token, which hive-core wrote: read without following a link."""
    fd = os.open(state_dir / "operator.token", os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    with os.fdopen(fd) as f:
        return f.read(256).strip()


async def stop_all_cages(priv_sock: Path) -> bool:
    """Stop every running cage. False (the reasons logged) if any may still be running."""
    try:
        status = await asyncio.to_thread(priv_call, str(priv_sock), {"cmd": "status"})
        if not status.get("ok"):
            log.error("could not stop the cages: hive-priv: %s", status.get("error"))
            return False
        stopped = True
        for name, cage in status.get("cages", {}).items():
            if cage.get("running"):
                reply = await asyncio.to_thread(priv_call, str(priv_sock), {"cmd": "stop", "name": name})
                if reply.get("ok"):
                    log.info("cage %s stopped", name)
                else:
                    log.error("could not stop cage %s: %s", name, reply.get("error"))
                    stopped = False
        return stopped
    except (OSError, ValueError) as e:
        log.error("could not stop the cages: %s", e)
        return False


def tcp_ready(listen: str) -> Callable[[], Awaitable[bool]]:
    host, port = parse_listen(listen)

    async def check() -> bool:
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 1.0)
        except (OSError, TimeoutError):
            return False
        writer.close()
        return True

    return check


async def run_hive(config: Path | None, state_dir: Path, run_dir: Path, listen: str) -> int:
    ensure_group(ADMIN_GROUP)
    ensure_user(CORE_USER)
    ensure_user(GATEWAY_USER)
    prepare_dirs(state_dir, run_dir)
    priv_sock = run_dir / "priv.sock"
    listener = bind_priv_socket(priv_sock, CORE_USER)
    priv = SocketActivated(
        "hive-priv",
        [sys.executable, "-m", "hyperhive.priv", "--run-dir", str(run_dir), "--state-dir", str(state_dir),
         "--core-user", CORE_USER, "--gateway-group", GATEWAY_USER],
        listener,
    )
    argv = [sys.executable, "-m", "hyperhive.core", "--run-dir", str(run_dir), "--state-dir", str(state_dir),
            "--listen", listen, "--priv-sock", str(priv_sock)]
    if config is not None:
        argv += ["--config", str(config)]
    core = Supervised(
        "hive-core", argv, "hive-core: ready",
        # Member of hive-admin and hive-gateway only to give host.sock and core.sock their groups.
        user=CORE_USER, group=CORE_USER, extra_groups=[ADMIN_GROUP, GATEWAY_USER],
    )
    nginx_conf = gateway_config.write(listen, run_dir, GATEWAY_USER)
    gateway = Supervised("gateway", ["nginx", "-c", str(nginx_conf)], None, ready_check=tcp_ready(listen),
                         own_group=True, stderr=None)
    print(f"hive: starting (state {state_dir}, sockets {run_dir})", flush=True)
    try:
        await priv.start()
        await core.start()
        await gateway.start()
    except RuntimeError as e:
        print(f"hive: {e}", file=sys.stderr)
        await gateway.stop()
        await core.stop()
        await priv.stop()
        return 1
    token = read_token(state_dir)
    host, port = parse_listen(listen)
    login = f"http://{host}:{port}/login?token={token}"
    print(f"hive: ready: log in at {login} (operator socket {run_dir / 'host.sock'})", flush=True)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    watchers = [asyncio.ensure_future(p.supervise()) for p in (core, priv, gateway)]
    await stop.wait()
    print("hive: stopping", flush=True)
    await gateway.stop()
    await core.stop()
    cages_stopped = await stop_all_cages(priv_sock)
    await priv.stop()
    for w in watchers:
        w.cancel()
    listener.close()
    priv_sock.unlink(missing_ok=True)
    if not cages_stopped:
        print("hive: stopped, but some cages may still be running (see the log above)", file=sys.stderr, flush=True)
        return 1
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
    if os.geteuid() != 0:
        raise click.ClickException("hive up must run as root: like systemd, it creates users, binds priv.sock "
                                   "and starts hive-priv; hive-core itself runs as user hive-core")
    raise SystemExit(asyncio.run(run_hive(config, state_dir.absolute(), Path(run_dir).absolute(), cfg.hive.listen)))
