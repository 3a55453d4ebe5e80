"""kdump-compressed dumps, built in bytes: every codec, plain and flattened, and damage.

The writer below follows makedumpfile's layout (disk_dump_header,
kdump_sub_header, two bitmaps, page descriptors, pages) so that each codec's
pages, the flattened records and 32-bit headers are exercised without a
guest; tests/lab/test_attach_any_lab.py reads dumps that QEMU and libvirt wrote.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import pytest

from vmishell.errors import PhysicalReadError, SourceError, VmiError
from vmishell.sources import open_image
from vmishell.sources.kdump import (
    DUMP_DH_COMPRESSED_LZO,
    DUMP_DH_COMPRESSED_SNAPPY,
    DUMP_DH_COMPRESSED_ZLIB,
    DUMP_DH_COMPRESSED_ZSTD,
    KdumpSource,
)

BS = 4096
VMCOREINFO = b"OSRELEASE=6.1.0-test\nPAGESIZE=4096\nKERNELOFFSET=2d400000\nNUMBER(phys_base)=0\n"


def _compress(codec: str, page: bytes) -> tuple[bytes, int]:
    if codec == "zlib":
        return zlib.compress(page), DUMP_DH_COMPRESSED_ZLIB
    if codec == "lzo":
        lzo = pytest.importorskip("lzo")
        return lzo.compress(page, 1, False), DUMP_DH_COMPRESSED_LZO
    if codec == "snappy":
        cramjam = pytest.importorskip("cramjam")
        return bytes(cramjam.snappy.compress_raw(page)), DUMP_DH_COMPRESSED_SNAPPY
    if codec == "zstd":
        zstandard = pytest.importorskip("zstandard")
        return zstandard.ZstdCompressor().compress(page), DUMP_DH_COMPRESSED_ZSTD
    return page, 0


def write_kdump(
    pages: dict[int, bytes],
    max_mapnr: int,
    *,
    codec: str = "zlib",
    machine: bytes = b"x86_64",
    vmcoreinfo: bytes = VMCOREINFO,
    split: int = 0,
    block_size: int = BS,
    wide: bool | None = None,
) -> bytes:
    """A kdump-compressed file of `pages` (pfn -> 4 KiB) of a machine of `max_mapnr` frames."""
    is64 = machine == b"x86_64" if wide is None else wide
    header = bytearray(BS)
    header[0:8] = b"KDUMP   "
    struct.pack_into("<i", header, 8, 6)
    for i, text in enumerate([b"Linux", b"guest", b"6.1.0-test", b"#1", machine, b""]):
        header[12 + 65 * i : 12 + 65 * i + len(text)] = text
    bitmap_bytes = -(-max_mapnr // 8)
    half_blocks = -(-bitmap_bytes // BS)
    struct.pack_into(
        "<IiiIIIII", header, 424 if is64 else 412,
        0, block_size, 1, 2 * half_blocks, max_mapnr, len(pages), 0, len(pages),
    )  # fmt: skip
    sub = bytearray(BS)
    vmci_at = BS + 512
    sub[512 : 512 + len(vmcoreinfo)] = vmcoreinfo
    if is64:
        struct.pack_into("<QiI", sub, 0, 0x1000000, 0, split)
        struct.pack_into("<qQqQ", sub, 32, vmci_at, len(vmcoreinfo), 0, 0)
        struct.pack_into("<Q", sub, 96, max_mapnr)
    else:
        struct.pack_into("<IiI", sub, 0, 0x1000000, 0, split)
        struct.pack_into("<qIqI", sub, 20, vmci_at, len(vmcoreinfo), 0, 0)
        struct.pack_into("<Q", sub, 72, max_mapnr)
    bitmap = bytearray(half_blocks * BS)
    for pfn in pages:
        bitmap[pfn >> 3] |= 1 << (pfn & 7)
    out = bytearray(header + sub + bitmap + bitmap)
    desc_at = len(out)
    data_at = desc_at + 24 * len(pages)
    descs, data = bytearray(), bytearray()
    for pfn in sorted(pages):
        stored, flags = _compress(codec, pages[pfn])
        if len(stored) >= BS:
            stored, flags = pages[pfn], 0
        descs += struct.pack("<qIIQ", data_at + len(data), len(stored), flags, 0)
        data += stored
    return bytes(out + descs + data)


def flatten(plain: bytes, record: int = 3000, skip_zeros: bool = True) -> bytes:
    """The flattened form (what QEMU and libvirt write): offset/size records, zeros left out."""
    out = bytearray(4096)
    out[0:16] = b"makedumpfile\0\0\0\0"
    struct.pack_into(">qq", out, 16, 1, 1)
    for pos in range(0, len(plain), record):
        chunk = plain[pos : pos + record]
        if skip_zeros and not any(chunk):
            continue
        out += struct.pack(">qq", pos, len(chunk)) + chunk
    return bytes(out + struct.pack(">qq", -1, -1))


def _pages() -> dict[int, bytes]:
    """RAM at frames 0-15 and 256-271; pages of text (compress well) and of noise (do not)."""
    import random

    rng = random.Random(7)
    pages = {}
    for pfn in [*range(16), *range(256, 272)]:
        if pfn % 3 == 0:
            pages[pfn] = bytes(rng.getrandbits(8) for _ in range(BS))
        else:
            pages[pfn] = (f"page {pfn:#x} ".encode() * 1000)[:BS]
    pages[5] = bytes(BS)
    return pages


@pytest.mark.parametrize("flat", [False, True], ids=["plain", "flattened"])
@pytest.mark.parametrize("codec", ["zlib", "lzo", "snappy", "zstd", "none"])
def test_every_page_reads_back_through_each_codec(tmp_path: Path, codec: str, flat: bool) -> None:
    pages = _pages()
    data = write_kdump(pages, 300, codec=codec)
    path = tmp_path / "dump.kdump"
    path.write_bytes(flatten(data) if flat else data)
    with open_image(path) as src:
        assert isinstance(src, KdumpSource) and src.flattened == flat
        assert [(r.start, r.end) for r in src.ranges()] == [(0, 16 * BS), (256 * BS, 272 * BS)]
        for pfn, page in pages.items():
            assert src.read(pfn * BS, BS) == page, pfn
        assert src.read(15 * BS + 100, 10) == pages[15][100:110]
        assert src.read(2 * BS - 8, 16) == pages[1][-8:] + pages[2][:8]  # across pages
        with pytest.raises(PhysicalReadError):
            src.read(16 * BS, 8)
        assert src.vmcoreinfo == VMCOREINFO.decode()
        assert src.read_padded(15 * BS, 2 * BS) == pages[15] + bytes(BS)


@pytest.mark.parametrize("wide", [False, True], ids=["makedumpfile-i386", "qemu"])
def test_a_32_bit_kernels_dump_has_either_header_width(tmp_path: Path, wide: bool) -> None:
    # makedumpfile on i386 writes 32-bit fields; QEMU writes the 64-bit header for i686 guests.
    pages = _pages()
    path = tmp_path / "i386.kdump"
    path.write_bytes(write_kdump(pages, 300, machine=b"i686", wide=wide))
    with KdumpSource(path) as src:
        assert src.is_64bit == wide and src.machine_name == "i686" and src.max_mapnr == 300
        assert src.read(257 * BS, BS) == pages[257]
        assert src.vmcoreinfo == VMCOREINFO.decode()


@pytest.mark.parametrize("flat", [False, True], ids=["plain", "flattened"])
def test_a_truncated_dump_gives_only_vmishell_errors(tmp_path: Path, flat: bool) -> None:
    pages = _pages()
    whole = write_kdump(pages, 300)
    whole = flatten(whole) if flat else whole
    path = tmp_path / "cut.kdump"
    for cut in [10, 500, 4096, 5000, 9000, 13000, len(whole) // 2, len(whole) - 100]:
        path.write_bytes(whole[:cut])
        try:
            with KdumpSource(path) as src:
                for pfn in pages:
                    src.read(pfn * BS, BS)
        except VmiError as exc:
            assert str(path) in str(exc), exc
        else:
            pytest.fail(f"a dump cut at {cut} bytes read back whole")


def test_damaged_page_data_names_the_page(tmp_path: Path) -> None:
    pages = _pages()
    data = bytearray(write_kdump(pages, 300))
    desc_at = 4 * BS  # header, sub-header, one block per bitmap
    offset, size, _, _ = struct.unpack_from("<qIIQ", data, desc_at + 24 * 1)  # pfn 1
    data[offset : offset + size] = b"\x55" * size
    path = tmp_path / "bad.kdump"
    path.write_bytes(bytes(data))
    with KdumpSource(path) as src:
        assert src.read(0, BS) == pages[0]
        with pytest.raises(PhysicalReadError, match=r"page 0x1: corrupt zlib data"):
            src.read(BS, 16)


def test_headers_that_cannot_be_right_are_refused_at_open(tmp_path: Path) -> None:
    path = tmp_path / "x.kdump"
    path.write_bytes(write_kdump(_pages(), 300, split=1))
    with pytest.raises(SourceError, match="split dump"):
        KdumpSource(path)
    path.write_bytes(write_kdump(_pages(), 300, block_size=1000))
    with pytest.raises(SourceError, match="damaged header"):
        KdumpSource(path)
    data = bytearray(write_kdump(_pages(), 300))
    struct.pack_into("<I", data, 424 + 16, 1 << 30)  # max_mapnr past the bitmaps
    struct.pack_into("<Q", data, BS + 96, 1 << 30)
    path.write_bytes(bytes(data))
    with pytest.raises(SourceError, match="do not fit the bitmaps"):
        KdumpSource(path)


def test_overlapping_flattened_records_are_refused(tmp_path: Path) -> None:
    flat = bytearray(flatten(write_kdump(_pages(), 300), skip_zeros=False))
    struct.pack_into(
        ">q", flat, 4096 + 16 + 3000, 2000
    )  # the second record starts inside the first
    path = tmp_path / "overlap.kdump"
    path.write_bytes(bytes(flat))
    with pytest.raises(SourceError, match=r"overlap at 0x7d0.*makedumpfile -R"):
        KdumpSource(path)


@pytest.mark.parametrize("flat", [False, True], ids=["plain", "flattened"])
def test_random_damage_to_the_headers_gives_only_vmishell_errors(
    tmp_path: Path, flat: bool
) -> None:
    import random

    pages = _pages()
    whole = write_kdump(pages, 300)
    whole = flatten(whole) if flat else whole
    rng = random.Random(15)
    path = tmp_path / "damaged.kdump"
    for _ in range(300):
        data = bytearray(whole)
        for _ in range(rng.randint(1, 8)):
            at = rng.randrange(min(len(data), 6 * BS))  # headers, bitmaps, descriptors
            data[at] = rng.randrange(256)
        path.write_bytes(bytes(data))
        try:
            with KdumpSource(path) as src:
                for r in src.ranges()[:4]:
                    src.read_padded(r.start, min(r.size, 4 * BS))
        except VmiError:
            pass
