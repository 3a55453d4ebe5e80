"""Memory maps on synthetic kernels: maple trees bounded as the kernel bounds them, the
pre-6.1 VMA list, and suspect VMAs shown with an error rather than dropped or trusted."""

from __future__ import annotations

import pytest

from tests.support.kernel import Mm, Obj, SyntheticKernel
from tests.support.profiles import kernel
from vmishell.os.linux.guest import LinuxGuest
from vmishell.os.linux.vmas import Vma

PAGE = 0x1000
MAPLE = ["6.1", "6.7", "i386-pae"]


def _process(k: SyntheticKernel, count: int, *, leaf_slots: int | None = None):
    """A process with `count` one-page VMAs two pages apart (gaps between them)."""
    mm = k.mm()
    vmas = [k.vma(mm, 0x400000 + 2 * PAGE * i, 0x401000 + 2 * PAGE * i) for i in range(count)]
    tree = k.set_vmas(mm, vmas, leaf_slots=leaf_slots)
    k.task(1, "prog", mm=mm)
    return mm, vmas, tree


def _vmas(k: SyntheticKernel) -> list[Vma]:
    guest = LinuxGuest(k.source(), k.profile)
    return guest.vmas(next(t for t in guest.tasks() if t.pid == 1))


def _spans(vmas: list[Vma]) -> list[tuple[int, int]]:
    return [(v.start, v.end) for v in vmas]


def _expected(vmas: list[Obj]) -> list[tuple[int, int]]:
    return [(v.get("vm_start"), v.get("vm_end")) for v in vmas]


@pytest.mark.parametrize("layout", MAPLE)
@pytest.mark.parametrize(("count", "leaf_slots"), [(3, None), (7, 15), (8, 16), (40, 4), (300, 15)])
def test_every_vma_of_a_tree_of_any_depth_is_read(layout: str, count: int, leaf_slots) -> None:
    """One leaf, full leaves (the end told by the pivots), and trees of arange_64
    nodes over leaves, whose children are encoded node pointers (type and NULL
    bits, not the root's bit 1)."""
    k = kernel(layout)
    _, vmas, _ = _process(k, count, leaf_slots=leaf_slots)
    got = _vmas(k)
    assert [v.error for v in got] == [None] * count
    assert _spans(got) == _expected(vmas)


@pytest.mark.parametrize("layout", MAPLE)
def test_a_stale_slot_past_the_node_end_is_not_a_mapping(layout: str) -> None:
    """A leaf that held more entries once keeps their pointers after its end marker;
    the kernel does not read them, nor may vmishell."""
    k = kernel(layout)
    mm, vmas, tree = _process(k, 3)
    leaf = tree.leaves[0]
    end = leaf.get("mr64.meta.end")
    stale = k.vma(mm, 0x700000, 0x701000)
    leaf.set(f"mr64.slot[{end + 1}]", stale.va)
    leaf.set(f"mr64.pivot[{end}]", 0x6FFFFF)
    leaf.set(f"mr64.pivot[{end + 1}]", 0x700FFF)
    assert _spans(_vmas(k)) == _expected(vmas)


@pytest.mark.parametrize("layout", MAPLE)
def test_pivots_out_of_order_make_the_entries_below_suspect(layout: str) -> None:
    k = kernel(layout)
    _, vmas, tree = _process(k, 3)
    tree.leaves[0].set("mr64.pivot[2]", 0x10)  # goes back below the slot before
    got = _vmas(k)
    assert _spans(got) == _expected(vmas)
    assert got[0].error is None
    assert all(v.error and "out of order" in v.error for v in got[1:])


@pytest.mark.parametrize("layout", MAPLE)
def test_an_end_marker_past_the_slots_makes_the_node_suspect(layout: str) -> None:
    k = kernel(layout)
    _, vmas, tree = _process(k, 3)
    tree.leaves[0].set("mr64.meta.end", 200)
    got = _vmas(k)
    assert got and all(v.error and "ends at slot 200" in v.error for v in got)
    assert _spans(got)[: len(vmas)] == _expected(vmas)


@pytest.mark.parametrize("layout", MAPLE)
def test_a_vma_of_another_mm_is_a_suspect_row(layout: str) -> None:
    k = kernel(layout)
    _, vmas, _ = _process(k, 3)
    vmas[1].set("vm_mm", vmas[1].get("vm_mm") + 0x1000)
    got = _vmas(k)
    assert _spans(got) == _expected(vmas)
    assert [v.error is None for v in got] == [True, False, True]
    assert "belongs to mm" in got[1].error


@pytest.mark.parametrize("layout", MAPLE)
def test_a_vma_that_ends_before_it_starts_is_a_suspect_row(layout: str) -> None:
    k = kernel(layout)
    _, vmas, _ = _process(k, 3)
    vmas[1].set("vm_end", vmas[1].get("vm_start"))
    got = _vmas(k)
    assert len(got) == 3
    assert "not after its start" in got[1].error


@pytest.mark.parametrize("layout", MAPLE)
def test_a_vma_outside_the_range_the_tree_stores_it_at_is_a_suspect_row(layout: str) -> None:
    """A VMA whose bounds were edited (a mapping made to look smaller, or moved)."""
    k = kernel(layout)
    _, vmas, _ = _process(k, 3)
    vmas[1].set("vm_end", vmas[1].get("vm_end") + PAGE)
    got = _vmas(k)
    assert len(got) == 3
    assert "the tree stores it at" in got[1].error
    assert got[0].error is None and got[2].error is None


@pytest.mark.parametrize("layout", MAPLE)
def test_two_vmas_that_claim_one_start_are_both_shown(layout: str) -> None:
    k = kernel(layout)
    _, vmas, _ = _process(k, 3)
    vmas[2].set("vm_start", vmas[1].get("vm_start"))
    got = _vmas(k)
    same = [v for v in got if v.start == vmas[1].get("vm_start")]
    assert {v.address for v in same} == {vmas[1].va, vmas[2].va}
    assert [v.error is None for v in same] == [True, False]


@pytest.mark.parametrize("layout", MAPLE)
def test_a_child_whose_parent_link_does_not_point_back_costs_only_its_entries(
    layout: str,
) -> None:
    k = kernel(layout)
    _, _, tree = _process(k, 40, leaf_slots=4)
    second = tree.leaves[1]
    second.set("mr64.parent", second.va)  # names itself
    got = _vmas(k)
    good = [v for v in got if v.error is None]
    bad = [v for v in got if v.error]
    assert len(bad) == 1 and "names parent" in bad[0].error and bad[0].start == 0
    assert len(good) == 40 - 2  # the leaf held two VMAs (and two gaps)


@pytest.mark.parametrize("layout", ["5.10", "i386-5.10"])
def test_the_vma_list_before_6_1(layout: str) -> None:
    k = kernel(layout)
    _, vmas, _ = _process(k, 5)
    got = _vmas(k)
    assert _spans(got) == _expected(vmas) and all(v.error is None for v in got)


@pytest.mark.parametrize("layout", ["5.10", "i386-5.10"])
def test_a_vma_list_link_that_skips_a_vma_marks_the_row_it_leads_to(layout: str) -> None:
    """vm_next jumps over a VMA: the VMA reached names another vm_prev."""
    k = kernel(layout)
    _, vmas, _ = _process(k, 5)
    vmas[1].set("vm_next", vmas[3].va)
    got = _vmas(k)
    assert vmas[2].get("vm_start") not in {v.start for v in got}
    row = next(v for v in got if v.start == vmas[3].get("vm_start"))
    assert row.error and "vm_prev" in row.error


def test_a_process_with_a_vma_in_its_file_keeps_the_files_path() -> None:
    k = kernel("6.1")
    mm: Mm = k.mm()
    f = k.file("/usr/bin/tool", ino=77)
    k.set_vmas(mm, [k.vma(mm, 0x400000, 0x402000, 0x5, f)])
    k.task(1, "tool", mm=mm)
    (vma,) = _vmas(k)
    assert (vma.path, vma.inode, vma.device, vma.perms) == ("/usr/bin/tool", 77, "08:01", "r-xp")
