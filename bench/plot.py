"""The scale figure (issue 17): cage cold start and idle memory per cage against the
number of cages running, from bench/scale.py's sweep. matplotlib (the `bench`
dependency group) is imported here only, so the benchmarks run without it."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any


def plot_scale(points: Sequence[Any], path: Path, title: str) -> None:
    """Two panels sharing a log x axis: cold start p50/p99 (ms) and MiB per idle cage."""
    import matplotlib

    matplotlib.use("Agg")  # no display: a file only
    import matplotlib.pyplot as plt

    xs = [p.running for p in points]
    fig, (ax1, ax2) = plt.subplots(2, 1, sharex=True, figsize=(7, 6.5), dpi=100)
    ax1.plot(xs, [p.start_p50 for p in points], "o-", label="p50")
    ax1.plot(xs, [p.start_p99 for p in points], "s--", label="p99")
    ax1.axhline(60, color="grey", lw=0.8, ls=":", label="target p50 60 ms")
    ax1.set_ylabel("cold start (ms)\nstart → harness connected")
    ax1.set_ylim(bottom=0)
    ax1.legend(loc="upper left", fontsize="small")
    ax2.plot(xs, [p.mem_mib for p in points], "o-", color="tab:green", label="mean per cage")
    ax2.axhline(10, color="grey", lw=0.8, ls=":", label="target 10 MiB")
    ax2.set_ylabel("idle memory per cage (MiB)\ncgroup charge")
    ax2.set_ylim(bottom=0)
    ax2.legend(loc="lower left", fontsize="small")
    ax2.set_xscale("log")
    ax2.set_xticks(xs, [str(x) for x in xs])
    ax2.minorticks_off()
    ax2.set_xlabel("cages running")
    for ax in (ax1, ax2):
        ax.grid(True, alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
