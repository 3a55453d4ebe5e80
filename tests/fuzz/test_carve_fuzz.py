"""Crafted guest memory against the carve: BTF headers and kallsyms tables the guest controls.

A guest can plant or corrupt every byte the carve reads. Whatever the bytes,
carving (and building the profile from what it found) ends in a profile or a
vmishell error, within a bounded amount of work, and a profile it does return
still names the kernel's own banner and the BTF at `__start_BTF`.
"""

from __future__ import annotations

import struct

from hypothesis import given
from hypothesis import strategies as st

from tests.support.carve import BANNER, BTF_AT, IMAGE_PADDR, TABLES_AT, make_guest, vmcoreinfo
from vmishell.errors import VmiError
from vmishell.sources import BufferSource
from vmishell.symbols.carve import carve_kernel, carved_isf

from .harness import fuzz_settings, work_meter

SIZE = 0x1400000
CLEAN = make_guest(size=SIZE, info=vmcoreinfo())
TABLES_LEN = 0x8000  # the synthetic tables are ~12 KiB; mutate a little past them
#: Function calls one carve may make: a clean carve makes well under a million.
CARVE_CALLS = 5_000_000

regions = st.sampled_from(
    [
        (IMAGE_PADDR + BTF_AT, 24),  # the BTF header
        (IMAGE_PADDR + BTF_AT + 24, 64),  # the first type records
        (IMAGE_PADDR + TABLES_AT, TABLES_LEN),  # kallsyms (offsets, names, markers, tokens)
        (SIZE - 0x100000, 128),  # VMCOREINFO
    ]
)
words = st.sampled_from([0, 1, 0xFF, 0x100, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF, 0xEB9F, 24])


@st.composite
def mutations(draw: st.DrawFn) -> list[tuple[int, bytes]]:
    out = []
    for _ in range(draw(st.integers(1, 6))):
        start, length = draw(regions)
        at = start + draw(st.integers(0, length - 1))
        if draw(st.booleans()):
            data = struct.pack("<I", draw(words))
        else:
            data = draw(st.binary(min_size=1, max_size=16))
        out.append((at, data))
    return out


def _carve(memory: bytearray) -> object:
    source = BufferSource([(0, memory)], description="crafted guest")
    try:
        with work_meter(CARVE_CALLS):
            carved = carve_kernel(source)
            carved_isf(carved, "crafted guest")
    except VmiError as exc:
        return exc
    return carved


@given(mutations())
@fuzz_settings(60)
def test_crafted_btf_and_kallsyms_end_in_a_profile_or_a_vmishell_error(
    changes: list[tuple[int, bytes]],
) -> None:
    memory = bytearray(CLEAN.memory)
    for at, data in changes:
        memory[at : at + len(data)] = data
    result = _carve(memory)
    if isinstance(result, VmiError):
        return
    assert result.banner == BANNER
    assert result.where["btf"] == IMAGE_PADDR + BTF_AT


def test_the_clean_guest_carves() -> None:
    result = _carve(bytearray(CLEAN.memory))
    assert not isinstance(result, VmiError), result
