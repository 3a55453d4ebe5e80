"""BTF parsing: the host kernel's BTF against pahole; hand-built BTF for every kind and error."""

from __future__ import annotations

import contextlib
import functools
import os
import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmishell.errors import ProfileError
from vmishell.symbols.btf import BtfKind, parse_btf

HOST_BTF = Path("/sys/kernel/btf/vmlinux")
K = BtfKind


# -- helpers shared with the ISF tests ------------------------------------------


def need_host_btf_and_pahole() -> None:
    """Skip without the host BTF or pahole, unless under CI where they must exist."""
    missing = [
        what
        for what, ok in (("BTF", HOST_BTF.exists()), ("pahole", shutil.which("pahole")))
        if not ok
    ]
    if missing and not os.environ.get("CI"):
        pytest.skip(f"host lacks {', '.join(missing)}")


_MEMBER = re.compile(
    r"^(?P<indent>\t+)(?P<decl>.*?);\s*/\*\s*(?P<off>\d+)(?::\s*(?P<bit>\d+))?\s+(?P<size>\d+)\s*\*/"
)


@functools.cache
def pahole_layout(struct_name: str) -> tuple[int, dict[str, tuple[int, int | None, int]]]:
    """(size, {member: (offset, bit or None, size)}) as pahole prints them.

    Members of anonymous unions/structs are flattened (Volatility3's view);
    members of named inline structs are not.
    """
    out = subprocess.run(
        ["pahole", "-C", struct_name, str(HOST_BTF)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    stack: list[dict[str, tuple[int, int | None, int]]] = [{}]
    size = None
    for line in out.splitlines()[1:]:
        stripped = line.strip()
        if m := re.match(r"/\* size: (\d+)", stripped):
            size = int(m[1])
            continue
        if stripped.endswith("{") and (stripped.startswith(("union", "struct"))):
            stack.append({})
            continue
        if stripped.startswith("}") and len(stack) > 1:
            inner = stack.pop()
            closing = _MEMBER.match(line)
            name = re.match(r"}\s*(\w+)", re.sub(r"__attribute__\(\(.*\)\)", "", stripped))
            if name is None:  # anonymous: flatten
                stack[-1].update(inner)
            elif closing:
                stack[-1][name[1]] = (int(closing["off"]), None, int(closing["size"]))
            continue
        m = _MEMBER.match(line)
        if not m:
            continue
        decl = re.sub(r"__attribute__\(\(.*\)\)", "", m["decl"]).strip()
        fn = re.search(r"\(\*\s*(\w+)\)", decl)
        name = fn[1] if fn else re.search(r"(\w+)\s*(?:\[[^\]]*\])*\s*(?::\s*\d+)?$", decl)[1]
        bit = int(m["bit"]) if m["bit"] is not None else None
        stack[-1][name] = (int(m["off"]), bit, int(m["size"]))
    assert size is not None, out
    return size, stack[0]


class BtfWriter:
    """Builds BTF bytes by hand, either endianness, for crafted test inputs."""

    def __init__(self) -> None:
        self.strings = bytearray(b"\0")
        self.records: list[list[int]] = []

    def s(self, name: str) -> int:
        if not name:
            return 0
        off = len(self.strings)
        self.strings += name.encode() + b"\0"
        return off

    def add(
        self, kind: int, name: str = "", vlen: int = 0, third: int = 0, *extra: int, kflag=False
    ) -> int:
        info = (int(kflag) << 31) | (kind << 24) | vlen
        self.records.append([self.s(name), info, third, *extra])
        return len(self.records)  # ids start at 1

    def bytes(self, endian: str = "<", *, magic: int = 0xEB9F) -> bytes:
        types = b"".join(
            struct.pack(f"{endian}{len(r)}I", *(v & 0xFFFFFFFF for v in r)) for r in self.records
        )
        header = struct.pack(
            f"{endian}HBBIIIII", magic, 1, 0, 24, 0, len(types), len(types), len(self.strings)
        )
        return header + types + bytes(self.strings)


def sample_btf() -> tuple[BtfWriter, dict[str, int]]:
    """One of every kind: ints, pointers, arrays, a struct with bit-fields and an
    anonymous union, enums (signed, 64-bit), typedefs, qualifiers, functions,
    a per-CPU variable in a DATASEC, a float and tags."""
    w = BtfWriter()
    ids: dict[str, int] = {}
    ids["uint"] = w.add(K.INT, "unsigned int", 0, 4, 32)
    ids["int"] = w.add(K.INT, "int", 0, 4, (1 << 24) | 32)
    ids["char"] = w.add(K.INT, "char", 0, 1, 8)
    ids["ulong"] = w.add(K.INT, "long unsigned int", 0, 8, 64)
    ids["bool"] = w.add(K.INT, "_Bool", 0, 1, (4 << 24) | 8)
    ids["ptr_char"] = w.add(K.PTR, "", 0, ids["char"])
    ids["comm"] = w.add(K.ARRAY, "", 0, 0, ids["char"], ids["int"], 16)
    ids["state"] = w.add(K.ENUM, "state", 3, 4, w.s("S_NEG"), -1, w.s("S_ZERO"), 0,
                         w.s("S_ONE"), 1, kflag=True)  # fmt: skip
    ids["big"] = w.add(K.ENUM64, "big", 1, 8, w.s("HUGE"), 0, 0x80000000, kflag=False)
    ids["u32"] = w.add(K.TYPEDEF, "u32", 0, ids["uint"])
    ids["cu32"] = w.add(K.CONST, "", 0, ids["u32"])
    ids["vu32"] = w.add(K.VOLATILE, "", 0, ids["cu32"])
    ids["proto"] = w.add(K.FUNC_PROTO, "", 2, ids["int"], w.s("a"), ids["int"], 0, ids["ptr_char"])
    ids["fnptr"] = w.add(K.PTR, "", 0, ids["proto"])
    ids["func"] = w.add(K.FUNC, "do_it", 1, ids["proto"])
    ids["anon_u"] = w.add(K.UNION, "", 2, 8, w.s("x"), ids["ulong"], 0,
                          w.s("y"), ids["uint"], 0)  # fmt: skip
    ids["fwd"] = w.add(K.FWD, "opaque", 0, 0)
    ids["ptr_fwd"] = w.add(K.PTR, "", 0, ids["fwd"])
    # struct thing { unsigned a:3; unsigned b:5; enum state st:2; bool flag:1;
    #   char comm[16]; union { x; y; }; volatile const u32 v; int (*cb)(int, char *);
    #   struct opaque *o; }
    ids["thing"] = w.add(
        K.STRUCT, "thing", 9, 56,
        w.s("a"), ids["uint"], (3 << 24) | 0,
        w.s("b"), ids["uint"], (5 << 24) | 3,
        w.s("st"), ids["state"], (2 << 24) | 8,
        w.s("flag"), ids["bool"], (1 << 24) | 10,
        w.s("comm"), ids["comm"], 32,
        0, ids["anon_u"], 160,
        w.s("v"), ids["vu32"], 224,
        w.s("cb"), ids["fnptr"], 256,
        w.s("o"), ids["ptr_fwd"], 320,
        kflag=True,
    )  # fmt: skip
    ids["var"] = w.add(K.VAR, "runqueue_thing", 0, ids["thing"], 1)
    ids["sec"] = w.add(K.DATASEC, ".data..percpu", 1, 56, ids["var"], 0x40, 56)
    ids["float"] = w.add(K.FLOAT, "double", 0, 8)
    ids["tag"] = w.add(K.DECL_TAG, "user", 0, ids["thing"], 0xFFFFFFFF)
    ids["ttag"] = w.add(K.TYPE_TAG, "rcu", 0, ids["thing"])
    return w, ids


# -- the host kernel ---------------------------------------------------------------


@pytest.fixture(scope="module")
def host_btf():
    need_host_btf_and_pahole()
    return parse_btf(HOST_BTF.read_bytes())


def btf_flat_members(btf, struct_name: str) -> tuple[int, dict[str, tuple[int, int | None, int]]]:
    """(size, {member: (byte offset, bit or None, size)}) from the parsed BTF, flattened."""
    (t,) = [t for t in btf.find(struct_name, K.STRUCT)]
    out: dict[str, tuple[int, int | None, int]] = {}

    def walk(agg, base_bits: int) -> None:
        for m in agg.extra:
            target = btf.resolve(m.type)
            bits = base_bits + m.bit_offset
            if not m.name:
                walk(target, bits)
            elif m.bitfield_size:
                unit = target.size
                start = bits // (unit * 8) * unit
                out[m.name] = (start, bits - start * 8, unit)
            else:
                out[m.name] = (bits // 8, None, btf.size_of(m.type))

    walk(t, 0)
    return t.size, out


@pytest.mark.parametrize("name", ["task_struct", "mm_struct", "list_head", "page"])
def test_host_struct_layouts_equal_what_pahole_prints(host_btf, name: str) -> None:
    assert btf_flat_members(host_btf, name) == pahole_layout(name)


def test_host_task_struct_bitfields_sit_where_pahole_says(host_btf) -> None:
    _, members = btf_flat_members(host_btf, "task_struct")
    bitfields = {k: v for k, v in members.items() if v[1] is not None}
    assert "sched_reset_on_fork" in bitfields
    _, expected = pahole_layout("task_struct")
    assert bitfields == {k: v for k, v in expected.items() if v[1] is not None}


def test_host_btf_is_little_endian_version_1_with_every_type_id_in_range(host_btf) -> None:
    assert (host_btf.endian, host_btf.version) == ("little", 1)
    assert len(host_btf) > 10_000
    assert host_btf.find("task_struct", K.STRUCT)[0].size == pahole_layout("task_struct")[0]


def test_a_truncated_host_btf_raises_profile_error_naming_an_offset() -> None:
    need_host_btf_and_pahole()
    data = HOST_BTF.read_bytes()
    with pytest.raises(ProfileError, match=r"truncated\?"):
        parse_btf(data[: len(data) // 2])
    with pytest.raises(ProfileError, match="shorter than its 24-byte header"):
        parse_btf(data[:10])


# -- crafted BTF ---------------------------------------------------------------------


@pytest.mark.parametrize("endian", ["<", ">"])
def test_every_kind_decodes_identically_in_both_endiannesses(endian: str) -> None:
    w, ids = sample_btf()
    btf = parse_btf(w.bytes(endian))
    assert btf.endian == ("little" if endian == "<" else "big")
    thing = btf[ids["thing"]]
    assert (thing.kind, thing.name, thing.size) == (K.STRUCT, "thing", 56)
    assert [(m.name, m.bit_offset, m.bitfield_size) for m in thing.extra] == [
        ("a", 0, 3), ("b", 3, 5), ("st", 8, 2), ("flag", 10, 1), ("comm", 32, 0),
        ("", 160, 0), ("v", 224, 0), ("cb", 256, 0), ("o", 320, 0),
    ]  # fmt: skip
    assert btf[ids["state"]].extra == (("S_NEG", -1), ("S_ZERO", 0), ("S_ONE", 1))
    assert btf[ids["big"]].extra == (("HUGE", 0x80000000 << 32),)
    assert btf[ids["comm"]].extra.nelems == 16
    assert btf[ids["int"]].extra == (1, 0, 32)
    assert [p.name for p in btf[ids["proto"]].extra] == ["a", ""]
    assert btf[ids["sec"]].extra[0].offset == 0x40
    assert btf[ids["tag"]].extra == (-1,)
    assert btf[ids["fwd"]].kind == K.FWD
    assert btf.resolve(ids["vu32"]).name == "unsigned int"
    assert btf.size_of(ids["comm"]) == 16
    assert btf.size_of(ids["fnptr"]) == 8
    le = parse_btf(sample_btf()[0].bytes("<"))
    assert [t[:8] for t in btf] == [t[:8] for t in le]


def test_bad_magic_raises_profile_error() -> None:
    w, _ = sample_btf()
    with pytest.raises(ProfileError, match=r"not BTF: magic at offset 0x0 is 3412"):
        parse_btf(w.bytes(magic=0x1234))


def test_a_typedef_cycle_raises_profile_error_naming_the_types_and_offset() -> None:
    w = BtfWriter()
    a = w.add(K.TYPEDEF, "a_t", 0, 2)
    w.add(K.CONST, "", 0, 3)
    w.add(K.TYPEDEF, "b_t", 0, a)
    with pytest.raises(
        ProfileError, match=r"#1 \(TYPEDEF 'a_t'\) at offset 0x18 .*cycle: #1 -> #2 -> #3 -> #1"
    ):
        parse_btf(w.bytes())


def test_a_pointer_to_itself_is_a_cycle_but_a_struct_pointing_to_itself_is_fine() -> None:
    w = BtfWriter()
    w.add(K.PTR, "", 0, 1)
    with pytest.raises(ProfileError, match="cycle"):
        parse_btf(w.bytes())
    w = BtfWriter()
    node = w.add(K.STRUCT, "node", 1, 8, w.s("next"), 2, 0)
    w.add(K.PTR, "", 0, node)
    assert parse_btf(w.bytes())[node].extra[0].type == 2


def test_a_type_id_out_of_range_raises_profile_error() -> None:
    w = BtfWriter()
    w.add(K.STRUCT, "s", 1, 4, w.s("m"), 99, 0)
    with pytest.raises(
        ProfileError, match=r"member 'm' refers to type id 99, beyond the last type id 1"
    ):
        parse_btf(w.bytes())


@pytest.mark.parametrize(
    ("record", "says"),
    [
        ((K.PTR, "", 0, 77), "its type refers to type id 77"),
        ((K.TYPEDEF, "t", 0, 77), "its type refers to type id 77"),
        ((K.ARRAY, "", 0, 0, 77, 1, 4), "its type refers to type id 77"),
        ((K.ARRAY, "", 0, 0, 1, 77, 4), "its index type refers to type id 77"),
        ((K.FUNC_PROTO, "", 1, 0, 0, 77), "parameter '' refers to type id 77"),
        ((K.DATASEC, ".data", 1, 8, 77, 0, 8), "a section variable refers to type id 77"),
    ],
)
def test_every_kind_of_reference_past_the_last_type_is_named(record: tuple, says: str) -> None:
    w = BtfWriter()
    w.add(K.INT, "int", 0, 4, 32)
    w.add(*record)
    with pytest.raises(ProfileError, match=rf"{re.escape(says)}, beyond the last type id 2"):
        parse_btf(w.bytes())


def test_offsets_beyond_the_data_raise_profile_error() -> None:
    w, _ = sample_btf()
    data = bytearray(w.bytes())
    struct.pack_into("<I", data, 20, 10_000_000)  # str_len
    with pytest.raises(ProfileError, match=r"string section .* runs past the end"):
        parse_btf(bytes(data))
    w = BtfWriter()
    w.add(K.STRUCT, "s", 1, 4, w.s("m"), 0, 0)
    data = bytearray(w.bytes())
    struct.pack_into("<I", data, 24, 5000)  # name_off of the struct
    with pytest.raises(ProfileError, match=r"offset 0x18 names string offset 0x1388"):
        parse_btf(bytes(data))


def test_a_record_cut_short_by_the_type_section_raises_profile_error() -> None:
    w = BtfWriter()
    w.add(K.STRUCT, "s", 3, 4, w.s("m"), 0, 0)  # claims 3 members, holds 1
    with pytest.raises(ProfileError, match=r"type #1 \(STRUCT\) at offset 0x18 is truncated"):
        parse_btf(w.bytes())


def test_an_unknown_kind_raises_profile_error() -> None:
    w = BtfWriter()
    w.add(25, "x", 0, 0)
    with pytest.raises(ProfileError, match="type #1 at offset 0x18 has unknown kind 25"):
        parse_btf(w.bytes())


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_corrupted_btf_never_raises_anything_but_profile_error(data) -> None:
    from vmishell.symbols.isf_build import build_isf

    endian = data.draw(st.sampled_from(["<", ">"]))
    blob = bytearray(sample_btf()[0].bytes(endian))
    for _ in range(data.draw(st.integers(1, 4))):
        # Mostly the type section's words (ids, kinds, vlens, offsets), sometimes anywhere.
        pos = data.draw(st.integers(24, 24 + 4 * 80) | st.integers(0, len(blob) - 1))
        if pos < len(blob):
            blob[pos] = data.draw(
                st.sampled_from([0, 1, 2, 3, 0x7F, 0x80, 0xFF]) | st.integers(0, 255)
            )
    if data.draw(st.booleans()):
        blob = blob[: data.draw(st.integers(0, len(blob)))]
    try:
        btf = parse_btf(bytes(blob))
    except ProfileError:
        return
    with contextlib.suppress(ProfileError):
        build_isf(bytes(blob), {"runqueue_thing": 0x40, "init_task": 0x1000}, endian=btf.endian)
