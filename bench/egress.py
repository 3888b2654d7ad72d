"""Egress benchmark (root: real cages and a test network namespace).

The same client program against the same test server (tests/testnet.py, in a
network namespace on 198.18.43.0/24), run twice in one go:
  * direct: from the host's network namespace, no proxy (a cage has no route
    anywhere, so "direct" can only be measured from outside one);
  * proxied: from inside an agent's cage, through the harness's bridge on the
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

sys.path.insert(0, str(ROOT / "tests"))
from testnet import TestNet  # noqa: E402

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


def bench_egress(ctx: Context) -> list[Row]:
    rounds, mib, n = ctx.n(5, 3), ctx.n(256, 64), ctx.n(300, 60)
    with TestNet(43, prefix="hvbe") as net:
        net.serve(SERVER_ADDRESS, 80)
        hive = Hive({"net": {"command": ["true"], "egress": [f"{SERVER_ADDRESS}:80"]}})
        try:
            hive.start()
            hive.wait_running({"net"})
            in_cage = [str(Path(sys.executable).parent / "hive"), "--run-dir", str(hive.run_dir), "exec", "net", "--"]
            url = f"http://{SERVER_ADDRESS}"
            direct, proxied = [], []
            for _ in range(rounds):  # interleaved, so drift hits both alike
                direct.append(_curl_mb_s([], url, mib, "--noproxy", "*"))
                proxied.append(_curl_mb_s(in_cage, url, mib))
            lat: dict[str, list[float]] = {}
            for mode, prefix in (("direct", [sys.executable]), ("proxied", [*in_cage, "python3"])):
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
        Row(section, f"direct download ({mib} MiB, host netns) median of {rounds}", d50, "MB/s"),
        Row(section, f"through the proxy from a cage, median of {rounds}", p50, "MB/s"),
        Row(section, "proxied ÷ direct throughput", 100 * p50 / d50, "%", Target(">=", 50)),
        Row(section, f"small GET p50 direct / proxied ({n} requests)", lp, "ms",
            note=f"direct {ld:.3f} ms"),
        Row(section, "added latency per request p50", lp - ld, "ms", Target("<=", 2)),
    ]


EGRESS_BENCHMARKS = [bench_egress]
