"""The parsers that read files raise only vmishell errors, whatever the file holds.

Profiles are trusted input (see SECURITY.md: a profile says where to look,
so a wrong one gives wrong answers), but a damaged or truncated file must
still end in a ProfileError or SourceError that names it, never in a
KeyError, an OverflowError or a RecursionError from deep inside a parser.
Each test is a short, seeded hypothesis run over one format:

- ISF: a slice of the shipped profile (every type and symbol attaching
  needs), mutated as JSON (values of the wrong type, huge or non-finite
  numbers, deleted keys, odd names, deep nesting) and as bytes; then
  loaded and used the way attaching uses it.
- ELF cores: a small QEMU-style core (notes with CPU state, PT_LOAD
  segments) with its header fields, program headers and notes mutated or
  truncated; then opened, its registers and memory read.
- BTF: a small kernel-like BTF with its words mutated; then parsed, turned
  into an ISF and a profile, and the layouts the Linux layer needs taken.
"""

from __future__ import annotations

import contextlib
import json
import lzma
import struct
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmishell.errors import VmiError
from vmishell.os.linux.layout import maple_layout, mm_layout, task_layout, vma_layout
from vmishell.sources import open_image
from vmishell.symbols.btf import BtfKind, parse_btf
from vmishell.symbols.isf_build import build_isf
from vmishell.symbols.placement import KernelHints
from vmishell.symbols.profile import Profile, load_profile

from .harness import fuzz_settings

PROFILES = Path(__file__).resolve().parents[2] / "profiles"
#: What attaching reads from a profile (kernel.py, layout.py).
ROOT_TYPES = (
    "task_struct", "list_head", "mm_struct", "maple_tree", "maple_node", "maple_range_64",
    "maple_arange_64", "vm_area_struct", "file", "path", "dentry", "qstr", "cred", "inode",
    "super_block", "mount", "vfsmount", "kthread", "signal_struct", "pgprot",
)  # fmt: skip
ROOT_SYMBOLS = (
    "init_task", "linux_banner", "init_top_pgt", "swapper_pg_dir", "__pgtable_l5_enabled",
    "special_mapping_vmops", "legacy_special_mapping_vmops", "_text",
)  # fmt: skip

FUZZ = fuzz_settings(150)


# -- ISF --------------------------------------------------------------------------------


def _names_in(desc: Any) -> list[str]:
    """Names of the user types a descriptor refers to."""
    if not isinstance(desc, dict):
        return []
    out = [desc["name"]] if desc.get("kind") in ("struct", "union") and "name" in desc else []
    for key in ("subtype", "type"):
        out += _names_in(desc.get(key))
    return out


@pytest.fixture(scope="module")
def mini_isf() -> dict[str, Any]:
    """A shipped amd64 profile (any version) cut down to what attaching needs (~100 KB)."""
    shipped = sorted(PROFILES.glob("linux-*-amd64-*.json.xz"))
    if not shipped:
        pytest.fail("profiles/ holds no amd64 profile: run scripts/refresh-profiles", pytrace=False)
    isf = json.loads(lzma.decompress(shipped[-1].read_bytes()))
    user = isf["user_types"]
    keep: dict[str, Any] = {}
    todo = [t for t in ROOT_TYPES if t in user]
    while todo:
        name = todo.pop()
        if name in keep or name not in user:
            continue
        keep[name] = user[name]
        for field in user[name]["fields"].values():
            # Anonymous members are flattened into their parent: they must come along.
            todo += [n for n in _names_in(field["type"]) if n.startswith("unnamed_")]
    return {
        "metadata": isf["metadata"],
        "base_types": isf["base_types"],
        "user_types": keep,
        "enums": {},
        "symbols": {k: v for k, v in isf["symbols"].items() if k in ROOT_SYMBOLS},
    }


def _paths(obj: Any, prefix: tuple[Any, ...] = (), out: list | None = None) -> list:
    out = [] if out is None else out
    out.append(prefix)
    if isinstance(obj, dict):
        for k, v in obj.items():
            _paths(v, (*prefix, k), out)
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            _paths(v, (*prefix, i), out)
    return out


def _at(doc: Any, path: tuple[Any, ...]) -> Any:
    for key in path:
        doc = doc[key]
    return doc


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.sampled_from([0, -1, 1 << 63, 1 << 64, -(1 << 70), 10**400, 2**31])
    | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.sampled_from(["", "\ud800", "task_struct", "pointer", "x" * 5000])
    | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=6,
)
DEEP = "__deep__"


NUMBERS = st.sampled_from([float("inf"), float("-inf"), float("nan"), 1e30, 0.5, -1, 1 << 64])


def _mutate_json(data: Any, doc: Any) -> str:
    """One to three structural mutations of `doc`, serialised (deep nesting as raw text).

    Half of the mutations hit a number (offsets, sizes, counts, addresses:
    what parsers convert) or a name (what they index by), the rest any node.
    """
    paths = _paths(doc)
    for _ in range(data.draw(st.integers(1, 3))):
        numbers = [p for p in paths if p and isinstance(_at(doc, p), int | float)]
        kind = data.draw(st.sampled_from(["number", "name", "any", "any"]))
        if kind == "number" and numbers:
            path = data.draw(st.sampled_from(numbers))
            parent = _at(doc, path[:-1])
            parent[path[-1]] = data.draw(NUMBERS | JSON_VALUES)
            paths = _paths(doc)
            continue
        path = data.draw(st.sampled_from(paths))
        if kind == "name" and path and isinstance(_at(doc, path[:-1]), dict):
            parent = _at(doc, path[:-1])
            parent["\ud800" + str(path[-1])] = parent.pop(path[-1])
            paths = _paths(doc)
            continue
        if not path:
            continue
        parent = doc
        for key in path[:-1]:
            parent = parent[key]
        key = path[-1]
        op = data.draw(st.sampled_from(["replace", "replace", "delete", "deep", "rename"]))
        if op == "replace":
            parent[key] = data.draw(JSON_VALUES)
        elif op == "delete" and isinstance(parent, dict):
            del parent[key]
        elif op == "deep":
            parent[key] = DEEP
        elif op == "rename" and isinstance(parent, dict):
            new = data.draw(st.sampled_from(["", "\ud800", "a.b", "x[1]", "struct ", "\x00"]))
            parent[new] = parent.pop(key)
        paths = _paths(doc)
    text = json.dumps(doc)
    nested = data.draw(st.sampled_from([50, 5000, 200_000]))
    return text.replace(json.dumps(DEEP), "[" * nested + "]" * nested)


def _use_profile(profile: Profile) -> None:
    """What attaching does with a fresh profile."""
    KernelHints.from_profile(profile)
    task_layout(profile)
    mm_layout(profile)
    vma_layout(profile)
    maple_layout(profile)
    profile.symbol_at(profile.symbol_address("init_task") + 8)
    for name in profile.symbol_names()[:20]:
        profile.symbol_type(name)


@FUZZ
@given(data=st.data())
def test_a_mutated_isf_loads_or_raises_a_vmishell_error(mini_isf, tmp_path_factory, data) -> None:
    doc = json.loads(json.dumps(mini_isf))
    text = _mutate_json(data, doc).encode("utf-8", "surrogatepass")
    raw = bytearray(text)
    for _ in range(data.draw(st.integers(0, 2))):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    tmp = tmp_path_factory.mktemp("isf")
    path = tmp / "mutated.json"
    path.write_bytes(bytes(raw))
    try:
        profile = load_profile(path, cache_dir=tmp / "cache")
        _use_profile(profile)
    except VmiError:
        pass


def test_the_unmutated_slice_attaches_its_layouts(mini_isf, tmp_path) -> None:
    """The fuzz starts from a profile that works, so mutations are what fails."""
    path = tmp_path / "slice.json"
    path.write_text(json.dumps(mini_isf))
    _use_profile(load_profile(path, cache_dir=tmp_path / "cache"))


# -- ELF cores ---------------------------------------------------------------------------------

_EHDR = struct.Struct("<4sBBBBB7sHHIQQQIHHHHHH")
_PHDR = struct.Struct("<IIQQQQQQ")
_QEMU_CPU_STATE = 8 + 18 * 8 + 10 * 24 + 5 * 8 + 8


def _note(name: bytes, ntype: int, desc: bytes) -> bytes:
    name += b"\0"

    def pad(b: bytes) -> bytes:
        return b + b"\0" * (-len(b) % 4)

    return struct.pack("<III", len(name), len(desc), ntype) + pad(name) + pad(desc)


def small_core() -> bytes:
    """A QEMU-style x86_64 ELF core: a QEMU CPU note, VMCOREINFO, two RAM segments."""
    cpu = bytearray(_QEMU_CPU_STATE)
    struct.pack_into("<5Q", cpu, 8 + 18 * 8 + 10 * 24, 0x80050033, 0, 0, 0x1000, 0x3606F0)
    notes = _note(b"QEMU", 0, bytes(cpu)) + _note(b"VMCOREINFO", 0, b"OSRELEASE=6.1\n")
    ram = [(0, bytes(range(256)) * 16), (0x100000, b"\xaa" * 0x2000)]
    phnum = 1 + len(ram)
    offset = _EHDR.size + phnum * _PHDR.size
    phdrs = [_PHDR.pack(4, 0, offset, 0, 0, len(notes), len(notes), 0)]
    body = notes
    for paddr, data in ram:
        phdrs.append(
            _PHDR.pack(1, 7, offset + len(body), paddr, paddr, len(data), len(data), 0x1000)
        )
        body += data
    header = _EHDR.pack(
        b"\x7fELF", 2, 1, 1, 0, 0, b"", 4, 62, 1, 0, _EHDR.size, 0, 0,
        _EHDR.size, _PHDR.size, phnum, 0, 0, 0,
    )  # fmt: skip
    return header + b"".join(phdrs) + body


#: Offsets of the fields a parser trusts: e_phoff, e_phentsize, e_phnum, then the
#: program headers' p_type, p_offset, p_paddr, p_filesz, then the first note's sizes.
_HOT = [32, 54, 56, *(64 + 56 * i + o for i in range(3) for o in (0, 8, 24, 32)), 232, 236]


@FUZZ
@given(data=st.data())
def test_a_mutated_elf_core_opens_or_raises_a_vmishell_error(tmp_path_factory, data) -> None:
    blob = bytearray(small_core())
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.sampled_from(_HOT) | st.integers(0, len(blob) - 1))
        width = data.draw(st.sampled_from([1, 2, 4, 8]))
        value = data.draw(
            st.sampled_from([0, 1, 0xFF, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF, 1 << 63, (1 << 64) - 1])
            | st.integers(0, (1 << (8 * width)) - 1)
        )
        chunk = (value & ((1 << (8 * width)) - 1)).to_bytes(width, "little")
        blob[pos : pos + width] = chunk[: max(0, len(blob) - pos)]
    if data.draw(st.booleans()):
        # Cut inside the ELF header, the program headers, the notes or the RAM.
        cut = st.sampled_from([0, 4, 5, 16, 51, 52, 53, 60, 63, 64, 65, 120, 232, 240])
        blob = blob[: data.draw(cut | st.integers(0, len(blob)))]
    path = tmp_path_factory.mktemp("elf") / "core.elf"
    path.write_bytes(bytes(blob))
    try:
        source = open_image(path)
    except VmiError:
        return
    try:
        with contextlib.suppress(VmiError):
            source.registers()
        for r in source.ranges()[:4]:
            with contextlib.suppress(VmiError):
                source.read(r.start, min(r.size, 64))
        _ = getattr(source, "vmcoreinfo", None)
        list(zip(range(4), source.find(b"\xaa\xaa"), strict=False))
    finally:
        source.close()


def test_the_unmutated_core_opens_with_its_registers(tmp_path) -> None:
    path = tmp_path / "core.elf"
    path.write_bytes(small_core())
    with open_image(path) as source:
        assert source.registers().cr3 == 0x1000
        assert source.read(0x100000, 4) == b"\xaa" * 4
        assert source.vmcoreinfo == "OSRELEASE=6.1\n"  # type: ignore[attr-defined]


# -- BTF -----------------------------------------------------------------------------------

K = BtfKind


class _Btf:
    """A tiny BTF writer (little-endian)."""

    def __init__(self) -> None:
        self.strings = bytearray(b"\0")
        self.words: list[int] = []
        self.count = 0

    def s(self, name: str) -> int:
        off = len(self.strings)
        self.strings += name.encode() + b"\0"
        return off

    def add(self, kind: int, name: str, vlen: int, third: int, *extra: int) -> int:
        self.words += [self.s(name) if name else 0, (kind << 24) | vlen, third, *extra]
        self.count += 1
        return self.count

    def bytes(self) -> bytes:
        types = struct.pack(f"<{len(self.words)}I", *(w & 0xFFFFFFFF for w in self.words))
        header = struct.pack("<HBBIIIII", 0xEB9F, 1, 0, 24, 0, len(types), len(types),
                             len(self.strings))  # fmt: skip
        return header + types + bytes(self.strings)


def kernelish_btf() -> bytes:
    """task_struct, list_head, mm_struct and cred, enough for a task layout."""
    w = _Btf()
    i = w.add(K.INT, "int", 0, 4, 32 | (1 << 24))
    u = w.add(K.INT, "unsigned int", 0, 4, 32)
    ul = w.add(K.INT, "long unsigned int", 0, 8, 64)
    ch = w.add(K.INT, "char", 0, 1, 8)
    plh = w.add(K.PTR, "", 0, w.count + 2)  # struct list_head *, defined next
    lh = w.add(K.STRUCT, "list_head", 2, 16, w.s("next"), plh, 0, w.s("prev"), plh, 64)
    comm = w.add(K.ARRAY, "", 0, 0, ch, i, 16)
    cred = w.add(K.STRUCT, "cred", 2, 16, w.s("uid"), u, 64, w.s("gid"), u, 96)
    pcred = w.add(K.PTR, "", 0, cred)
    mm = w.add(K.STRUCT, "mm_struct", 8, 1024,
               w.s("pgd"), ul, 576, w.s("arg_start"), ul, 2496, w.s("arg_end"), ul, 2560,
               w.s("start_brk"), ul, 2304, w.s("brk"), ul, 2368, w.s("start_stack"), ul, 2432,
               w.s("mmap"), ul, 0, w.s("map_count"), i, 64)  # fmt: skip
    pmm = w.add(K.PTR, "", 0, mm)
    task = w.add(K.STRUCT, "task_struct", 10, 4096,
                 w.s("tasks"), lh, 1024, w.s("pid"), i, 2048, w.s("tgid"), i, 2080,
                 w.s("comm"), comm, 4096, w.s("mm"), pmm, 8192, w.s("active_mm"), pmm, 8256,
                 w.s("real_parent"), ul, 8320, w.s("flags"), u, 64, w.s("real_cred"), pcred, 8384,
                 w.s("__state"), u, 0)  # fmt: skip
    w.add(K.VAR, "init_task", 0, task, 1)
    return w.bytes()


@FUZZ
@given(data=st.data())
def test_mutated_btf_parses_builds_and_lays_out_or_raises_a_vmishell_error(data) -> None:
    blob = bytearray(kernelish_btf())
    words = (len(blob) - 24) // 4
    for _ in range(data.draw(st.integers(1, 4))):
        word = data.draw(st.integers(0, words - 1))
        value = data.draw(
            st.sampled_from([0, 1, 0xFFFF, 0x10000, 0x7FFFFFFF, 0xFFFFFFFF, 0x80000000 | 4 << 24])
            | st.integers(0, 0xFFFFFFFF)
        )
        struct.pack_into("<I", blob, 24 + 4 * word, value)
    try:
        parse_btf(bytes(blob))
        isf = build_isf(bytes(blob), {"init_task": 0xFFFFFFFF82000000, "linux_banner": 0})
        profile = Profile.from_isf(isf, "fuzzed")
        task_layout(profile)
        mm_layout(profile)
    except VmiError:
        pass


def test_the_unmutated_btf_gives_a_task_layout() -> None:
    isf = build_isf(kernelish_btf(), {"init_task": 0xFFFFFFFF82000000})
    layout = task_layout(Profile.from_isf(isf, "kernelish"))
    assert (layout.tasks, layout.pid, layout.comm, layout.mm) == (128, 256, 512, 1024)
