"""Agent ids: unique on the host, never reused.

The red team found two hives on one host giving their agents the same uids (so
agents of different hives shared files and signals), nothing checking the host's
accounts or ``/etc/subuid`` ranges (a rootless container user's range commonly
covers 200000), and a destroyed agent's uid given to the next agent, which then
inherited the old one's kernel keyring. Now one host-wide registry, under a lock,
hands out blocks above a high-water mark that only rises, skipping every host
account, group and subordinate range."""

from __future__ import annotations

import json
import multiprocessing
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from hive_fixture import HiveProcess, running_hive
from hyperhive.priv.ids import (
    BASE_UID,
    BLOCK,
    HEADROOM,
    LAST_UID,
    HostIds,
    HostRegistry,
    IdsExhausted,
    subordinate_ranges,
)

from .conftest import cage_run

UNIQUE = pytest.mark.attack("ids.host-unique", ref="issue 11 item 5; podman/rootless /etc/subuid ranges (subuid(5))")
REUSE = pytest.mark.attack("ids.reuse", ref="issue 11 item 4 (keyring inherited through a reused uid); CWE-694")


def registry(tmp_path: Path, accounts: set[int] | None = None,
             ranges: list[tuple[int, int]] | None = None) -> HostRegistry:
    return HostRegistry(tmp_path / "ids", HostIds(lambda: accounts or set(), lambda: ranges or []))


@UNIQUE
@pytest.mark.parametrize(("ranges", "first"), [
    ([], BASE_UID),
    ([(100_000, 165_535)], BASE_UID),  # a first user's range lies below
    ([(165_536, 231_071)], 231_072),  # a second user's range covers 200000
    ([(200_001, 200_001)], BASE_UID + 2),  # one id of the first block is enough to skip it
    ([(150_000, 250_000), (250_001, 300_000)], 300_002),  # adjacent ranges, then aligned
    ([(0, 2**31)], None),  # nothing left
])
def test_blocks_skip_subordinate_ranges(tmp_path: Path, ranges: list[tuple[int, int]], first: int | None) -> None:
    reg = registry(tmp_path, ranges=ranges)
    if first is None:
        with pytest.raises(IdsExhausted, match="no free agent ids"):
            reg.claim("h:a")
        return
    base = reg.claim("h:a")
    assert base == first
    assert not any(lo <= i <= hi for lo, hi in ranges for i in range(base, base + BLOCK))


@UNIQUE
@pytest.mark.parametrize("taken", [{BASE_UID}, {BASE_UID + 1}, {BASE_UID, BASE_UID + 2, BASE_UID + 5}])
def test_blocks_skip_host_accounts_and_groups(tmp_path: Path, taken: set[int]) -> None:
    base = registry(tmp_path, accounts=taken).claim("h:a")
    assert not {base, base + 1} & taken


@UNIQUE
@pytest.mark.parametrize("kind", ["user", "group"])
def test_blocks_skip_ids_a_directory_service_answers_for_but_does_not_list(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    """sssd or LDAP with ``enumerate = false`` lists none of its users in ``getpwall``
    but answers ``getpwuid`` for each: agents' blocks were checked against the listing
    only (session 17's note), so an agent could run as a directory user. Each id is now
    also looked up one by one."""
    from hyperhive.priv import nss

    directory = range(BASE_UID, BASE_UID + 7)  # a user (or group) in each of the first blocks
    real = nss.name_of

    def name_of(k: str, i: int) -> str | None:
        return f"ldap{i}" if k == ("uid" if kind == "user" else "gid") and i in directory else real(k, i)

    monkeypatch.setattr(nss, "name_of", name_of)
    reg = registry(tmp_path)  # the listing holds none of them
    bases = [reg.claim("h:a"), *reg.claim_many(["h:b", "h:c"])]
    assert bases == [BASE_UID + 8, BASE_UID + 10, BASE_UID + 12]
    assert not any(i in directory for b in bases for i in range(b, b + BLOCK))


@UNIQUE
def test_subuid_numbers_are_read_as_shadow_reads_them(tmp_path: Path) -> None:
    """shadow's newuidmap reads each number with ``strtoul(s, &end, 0)`` (the whole field):
    hexadecimal, octal, a leading blank or ``+`` count; anything else skips the line, as
    shadow skips it (a stray character no longer raises: red team of session 18)."""
    f = tmp_path / "subuid"
    f.write_text(
        "hex:0x30d40:2\noct:0606500:2\nblank: 200010:2\nplus:+200020:2\n"
        "super:\u00b2:1\nminus:-1:5\nbad:08:1\nempty::1\nzero:300000:0\nsix:1:2:3\n"
        "negzero:-0:300000\n"
    )
    assert subordinate_ranges([f]) == [
        (200_000, 200_001), (200_000, 200_001), (200_010, 200_011), (200_020, 200_021),
        (2**64 - 1, 2**64 + 3), (0, 299_999),
    ]


@UNIQUE
def test_subuid_file_format(tmp_path: Path) -> None:
    f = tmp_path / "subuid"
    f.write_text("alice:100000:65536\nbob:165536:65536\n# comment\nbroken\ncarol:x:1\n")
    assert subordinate_ranges([f]) == [(100_000, 165_535), (165_536, 231_071)]


def _claim_many(root: str, n: int, out: multiprocessing.Queue[list[int]]) -> None:
    reg = HostRegistry(Path(root), HostIds(lambda: set(), list))
    out.put([reg.claim(f"p{os.getpid()}:{i}") for i in range(n)])


@UNIQUE
def test_concurrent_hives_never_get_the_same_block(tmp_path: Path) -> None:
    q: multiprocessing.Queue[list[int]] = multiprocessing.Queue()
    procs = [multiprocessing.Process(target=_claim_many, args=(str(tmp_path / "ids"), 25, q)) for _ in range(4)]
    for p in procs:
        p.start()
    got = [b for _ in procs for b in q.get(timeout=60)]
    for p in procs:
        p.join(30)
    assert len(got) == len(set(got)) == 100


@REUSE
def test_released_blocks_are_never_handed_out_again(tmp_path: Path) -> None:
    reg = registry(tmp_path)
    first = [reg.claim(f"h:a{i}") for i in range(5)]
    for i, b in enumerate(first):
        reg.release(b, f"h:a{i}")
    again = [reg.claim(f"h:b{i}") for i in range(5)]
    assert not set(first) & set(again)
    assert min(again) > max(first)


@REUSE
def test_release_by_another_owner_changes_nothing(tmp_path: Path) -> None:
    reg = registry(tmp_path)
    b = reg.claim("h1:a")
    reg.release(b, "h2:a")
    assert reg.owner(b) == "h1:a"
    reg.release(b, "h1:a")
    assert reg.owner(b) is None


@UNIQUE
def test_concurrent_allocations_in_one_hive_are_batched_and_distinct(tmp_path: Path) -> None:
    # hive up starts several cages at once: their claims share a commit, never a block.
    alloc = _allocator(tmp_path)
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(alloc.allocate, [f"a{i % 40}" for i in range(80)]))
    by_name = {f"a{i % 40}": g.uid for i, g in enumerate(got)}
    assert all(by_name[f"a{i % 40}"] == g.uid for i, g in enumerate(got))  # a name keeps its block
    assert len(set(by_name.values())) == 40
    assert {n: a.uid for n, a in alloc.all().items()} == by_name
    assert all(alloc.registry.owner(u) == f"h:{n}" for n, u in by_name.items())


def _legacy(tmp_path: Path, table: dict[str, Any]) -> Path:
    (tmp_path / "ids").mkdir(mode=0o700)
    (tmp_path / "ids" / "registry.json").write_text(json.dumps(table))
    return tmp_path / "ids" / "registry.json"


def _older_claim(root: Path, owner: str) -> int:
    """A claim as the JSON-only hive-priv made it (a hive not yet upgraded, same host)."""
    table = json.loads((root / "registry.json").read_text())
    used = {int(b) + i for b in table["owners"] for i in range(BLOCK)}
    base = HostIds(set, list).free_block(max(int(table["next"]), BASE_UID), used)
    table["owners"][str(base)] = owner
    table["next"] = base + BLOCK
    (root / "registry.json").write_text(json.dumps(table, sort_keys=True))
    return base


@REUSE
def test_a_json_registry_is_migrated_once_and_its_blocks_stay_taken(tmp_path: Path) -> None:
    old = {"next": BASE_UID + 10, "owners": {str(BASE_UID + 4): "h:old", str(BASE_UID + 8): "h:older"}}
    legacy = _legacy(tmp_path, old)
    reg = registry(tmp_path)
    assert reg.claim("h:new") == BASE_UID + 10  # above the old mark
    assert reg.owner(BASE_UID + 4) == "h:old" and reg.owner(BASE_UID + 8) == "h:older"
    # What is left of the JSON: the mark alone (ahead of the table's), a few bytes to read.
    left = json.loads(legacy.read_text())
    assert left["owners"] == {} and left["next"] >= BASE_UID + 12
    assert registry(tmp_path).claim("h:next") == BASE_UID + 12


@REUSE
@UNIQUE
def test_an_older_hive_priv_on_the_host_never_gets_the_same_block(tmp_path: Path) -> None:
    reg = registry(tmp_path)
    mine = reg.claim_many([f"h:a{i}" for i in range(3)])
    theirs = _older_claim(tmp_path / "ids", "old:a")
    assert theirs > max(mine)
    again = reg.claim("h:b")
    assert again > theirs
    assert reg.owner(theirs) == "old:a"  # taken into the table
    # Past the JSON's headroom, with older claims in between: never a block twice.
    got = [*mine, theirs, again]
    for i in range(3 * HEADROOM):
        got.append(_older_claim(tmp_path / "ids", f"old:b{i}") if i % 50 == 0 else reg.claim(f"h:c{i}"))
        assert json.loads((tmp_path / "ids" / "registry.json").read_text())["next"] > got[-1]
    assert len(got) == len(set(got))


@REUSE
def test_a_json_registry_restored_later_never_lowers_the_mark(tmp_path: Path) -> None:
    legacy = _legacy(tmp_path, {"next": BASE_UID + 2, "owners": {str(BASE_UID): "h:a"}})
    reg = registry(tmp_path)
    first = [reg.claim(f"h:b{i}") for i in range(3)]
    legacy.write_text(json.dumps({"next": BASE_UID + 2, "owners": {str(BASE_UID): "h:a"}}))  # a backup
    assert reg.claim("h:c") > max(first)


@REUSE
@pytest.mark.parametrize("content", [b"{", b'{"next": "x", "owners": {}}', b"[]"])
def test_an_unreadable_json_registry_refuses_and_changes_nothing(tmp_path: Path, content: bytes) -> None:
    legacy = _legacy(tmp_path, {})
    legacy.write_bytes(content)
    with pytest.raises(IdsExhausted, match=r"registry\.json is unreadable"):
        registry(tmp_path).claim("h:a")
    assert legacy.read_bytes() == content


@UNIQUE
def test_registry_is_root_only(tmp_path: Path) -> None:
    reg = registry(tmp_path)
    reg.claim("h:a")
    st = os.stat(tmp_path / "ids")
    assert (st.st_uid, st.st_mode & 0o777) == (0, 0o700)
    assert LAST_UID < 2**31


@UNIQUE
def test_registry_dir_planted_as_link_is_refused(tmp_path: Path) -> None:
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "ids").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(Exception, match="ids"):
        registry(tmp_path).claim("h:a")
    assert not list((tmp_path / "elsewhere").iterdir())


# -- two real hives at once -------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_hives() -> Iterator[tuple[HiveProcess, HiveProcess]]:
    agents = {f"rtid{i}": {"runtime": "command", "command": ["true"]} for i in range(3)}
    first = running_hive(HiveProcess(agents))
    a = next(first)
    second = running_hive(HiveProcess(agents))
    b = next(second)
    yield a, b
    for gen in (second, first):
        next(gen, None)


@UNIQUE
@pytest.mark.parametrize("name", ["rtid0", "rtid1", "rtid2"])
def test_two_hives_same_names_disjoint_uids(two_hives: tuple[HiveProcess, HiveProcess], name: str) -> None:
    a, b = two_hives
    ids_a = {a.cage(n)["uid"] for n in a.names} | {a.cage(n)["harness_uid"] for n in a.names}
    row = b.cage(name)
    assert row["uid"] not in ids_a and row["harness_uid"] not in ids_a


@UNIQUE
def test_an_agent_cannot_signal_the_same_name_in_another_hive(two_hives: tuple[HiveProcess, HiveProcess]) -> None:
    """From inside hive A's rtid0: the pids of hive B's rtid0 are in another pid
    namespace, and with a different uid kill() would be refused even if they weren't."""
    a, b = two_hives
    res = cage_run(a, "rtid0", """
import os
result(uid=os.getuid())
""")
    assert res["uid"] == a.cage("rtid0")["uid"] != b.cage("rtid0")["uid"]


# -- a compromised core against hive-priv's own table (second red team) ---------------------------

CORE_TABLE = pytest.mark.attack(
    "privsep.core-misuse", ref="issue 11 re-attack: ids.json grown past hive-priv's read limit by prepare calls")


def _allocator(tmp_path: Path) -> Any:
    from hyperhive.priv.ids import IdAllocator

    d = tmp_path / "priv"
    d.mkdir(mode=0o700)
    return IdAllocator(os.open(d, os.O_RDONLY | os.O_DIRECTORY), "h", registry(tmp_path))


@CORE_TABLE
def test_priv_bounds_the_agents_it_keeps_per_hive(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from hyperhive.priv import ids as ids_mod

    monkeypatch.setattr(ids_mod, "MAX_AGENTS_PER_HIVE", 3)
    alloc = _allocator(tmp_path)
    for n in ("a", "b", "c"):
        alloc.allocate(n)
    with pytest.raises(IdsExhausted, match="hive-priv keeps at most 3 per hive"):
        alloc.allocate("d")
    assert sorted(alloc.all()) == ["a", "b", "c"]
    alloc.release("a")
    alloc.allocate("d")  # room again; and "a"'s block is not the one handed out
    assert alloc.get("d") is not None


@CORE_TABLE
@pytest.mark.parametrize("content", [b"{" * 100, b"\xff\xfe", b'{"a": "x"}', b"[1, 2]"])
def test_an_unreadable_table_is_one_line_not_a_traceback(tmp_path: Path, content: bytes) -> None:
    alloc = _allocator(tmp_path)
    (tmp_path / "priv" / "ids.json").write_bytes(content)
    with pytest.raises(IdsExhausted, match=r"ids\.json is unreadable"):
        alloc.get("a")


@CORE_TABLE
def test_the_agent_bound_is_the_configs_ceiling() -> None:
    from hyperhive.config import LimitsSection
    from hyperhive.priv.ids import MAX_AGENTS_PER_HIVE

    assert LimitsSection.model_fields["max_agents"].metadata[-1].le <= MAX_AGENTS_PER_HIVE
