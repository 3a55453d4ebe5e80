"""kallsyms recovery: synthetic tables in every layout, and Debian's lab kernels."""

from __future__ import annotations

import os
import struct
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import pytest

from vmishell.errors import ProfileError, VmiError
from vmishell.symbols.kallsyms import Kallsyms, find_kallsyms
from vmishell.symbols.sysmap import Symbol, load_system_map

if TYPE_CHECKING:
    from vmishell.lab.dbgprofiles import DebugFiles
    from vmishell.symbols.kimage import KernelImage


# -- a small scripts/kallsyms.c ---------------------------------------------------------


def _align(buf: bytearray, a: int) -> None:
    buf += b"\0" * (-len(buf) % a)


def make_symbols(ptr: int = 8, count: int = 700, percpu: bool = False) -> list[Symbol]:
    """Sorted symbols with digits in their names, mixed types, one very long name."""
    base = 0xFFFFFFFF81000000 if ptr == 8 else 0xC1000000
    words = ["init", "task", "sched", "page", "alloc", "irq", "net", "vfs", "read", "write"]
    types = "TtTtDdBbRrW"
    syms = []
    if percpu:
        syms += [Symbol("fixed_percpu_data", "A", 0), Symbol("__per_cpu_start", "A", 0),
                 Symbol("cpu_number", "A", 0x1000), Symbol("runqueues", "A", 0x2C000)]  # fmt: skip
    syms.append(Symbol("_text", "T", base))
    addr = base
    for i in range(count):
        addr += 16 + (i * 37) % 700
        name = f"{words[i % 10]}_{words[(i * 7) % 10]}{i}"
        syms.append(Symbol(name, types[i % len(types)], addr))
    addr += 64
    syms.append(Symbol("long_" + "".join(chr(97 + (i * 5) % 26) for i in range(190)), "t", addr))
    syms.append(Symbol("init_task", "D", addr + 0x1000))
    syms.append(Symbol("linux_banner", "D", addr + 0x2000))
    syms.append(Symbol("_end", "B", addr + 0x3000))
    return syms


def _tokens(strings: list[bytes]) -> tuple[list[bytes], dict[bytes, int]]:
    """Single characters keep their own code; free codes get the commonest bigrams."""
    used = {c for s in strings for c in s}
    free = [c for c in range(256) if c not in used]
    bigrams = Counter(s[i : i + 2] for s in strings for i in range(len(s) - 1))
    best = sorted(bigrams, key=lambda b: (-bigrams[b], b))[: len(free)]
    table = [bytes([c]) if c in used else b"" for c in range(256)]
    codes: dict[bytes, int] = {}
    for code, big in zip(free, best, strict=False):
        table[code], codes[big] = big, code
    for code in free[len(best) :]:
        table[code] = b"~" + bytes([48 + code % 10])  # never used, like a real table's tail
    return table, codes


def _compress(s: bytes, codes: dict[bytes, int]) -> bytes:
    if len(s) > 150:  # leave one name uncompressed: its length needs two bytes
        return s
    out, i = bytearray(), 0
    while i < len(s):
        code = codes.get(s[i : i + 2])
        if code is not None:
            out.append(code)
            i += 2
        else:
            out.append(s[i])
            i += 1
    return bytes(out)


def build_tables(
    syms: list[Symbol],
    *,
    ptr: int = 8,
    layout: str = "6.1",
    mode: str = "relative",
    markers_width: int | None = None,
    seqs: bool = False,
) -> bytes:
    """The kallsyms tables as scripts/kallsyms.c lays them out.

    layout "6.1": offsets, relative_base, num_syms, names, markers, [seqs], tokens, index;
    layout "6.4": num_syms, names, markers, seqs, tokens, index, offsets, relative_base;
    layout "6.12": num_syms, names, markers, tokens, index, offsets, relative_base, seqs
    (u32 markers, then a padding word when their count is odd);
    layout "7": as 6.12, names right after num_syms (unaligned), no relative_base.
    mode: "relative", "percpu" (KALLSYMS_ABSOLUTE_PERCPU), "absolute" (kallsyms_addresses)
    or "place" (`.long sym - .`; the tables must then be placed with `in_elf`).
    """
    pfmt = "<Q" if ptr == 8 else "<I"
    mw = markers_width or ptr
    strings = [(s.type + s.name).encode() for s in syms]
    table, codes = _tokens(strings)
    names, markers = bytearray(), []
    for i, string in enumerate(strings):
        if i % 256 == 0:
            markers.append(len(names))
        enc = _compress(string, codes)
        if len(enc) > 127:
            names += bytes([0x80 | (len(enc) & 0x7F), len(enc) >> 7])
        else:
            names.append(len(enc))
        names += enc

    kernel = [s.address for s in syms if not (mode == "percpu" and s.type == "A")]
    rel_base = min(kernel)
    offsets = bytearray()
    for s in syms:
        if mode == "percpu":
            value = s.address if s.type == "A" else rel_base - s.address - 1
        else:
            value = s.address - rel_base
        offsets += struct.pack("<i" if value < 0 else "<I", value)

    def addresses_part(buf: bytearray) -> None:
        _align(buf, ptr)
        if mode == "place":
            at = ELF_TABLES_VADDR + len(buf)
            for i, s in enumerate(syms):
                buf += struct.pack("<i", s.address - (at + 4 * i))
            return
        if mode == "absolute":
            for s in syms:
                buf += struct.pack(pfmt, s.address)
            return
        buf += offsets
        _align(buf, ptr)
        buf += struct.pack(pfmt, rel_base)

    def names_part(buf: bytearray) -> None:
        _align(buf, ptr)
        buf += struct.pack("<I", len(syms))
        if layout != "7":
            _align(buf, ptr)
        buf += names
        _align(buf, ptr)
        for m in markers:
            buf += struct.pack("<I" if mw == 4 else pfmt, m)
        if seqs or layout == "6.4":
            seqs_part(buf)

    def seqs_part(buf: bytearray) -> None:
        _align(buf, ptr)
        order = sorted(range(len(syms)), key=lambda i: strings[i][1:])
        for i in order:
            buf += bytes([(i >> 16) & 0xFF, (i >> 8) & 0xFF, i & 0xFF])

    def tokens_part(buf: bytearray) -> None:
        _align(buf, ptr)
        index, off = [], 0
        for tok in table:
            index.append(off)
            buf += tok + b"\0"
            off += len(tok) + 1
        _align(buf, ptr)
        buf += struct.pack("<256H", *index)

    buf = bytearray()
    if layout == "6.1":
        addresses_part(buf)
        names_part(buf)
        tokens_part(buf)
    elif layout == "6.4":
        names_part(buf)
        tokens_part(buf)
        addresses_part(buf)
    else:
        names_part(buf)
        tokens_part(buf)
        addresses_part(buf)
        seqs_part(buf)
    return bytes(buf)


#: Where `in_elf` loads the tables: what "place" offsets are computed against.
ELF_TABLES_VADDR = 0xFFFFFFFF82000000


def in_elf(tables: bytes) -> bytes:
    """An ELF64 vmlinux whose one PT_LOAD maps the tables at ELF_TABLES_VADDR."""
    head = 64 + 56
    ehdr = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)
    ehdr += struct.pack("<HHIQQQIHHHHHH", 2, 62, 1, 0, 64, 0, 0, 64, 56, 1, 0, 0, 0)
    pad = -head % 4096
    phdr = struct.pack(
        "<IIQQQQQQ", 1, 4, head + pad, ELF_TABLES_VADDR, 0, len(tables), len(tables), 4096
    )
    return ehdr + phdr + bytes(pad) + tables


def embed(tables: bytes, decoy: bool = True) -> bytes:
    """Tables inside other data, with a false "0\\01\\0..9\\0" match before them."""
    head = bytearray(bytes(range(256)) * 64)
    if decoy:
        head += b"".join(bytes([c, 0]) for c in b"0123456789") + b"noise\0" * 20
    _align(head, 16)
    return bytes(head) + tables + bytes(reversed(range(256))) * 16


def _check(found, syms: list[Symbol]) -> None:
    assert [tuple(s) for s in found.symbols] == [tuple(s) for s in syms]
    assert found["init_task"] == next(s.address for s in syms if s.name == "init_task")


# -- synthetic layouts ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("ptr", "layout", "mode", "markers_width", "seqs"),
    [
        (8, "6.1", "percpu", 8, False),  # x86_64 up to 6.1 upstream
        (8, "6.1", "percpu", 4, True),  # Debian's 6.1.1xx: u32 markers, seqs_of_names
        (8, "6.1", "relative", 8, False),  # arm64
        (8, "6.1", "relative", 8, True),  # 6.2/6.3: pointer-size markers, seqs_of_names
        (4, "6.1", "relative", 4, False),  # i386 686(-pae)
        (4, "6.1", "absolute", 4, False),  # without KALLSYMS_BASE_RELATIVE
        (8, "6.1", "absolute", 8, False),
        (8, "6.4", "relative", 4, True),  # offsets after token_index
        (8, "6.4", "percpu", 4, True),
        (4, "6.4", "relative", 4, True),
        (8, "6.12", "percpu", 4, False),  # 6.12: padding word after odd u32 markers
        (8, "6.12", "relative", 4, False),
    ],
)
def test_synthetic_layouts(
    ptr: int, layout: str, mode: str, markers_width: int, seqs: bool
) -> None:
    syms = make_symbols(ptr, percpu=mode == "percpu")
    tables = build_tables(syms, ptr=ptr, layout=layout, mode=mode, markers_width=markers_width,
                          seqs=seqs)  # fmt: skip
    found = find_kallsyms(embed(tables), pointer_size=ptr)
    _check(found, syms)
    assert found.layout.base_relative == (mode != "absolute")
    assert found.layout.absolute_percpu == (mode == "percpu")
    # seqs_of_names is located only between the markers and the tokens (6.2 to 6.11).
    assert (found.layout.seqs_of_names is not None) == (seqs or layout == "6.4")


def test_markers_then_a_padding_word_before_the_token_table() -> None:
    """6.12: three u32 markers end 4 bytes before the 8-aligned token table."""
    syms = make_symbols(8, count=700, percpu=True)
    assert len(syms) // 256 + 1 == 3  # an odd count of markers needs the padding
    tables = build_tables(syms, layout="6.12", mode="percpu", markers_width=4)
    found = find_kallsyms(embed(tables))
    _check(found, syms)
    assert found.layout.token_table - found.layout.markers == 3 * 4 + 4


def test_place_relative_offsets_and_unaligned_names() -> None:
    """Newest kernels: names right after num_syms, offsets as `.long sym - .`, no base."""
    syms = make_symbols(8)
    tables = build_tables(syms, layout="7", mode="place", markers_width=4)
    found = find_kallsyms(in_elf(tables))
    _check(found, syms)
    assert found.layout.names == found.layout.num_syms + 4
    assert found.layout.relative_base is None and found.layout.base_relative


def test_place_relative_offsets_need_an_elf_to_place_them() -> None:
    tables = build_tables(make_symbols(8), layout="7", mode="place", markers_width=4)
    with pytest.raises(ProfileError, match="no kallsyms tables"):
        find_kallsyms(tables)


def test_local_labels_in_the_tables_are_left_out() -> None:
    """5.10's tables hold a few ".LC<n>" labels, which System.map never lists."""
    syms = make_symbols(8)
    labels = [Symbol(".LC0", "r", syms[5].address + 1), Symbol(".LC12", "r", syms[9].address + 1)]
    tables = build_tables(sorted(syms + labels, key=lambda s: s.address), mode="relative")
    found = find_kallsyms(embed(tables))
    _check(found, syms)


def test_few_symbols_single_marker() -> None:
    syms = make_symbols(8, count=40)
    found = find_kallsyms(embed(build_tables(syms, mode="relative")), pointer_size=8)
    _check(found, syms)


def test_long_name_uses_two_length_bytes() -> None:
    syms = make_symbols(8)
    found = find_kallsyms(embed(build_tables(syms)), pointer_size=8)
    long = [s for s in found.symbols if s.name.startswith("long_")]
    assert len(long) == 1 and len(long[0].name) == 195


def test_duplicates_keep_global_then_first() -> None:
    syms = make_symbols(8, count=30)
    last = syms[-1].address
    syms += [
        Symbol("dup", "t", last + 16),
        Symbol("dup", "T", last + 32),
        Symbol("dup", "t", last + 48),
    ]
    found = find_kallsyms(embed(build_tables(syms)), pointer_size=8)
    assert [s.address for s in found.symbols if s.name == "dup"] == [
        last + 16,
        last + 32,
        last + 48,
    ]
    assert found["dup"] == last + 32 and found.types["dup"] == "T"


def test_arm64_relative_base_from_rela() -> None:
    """arm64 Images store 0 for kallsyms_relative_base; a RELA entry holds the value."""
    syms = make_symbols(8)
    rel_base = syms[0].address
    tables = build_tables(syms, mode="relative")
    image = bytearray(embed(tables))
    slot = image.find(struct.pack("<Q", rel_base))
    image[slot : slot + 8] = bytes(8)
    base = 0xFFFFFFFF80F00000  # link address of the image's first byte
    decoy = base + 0x10000  # less aligned: loses
    image += struct.pack("<QQQ", decoy + slot, 1027, decoy + 0x5000)
    image += struct.pack("<QQQ", base + slot, 1027, rel_base)
    image += struct.pack("<QQQ", base + 0x40, 1027, base + 0x9000)  # another slot
    found = find_kallsyms(bytes(image), pointer_size=8)
    _check(found, syms)
    assert found.image_base == base
    image[-72:] = bytes(72)
    with pytest.raises(ProfileError, match="relocates it at boot"):
        find_kallsyms(bytes(image), pointer_size=8)


def test_no_tables() -> None:
    data = bytes(range(256)) * 100 + b"".join(bytes([c, 0]) for c in b"0123456789") * 3
    with pytest.raises(ProfileError, match="no kallsyms tables"):
        find_kallsyms(data)


def test_missing_data_symbols_reported() -> None:
    syms = [s for s in make_symbols(8, count=300) if s.type in "Tt"]
    found = find_kallsyms(embed(build_tables(syms)), pointer_size=8)
    assert found.missing() == ["init_task", "init_mm", "linux_banner"]


# -- Debian's kernels, held against their own -dbg packages ------------------------------
#
# Which kernel Debian serves changes without notice, so these tests take the
# kernel the lab boots today and the System.map of the -dbg package of the
# same version (both fetched by the lab's build step, once per kernel) and
# check properties that hold for any version.


@dataclass(frozen=True)
class LabKernel:
    """A lab guest's kernel package and what its -dbg package of the same version holds."""

    guest: str
    deb: Path
    dbg: DebugFiles


def unavailable(reason: str) -> NoReturn:
    """Skip on a machine that cannot fetch Debian packages; fail under CI=true."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"under CI=true, {reason}", pytrace=False)
    pytest.skip(reason)


def lab_kernel_deb(guest: str) -> Path:
    """The kernel package `guest` boots, from the lab's build step."""
    from vmishell.lab.build import build_guest

    try:
        return build_guest(guest).kernel_deb
    except VmiError as exc:
        unavailable(f"the {guest} lab kernel is not available: {exc}")


def lab_kernel(guest: str, *, btf: bool = False) -> LabKernel:
    """The kernel `guest` boots and its -dbg files, from the lab's build step."""
    from vmishell.lab.build import build_guest
    from vmishell.lab.dbgprofiles import debug_files

    try:
        built = build_guest(guest)
        kernel = built.manifest["packages"]["kernel"]
        dbg = debug_files(built.guest.debian_arch, kernel["name"], kernel["version"], btf=btf)
    except VmiError as exc:
        unavailable(f"the {guest} lab kernel or its -dbg package is not available: {exc}")
    return LabKernel(guest, built.kernel_deb, dbg)


@pytest.fixture(scope="module")
def amd64_kernel() -> LabKernel:
    return lab_kernel("x86_64")


@pytest.fixture(scope="module", params=["x86_64", "i386-pae", "i386"])
def debian_kernel(request: pytest.FixtureRequest) -> tuple[LabKernel, KernelImage, Kallsyms]:
    from vmishell.symbols.kimage import open_kernel

    kernel = lab_kernel(request.param)
    image = open_kernel(kernel.deb)
    return kernel, image, image.kallsyms()


def test_every_kallsyms_symbol_is_in_the_system_map_of_the_same_build(debian_kernel) -> None:
    kernel, _image, ksyms = debian_kernel
    smap = load_system_map(kernel.dbg.system_map)
    entries = {(s.name, s.address): s.type for s in smap}
    assert len(ksyms) > 10_000
    assert [s for s in ksyms.symbols if (s.name, s.address) not in entries] == []
    # Types agree, except that kallsyms marks per-CPU variables (linked from 0) absolute.
    text = smap["_text"]
    retyped = [
        s for s in ksyms.symbols
        if entries[s.name, s.address] != s.type and not (s.type == "A" and s.address < text)
    ]  # fmt: skip
    assert retyped == []
    addresses = [s.address for s in ksyms.symbols]
    assert addresses == sorted(addresses)
    assert ksyms["_text"] == text


def test_with_kallsyms_all_only_absolute_and_kallsyms_own_symbols_are_left_out(
    debian_kernel,
) -> None:
    kernel, image, ksyms = debian_kernel
    if image.config_option("KALLSYMS_ALL") != "y":
        assert ksyms.missing() == ["init_task", "init_mm", "linux_banner"]
        return
    listed = {(s.name, s.address) for s in ksyms.symbols}
    left_out = [
        s for s in load_system_map(kernel.dbg.system_map)
        if (s.name, s.address) not in listed
        and s.type not in "aA" and not s.name.startswith("kallsyms_")
    ]  # fmt: skip
    assert left_out == []
    assert not ksyms.missing()
    assert ksyms.layout.base_relative
