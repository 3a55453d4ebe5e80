"""vmishell never writes guest memory unless a source was explicitly opened writable.

Read-only is enforced twice: `write()` refuses with SourceError, and the
file behind the source is mapped PROT_READ (mmap.ACCESS_READ from an
O_RDONLY descriptor), so even a bug that wrote through a zero-copy view
would fail with TypeError instead of changing the guest.
"""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from vmishell.errors import SourceError
from vmishell.sources import BufferSource, open_image
from vmishell.sources.files import QemuRamSource, RawImageSource

PAGE = 4096


@pytest.fixture
def ram_file(tmp_path: Path) -> Path:
    path = tmp_path / "ram"
    path.write_bytes(bytes(range(256)) * 64)  # 16 KiB
    return path


def _elf_core(tmp_path: Path) -> Path:
    ram = b"\x11" * PAGE
    header = struct.pack(
        "<4sBBBBB7sHHIQQQIHHHHHH",
        b"\x7fELF", 2, 1, 1, 0, 0, b"", 4, 62, 1, 0, 64, 0, 0, 64, 56, 1, 0, 0, 0,
    )  # fmt: skip
    phdr = struct.pack("<IIQQQQQQ", 1, 7, 120, 0, 0, len(ram), len(ram), 0x1000)
    path = tmp_path / "core.elf"
    path.write_bytes(header + phdr + ram)
    return path


def _assert_read_only(source, path: Path) -> None:
    before = path.read_bytes()
    assert source.writable is False
    with pytest.raises(SourceError, match="read-only"):
        source.write(0, b"\xff")
    view = source.segments()[0].view
    assert view.readonly
    with pytest.raises(TypeError):
        view[0] = 0xFF
    assert source._mmap.closed is False
    with pytest.raises(TypeError, match="readonly"):
        source._mmap.write_byte(0)
    assert path.read_bytes() == before


def test_a_raw_image_is_mapped_read_only(ram_file: Path) -> None:
    with RawImageSource(ram_file) as source:
        _assert_read_only(source, ram_file)


def test_open_image_maps_raw_and_elf_images_read_only(ram_file: Path, tmp_path: Path) -> None:
    for path in (ram_file, _elf_core(tmp_path)):
        with open_image(path) as source:
            _assert_read_only(source, path)


def test_a_live_ram_file_is_read_only_unless_opened_writable(ram_file: Path) -> None:
    with QemuRamSource(ram_file) as source:
        assert source.live
        _assert_read_only(source, ram_file)


def test_a_live_ram_file_opened_writable_writes_through_to_the_guest(ram_file: Path) -> None:
    with QemuRamSource(ram_file, writable=True) as source:
        assert source.writable
        source.write(PAGE, b"written")
    assert ram_file.read_bytes()[PAGE : PAGE + 7] == b"written"


def test_a_buffer_source_is_read_only_by_default_even_over_a_bytearray() -> None:
    buf = bytearray(PAGE)
    source = BufferSource([(0, buf)])
    with pytest.raises(SourceError, match="read-only"):
        source.write(0, b"x")
    assert BufferSource([(0, bytes(PAGE))], writable=True).writable is False  # bytes cannot be
    writable = BufferSource([(0, buf)], writable=True)
    writable.write(0, b"x")
    assert buf[0] == ord("x")


def test_the_default_for_every_way_of_opening_is_read_only() -> None:
    """Keyword defaults are the policy: a change to any of them must be deliberate."""
    import inspect

    from vmishell.session import Session

    for fn in (Session.qemu, Session.lab, Session.attach, QemuRamSource.__init__):
        assert inspect.signature(fn).parameters["writable"].default is False, fn
