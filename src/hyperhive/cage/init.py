"""The cage's init: the only process in a cage with any capability (CAP_SETUID,
CAP_SETGID, CAP_SETPCAP, nothing else), used only to start the harness as its own
uid with no capabilities, no bounding set and no_new_privs. It restarts a harness
that dies, with backoff, and on SIGTERM exits, which ends the whole cage."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time

from hyperhive.cage import seccomp
from hyperhive.cage.layout import python_argv

MAX_BACKOFF = 10.0


def drop_to(uid: int, gid: int) -> list[str]:
    """setpriv argv that becomes uid:gid for good before running the rest."""
    return [
        "/usr/bin/setpriv", "--reuid", str(uid), "--regid", str(gid), "--clear-groups",
        "--inh-caps=-all", "--ambient-caps=-all", "--bounding-set=-all", "--no-new-privs", "--",
    ]


def main(args: list[str]) -> None:
    p = argparse.ArgumentParser(prog="cage-init")
    p.add_argument("--uid", type=int, required=True)
    p.add_argument("--gid", type=int, required=True)
    p.add_argument("--harness-uid", type=int, required=True)
    opts = p.parse_args(args)
    if opts.uid == 0 or opts.harness_uid == 0 or opts.gid == 0:
        print("cage-init: refusing to run anything as root", file=sys.stderr)
        raise SystemExit(2)
    seccomp.install()  # no user namespaces for anything this cage runs

    def on_term(signum: int, frame: object) -> None:
        # Init can't signal the harness (another uid, no CAP_KILL) and needn't:
        # when init exits, bwrap ends the pid namespace and the kernel kills the rest.
        os._exit(0)

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    backoff = 0.5
    while True:
        started = time.monotonic()
        child = subprocess.Popen(drop_to(opts.harness_uid, opts.gid) + python_argv("harness"), stdin=subprocess.DEVNULL)
        code = child.wait()
        print(f"cage-init: harness exited with status {code}; restarting in {backoff:.1f} s", file=sys.stderr, flush=True)
        time.sleep(backoff)
        backoff = 0.5 if time.monotonic() - started > 60 else min(backoff * 2, MAX_BACKOFF)
