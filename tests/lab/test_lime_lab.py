"""A LiME image of a lab guest, with a hole in its RAM, is as good as the raw dump."""

from __future__ import annotations

from pathlib import Path

import pytest

from vmishell.session import Session
from vmishell.sources import open_image
from vmishell.sources.base import PhysRange
from vmishell.sources.lime import LimeSource, write_lime

pytestmark = pytest.mark.lab

#: Legacy VGA/BIOS memory: a hole LiME itself leaves (the kernel does not keep tasks there).
HOLE = PhysRange(0xA0000, 0x100000)


@pytest.fixture(params=["x86_64", "i386-pae"])
def guest_name(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(params=[False, True], ids=["lime", "avml"])
def images(request, lab_guest, guest_name, tmp_path: Path):
    raw = lab_guest(guest_name).dump(tmp_path / "ram.raw", "raw")
    with open_image(raw) as src:
        ranges = [PhysRange(0, HOLE.start), PhysRange(HOLE.end, src.size)]
        lime = write_lime(src, tmp_path / "ram.lime", ranges, compress=request.param)
    yield raw, lime, ranges
    raw.unlink(missing_ok=True)
    lime.unlink(missing_ok=True)


def test_the_image_reads_back_byte_for_byte_with_its_hole(images) -> None:
    raw, lime, ranges = images
    with open_image(raw) as a, open_image(lime) as b:
        assert isinstance(b, LimeSource)
        assert list(b.ranges()) == ranges
        assert not b.is_valid(HOLE.start) and not b.is_valid(HOLE.end - 1)
        for r in ranges:
            for pos in range(r.start, r.end, 32 << 20):
                n = min(32 << 20, r.end - pos)
                assert a.read(pos, n) == b.read(pos, n), hex(pos)


def test_the_image_lists_the_same_processes_as_the_raw_dump(images) -> None:
    raw, lime, _ = images
    with Session.image(raw) as a, Session.image(lime) as b:
        assert b.processes().equals(a.processes())
