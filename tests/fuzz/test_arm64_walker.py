"""Hostile AArch64 tables stay within the fuzz bounds of the x86 walker.

Synthetic: the tables are built in bytes (tests/support/arm64tables), so no
lab guest is needed. Crafted shapes that multiply work (tables pointing at
themselves or all sharing one child, at every granule) and random corruption
(raw descriptors of every type, pointers into tables, beyond RAM and beyond
the physical size) must end in a vmishell error or a result, within the
per-case call and memory bounds the x86 fuzzing asserts (`harness`), with
`Limits().max_mapping_work` as a session would pass it.
"""

from __future__ import annotations

import random
import tracemalloc
from collections.abc import Callable

import pytest

from tests.support.arm64tables import AF, AP_EL0, Arm64TableBuilder
from vmishell.arch import AddressSpace
from vmishell.arch.aarch64 import Arm64Translator
from vmishell.errors import GuestDataError, VmiError
from vmishell.limits import Limits

from .harness import CASE_CALLS, CASE_PEAK_BYTES, work_meter

GRANULES = [4096, 16384, 65536]
RAM = 0x4000_0000


def translator(b: Arm64TableBuilder, max_work: int = Limits().max_mapping_work) -> Arm64Translator:
    return b.translator(lpa2=b.fmt == "lpa2", max_mapping_work=max_work)


def counted(call: Callable[[], object]) -> tuple[object, int]:
    """The result (or the vmishell error) and the calls it made (a count, not seconds)."""
    with work_meter(CASE_CALLS) as calls:
        try:
            result: object = call()
        except VmiError as exc:
            result = exc
    return result, calls[0]


def peak_of(call: Callable[[], object]) -> tuple[object, int]:
    """The result (or the vmishell error) and the peak Python heap it took."""
    tracemalloc.start()
    try:
        try:
            result: object = call()
        except VmiError as exc:
            result = exc
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def fill(b: Arm64TableBuilder, table: int, value: int) -> None:
    for i in range(b.granule // 8):
        b.write(table + 8 * i, value)


def self_pointing(granule: int) -> Arm64TableBuilder:
    """Both top tables name themselves in every entry: 2**36 pages with 4 KiB granules."""
    b = Arm64TableBuilder(granule, 48)
    for half in (0, 1):
        fill(b, b.roots[half], b.roots[half] | 3)
    return b


def one_child_everywhere(granule: int) -> Arm64TableBuilder:
    """Each table's every entry names the same next table; the last maps one frame
    everywhere, so no run coalesces: the most objects per unit of work."""
    b = Arm64TableBuilder(granule, 48, ram_size=16 * granule)
    table = b.roots[0]
    for _ in range(len(b.shifts(0)) - 1):
        child = b.new_table()
        fill(b, table, child | 3)
        table = child
    fill(b, table, (RAM + 8 * granule) | 3 | AF | AP_EL0)
    return b


@pytest.mark.parametrize("granule", [4096, 65536])
def test_a_top_table_pointing_at_itself_is_enumerated_within_the_default_work_cap(
    granule: int,
) -> None:
    tr = translator(self_pointing(granule))
    result, calls = counted(lambda: sum(1 for _ in tr.mappings()))
    assert isinstance(result, GuestDataError) and "alias" in str(result)
    assert calls < CASE_CALLS


def test_one_child_everywhere_is_bounded_in_both_enumerations() -> None:
    tr = translator(one_child_everywhere(16384))
    for enumerate_all in (lambda: sum(1 for _ in tr.mappings()), tr.runs):
        result, calls = counted(enumerate_all)
        assert isinstance(result, GuestDataError), result
        assert calls < CASE_CALLS


@pytest.mark.parametrize("build", [self_pointing, one_child_everywhere])
def test_enumerating_aliased_tables_holds_one_batch_of_runs_in_memory(build) -> None:
    tr = translator(build(4096), max_work=1 << 15)
    result, peak = peak_of(lambda: sum(1 for _ in tr.mappings()))
    assert isinstance(result, GuestDataError)
    assert peak < 1 << 20
    result, peak = peak_of(tr.runs)
    assert isinstance(result, GuestDataError)
    assert peak < CASE_PEAK_BYTES


def corrupt(b: Arm64TableBuilder, rng: random.Random, count: int) -> None:
    """Write `count` hostile descriptors into the tables."""
    tables = list(range(b.ram_base, b._next, b.granule))
    entries = b.granule // 8
    for _ in range(count):
        where = rng.choice(tables) + 8 * rng.choice([0, 1, 2, entries - 1, rng.randrange(entries)])
        shape = rng.randrange(5)
        if shape == 0:
            value = rng.getrandbits(64)
        elif shape == 1:  # table or page descriptor naming a table (cycles, aliases)
            value = rng.choice(tables) | 3 | rng.getrandbits(5) << 59
        elif shape == 2:  # block descriptor wherever it lands
            value = rng.choice(tables) | 1 | AF
        elif shape == 3:  # beyond RAM, beyond 48 and 52 bits
            value = rng.choice([RAM + len(b.ram), 1 << 47, 0xF << 48, 3 << 50]) | 3
        else:
            value = 0
        b.write(where, value)


@pytest.mark.parametrize("seed", range(24))
def test_random_corruption_ends_in_results_or_vmishell_errors_within_the_bounds(
    seed: int,
) -> None:
    rng = random.Random(seed)
    granule = GRANULES[seed % 3]
    b = Arm64TableBuilder(granule, 48, ram_size=48 * granule)
    vas = []
    for _ in range(12):
        half = rng.randrange(2)
        va = rng.randrange(1 << 20) * granule % (1 << 47)
        if half:
            va |= 0xFFFF_8000_0000_0000
        b.map(va, RAM + rng.randrange(40) * granule)
        vas.append(va)
    corrupt(b, rng, rng.randrange(1, 40))
    # A lower cap than a session's keeps the 24 cases short; the default is exercised above.
    tr = translator(b, max_work=1 << 16)
    space = AddressSpace(tr)

    def case() -> int:
        n = 0
        for va in vas:
            for call, args in (
                (tr.translate, (va + 8,)),
                (tr.walk, (va,)),
                (space.read_into, (va, bytearray(3 * granule))),
            ):
                try:
                    call(*args)  # type: ignore[operator]
                except VmiError:
                    n += 1
        for enumerate_all in (lambda: sum(1 for _ in tr.mappings()), tr.runs):
            try:
                enumerate_all()
            except GuestDataError:
                n += 1
        return n

    result, calls = counted(case)
    assert isinstance(result, int), result  # a VmiError escaping the case would show here
    assert calls < CASE_CALLS
    result, peak = peak_of(case)
    assert isinstance(result, int) and peak < CASE_PEAK_BYTES
