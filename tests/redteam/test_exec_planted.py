"""``hive exec`` must not run code the agent planted, unless the operator trusts the home.

The agent controls its home: shell startup files, Python's user site and modules
next to where a script runs, git's and other tools' configuration. Each case plants
one such file (a hook that creates a marker file), then runs the operator's
command the plant is aimed at: by default (clean: HOME a fresh empty directory,
cwd /, PYTHONNOUSERSITE, PYTHONSAFEPATH) the marker must not appear; with
``--trust-home`` it must (so the plant is real, and the flag does what it says).
And the operator's ``--env`` may not set a name that would undo the clean
environment (HOME, PYTHONPATH, BASH_ENV, LD_PRELOAD, ...) without ``--trust-home``.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from hive_fixture import HIVE, HiveProcess, running_hive
from hyperhive.wire.priv import CLEAN_ENV_GUARDED

NAME = "rxplant"
AGENTS = {NAME: {"runtime": "command", "command": ["true"]}}
HOOK = ".rxhook.sh"  # planted executable: creates the marker (MARK)
USER_SITE = ".local/lib/python3.11/site-packages"
PY_TOUCH = "import pathlib; pathlib.Path('MARK').touch()\n"


@dataclass
class Plant:
    files: dict[str, str]  # path in the home -> content (MARK replaced by the marker's path)
    argv: list[str]
    flags: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    stdin: bytes = b""
    ref: str = "issue 11 (hive exec runs the agent's dotfiles)"


GIT_HOOK = {HOOK: "#!/bin/sh\ntouch MARK\nexit 1\n"}
PLANTS: dict[str, Plant] = {
    "bashrc": Plant({".bashrc": "touch MARK\n"}, ["bash", "-i", "-c", "true"]),
    "bashrc-interactive-tty": Plant(
        {".bashrc": "touch MARK\n"}, ["bash", "-i"], flags=("--tty",), stdin=b"exit\n"
    ),
    "bash_profile": Plant({".bash_profile": "touch MARK\n"}, ["bash", "-l", "-c", "true"]),
    "bash_login": Plant({".bash_login": "touch MARK\n"}, ["bash", "-l", "-c", "true"]),
    "profile": Plant({".profile": "touch MARK\n"}, ["sh", "-l", "-c", "true"]),
    "bash_logout": Plant({".bash_logout": "touch MARK\n"}, ["bash", "-l", "-c", "exit 0"]),
    "bash_env-planted-file": Plant(
        {".rxenv": "touch MARK\n"}, ["bash", "-c", "true"], env={"BASH_ENV": "/home/agent/.rxenv"}
    ),
    "user-site-pth": Plant(
        {f"{USER_SITE}/rx.pth": PY_TOUCH},
        ["python3", "-c", "pass"],
        ref="Python site.py .pth execution (CVE-2023-27043-style planted startup code)",
    ),
    "usercustomize": Plant({f"{USER_SITE}/usercustomize.py": PY_TOUCH}, ["python3", "-c", "pass"]),
    "module-in-cwd-c": Plant(
        {"json.py": PY_TOUCH},
        ["python3", "-c", "import json"],
        ref="Python sys.path[0] = cwd (PYTHONSAFEPATH, PEP 432)",
    ),
    "module-in-cwd-m": Plant(
        {"json.py": PY_TOUCH},
        ["python3", "-m", "json.tool", "/dev/null"],
        ref="Python sys.path[0] = cwd (PYTHONSAFEPATH, PEP 432)",
    ),
    "gitconfig-fsmonitor": Plant(
        {**GIT_HOOK, ".gitconfig": f"[core]\n\tfsmonitor = /home/agent/{HOOK}\n"},
        ["git", "-C", "/home/agent/rxrepo", "status"],
        ref="CVE-2022-24765 (git in a directory another user controls)",
    ),
    "xdg-git-config-fsmonitor": Plant(
        {**GIT_HOOK, ".config/git/config": f"[core]\n\tfsmonitor = /home/agent/{HOOK}\n"},
        ["git", "-C", "/home/agent/rxrepo", "status"],
        ref="CVE-2022-24765 (git in a directory another user controls)",
    ),
    "gitconfig-pager": Plant(
        {**GIT_HOOK, ".gitconfig": f"[core]\n\tpager = /home/agent/{HOOK}\n"},
        ["git", "-p", "config", "--list"],
        flags=("--tty",),
        ref="CVE-2022-24765 (git core.pager from a config another user wrote)",
    ),
    "gitconfig-alias": Plant({".gitconfig": "[alias]\n\tst = !touch MARK\n"}, ["git", "st"]),
    "repo-config-relative-to-cwd": Plant(
        {**GIT_HOOK, "rxrepo/.git/config.rx": f"[core]\n\tfsmonitor = /home/agent/{HOOK}\n"},
        ["git", "-C", "rxrepo", "status"],
        ref="CVE-2022-24765 (git in a directory another user controls)",
    ),
    "curlrc": Plant({".curlrc": 'output = "MARK"\n'}, ["curl", "-s", "file:///etc/hosts"]),
    "lesskey-lessopen": Plant(
        {**GIT_HOOK, ".lesskey": f"#env\nLESSOPEN = |/home/agent/{HOOK} %s\n"},
        ["less", "/etc/hosts"],
        flags=("--tty",),
        stdin=b"q",
        ref="less LESSOPEN input preprocessor set from a lesskey file",
    ),
    "vimrc": Plant(
        {".vimrc": "call writefile([], 'MARK')\n"}, ["vim", "-c", "qa!"], flags=("--tty",)
    ),
    "ssh-config-proxycommand": Plant(
        {**GIT_HOOK, ".ssh/config": f"Host rxhost\n\tProxyCommand /home/agent/{HOOK}\n"},
        ["ssh", "-o", "BatchMode=yes", "rxhost", "true"],
        ref="OpenSSH ProxyCommand from ~/.ssh/config",
    ),
}


@pytest.fixture(scope="module")
def rp() -> Iterator[HiveProcess]:
    h = HiveProcess(AGENTS)
    for hive in running_hive(h):
        # A repository of the agent's, for the git cases (the agent's own uid owns it).
        proc = h.exec(NAME, "git", "init", "-q", "/home/agent/rxrepo")
        assert proc.returncode == 0, proc.stderr
        yield hive


def operator_exec(
    h: HiveProcess, plant: Plant, extra: tuple[str, ...]
) -> subprocess.CompletedProcess[bytes]:
    env = [a for k, v in plant.env.items() for a in ("--env", f"{k}={v}")]
    cmd = [
        str(HIVE),
        "--run-dir",
        str(h.run_dir),
        "exec",
        *env,
        *plant.flags,
        *extra,
        NAME,
        "--",
        *plant.argv,
    ]
    return subprocess.run(cmd, input=plant.stdin, capture_output=True, timeout=60, check=False)


@pytest.mark.parametrize(
    "case",
    [
        pytest.param(k, marks=pytest.mark.attack("exec.planted-code", ref=p.ref))
        for k, p in sorted(PLANTS.items())
    ],
)
def test_planted_code_runs_only_with_trust_home(rp: HiveProcess, case: str) -> None:
    plant = PLANTS[case]
    h = rp
    home = h.home(NAME)
    cage = h.cage(NAME)
    marker = f"/home/agent/.planted-{secrets.token_hex(4)}"
    on_host = home / Path(marker).name
    planted: list[Path] = []
    # A planted module's bytecode, cached beside it: two cases plant json.py of the same
    # size within a second, and the second would run the first's stale .pyc (its marker).
    pycache = home / "__pycache__"
    had_pycache = pycache.exists()
    try:
        for rel, content in plant.files.items():
            path = home / rel.removesuffix(".rx")
            if path.exists():  # the repository's own config: add to it, put it back after
                shutil.copy(path, path.with_name(path.name + ".orig"))
                content = path.read_text() + content
            planted.append(path)
            for parent in reversed([p for p in path.relative_to(home).parents if str(p) != "."]):
                d = home / parent
                if not d.exists():
                    d.mkdir()
                    planted.append(d)
                os.chown(d, cage["uid"], cage["gid"])
            path.write_text(content.replace("MARK", marker))
            os.chown(path, cage["uid"], cage["gid"])
            os.chmod(path, 0o755 if rel == HOOK else 0o644)
        clean = operator_exec(h, plant, ())
        assert not on_host.exists(), (
            f"the agent's planted {case} ran by default: {clean.stderr[-500:]!r}"
        )
        trusted = operator_exec(h, plant, ("--trust-home",))
        assert on_host.exists(), (
            f"with --trust-home the planted {case} should run (is the plant real?): "
            f"{trusted.returncode} {trusted.stdout[-300:]!r} {trusted.stderr[-500:]!r}"
        )
    finally:
        on_host.unlink(missing_ok=True)
        if not had_pycache:
            shutil.rmtree(pycache, ignore_errors=True)
        for path in reversed(planted):
            orig = path.with_name(path.name + ".orig")
            if orig.exists():
                orig.replace(path)
            elif path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


@pytest.mark.attack(
    "exec.planted-code",
    ref="CVE-2017-5226-era sandboxes: env-borne startup code (LD_PRELOAD, BASH_ENV)",
)
@pytest.mark.parametrize("var", sorted(CLEAN_ENV_GUARDED))
def test_env_that_would_undo_the_clean_default_is_refused(rp: HiveProcess, var: str) -> None:
    h = rp
    home = h.home(NAME)
    marker = home / f".planted-{secrets.token_hex(4)}"
    cmd = [
        str(HIVE),
        "--run-dir",
        str(h.run_dir),
        "exec",
        "--env",
        f"{var}=/home/agent",
        NAME,
        "--",
        "sh",
        "-c",
        f"touch /home/agent/{marker.name}",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip() == (
        f"Error: --env {var} would undo the clean environment; add --trust-home to allow it"
    ), proc.stderr
    assert not marker.exists()
    trusted = subprocess.run(
        [*cmd[:4], "--trust-home", *cmd[4:]],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert marker.exists(), trusted.stderr  # with --trust-home the operator may
    marker.unlink()


# -- servers the agent leaves in shared places ---------------------------------------------------

# What the agent leaves where a client looks for its server: tmux's and screen's socket
# directories, an ssh ControlMaster socket and a bare socket.
SHARED_PLANTS = {
    "tmux server socket": "/tmp/tmux-{uid}/default",
    "screen socket": "/tmp/screens/S-agent/1.planted",
    "ssh ControlMaster socket": "/tmp/ssh-master-agent@host:22",
    "unix socket in /tmp": "/tmp/rx-planted.sock",
    # (the cage's /dev/shm is not the agent's to write: bwrap's /dev is root's)
}

PLANT_SOCKET = r"""
import os, socket, sys
path = sys.argv[1].format(uid=os.getuid())
os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
socket.socket(socket.AF_UNIX).bind(path)  # the socket file stays after we exit
print(path)
"""


@pytest.mark.attack(
    "exec.planted-code",
    ref="issue 11 (second red team: the operator's tmux attached to the agent's server in the cage's /tmp)",
)
@pytest.mark.parametrize("what", sorted(SHARED_PLANTS))
def test_servers_the_agent_left_in_tmp_are_not_the_operators(rp: HiveProcess, what: str) -> None:
    """The clean exec has a /tmp and /dev/shm of its own: a client (tmux, screen, ssh)
    looking for its server there finds none of the agent's. With --trust-home it
    shares the agent's (so the plant is real)."""
    planted = rp.exec(NAME, "python3", "-c", PLANT_SOCKET, SHARED_PLANTS[what])
    assert planted.returncode == 0, planted.stderr
    path = planted.stdout.strip()
    try:
        clean = rp.exec(NAME, "test", "-e", path, flags=())
        trusted = rp.exec(NAME, "test", "-e", path, flags=("--trust-home",))
        assert (clean.returncode, trusted.returncode) == (1, 0), (clean.stderr, trusted.stderr)
    finally:
        rp.exec(NAME, "rm", "-rf", path)
