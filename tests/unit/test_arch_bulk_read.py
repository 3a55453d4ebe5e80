"""Large reads: read_into a caller's buffer, zero-copy views, and pread from a mapped file."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.support.pagetables import PageTableBuilder
from vmishell.arch import AddressSpace, PagingMode, Translator
from vmishell.arch.addrspace import PREAD_MIN
from vmishell.errors import PageFault, TargetEnded, TranslationError
from vmishell.sources.files import RawImageSource

MiB = 1 << 20
VA = 0xFFFF_C900_0000_0000


def pattern(size: int, seed: int) -> bytes:
    return bytes((seed + i * 7 + (i >> 12)) & 0xFF for i in range(size))


def scattered(ram_mib: int = 16) -> tuple[PageTableBuilder, bytes]:
    """Eight pages: two contiguous pairs, a hole, scattered frames; and what they hold."""
    b = PageTableBuilder(PagingMode.LEVEL4, ram_size=ram_mib * MiB)
    frames = [0x40_0000, 0x40_1000, 0x80_0000, None, 0x60_0000, 0x60_1000, 0x20_0000, 0x90_0000]
    want = b""
    for i, frame in enumerate(frames):
        if frame is None:
            want += bytes(0x1000)
            continue
        data = pattern(0x1000, i)
        b.ram[frame : frame + 0x1000] = data
        b.map(VA + i * 0x1000, frame)
        want += data
    return b, want


@pytest.mark.parametrize("zero_copy", [True, False], ids=["mmap", "copying"])
def test_read_into_fills_the_buffer_like_read(zero_copy: bool) -> None:
    b, want = scattered()
    asp = AddressSpace(Translator(b.source(zero_copy=zero_copy), b.dtb, b.mode))
    buf = bytearray(len(want))
    assert asp.read_into(VA, buf, pad=True) == len(want)
    assert buf == want == asp.read(VA, len(want), pad=True)
    part = memoryview(bytearray(0x1800))
    asp.read_into(VA + 0x800, part)
    assert part == want[0x800:0x2000]


def test_read_into_finds_faults_before_writing() -> None:
    b, _ = scattered()
    asp = AddressSpace(Translator(b.source(), b.dtb, b.mode))
    buf = bytearray(b"\xaa" * 0x8000)
    with pytest.raises(PageFault):
        asp.read_into(VA, buf)  # page 3 is a hole
    assert buf == b"\xaa" * 0x8000
    with pytest.raises(TranslationError, match="writable"):
        asp.read_into(VA, bytes(16))


def test_view_is_zero_copy_over_one_physical_run_and_released_after() -> None:
    b, want = scattered()
    asp = AddressSpace(Translator(b.source(), b.dtb, b.mode))
    with asp.view(VA + 0x10, 0x1FF0) as view:  # pages 0-1: physically contiguous
        assert view.readonly and view == want[0x10:0x2000]
        b.ram[0x40_0010] ^= 0xFF  # the guest writes: a view sees it
        assert view[0] == b.ram[0x40_0010]
    with pytest.raises(ValueError, match="released"):
        view[0]


def test_view_over_several_runs_is_a_copy() -> None:
    b, want = scattered()
    asp = AddressSpace(Translator(b.source(), b.dtb, b.mode))
    with asp.view(VA, len(want), pad=True) as view:
        assert view == want
        b.ram[0x40_0000] ^= 0xFF
        assert view[0] == want[0]  # a copy: the guest's later write is not in it
    with asp.view(VA, 0) as empty:
        assert len(empty) == 0


def image(tmp_path: Path, b: PageTableBuilder) -> RawImageSource:
    path = tmp_path / "ram.raw"
    path.write_bytes(b.ram)
    return RawImageSource(path)


def test_large_runs_of_a_file_are_read_with_pread_and_agree(tmp_path: Path) -> None:
    b = PageTableBuilder(PagingMode.LEVEL4, ram_size=16 * MiB)
    size = max(2 * PREAD_MIN, 2 * MiB)
    data = pattern(size, 3)
    b.ram[4 * MiB : 4 * MiB + size] = data
    b.map_range(VA, 4 * MiB, size)
    src = image(tmp_path, b)
    asp = AddressSpace(Translator(src, b.dtb, b.mode))
    calls = []
    real = src.read_file

    def spy(paddr: int, length: int) -> bytes | None:
        calls.append((paddr, length))
        return real(paddr, length)

    asp._read_file = spy
    assert asp.read(VA + 1, size - 1) == data[1:]
    assert calls == [(4 * MiB + 1, size - 1)]
    assert asp.read(VA, 0x100) == data[:0x100]  # small reads stay with the map
    assert len(calls) == 1
    assert src.read_file(15 * MiB, 2 * MiB) is None  # past the end of RAM
    src.close()


def test_a_file_that_shrank_ends_the_source_on_pread(tmp_path: Path) -> None:
    b = PageTableBuilder(PagingMode.LEVEL4, ram_size=16 * MiB)
    src = image(tmp_path, b)
    os.truncate(src.path, 8 * MiB)
    with pytest.raises(TargetEnded, match="shrank"):
        src.read_file(10 * MiB, MiB)
