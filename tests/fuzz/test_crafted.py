"""Crafted structures that would multiply vmishell's work stay bounded, and corrupt ones show.

Random mutations rarely build these: a page table that points back at
itself, lists that loop or share members, a dentry whose parent chain loops,
many tasks naming one huge argument area. Each is built here on a real lab
dump, and each test says what vmishell must answer: in bounded time and
memory, with the damage shown on the rows it affects (the `error` column),
never hiding the rest of the table and never passing the damage off as data.
"""

from __future__ import annotations

import tracemalloc
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace

import pytest

from vmishell.errors import GuestDataError, PageFault
from vmishell.limits import Limits
from vmishell.session import Process, Session

from .harness import CASE_CALLS, USER_END, Harness, Mutation, work_meter

pytestmark = pytest.mark.lab


@contextmanager
def mutated(h: Harness, *mutations: Mutation) -> Iterator[Session]:
    patches = h.patches(mutations)
    assert patches, f"no spot for {mutations}: the dump's layout changed?"
    with h.source.patched(patches):
        yield h.session


def value(h: Harness, spot: str) -> int:
    """The clean dump's value at a pointer/int spot."""
    s = h.targets[spot]
    return int.from_bytes(h.targets.read(s.paddr, min(s.size, 8)), "little")


def marker(session: Session, h: Harness) -> Process:
    return session.process(h.targets.marker_pid)


def timed(call) -> tuple[object, int]:
    """The result (or GuestDataError) and the work it took, in function calls.

    Work, not seconds: a count does not depend on how busy the machine is
    (CaseOverWork ends a call past a fuzz case's bound).
    """
    with work_meter(CASE_CALLS) as calls:
        try:
            result: object = call()
        except GuestDataError as exc:
            result = exc
    return result, calls[0]


def by_pid(rows: Sequence) -> dict[int, object]:
    return {r.pid: r for r in rows}


# -- page tables ----------------------------------------------------------------------------


@pytest.mark.parametrize("level", ["PML4", "PDPT"])
def test_a_table_pointing_back_at_itself_is_enumerated_within_the_default_work_cap(
    harness: Harness, level: str
) -> None:
    """512 self-pointers describe 2**36 pages; Limits.max_mapping_work stops it."""
    with mutated(harness, Mutation(f"task:vmi-marker.table.{level}", "fill-self")) as s:
        proc = marker(s, harness)
        result, work = timed(lambda: sum(1 for _ in proc.mappings(0, USER_END)))
    assert isinstance(result, GuestDataError), result
    assert "alias" in str(result)
    assert work < CASE_CALLS


def test_enumerating_aliased_tables_holds_no_more_than_one_run_in_memory(
    harness: Harness,
) -> None:
    with mutated(harness, Mutation("task:vmi-marker.table.PML4", "fill-self")) as s:
        proc = marker(s, harness)
        tracemalloc.start()
        try:
            with pytest.raises(GuestDataError):
                sum(1 for _ in proc.mappings(0, USER_END, max_work=1 << 15))
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert peak < 1 << 20


def test_a_kernel_top_table_sharing_one_child_everywhere_is_bounded(harness: Harness) -> None:
    child = harness.targets["kernel.init_task.table.PDPT"].paddr
    with mutated(harness, Mutation("kernel.init_task.table.PML4", "fill-alias", child)) as s:
        kernel = s.kernel
        result, work = timed(lambda: sum(1 for _ in kernel.mappings()))
    assert work < CASE_CALLS
    assert isinstance(result, GuestDataError | int)


def test_a_page_table_entry_beyond_ram_faults_naming_the_level(harness: Harness) -> None:
    beyond = harness.targets.ram_size * 4
    with mutated(harness, Mutation("task:vmi-marker.pte.PT", "pte-phys", beyond)) as s:
        proc = marker(s, harness)
        with pytest.raises(PageFault, match="outside guest RAM") as info:
            proc.read(0x600000, 16)
        walk = proc.walk(0x600000)
    assert info.value.level == "PT"
    assert walk.translation is not None and walk.translation.paddr >= beyond


# -- the task list ----------------------------------------------------------------------------


def test_a_task_list_looping_back_keeps_the_tasks_before_and_marks_where_it_loops(
    harness: Harness,
) -> None:
    clean = harness.session.process_rows()
    loop = Mutation("task:vmi-marker.tasks.next", "ref", "task:init.tasks.next")
    with mutated(harness, loop) as s:
        rows = s.process_rows()
    pids = [r.pid for r in rows]
    marker_row = by_pid(rows)[harness.targets.marker_pid]
    assert pids == [r.pid for r in clean][: len(pids)]  # nothing invented, nothing reordered
    assert "loops back" in marker_row.error  # type: ignore[attr-defined]
    assert [r.pid for r in rows if r.error] == [harness.targets.marker_pid]


def test_a_task_unlinked_from_the_list_shows_on_the_task_after_it(harness: Harness) -> None:
    """A rootkit hides `sleep` by linking the marker to `cat`; cat's prev still names sleep."""
    hide = Mutation("task:vmi-marker.tasks.next", "ref", "task:cat.tasks.next")
    with mutated(harness, hide) as s:
        rows = by_pid(s.process_rows())
    cat = next(r for r in rows.values() if r.comm == "cat")  # type: ignore[attr-defined]
    assert "prev link" in cat.error  # type: ignore[attr-defined]
    assert not any(r.comm == "sleep" for r in rows.values())  # type: ignore[attr-defined]


def test_a_thread_shared_by_two_groups_is_listed_once_and_stops_the_second_walk(
    harness: Harness,
) -> None:
    share = Mutation("task:sleep.thread_group.next", "ref", "task:vmi-thread.thread_group.next")
    with mutated(harness, share) as s:
        rows = s.process_rows()
    threads = [r for r in rows if r.comm == "vmi-thread"]
    sleep = next(r for r in rows if r.comm == "sleep")
    assert len(threads) == 1
    assert "already listed" in sleep.error


def test_a_list_link_into_foreign_memory_stops_after_two_links_that_do_not_point_back(
    harness: Harness,
) -> None:
    """`sleep`'s thread list led into memory holding list-like pointers that are not a
    list (campaign seed 52376: 9,682 junk rows, all marked). Two links in a row whose
    prev does not point back end the walk: the leader says so, one junk row at most."""
    spot = harness.targets["task:sleep.struct"]
    direct_map = spot.vaddr - spot.paddr  # slab memory is in the direct map
    frame = value(harness, "task:vmi-marker.pte.PT") & 0x000F_FFFF_FFFF_F000
    a, b, c = (frame + 0x800 + 16 * i for i in range(3))  # unused, zeroed bytes

    def node(at: int, next_: int, prev: int) -> tuple[int, bytes]:
        return at, (direct_map + next_).to_bytes(8, "little") + prev.to_bytes(8, "little")

    junk = [node(a, b, 0x1111), node(b, c, 0x2222), node(c, a, 0x3333)]
    link = Mutation("task:sleep.thread_group.next", "set", direct_map + a)
    with harness.source.patched([*junk, *harness.patches([link])]):
        rows = harness.session.process_rows()
    sleep = next(r for r in rows if r.comm == "sleep")
    assert "foreign memory" in sleep.error
    assert len(rows) <= len(harness.session.process_rows()) + 1
    assert all(r.error for r in rows if r.tgid == sleep.tgid and r.pid != sleep.pid)


def test_a_null_task_link_marks_the_last_task_read(harness: Harness) -> None:
    with mutated(harness, Mutation("task:sleep.tasks.next", "set", 0)) as s:
        rows = s.process_rows()
    assert rows[-1].comm == "sleep"
    assert "NULL link" in rows[-1].error


# -- memory maps ----------------------------------------------------------------------------


def test_a_dentry_parent_loop_is_an_error_on_the_rows_of_that_file_only(harness: Harness) -> None:
    first = "task:vmi-marker.file0.dentry0.struct"
    loop = Mutation("task:vmi-marker.file0.dentry1.d_parent", "ref", first)
    with mutated(harness, loop) as s:
        vmas = marker(s, harness).vmas()
    broken = [v for v in vmas if v.error]
    assert broken and all("loops" in v.error for v in broken)
    assert all(v.path == "" for v in broken)
    assert any(v.path == "[stack]" and v.error is None for v in vmas)


def test_files_under_one_directory_walk_that_directory_once(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The marker's bss VMA given busybox's file: both paths pass through /bin, read once."""
    busybox = value(harness, "task:sleep.vma0.vm_file")
    bin_dentry = value(harness, "task:vmi-marker.file0.dentry0.d_parent")
    parent_field = bin_dentry + harness.session.guest._vmas.v.dentry_parent
    reader = harness.session.guest.reader
    reads: list[int] = []
    pointer = reader.pointer
    monkeypatch.setattr(reader, "pointer", lambda va: reads.append(va) or pointer(va))
    with mutated(harness, Mutation("task:vmi-marker.vma2.vm_file", "set", busybox)) as s:
        paths = [v.path for v in marker(s, harness).vmas()]
    assert "/bin/vmi-marker" in paths and "/bin/busybox" in paths
    assert reads.count(parent_field) == 1


def test_a_name_length_of_four_billion_is_refused_before_it_is_read(harness: Harness) -> None:
    huge = Mutation("task:vmi-marker.file0.dentry0.d_name.len", "set", 0xFFFF_FFFF)
    with mutated(harness, huge) as s:
        tracemalloc.start()
        try:
            vmas = marker(s, harness).vmas()
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert any(v.error and "longer than 4096" in v.error for v in vmas)
    assert peak < 1 << 20


def test_one_vma_in_every_slot_of_the_tree_is_one_row(harness: Harness) -> None:
    slots = sorted(
        (n for n in harness.targets.spots if n.startswith("task:vmi-marker.maple[0].slot")),
        key=lambda n: int(n.rsplit("slot", 1)[1]),  # slot 15 of a partly full node is metadata
    )[:6]
    first = value(harness, slots[0])
    same = [Mutation(n, "set", first) for n in slots[1:]]
    with mutated(harness, *same) as s:
        vmas = marker(s, harness).vmas()
    assert len([v for v in vmas if v.error is None]) == len({v.start for v in vmas})
    assert len(vmas) < 6


def test_a_leaf_retyped_as_an_inner_node_is_reported_not_followed(harness: Harness) -> None:
    retype = Mutation("task:vmi-marker.maple.root", "xor", 0b0011 << 3)  # leaf_64 -> range_64
    with mutated(harness, retype) as s:
        vmas = marker(s, harness).vmas()
    assert vmas and all(v.error for v in vmas)
    assert all((v.start, v.end) == (0, 0) for v in vmas)


def test_an_unreadable_vma_is_a_row_with_an_error_and_the_others_stay(harness: Harness) -> None:
    clean = [v for v in marker(harness.session, harness).vmas()]
    away = Mutation("task:vmi-marker.maple[0].slot1", "set", 0xFFFF_8880_F000_0000)
    with mutated(harness, away) as s:
        vmas = marker(s, harness).vmas()
    assert len([v for v in vmas if v.error is None]) == len(clean) - 1
    assert next(v for v in vmas if v.error).start == 0


# -- command lines ------------------------------------------------------------------------------


def test_many_tasks_naming_one_argument_area_read_it_once(harness: Harness) -> None:
    """Kernel threads given the marker's mm, whose arguments are 128 KiB of kernel rodata:
    the area is read once and its text held once, however many rows show it."""
    mm = value(harness, "task:vmi-marker.mm")
    rodata = harness.session.symbol("linux_banner")
    threads = [n[: -len(".mm")] for n in harness.targets.of_kind("ptr") if n.endswith(".mm")]
    threads = [t for t in threads if value(harness, f"{t}.mm") == 0][:30]
    assert len(threads) >= 20
    area = [
        Mutation("task:vmi-marker.mm.arg_start", "set", rodata),
        Mutation("task:vmi-marker.mm.arg_end", "set", rodata + Limits().max_cmdline),
    ]
    with mutated(harness, *area, *(Mutation(f"{t}.mm", "set", mm) for t in threads)) as s:
        tracemalloc.start()
        try:
            rows = s.process_rows()
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    shown = [r.cmdline for r in rows if r.cmdline and len(r.cmdline) > 50_000]
    assert len(shown) == len(threads) + 1
    assert len({id(c) for c in shown}) == 1  # one string, shared by every row
    assert peak < 16 * Limits().max_cmdline  # about one area's worth, not thirty


def test_command_lines_past_the_text_budget_are_errors_not_truncated_text(
    harness: Harness, x86_64_dump
) -> None:
    tight = Harness(x86_64_dump, limits=replace(Limits(), max_text=1024))
    start = value(tight, "task:vmi-marker.mm.arg_start")
    big = Mutation("task:vmi-marker.mm.arg_end", "set", start + 4096)
    with mutated(tight, big) as s:
        rows = by_pid(s.process_rows())
    row = rows[tight.targets.marker_pid]
    assert row.cmdline is None  # type: ignore[attr-defined]
    assert "max_text" in row.error  # type: ignore[attr-defined]


# -- attaching ----------------------------------------------------------------------------------


def test_memory_full_of_banner_prefixes_is_scanned_a_bounded_number_of_times() -> None:
    from vmishell.sources.memory import BufferSource
    from vmishell.symbols.finder import banners_in

    source = BufferSource([(0, b"Linux version x" * 200_000)])
    found, work = timed(lambda: banners_in(source, scan=Limits().max_banner_scan))
    assert found == []
    # A few calls per candidate looked at (max_banner_scan of them), not per prefix in RAM.
    assert work < 32 * Limits().max_banner_scan
