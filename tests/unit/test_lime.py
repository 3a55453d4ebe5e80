"""LiME and AVML images: ranges with holes read back exactly; bad files fail with one clear line."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from vmishell.errors import PhysicalReadError, SourceError
from vmishell.sources import open_image
from vmishell.sources.base import PhysRange
from vmishell.sources.lime import AVML_MAGIC, LIME_MAGIC, LimeSource, write_lime
from vmishell.sources.memory import BufferSource

HEADER = struct.Struct("<IIQQQ")


def ram_with_holes() -> BufferSource:
    """Three RAM runs with holes between them, each byte telling where it is."""
    runs = [(0x0, 0x3000), (0x5000, 0x12345), (0x100000, 0x20000)]
    return BufferSource(
        [(start, bytes((start + i) * 7 % 251 for i in range(size))) for start, size in runs]
    )


def header(start: int, end_inclusive: int, *, magic: int = LIME_MAGIC, version: int = 1) -> bytes:
    return HEADER.pack(magic, version, start, end_inclusive, 0)


@pytest.fixture(params=[False, True], ids=["lime", "avml-compressed"])
def compress(request: pytest.FixtureRequest) -> bool:
    return request.param


def test_a_written_image_reads_back_byte_for_byte(tmp_path: Path, compress: bool) -> None:
    ram = ram_with_holes()
    path = write_lime(ram, tmp_path / "img.lime", compress=compress, chunk=0x4000)
    with open_image(path) as img:
        assert isinstance(img, LimeSource)
        assert list(img.ranges()) == list(ram.ranges())
        for r in ram.ranges():
            assert img.read(r.start, r.size) == ram.read(r.start, r.size)
        # Reads inside a range may start and stop anywhere (and cross compressed frames).
        assert img.read(0x5000 + 0xFFF0, 0x30) == ram.read(0x5000 + 0xFFF0, 0x30)


def test_holes_between_ranges_are_not_ram(tmp_path: Path, compress: bool) -> None:
    path = write_lime(ram_with_holes(), tmp_path / "img.lime", compress=compress)
    with LimeSource(path) as img:
        with pytest.raises(PhysicalReadError):
            img.read(0x3000, 1)
        with pytest.raises(PhysicalReadError):
            img.read(0x2FF0, 0x20)  # runs off the end of the first range
        assert not img.is_valid(0x4FFF)
        assert img.read_padded(0x2FFE, 4) == ram_with_holes().read(0x2FFE, 2) + b"\0\0"


def test_only_the_requested_ranges_are_written(tmp_path: Path) -> None:
    ram = ram_with_holes()
    path = write_lime(ram, tmp_path / "part.lime", [PhysRange(0x5000, 0x6000)])
    with LimeSource(path) as img:
        assert list(img.ranges()) == [PhysRange(0x5000, 0x6000)]
        assert img.read(0x5000, 0x1000) == ram.read(0x5000, 0x1000)


def test_uncompressed_images_offer_zero_copy_segments(tmp_path: Path) -> None:
    path = write_lime(ram_with_holes(), tmp_path / "img.lime")
    with LimeSource(path) as img:
        segs = img.segments()
        assert segs is not None
        assert [(s.start, s.end) for s in segs] == [(r.start, r.end) for r in img.ranges()]


def test_compressed_images_are_smaller_and_named_so(tmp_path: Path) -> None:
    ram = BufferSource([(0, bytes(1 << 20))])
    plain = write_lime(ram, tmp_path / "a.lime")
    packed = write_lime(ram, tmp_path / "a.avml", compress=True)
    assert packed.stat().st_size < plain.stat().st_size // 10
    assert packed.read_bytes()[:4] == b"AVML"
    with open_image(packed) as img:
        assert "compressed" in img.description
        assert img.segments() is None
        assert img.read(0x80000, 16) == bytes(16)


def write(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / "bad.lime"
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (header(0, 0xFFF, magic=0x12345678) + bytes(0x1000), "bad LiME magic 0x12345678"),
        (header(0, 0xFFF, version=3) + bytes(0x1000), "LiME version 3 at offset 0x0"),
        (header(0, 0xFFF)[:20], "truncated LiME header at offset 0x0"),
        (header(0, 0xFFF) + bytes(0x800), "is truncated: 0x1000 bytes declared, 0x800 present"),
        (
            header(0x1000, 0x1FFF) + bytes(0x1000) + header(0x1800, 0x27FF) + bytes(0x1000),
            "overlaps the range 0x1000-0x1fff",
        ),
        (
            header(0x2000, 0x2FFF) + bytes(0x1000) + header(0, 0xFFF) + bytes(0x1000),
            "comes before the range 0x2000-0x2fff",
        ),
        (header(0x2000, 0x1000), "ends (0x1000) before it starts (0x2000)"),
        (header(0, (1 << 60) - 1), "lies beyond any physical address"),
        (header(0, 0xFFF) + bytes(0x1000) + b"junk", "truncated LiME header at offset 0x1020"),
        (header(0, 0xFFF, magic=AVML_MAGIC, version=2) + b"\xff\x06\x00\x00sNaPpY", "truncated"),
        (
            header(0, 0xFFF, magic=AVML_MAGIC, version=2) + b"\xff\x06\x00\x00sNaPpX",
            "bad snappy stream identifier",
        ),
    ],
    ids=[
        "magic", "version", "short-header", "short-range", "overlap", "unsorted",
        "end-before-start", "absurd-address", "trailing-junk", "short-stream", "bad-stream-id",
    ],
)  # fmt: skip
def test_bad_files_fail_with_a_clear_error(tmp_path: Path, data: bytes, message: str) -> None:
    path = write(tmp_path, data)
    with pytest.raises(SourceError) as err:
        LimeSource(path)
    assert message in str(err.value)
    assert str(path) in str(err.value)
    assert "\n" not in str(err.value)


def test_an_empty_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="is empty"):
        LimeSource(write(tmp_path, b""))


def test_a_corrupt_compressed_frame_fails_when_read_not_before(tmp_path: Path) -> None:
    body = b"\x00\x10\x00\x00" + b"\0\0\0\0" + b"\x80\x20" + b"\xff" * 10  # 0x1000 bytes claimed
    data = header(0, 0xFFF, magic=AVML_MAGIC, version=2) + body + struct.pack("<Q", len(body))
    with (
        LimeSource(write(tmp_path, data)) as img,
        pytest.raises(SourceError, match="corrupt snappy frame"),
    ):
        img.read(0, 16)


def test_open_image_knows_both_magics(tmp_path: Path) -> None:
    lime = write_lime(ram_with_holes(), tmp_path / "x.lime")
    avml = write_lime(ram_with_holes(), tmp_path / "x.avml", compress=True)
    assert lime.read_bytes()[:4] == b"EMiL"
    for path in (lime, avml):
        with open_image(path) as img:
            assert isinstance(img, LimeSource)
