"""Physical memory sources: ranges, out-of-RAM reads, image formats, ELF core notes."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from vmishell.errors import PhysicalReadError, RegistersUnavailable, SourceError
from vmishell.sources import BufferSource, open_image
from vmishell.sources.elfcore import ElfCoreSource
from vmishell.sources.files import RawImageSource
from vmishell.sources.layout import qemu_ram_layout, qemu_x86_ram_layout


def test_a_read_inside_ram_returns_the_bytes_there() -> None:
    src = BufferSource([(0x1000, bytes(range(256)) * 16)])
    assert src.read(0x1010, 4) == bytes([0x10, 0x11, 0x12, 0x13])


@pytest.mark.parametrize("paddr,size", [(0x0, 1), (0x1FFF, 2), (0x2000, 1), (-1, 1)])
def test_a_read_touching_anything_outside_ram_names_the_address(paddr: int, size: int) -> None:
    src = BufferSource([(0x1000, bytes(0x1000))])
    with pytest.raises(PhysicalReadError, match=hex(paddr) if paddr >= 0 else "negative"):
        src.read(paddr, size)


def test_a_read_may_span_adjacent_ranges_but_not_a_hole() -> None:
    src = BufferSource([(0, b"a" * 16), (16, b"b" * 16), (64, b"c" * 16)])
    assert src.read(12, 8) == b"aaaabbbb"
    with pytest.raises(PhysicalReadError, match="0x20 is outside"):
        src.read(24, 48)
    assert src.read_padded(24, 48) == b"b" * 8 + bytes(32) + b"c" * 8


def test_find_reports_every_match_including_across_internal_chunks() -> None:
    data = bytearray(40 << 20)
    for pos in (5, (16 << 20) - 3, 30 << 20):
        data[pos : pos + 6] = b"NEEDLE"
    src = BufferSource([(0x100000, data)])
    assert list(src.find(b"NEEDLE")) == [
        0x100000 + 5,
        0x100000 + (16 << 20) - 3,
        0x100000 + (30 << 20),
    ]


def test_sources_are_read_only_unless_opened_writable() -> None:
    src = BufferSource([(0, bytearray(16))])
    with pytest.raises(SourceError, match="read-only"):
        src.write(0, b"x")
    writable = BufferSource([(0, bytearray(16))], writable=True)
    writable.write(4, b"xy")
    assert writable.read(3, 4) == b"\0xy\0"


def test_live_sources_change_generation_on_refresh_images_do_not() -> None:
    live = BufferSource([(0, b"x")], live=True)
    image = BufferSource([(0, b"x")])
    live.refresh()
    image.refresh()
    assert (live.generation, image.generation) == (1, 0)


def test_a_source_without_cpu_state_says_so() -> None:
    with pytest.raises(RegistersUnavailable):
        BufferSource([(0, b"x")]).registers()


def test_qemu_puts_ram_above_4gib_only_when_it_no_longer_fits_below() -> None:
    assert qemu_x86_ram_layout(512 << 20, "q35") == [(0, 0, 512 << 20)]
    assert qemu_x86_ram_layout(4 << 30, "q35") == [(0, 0, 2 << 30), (4 << 30, 2 << 30, 2 << 30)]
    assert qemu_x86_ram_layout(4 << 30, "pc") == [(0, 0, 3 << 30), (4 << 30, 3 << 30, 1 << 30)]


def test_arm_virt_ram_starts_at_1_gib_whatever_its_size() -> None:
    assert qemu_ram_layout(256 << 20, "virt") == [(0x40000000, 0, 256 << 20)]
    assert qemu_ram_layout(4 << 30, "virt") == [(0x40000000, 0, 4 << 30)]
    assert qemu_ram_layout(4 << 30, "q35") == qemu_x86_ram_layout(4 << 30, "q35")


def test_a_virt_ram_file_puts_offset_0_at_physical_0x40000000(tmp_path: Path) -> None:
    path = tmp_path / "virt.ram"
    path.write_bytes(b"\0" * 0x2000 + b"MARK" + b"\0" * 0xFFC)
    with RawImageSource(path, machine="virt") as src:
        assert [(r.start, r.end) for r in src.ranges()] == [(0x40000000, 0x40003000)]
        assert src.read(0x40002000, 4) == b"MARK"
        assert list(src.find(b"MARK")) == [0x40002000]
        with pytest.raises(PhysicalReadError):
            src.read(0x2000, 4)


def test_a_raw_image_maps_file_offsets_to_physical_addresses(tmp_path: Path) -> None:
    path = tmp_path / "mem.raw"
    path.write_bytes(b"\0" * 0x3000 + b"MARK" + b"\0" * 0xFFC)
    with open_image(path) as src:
        assert isinstance(src, RawImageSource)
        assert src.read(0x3000, 4) == b"MARK"
        assert list(src.find(b"MARK")) == [0x3000]
        with pytest.raises(PhysicalReadError):
            src.read(0x4000, 1)


def test_a_missing_or_empty_image_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="no such image"):
        open_image(tmp_path / "nope")
    (tmp_path / "empty").write_bytes(b"")
    with pytest.raises(SourceError, match="empty"):
        open_image(tmp_path / "empty")


def _qemu_note(cr: tuple[int, int, int, int, int]) -> bytes:
    state = struct.pack("<II", 1, 0x1B8) + struct.pack("<18Q", *range(18))
    state += bytes(10 * 24) + struct.pack("<5Q", *cr) + struct.pack("<Q", 0)
    name = b"QEMU\0"
    return (
        struct.pack("<III", len(name), len(state), 0)
        + name.ljust(8, b"\0")
        + state.ljust((len(state) + 3) & ~3, b"\0")
    )


def _elf64_core(segments: list[tuple[int, bytes]], note: bytes) -> bytes:
    """A minimal ELF64 core: one PT_NOTE then PT_LOADs, as QEMU writes them."""
    phnum = 1 + len(segments)
    offset = 64 + 56 * phnum
    headers, body = [], b""
    headers.append(struct.pack("<IIQQQQQQ", 4, 0, offset, 0, 0, len(note), len(note), 0))
    body += note
    for paddr, data in segments:
        headers.append(
            struct.pack("<IIQQQQQQ", 1, 7, offset + len(body), 0, paddr, len(data), len(data), 0)
        )
        body += data
    ident = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)
    ehdr = ident + struct.pack("<HHIQQQIHHHHHH", 4, 62, 1, 0, 64, 0, 0, 64, 56, phnum, 0, 0, 0)
    return ehdr + b"".join(headers) + body


def test_an_elf_core_places_segments_and_carries_the_control_registers(tmp_path: Path) -> None:
    path = tmp_path / "dump.elf"
    cr = (0x80050033, 0, 0, 0x1234000, 0x3406F0)
    path.write_bytes(_elf64_core([(0, b"A" * 0x1000), (0x100000, b"B" * 0x2000)], _qemu_note(cr)))
    with open_image(path) as src:
        assert isinstance(src, ElfCoreSource)
        assert [(r.start, r.end) for r in src.ranges()] == [(0, 0x1000), (0x100000, 0x102000)]
        assert src.read(0x100FFE, 4) == b"BBBB"
        with pytest.raises(PhysicalReadError):
            src.read(0x1000, 1)
        regs = src.registers()
        assert (regs.arch, regs.cr0, regs.cr3, regs.cr4) == ("x86_64", cr[0], cr[3], cr[4])
        assert regs.efer is not None and regs.efer & (1 << 10)


def test_a_truncated_elf_core_is_a_clear_error(tmp_path: Path) -> None:
    data = _elf64_core([(0, b"A" * 0x1000)], _qemu_note((0, 0, 0, 0, 0)))
    path = tmp_path / "cut.elf"
    path.write_bytes(data[:100])
    with pytest.raises(SourceError, match="outside the file"):
        open_image(path)
    path.write_bytes(data[: len(data) - 10])
    with pytest.raises(SourceError, match="too small"):
        open_image(path)
