"""``hive exec NAME -- CMD...``: run a command inside an agent's cage, as the agent.

hive-priv does it (root only). Our stdin/stdout/stderr go to hive-priv, which keeps
them and relays bytes: the command gets unix sockets (not pipes: a cage process
could hold a pipe's lock, and hive-priv's relay with it), or a pty of hive-priv's when
our stdin and stdout are a terminal (we then put ours in raw mode, and restore it).
No descriptor of ours ever enters the cage. The command runs in a pid namespace of
its own that nothing in the cage can see, with a fresh empty HOME and cwd / (the
agent's dotfiles don't run) unless --trust-home; everything it started is killed
when it ends. Its exit status becomes ours."""

from __future__ import annotations

import base64
import contextlib
import os
import shutil
import sys
import termios
import threading
import tty as ttymod
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import click
from pydantic import ValidationError

from hyperhive.client import Client, HiveUnavailable, priv_call
from hyperhive.display import dumps, visible
from hyperhive.wire import priv as wp
from hyperhive.wire.framing import describe_validation_error
from hyperhive.wire.secrets import placeholder_var

EPILOG = """\b
By default the command runs clean: env -i with the hive's base environment, HOME a
fresh empty directory (/home/exec, private to this exec), cwd /, PYTHONNOUSERSITE=1
and PYTHONSAFEPATH=1: nothing the agent planted in its home runs. The variables of
its secret bindings hold their placeholders, as in the agent's turns. --env may not set
HOME, PYTHON{PATH,HOME,STARTUP,USERBASE,NOUSERSITE,SAFEPATH}, BASH_ENV, ENV or
LD_{PRELOAD,LIBRARY_PATH,AUDIT} without --trust-home; any other value you pass is
yours to judge (a PATH entry in /home/agent or /tmp runs the agent's code).

\b
Without a pty the command's stdin, stdout and stderr are unix sockets, not pipes:
opening /dev/stdin, /dev/stdout or /dev/stderr by name fails (ENXIO), so write
">&2", not ">/dev/stderr", or pass -t for a pty.

\b
Examples:
  hive exec alice -- ls -la /home/agent
  hive exec alice -- bash -i            # a clean interactive shell (a pty)
  hive exec --trust-home alice -- make  # in the agent's home, its dotfiles too

\b
--json prints, once the command has ended, one line:
  {"version": 1, "ok": true, "exit_status": 0, "stdout": "...", "stdout_bytes": 4,
   "stderr": "...", "stderr_bytes": 0}
stdout and stderr are the bytes as UTF-8 text; when they are not valid UTF-8,
stdout_base64 / stderr_base64 carry them exactly. At most 16 MiB of each is kept
(the *_bytes counts are still of everything; "stdout_truncated": true says so).
Stdin is still ours. A refusal is {"version": 1, "ok": false, "error": "..."}, exit 1;
otherwise the exit status is the command's.
"""
CAPTURE_MAX = 16 << 20  # bytes of each output --json keeps (the counts go on past it)


def _runtime_env(host_sock: Path, name: str) -> dict[str, str]:
    """The agent's runtime's variables beyond the base environment (its secret bindings'
    placeholders), from hive-core, so the command sees what the agent's turns see. Without
    them if hive-core can't say: then hive-priv's own refusal follows (not root, the hive
    not running, no such agent), and nothing else is said."""
    try:
        with Client(host_sock, timeout=10) as c:
            reply = c.call("agent_env", name=name)
    except (HiveUnavailable, OSError, ValueError):
        return {}
    env = reply.get("env") if reply.get("ok") else None
    if not isinstance(env, dict):
        return {}
    # Only placeholders in variables a binding may name: this runs as root, and what a
    # compromised hive-core says here must not be PATH=/home/agent/bin:... or
    # GIT_SSH_COMMAND=... for a clean exec (red team round 6).
    return {k: v for k, v in env.items() if placeholder_var(k, v)}


@click.command("exec", context_settings={"ignore_unknown_options": True}, epilog=EPILOG)
@click.option(
    "--env",
    "env",
    multiple=True,
    metavar="KEY=VALUE",
    help="Set in the command's environment (repeatable).",
)
@click.option(
    "--tty/--no-tty",
    "-t/-T",
    "want_tty",
    default=None,
    help="A pty for the command (default: when stdin and stdout are a terminal).",
)
@click.option(
    "--trust-home",
    is_flag=True,
    help="HOME and cwd = the agent's home: its .bashrc, .profile, .pth files, ... run.",
)
@click.option(
    "--as-agent",
    is_flag=True,
    help="Run in the cage's own pid namespace, exactly like the agent's processes (implies "
    "--trust-home): they can see it, trace it, read its environment and memory. "
    "For tests and debugging; never with secrets.",
)
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Capture the command's stdout and stderr and print one JSON object: exit_status, "
    "stdout, stderr (text) and their byte counts (no pty; see below).",
)
@click.argument("name")
@click.argument("argv", nargs=-1, required=True, type=click.UNPROCESSED)
@click.pass_context
def exec_cmd(
    ctx: click.Context,
    name: str,
    argv: tuple[str, ...],
    env: tuple[str, ...],
    want_tty: bool | None,
    trust_home: bool,
    as_agent: bool,
    as_json: bool,
) -> None:
    """Run ARGV in agent NAME's cage as the agent (root only).

    Same uid, cgroup, network and files as the agent, no capabilities, the cage's
    seccomp filter; but a pid namespace of its own, so nothing the agent runs can
    see it, read it or outlive it. Exits with ARGV's exit status."""
    priv_sock: Path = ctx.obj["run_dir"] / "priv.sock"

    def fail(message: str) -> NoReturn:
        if as_json:
            click.echo(dumps({"version": 1, "ok": False, "error": message}))
            sys.exit(1)
        raise click.ClickException(visible(message, one_line=True))

    environment = _runtime_env(ctx.obj["run_dir"] / "host.sock", name)
    for item in env:
        key, sep, value = item.partition("=")
        if not sep:
            fail(f"--env {item!r}: expected KEY=VALUE")
        environment[key] = value
    if as_json and want_tty:
        fail("--json captures stdout and stderr apart: it takes no --tty")
    if want_tty is None:
        want_tty = not as_json and os.isatty(0) and os.isatty(1)
    size = shutil.get_terminal_size() if want_tty else None
    try:
        # The same checks hive-priv makes, and the same one-line refusals.
        request = wp.Exec(
            name=name,
            argv=list(argv),
            env=environment,
            tty=wp.Tty(rows=max(size.lines, 1), cols=max(size.columns, 1)) if size else None,
            trust_home=trust_home,
            as_agent=as_agent,
        )
    except ValidationError as e:
        fail(describe_validation_error(e, tagged=False))
    captures = (Capture(), Capture()) if as_json else None
    try:
        with _raw(0 if want_tty else None):
            if captures is None:
                reply = priv_call(str(priv_sock), request, fds=[0, 1, 2], timeout=None)
            else:
                fds = [0, captures[0].write_end, captures[1].write_end]
                try:
                    reply = priv_call(str(priv_sock), request, fds=fds, timeout=None)
                finally:
                    for c in captures:
                        os.close(c.write_end)
                for c in captures:  # hive-priv closed its copies before it replied: EOF
                    c.thread.join()
    except PermissionError:
        fail(f"hive exec needs root (permission denied on {priv_sock})")
    except (FileNotFoundError, ConnectionRefusedError):
        fail(f"the hive is not running: can't connect to {priv_sock}")
    except ConnectionError as e:
        fail(str(e))
    except KeyboardInterrupt:
        # Only without a pty (with one, ^C goes to the command). hive-priv keeps our
        # descriptors and the command runs on until it ends: say so, in one line.
        fail("interrupted; the command runs on in the cage until it ends")
    if not reply.get("ok"):
        fail(str(reply.get("error")))
    status = int(reply["exit_status"])
    if captures is not None:
        out: dict[str, Any] = {"version": 1, "ok": True, "exit_status": status}
        for name, c in zip(("stdout", "stderr"), captures, strict=True):
            out.update(c.fields(name))
        click.echo(dumps(out))
        sys.stdout.flush()
    os._exit(status)


class Capture:
    """One output of the command, for --json: a pipe whose write end goes to hive-priv
    (which relays the command's bytes into it) and a thread that reads it to EOF,
    keeping the first CAPTURE_MAX bytes and counting all (it never stops reading: a
    command that writes more is not blocked)."""

    def __init__(self) -> None:
        self.read_end, self.write_end = os.pipe()
        self.kept = bytearray()
        self.total = 0
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        with os.fdopen(self.read_end, "rb", buffering=0) as f:
            while chunk := f.read(1 << 16):
                self.total += len(chunk)
                room = CAPTURE_MAX - len(self.kept)
                if room > 0:
                    self.kept += chunk[:room]

    def fields(self, name: str) -> dict[str, Any]:
        data = bytes(self.kept)
        out: dict[str, Any] = {name: data.decode("utf-8", errors="replace")}
        out[f"{name}_bytes"] = self.total
        try:
            data.decode("utf-8")
        except UnicodeDecodeError as e:
            # Cut at the 16 MiB mark inside a character is still text: only a bad byte
            # before the end needs the exact bytes.
            if not (self.total > len(data) and e.start >= len(data) - 3):
                out[f"{name}_base64"] = base64.b64encode(data).decode()
        if self.total > len(data):
            out[f"{name}_truncated"] = True
        return out


@contextlib.contextmanager
def _raw(fd: int | None) -> Iterator[None]:
    """Our terminal in raw mode while the command has the pty (keys, ^C and ^D go to
    it, its own line discipline echoes), restored whatever happens."""
    if fd is None or not os.isatty(fd):
        yield
        return
    saved = termios.tcgetattr(fd)
    try:
        ttymod.setraw(fd)
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSAFLUSH, saved)
