"""An agent's cage hitting its limits, told to the operator (red team round 17: the kernel
enforced them and nobody heard). hive-priv's ``status`` gives each cage's counts since its
cgroup was made (``oom_kills``, ``pids_refused``); the core reads them every
``LIMITS_POLL`` seconds and, when one grew, publishes one line on the agent's
``agent_status`` event (``trouble``; core/notify.py sends it to the operator's webhooks),
at most once per ``NOTE_INTERVAL`` per agent and counter: a fork bomb refused 10,000 times
is one line with the total, not 10,000.

Baseline: the first read after the core starts. The counts live in the cgroup, which
outlives the core (a restart finds its cages running), so what was there then is old news
that a restart must not tell again; it is still in the counts the status shows. A cage
the core first sees afterwards (created, or recreated after a destroy: a new cgroup) starts
from 0, so a kill in its first seconds is told. A count lower than the one told means a
cgroup made anew: it becomes the baseline. Not persisted: one write per change for what
the kernel keeps anyway, and after a restart the counts are whole in ``hive status``."""

from __future__ import annotations

from dataclasses import dataclass, field

LIMITS_POLL = 5.0  # seconds between two reads of every running cage's counts
NOTE_INTERVAL = 60.0  # seconds: one line per agent and counter at most, then the total
COUNTERS = ("oom_kills", "pids_refused")


def describe(name: str, counter: str, total: int, new: int, pids_max: int) -> str:
    """The operator's line for ``new`` more hits of ``counter`` (``total`` so far)."""
    if counter == "oom_kills":
        what = "a process" if new == 1 else f"{new} processes"
        return f"agent {name}: out of memory, the kernel killed {what} ({total} so far)"
    what = "a fork" if new == 1 else f"{new} forks"
    return f"agent {name}: its process limit ({pids_max}) refused {what} ({total} so far)"


@dataclass
class LimitWatch:
    counts: dict[str, dict[str, int]] = field(default_factory=dict)  # last read, per agent
    told: dict[str, dict[str, int]] = field(default_factory=dict)  # the counts last told
    told_at: dict[tuple[str, str], float] = field(default_factory=dict)
    started: bool = False  # a first read done: later names are new cgroups

    def observe(self, name: str, now: dict[str, int], at: float) -> list[tuple[str, int, int]]:
        """Record ``name``'s counts; the (counter, total, new) to tell now."""
        self.counts[name] = now
        told = self.told.get(name)
        if told is None:
            told = self.told[name] = {} if self.started else dict(now)
        out = []
        for counter in COUNTERS:
            total = now.get(counter)
            if total is None:
                continue
            before = told.get(counter, 0)
            if total < before:  # a cgroup made anew: its counts start again
                told[counter] = total
                continue
            if total == before:
                continue
            last = self.told_at.get((name, counter))
            if last is not None and at - last < NOTE_INTERVAL:
                continue  # told recently: the total goes in the next line
            out.append((counter, total, total - before))
            told[counter] = total
            self.told_at[(name, counter)] = at
        return out

    def forget(self, name: str) -> None:
        """``name`` destroyed: its cgroup goes, a new one starts from 0."""
        self.counts.pop(name, None)
        self.told.pop(name, None)
        for counter in COUNTERS:
            self.told_at.pop((name, counter), None)
