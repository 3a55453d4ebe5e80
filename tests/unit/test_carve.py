"""Carving a profile from guest memory: a kernel image laid out in bytes, then tampered with.

The synthetic "kernel" is what the carve relies on in a real one: a banner,
the kallsyms tables (built as scripts/kallsyms.c lays them out, holding
run-time addresses moved by a KASLR slide), a BTF blob between `__start_BTF`
and `__stop_BTF`, and, in some tests, the kernel's VMCOREINFO page.
"""

from __future__ import annotations

import struct
import time

import pytest

from tests.support.carve import (
    BANNER,
    BANNER_AT,
    BTF_AT,
    IMAGE_PADDR,
    INIT_TASK_AT,
    LINK_TEXT,
    SLIDE,
    TABLES_AT,
    VMCOREINFO_DATA_AT,
    make_guest,
    vmcoreinfo,
)
from tests.unit.test_btf import sample_btf
from vmishell.errors import ProfileError, VmiError
from vmishell.sources import BufferSource
from vmishell.symbols.carve import (
    CARVED_SUFFIX,
    MissingBtf,
    carve_kernel,
    carved_isf,
)
from vmishell.symbols.carve_btf import btf_candidates, parse_header
from vmishell.symbols.carve_cache import carve_profile


def test_carve_finds_btf_kallsyms_and_banner_and_takes_the_kaslr_slide_off() -> None:
    guest = make_guest(info=vmcoreinfo())
    carved = carve_kernel(guest.source())
    assert carved.banner == BANNER
    assert carved.btf == guest.btf
    assert carved.symbols == guest.link_symbols
    assert carved.slide == SLIDE
    assert "VMCOREINFO" in carved.slide_from
    assert carved.where["btf"] == IMAGE_PADDR + BTF_AT
    assert (carved.pointer_size, carved.endian) == (8, "little")


def test_without_vmcoreinfo_the_slide_is_from_the_default_link_address() -> None:
    carved = carve_kernel(make_guest().source())
    assert carved.slide == SLIDE
    assert "assuming _text links at 0xffffffff81000000" in carved.slide_from
    assert carved.symbols["init_task"] == LINK_TEXT + INIT_TASK_AT


def test_the_page_vmcoreinfo_data_points_at_wins_over_vmcoreinfo_text_elsewhere() -> None:
    guest = make_guest(info=vmcoreinfo())
    decoy = b"OSRELEASE=6.1.0-99-amd64\nKERNELOFFSET=200000\n"  # no _stext to check it by
    guest.memory[0x10000 : 0x10000 + len(decoy)] = decoy  # found first by a scan
    assert carve_kernel(guest.source()).slide == SLIDE
    guest.memory[IMAGE_PADDR + VMCOREINFO_DATA_AT : IMAGE_PADDR + VMCOREINFO_DATA_AT + 8] = bytes(8)
    assert carve_kernel(guest.source()).slide == 0x200000  # the scan, when the pointer is gone


def test_a_vmcoreinfo_of_another_release_is_not_believed() -> None:
    other = vmcoreinfo(0x200000).replace(b"6.1.0-99-amd64", b"5.10.0-1-amd64")
    carved = carve_kernel(make_guest(info=other).source())
    assert carved.slide == SLIDE  # from the default link address, not the foreign note


def test_the_carved_isf_holds_banner_link_addresses_and_the_btf_checksum() -> None:
    guest = make_guest(info=vmcoreinfo())
    carved = carve_kernel(guest.source())
    isf = carved_isf(carved, "synthetic guest")
    assert isf["symbols"]["init_task"]["address"] == LINK_TEXT + INIT_TASK_AT
    assert isf["metadata"]["producer"]["btf_sha256"] == carved.btf_sha256
    assert "thing" in isf["user_types"]
    assert carved.filename().startswith("linux-6.1.0-99-amd64-6.1.999-1-btf")
    assert carved.filename().endswith(CARVED_SUFFIX)


def test_carve_profile_returns_a_usable_profile_without_touching_disk() -> None:
    profile = carve_profile(make_guest().source(), cache=False)
    assert profile.path is None
    assert profile.banner == BANNER
    assert profile.symbol_address("linux_banner") == LINK_TEXT + BANNER_AT
    assert profile.size_of("thing") == 56


def test_a_kernel_without_btf_gets_a_message_naming_what_is_missing_and_the_way_out() -> None:
    guest = make_guest(btf=b"")
    with pytest.raises(MissingBtf) as err:
        carve_kernel(guest.source())
    message = str(err.value)
    assert "no BTF" in message and "CONFIG_DEBUG_INFO_BTF" in message
    assert "vmishell profile fetch" in message


def test_a_planted_btf_elsewhere_is_ignored_for_the_one_at_start_btf() -> None:
    guest = make_guest()
    w, _ = sample_btf()
    w.add(1, "planted_int", 0, 4, 32)  # a different, larger blob
    fake = w.bytes()
    guest.memory[IMAGE_PADDR + 0x60000 : IMAGE_PADDR + 0x60000 + len(fake)] = fake
    carved = carve_kernel(guest.source())
    assert carved.btf == guest.btf


def test_a_btf_at_start_btf_of_the_wrong_size_is_refused_not_used() -> None:
    w, _ = sample_btf()
    w.add(1, "planted_int", 0, 4, 32)
    guest = make_guest()
    fake = w.bytes()  # longer than __stop_BTF - __start_BTF
    guest.memory[IMAGE_PADDR + BTF_AT : IMAGE_PADDR + BTF_AT + len(fake)] = fake
    with pytest.raises(ProfileError, match="__stop_BTF - __start_BTF"):
        carve_kernel(guest.source())


def test_a_btf_whose_kallsyms_do_not_point_at_the_banner_is_refused() -> None:
    guest = make_guest()
    at = IMAGE_PADDR + BANNER_AT
    guest.memory[at : at + 14] = b"Linux versioN "
    guest.memory[0x1800000 : 0x1800000 + len(BANNER)] = BANNER  # a banner to start from
    with pytest.raises(ProfileError, match="linux_banner"):
        carve_kernel(guest.source())


def test_digit_run_decoys_are_capped_and_end_in_a_clear_error_quickly() -> None:
    decoy = b"".join(bytes([c, 0]) for c in b"0123456789") + b"x\0" * 300
    tables = decoy * 2000  # thousands of kallsyms_token_table look-alikes
    guest = make_guest(tables=tables)
    started = time.process_time()
    with pytest.raises(ProfileError, match="kallsyms") as err:
        carve_kernel(guest.source())
    assert "candidates rejected" in str(err.value)
    assert time.process_time() - started < 30  # bounded work, not a measurement


def test_no_banner_at_all_says_so() -> None:
    source = BufferSource([(0, bytes(0x100000))], description="empty guest")
    with pytest.raises(ProfileError, match="no Linux banner in empty guest"):
        carve_kernel(source)


@pytest.mark.parametrize(
    ("offset", "value", "message"),
    [
        (3, b"\x01", "flags"),
        (4, struct.pack("<I", 32), "header length"),
        (8, struct.pack("<I", 4), "type section"),
        (12, struct.pack("<I", 6), "type section"),
        (16, struct.pack("<I", 0), "do not follow the types"),
        (20, struct.pack("<I", 0x7FFFFFF0), "implausible"),
    ],
)
def test_each_btf_header_check_rejects_its_field(offset: int, value: bytes, message: str) -> None:
    good = sample_btf()[0].bytes()
    parse_header(good)
    bad = bytearray(good)
    bad[offset : offset + len(value)] = value
    with pytest.raises(ProfileError, match=message):
        parse_header(bytes(bad), 0x1234)


def test_btf_header_scan_stops_at_its_cap() -> None:
    header = sample_btf()[0].bytes()[:24]
    memory = header * 1000
    source = BufferSource([(0, memory)])
    assert len(btf_candidates(source, 0, len(memory), cap=10)) == 10


def test_big_endian_btf_headers_are_recognised() -> None:
    big = sample_btf()[0].bytes(">")
    assert parse_header(big).endian == "big"


def test_every_failure_is_a_vmishell_error() -> None:
    guest = make_guest()
    guest.memory[IMAGE_PADDR + TABLES_AT : IMAGE_PADDR + TABLES_AT + 0x8000] = b"\xff" * 0x8000
    with pytest.raises(VmiError):
        carve_kernel(guest.source())


def _with_task_struct() -> bytes:
    """The sample BTF plus `struct task_struct { char comm[16]; }`: enough for the finder."""
    from tests.unit.test_btf import K

    w, ids = sample_btf()
    w.add(K.STRUCT, "task_struct", 1, 16, w.s("comm"), ids["comm"], 0)
    return w.bytes()


def test_the_cache_serves_the_next_attach_and_a_different_btf_is_carved_anew(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vmishell.symbols import locations
    from vmishell.symbols.carve_cache import find_or_carve, wait_for_cache

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("VMISHELL_PROFILE_PATH", raising=False)
    monkeypatch.setattr(locations, "shipped_dir", lambda: tmp_path / "none")
    guest = make_guest(btf=_with_task_struct())
    first = find_or_carve(guest.source())
    wait_for_cache()
    assert first.origin == "carved" and first.path.is_file()
    again = find_or_carve(guest.source())
    assert again.path == first.path  # found on disk: banner and BTF checksum agree
    at = IMAGE_PADDR + BTF_AT + len(guest.btf) - 6
    guest.memory[at : at + 4] = b"comX"  # same size and banner, another BTF
    other = find_or_carve(guest.source())
    wait_for_cache()
    assert other.path != first.path
    assert other.producer["btf_sha256"] != first.producer["btf_sha256"]
