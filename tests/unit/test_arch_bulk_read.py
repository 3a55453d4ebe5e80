"""Large reads: built in place, read_into a caller's buffer, zero-copy views."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.pagetables import PageTableBuilder
from vmishell.arch import AddressSpace, PagingMode, Translator, fresh
from vmishell.errors import PageFault, TranslationError
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


def big_scattered(tmp_path: Path) -> tuple[RawImageSource, PageTableBuilder, bytes]:
    """A 6 MiB virtual buffer: 3 MiB contiguous, a 1 MiB hole, 2 MiB in scattered frames."""
    b = PageTableBuilder(PagingMode.LEVEL4, ram_size=32 * MiB)
    head = pattern(3 * MiB, 3)
    b.ram[4 * MiB : 7 * MiB] = head
    b.map_range(VA, 4 * MiB, 3 * MiB)
    want = head + bytes(MiB)
    for i in range(512):
        frame = 16 * MiB + ((i * 37) % 512) * 0x2000
        page = pattern(0x1000, i)
        b.ram[frame : frame + 0x1000] = page
        b.map(VA + 4 * MiB + i * 0x1000, frame)
        want += page
    return image(tmp_path, b), b, want


def test_a_large_read_is_built_in_place_and_equals_the_pieces(tmp_path: Path) -> None:
    src, b, want = big_scattered(tmp_path)
    asp = AddressSpace(Translator(src, b.dtb, b.mode))
    assert len(want) >= fresh.IN_PLACE_MIN
    data = asp.read(VA, len(want), pad=True)
    assert type(data) is bytes and data == want
    assert asp.read(VA + 5, 3 * MiB - 5) == want[5 : 3 * MiB]  # one run
    with pytest.raises(PageFault):
        asp.read(VA, len(want))  # the hole, unpadded
    src.close()


def test_without_ctypes_a_large_read_is_joined_from_the_pieces(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src, b, want = big_scattered(tmp_path)
    monkeypatch.setattr("vmishell.arch.addrspace.fresh_bytes", lambda size: None)
    asp = AddressSpace(Translator(src, b.dtb, b.mode))
    assert asp.read(VA, len(want), pad=True) == want
    src.close()


def test_fresh_bytes_hands_out_a_writable_view_of_a_new_bytes_object() -> None:
    made = fresh.fresh_bytes(fresh.IN_PLACE_MIN)
    assert made is not None
    data, view = made
    view[:] = b"\xab" * len(view)
    view.release()
    assert type(data) is bytes and data == b"\xab" * fresh.IN_PLACE_MIN
    assert fresh.fresh_bytes(fresh.IN_PLACE_MIN - 1) is None  # small: built the plain way
