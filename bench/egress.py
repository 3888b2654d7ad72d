"""Egress benchmark (root: real cages and a test network namespace).

The same client program against the same test server (tests/testnet.py, in a
network namespace on 198.18.43.0/24), run from the same cage, in one go:
  * direct: in the agent's cage (its mount, pid, ipc and uts namespaces, its
    uid, no capabilities, its seccomp filter) but in the host's network
    namespace, without the proxy: the cage's own network has no route, so
    this is the one thing changed;
  * proxied: `hive exec` in the cage, through the harness's bridge on the
    cage's loopback, egress.sock and hive-core's proxy.
Throughput: curl downloading N MiB; latency: sequential small GETs on fresh
connections (Python http.client), p50 of each, and the difference.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from cages import Hive  # type: ignore[import-not-found]
from run import ROOT, Context, Row, Target, percentile  # type: ignore[import-not-found]

from hyperhive.cage import layout
from hyperhive.client import priv_call
from hyperhive.wire.priv import CageStatus

sys.path.insert(0, str(ROOT / "tests"))
from testnet import TestNet

SERVER_ADDRESS = "198.18.43.2"

LATENCY = r"""
import http.client, json, sys, time
proxied = sys.argv[1] == "proxied"
n = int(sys.argv[2])
out = []
for i in range(n + 5):
    t0 = time.perf_counter()
    if proxied:
        c = http.client.HTTPConnection("127.0.0.1", 3128, timeout=10)
        c.request("GET", "http://%s/" % sys.argv[3])
    else:
        c = http.client.HTTPConnection(sys.argv[3], 80, timeout=10)
        c.request("GET", "/")
    r = c.getresponse(); r.read(); c.close()
    assert r.status == 200, r.status
    if i >= 5:  # warm-up
        out.append((time.perf_counter() - t0) * 1000)
print(json.dumps(out))
"""


def _curl_mb_s(argv_prefix: list[str], url: str, mib: int, *curl_args: str) -> float:
    proc = subprocess.run(
        [*argv_prefix, "curl", *curl_args, "-sS", "-o", "/dev/null", "-w", "%{http_code} %{size_download} %{speed_download}",
         f"{url}/bytes/{mib << 20}"], capture_output=True, text=True, timeout=300,
    )
    code, size, speed = proc.stdout.split()
    if code != "200" or int(size) != mib << 20:
        raise RuntimeError(f"download failed: {proc.stdout} {proc.stderr}")
    return float(speed) / 1e6


def _in_cage_host_net(hive: Hive, name: str) -> list[str]:
    """argv prefix: like `hive exec NAME --` (see priv/cages.py exec_argv), minus --net."""
    cage = priv_call(str(hive.run_dir / "priv.sock"), CageStatus(names=[name]))["cages"][name]
    return [
        "nsenter", "--target", str(cage["pid"]), "--mount", "--uts", "--ipc", "--pid", "--root",
        f"--wdns={layout.HOME}", "/usr/bin/setpriv", "--reuid", str(cage["uid"]), "--regid", str(cage["gid"]),
        "--clear-groups", "--inh-caps=-all", "--ambient-caps=-all", "--bounding-set=-all", "--no-new-privs",
        "--", "/usr/bin/env", "-i", f"PATH={layout.PATH}", f"HOME={layout.HOME}",
        *layout.python_argv("exec", "--"),
    ]


def bench_egress(ctx: Context) -> list[Row]:
    rounds, mib, n = ctx.n(5, 3), ctx.n(256, 64), ctx.n(300, 60)
    with TestNet(43, prefix="hvbe") as net:
        net.serve(SERVER_ADDRESS, 80)
        hive = Hive({"net": {"command": ["true"], "egress": [f"{SERVER_ADDRESS}:80"]}})
        try:
            hive.start()
            hive.wait_running({"net"})
            in_cage = [str(Path(sys.executable).parent / "hive"), "--run-dir", str(hive.run_dir), "exec", "net", "--"]
            direct_from_cage = _in_cage_host_net(hive, "net")
            who = subprocess.run([*direct_from_cage, "sh", "-c", "id -u; hostname"], capture_output=True,
                                 text=True, timeout=60).stdout.split()
            if who != [str(priv_call(str(hive.run_dir / "priv.sock"), CageStatus(names=["net"]))
                           ["cages"]["net"]["uid"]), "net"]:
                raise RuntimeError(f"the direct client is not in the cage: {who}")
            url = f"http://{SERVER_ADDRESS}"
            direct, proxied = [], []
            for _ in range(rounds):  # interleaved, so drift hits both alike
                direct.append(_curl_mb_s(direct_from_cage, url, mib, "--noproxy", "*"))
                proxied.append(_curl_mb_s(in_cage, url, mib))
            lat: dict[str, list[float]] = {}
            for mode, prefix in (("direct", [*direct_from_cage, "python3"]), ("proxied", [*in_cage, "python3"])):
                proc = subprocess.run([*prefix, "-c", LATENCY, mode, str(n), SERVER_ADDRESS],
                                      capture_output=True, text=True, timeout=300)
                if proc.returncode != 0:
                    raise RuntimeError(f"latency ({mode}) failed: {proc.stderr[-500:]}")
                lat[mode] = json.loads(proc.stdout)
        finally:
            hive.stop()
    d50, p50 = percentile(direct, 50), percentile(proxied, 50)
    ld, lp = percentile(lat["direct"], 50), percentile(lat["proxied"], 50)
    section = "egress"
    return [
        Row(section, f"direct download ({mib} MiB) from the cage, host netns, median of {rounds}", d50, "MB/s"),
        Row(section, f"through the proxy from a cage, median of {rounds}", p50, "MB/s"),
        Row(section, "proxied ÷ direct throughput", 100 * p50 / d50, "%", Target(">=", 50)),
        Row(section, f"small GET p50 direct / proxied ({n} requests)", lp, "ms",
            note=f"direct {ld:.3f} ms"),
        Row(section, "added latency per request p50", lp - ld, "ms", Target("<=", 2)),
    ]


EGRESS_BENCHMARKS = [bench_egress]
