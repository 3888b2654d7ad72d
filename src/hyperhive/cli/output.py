"""How the CLI prints: rich tables for people, ``--json`` for scripts, one-line errors.

Every string the hive returns may be an agent's: everything printed goes through
``hyperhive.display`` (controls, C1 and bidi characters escaped, on a tty or a pipe),
and into rich only as ``Text``, never as markup."""

from __future__ import annotations

import math
import os
import shutil
import sys
from collections.abc import Callable, Collection, Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import click
from rich.console import Console
from rich.table import Table
from rich.text import Text

from hyperhive.client import Client, HiveUnavailable
from hyperhive.display import dumps, visible
from hyperhive.wire.timestamps import parse_timestamp

console = Console()
F = TypeVar("F", bound=Callable[..., Any])
BATCH_MAX = 10_000  # the largest count (max, limit) a listing request may ask for


class FiniteRange(click.FloatRange):
    """A number in a range that is also finite: click's FloatRange lets ``nan`` through
    (no comparison with it is true), and ``inf`` where a side is open-ended."""

    name = "finite float range"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return number


def json_option(fn: F) -> F:
    return click.option("--json", "as_json", is_flag=True, help="Print the raw JSON response.")(fn)


def say(line: str) -> None:
    """One line for a person (it may quote an agent: a newline in it is shown, not made).
    On a terminal it is cut to the terminal's width: a line that wrapped let an agent's
    text padded to the edge start a row of its own, drawn as the hive's (``hive status
    --watch``, ``hive events``: red team of session 32). ``hive show`` gives it whole."""
    shown = visible(line, one_line=True)
    if sys.stdout.isatty():
        shown = fit(shown, shutil.get_terminal_size().columns)
    click.echo(shown)


def fit(text: str, columns: int) -> str:
    """``text`` cut to ``columns`` terminal cells, with "…" where it was cut (``_cells``:
    anything past ASCII counted as two)."""
    if columns < 2 or sum(_cells(ch) for ch in text) <= columns:
        return text
    used = 0
    for i, ch in enumerate(text):
        used += _cells(ch)
        if used > columns - 1:
            return text[:i] + "…"
    return text


def _cells(ch: str) -> int:
    """Cells a terminal may give ``ch``, counted high: any character past ASCII as two.
    Python's Unicode tables and a terminal's (glibc's wcwidth, xterm, VTE) disagree on
    hundreds (hexagrams, circled numbers, a soft hyphen: re-check of session 32), and a
    line counted short wraps into a row of its own; one counted long is only cut early."""
    return 1 if ch < "\x80" else 2


def fail(message: str) -> None:
    click.echo(f"hive: {visible(message, one_line=True)}", err=True)
    raise SystemExit(1)


def request(path: Path, cmd: str, as_json: bool, **fields: Any) -> dict[str, Any]:
    """One request; on refusal print the one-line reason (or the JSON) and exit 1."""
    try:
        with Client(path) as c:
            resp = c.call(cmd, **{k: v for k, v in fields.items() if v is not None})
    except HiveUnavailable as e:
        fail(str(e))
    except (ConnectionError, TimeoutError) as e:
        fail(f"{path}: {e}")
    return report(resp, as_json)


def paged(
    path: Path,
    cmd: str,
    as_json: bool,
    rows: str,
    cursor: str,
    count: tuple[str, int],
    **fields: Any,
) -> dict[str, Any]:
    """A listing that comes in batches (every reply has a byte budget): ask for the next
    batch, ``cursor`` = the last row's id, until the reply says no ``more`` or ``count``
    (its field, the total wanted) rows came; report them as one reply. ``more`` stays in
    it when rows are left beyond ``count``."""
    field, wanted = count
    got: list[dict[str, Any]] = []
    try:
        with Client(path) as c:
            while True:
                ask = {k: v for k, v in fields.items() if v is not None}
                batch = min(wanted - len(got), BATCH_MAX)  # the most a request may ask
                resp = c.call(cmd, **ask, **{field: batch})
                if not resp.get("ok"):
                    break
                got += resp[rows]
                if not resp.get("more") or not resp[rows] or len(got) >= wanted:
                    resp[rows] = got
                    break
                fields[cursor] = resp[rows][-1]["id"]
    except HiveUnavailable as e:
        fail(str(e))
    except (ConnectionError, TimeoutError) as e:
        fail(f"{path}: {e}")
    return report(resp, as_json)


INDENT_EXTRA_MAX = 1 << 20  # the bytes indentation may add to a --json reply


def indent_adds_at_most(value: Any, budget: int, step: int = 2) -> bool:
    """Whether ``json.dumps(value, indent=step)`` adds at most about ``budget`` bytes to the
    compact form: each item of a list or object gets a line of its own, indented by its
    depth. An agent's deeply nested tool input made ``hive transcript --json`` 79 MB for
    100 entries (re-check of session 32); walked without recursion, so any depth."""
    extra = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            inner: Collection[Any] = item.values()
        elif isinstance(item, list):
            inner = item
        else:
            continue
        if not inner:
            continue
        # a newline and the indent before each item and before the closing bracket
        extra += len(inner) * (1 + step * depth) + 1 + step * (depth - 1)
        if extra > budget:
            return False
        stack.extend((x, depth + 1) for x in inner)
    return True


def report(resp: dict[str, Any], as_json: bool) -> dict[str, Any]:
    """Print a response as --json asks (indented, unless that would add over
    ``INDENT_EXTRA_MAX`` bytes: then compact, the same JSON); a refusal prints its one
    line and exits 1."""
    if as_json:
        indent = 2 if indent_adds_at_most(resp, INDENT_EXTRA_MAX) else None
        click.echo(dumps(resp, indent=indent))
        if not resp.get("ok"):
            raise SystemExit(1)
    elif not resp.get("ok"):
        fail(f"error: {resp.get('error')}")
    return resp


def stream(
    path: Path, cmd: str, as_json: bool, render: Callable[[dict[str, Any]], None], **fields: Any
) -> None:
    """Follow a stream: each line rendered (or, with ``as_json``, printed whole), and
    flushed at once, so a pipe sees every line as it comes. A refusal or a cut-off
    ends it with exit 1; a reader that went away (``| head``) ends it quietly."""
    try:
        with Client(path, timeout=None) as c:
            for item in c.stream(cmd, **fields):
                if not (as_json or item.get("ok")):
                    fail(f"error: {item.get('error')}")
                try:
                    click.echo(dumps(item)) if as_json else render(item)
                    sys.stdout.flush()
                except BrokenPipeError:
                    # Nobody reads our stdout any more: stop, and keep Python's exit-time
                    # flush of it from printing a traceback.
                    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
                    raise SystemExit(0) from None
                if not item.get("ok"):
                    raise SystemExit(1)
    except HiveUnavailable as e:
        fail(str(e))
    except ConnectionError:
        fail(f"{path}: the hive closed the stream")
    except KeyboardInterrupt:
        pass


def when(ts: float | str | None) -> str:
    """A wire time (RFC 3339 UTC) in the local zone, for people."""
    if ts is None:
        return ""
    return datetime.fromtimestamp(parse_timestamp(ts)).strftime("%Y-%m-%d %H:%M:%S")


def table(
    title: str,
    columns: Sequence[str],
    rows: Iterable[Sequence[Any]],
    whole: Collection[str] = (),
) -> None:
    """``whole``: columns whose values are copied and pasted (a name, an incarnation
    into ``--created-at``): not wrapped, they are the last a narrow terminal squeezes."""
    # Text(), not str: agent-written strings must never be read as rich markup.
    t = Table(title=Text(visible(title, one_line=True)), title_justify="left")
    for col in columns:
        t.add_column(col, overflow="fold", no_wrap=col in whole)
    count = 0
    for row in rows:
        t.add_row(*(Text(visible("" if v is None else str(v))) for v in row))
        count += 1
    if count == 0:
        console.print(Text(visible(f"{title}: none", one_line=True)))
    else:
        console.print(t)


def print_messages(messages: list[dict[str, Any]], title: str = "messages") -> None:
    table(
        title,
        ["id", "from", "kind", "ref", "sent", "body"],
        (
            [m["id"], "", "", "", "", f"unreadable: {m['unreadable']}"]
            if "unreadable" in m
            else [m["id"], m["from"], m["kind"], m.get("ref"), when(m["sent_at"]), m["body"]]
            for m in messages
        ),
    )
