"""What the exec holders of sessions 30's red teams share.

A holder is a process of the agent's, started by a first ``hive exec --as-agent`` and so
outliving the operator's exec, that is handed the exec's stdio over a socket in the
agent's home. ``HOLD_KIT`` is the in-cage half (prepend it to a holder's script);
``start_holder`` runs one and waits until it listens.
"""

from __future__ import annotations

import subprocess

from hive_fixture import HIVE, HiveProcess

# In the cage: ``take(tag, n)`` listens on ~/hold-TAG.sock (clearing ~/stop-TAG), says
# {"listening": path} on stdout, and returns (message, descriptors) of the first sender.
HOLD_KIT = r"""
import json, os, socket
def take(tag, n):
    path = os.path.expanduser(f"~/hold-{tag}.sock")
    for p in (path, os.path.expanduser(f"~/stop-{tag}")):
        if os.path.exists(p):
            os.unlink(p)
    lst = socket.socket(socket.AF_UNIX)
    lst.bind(path)
    lst.listen(1)
    print(json.dumps({"listening": path}), flush=True)
    conn, _ = lst.accept()
    msg, fds, _, _ = socket.recv_fds(conn, 64, n)
    return msg, fds
"""


def start_holder(hive: HiveProcess, agent: str, script: str, *args: str) -> subprocess.Popen[str]:
    """Runs ``HOLD_KIT + script`` as ``agent`` in the background; returns once it listens."""
    p = subprocess.Popen(
        [str(HIVE), "--run-dir", str(hive.run_dir), "exec", "--as-agent", agent, "--",
         "python3", "-c", HOLD_KIT + script, *args],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    assert p.stdout is not None
    line = p.stdout.readline()
    assert "listening" in line, (line, p.stderr.read() if p.poll() is not None else "")
    return p
