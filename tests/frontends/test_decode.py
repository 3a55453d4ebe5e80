"""decode(): typed guest structures from bytes, bounded, whatever the bytes say.

A tiny hand-written ISF describes the types; a fake reader serves the bytes
(with an unmapped page where a test needs one).
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmishell.errors import PageFault, SymbolNotFound, VmiError
from vmishell.symbols.decode import DecodeLimits, decode, layout
from vmishell.symbols.profile import Profile, TypeRef
from vmishell.symbols.values import Array, EnumValue, FieldValue, Pointer, Struct


def _base(size: int, signed: bool, kind: str = "int") -> dict:
    return {"size": size, "signed": signed, "kind": kind, "endian": "little"}


def _t(kind: str, name: str | None = None, **extra) -> dict:
    out = {"kind": kind, **extra}
    if name is not None:
        out["name"] = name
    return out


INT = _t("base", "int")
ISF = {
    "metadata": {"format": "6.2.0"},
    "base_types": {
        "char": _base(1, True, "char"),
        "unsigned char": _base(1, False, "char"),
        "int": _base(4, True),
        "unsigned int": _base(4, False),
        "long unsigned int": _base(8, False),
        "_Bool": _base(1, False, "bool"),
        "double": _base(8, True, "float"),
        "pointer": _base(8, False),
        "void": _base(0, False, "void"),
    },
    "user_types": {
        "demo": {
            "kind": "struct",
            "size": 72,
            "fields": {
                "id": {"offset": 0, "type": INT},
                "mode": {
                    "offset": 4,
                    "type": _t(
                        "bitfield", bit_position=0, bit_length=3, type=_t("base", "unsigned int")
                    ),
                },
                "delta": {
                    "offset": 4,
                    "type": _t("bitfield", bit_position=3, bit_length=4, type=INT),
                },
                "color": {"offset": 8, "type": _t("enum", "color")},
                "name": {"offset": 12, "type": _t("array", count=16, subtype=_t("base", "char"))},
                "raw": {
                    "offset": 28,
                    "type": _t("array", count=4, subtype=_t("base", "unsigned char")),
                },
                "next": {"offset": 32, "type": _t("pointer", subtype=_t("struct", "demo"))},
                "inner": {"offset": 40, "type": _t("struct", "inner")},
                "vals": {"offset": 48, "type": _t("array", count=2, subtype=INT)},
                "ok": {"offset": 56, "type": _t("base", "_Bool")},
                "ratio": {"offset": 64, "type": _t("base", "double")},
            },
        },
        "inner": {
            "kind": "struct",
            "size": 8,
            "fields": {"a": {"offset": 0, "type": INT}, "b": {"offset": 4, "type": INT}},
        },
        "wrap": {
            "kind": "struct",
            "size": 80,
            "fields": {
                "d": {"offset": 0, "type": _t("struct", "demo")},
                "tail": {"offset": 72, "type": _t("base", "long unsigned int")},
            },
        },
        "big": {
            "kind": "struct",
            "size": 4000 * 4,
            "fields": {"items": {"offset": 0, "type": _t("array", count=4000, subtype=INT)}},
        },
        "u": {
            "kind": "union",
            "size": 4,
            "fields": {
                "i": {"offset": 0, "type": INT},
                "c": {
                    "offset": 0,
                    "type": _t("array", count=4, subtype=_t("base", "unsigned char")),
                },
            },
        },
    },
    "enums": {"color": {"size": 4, "base": "int", "constants": {"RED": 0, "GREEN": 1, "BLUE": 2}}},
    "symbols": {"demo_global": {"address": 0x1000}},
}

BASE = 0x7000_0000


@pytest.fixture(scope="module")
def profile() -> Profile:
    return Profile.from_isf(ISF, "tiny")


class FakeMemory:
    """Guest memory at BASE; pages listed in `holes` are unmapped."""

    def __init__(self, data: bytes, holes: tuple[int, ...] = ()) -> None:
        self.data = data
        self.holes = holes
        self.reads = 0

    def read(self, vaddr: int, size: int) -> bytes:
        self.reads += 1
        for page in range(vaddr & ~0xFFF, vaddr + size, 0x1000):
            if page in self.holes or not BASE <= page < BASE + len(self.data):
                raise PageFault(page, "PT")
        off = vaddr - BASE
        if off + size > len(self.data):
            raise PageFault(vaddr + size, "PT")
        return self.data[off : off + size]


def demo_bytes(**over) -> bytes:
    v = {
        "id": 42,
        "bits": 0b1101_101,  # mode = 5, delta = 0b1101 = -3 as a signed 4-bit field
        "color": 2,
        "name": b"<b>vmi</b>\x1b[2J\0\0",
        "raw": b"\x00\xff\x10\x7f",
        "next": 0xFFFF888000001000,
        "a": -1,
        "b": 7,
        "vals": (10, 20),
        "ok": 1,
        "ratio": 0.5,
    }
    v.update(over)
    return struct.pack(
        "<iIi16s4sQii2iB7xd",
        v["id"], v["bits"], v["color"], v["name"], v["raw"], v["next"], v["a"], v["b"],
        *v["vals"], v["ok"], v["ratio"],
    )  # fmt: skip


def test_every_kind_of_member_decodes_to_a_plain_value(profile: Profile) -> None:
    mem = FakeMemory(demo_bytes() + bytes(0x1000))
    d = decode(profile, mem, "demo", BASE, depth=2)
    assert isinstance(d, Struct)
    assert (d.type_name, d.kind, d.address, d.size) == ("demo", "struct", BASE, 72)
    assert d.id == 42 and d["id"] == 42
    assert d.mode == 5
    assert d.delta == -3
    assert d.color == EnumValue("color", 2, "BLUE") and str(d.color) == "BLUE"
    assert d.name == "<b>vmi</b>\x1b[2J"
    assert d.raw == b"\x00\xff\x10\x7f"
    assert d.next == Pointer(0xFFFF888000001000, TypeRef("struct", "demo"))
    assert str(d.next) == "0xffff888000001000"  # what `{d.next}` puts in a magic line
    assert d.inner.a == -1 and d["inner.b"] == 7
    assert isinstance(d.vals, Array) and list(d.vals) == [10, 20]
    assert d.ok is True
    assert d.ratio == 0.5
    assert d.to_dict()["inner"] == {"a": -1, "b": 7}
    assert mem.reads == 1  # the struct's bytes were read once


def test_depth_names_nested_structs_without_expanding_them(profile: Profile) -> None:
    mem = FakeMemory(demo_bytes() + bytes(0x1000))
    shallow = decode(profile, mem, "demo", BASE, depth=1)
    assert not shallow.inner.expanded and shallow.inner.address == BASE + 40
    w = decode(profile, FakeMemory(demo_bytes() + bytes(8 + 0x1000)), "struct wrap", BASE, 1)
    assert not w.d.expanded
    deep = decode(profile, FakeMemory(demo_bytes() + bytes(8 + 0x1000)), "wrap", BASE, 3)
    assert deep.d.inner.b == 7


def test_layout_lists_members_with_offsets_bits_and_sizes(profile: Profile) -> None:
    rows = {r.name: r for r in layout(profile, "demo")}
    assert (rows["mode"].offset, rows["mode"].bit_position, rows["mode"].bit_length) == (4, 0, 3)
    assert rows["name"].type == "char [16]" and rows["name"].size == 16
    assert "inner.a" not in rows
    nested = {r.name: r for r in layout(profile, "demo", depth=1)}
    assert nested["inner.b"].offset == 44


def test_a_member_on_an_unmapped_page_keeps_its_row_with_the_error(profile: Profile) -> None:
    # the struct straddles a page boundary; the second page is unmapped
    start = BASE + 0x1000 - 32
    data = bytes(0x1000 - 32) + demo_bytes()[:32] + bytes(0x1000)
    d = decode(profile, FakeMemory(data, holes=(BASE + 0x1000,)), "demo", start)
    assert d.id == 42
    bad = d.field("next")
    assert bad.value is None and "unreadable" in (bad.error or "")
    assert [f.name for f in d.fields] == [f.name for f in profile.fields("demo")]


def test_nothing_readable_is_one_clear_error(profile: Profile) -> None:
    with pytest.raises(VmiError, match=r"cannot read struct demo at 0x"):
        decode(profile, FakeMemory(bytes(0x1000)), "demo", BASE + 0x5000)


def test_unknown_types_are_symbol_errors(profile: Profile) -> None:
    with pytest.raises(SymbolNotFound, match="no type 'nosuch'"):
        decode(profile, FakeMemory(bytes(0x1000)), "nosuch", BASE)


def test_arrays_bytes_and_values_are_capped(profile: Profile) -> None:
    data = struct.pack("<4000i", *range(4000)) + bytes(0x1000)
    d = decode(profile, FakeMemory(data), "big", BASE, limits=DecodeLimits(max_elements=8))
    assert d.items.count == 4000 and len(d.items) == 8 and d.items.truncated
    assert list(d.items) == list(range(8))
    few = decode(profile, FakeMemory(data), "big", BASE, limits=DecodeLimits(max_values=5))
    assert len(few.items) < 5
    cut = decode(profile, FakeMemory(data), "big", BASE, limits=DecodeLimits(max_bytes=64))
    assert list(cut.items)[:16] == list(range(16))
    assert any("decode limit" in str(x) for x in list(cut.items)[16:] + list(cut.notes))


def test_unions_show_every_view_of_the_same_bytes(profile: Profile) -> None:
    u = decode(profile, FakeMemory(b"\x01\x02\x03\x04" + bytes(0x1000)), "union u", BASE)
    assert u.kind == "union" and u.i == 0x04030201 and u.c == b"\x01\x02\x03\x04"


def test_text_and_html_forms_escape_guest_strings(profile: Profile) -> None:
    d = decode(profile, FakeMemory(demo_bytes() + bytes(0x1000)), "demo", BASE)
    text = d.to_text()
    assert "\x1b" not in text and "\\x1b[2J" in text
    page = d._repr_html_()
    assert "<b>vmi</b>" not in page and "&lt;b&gt;vmi&lt;/b&gt;" in page
    assert "BLUE" in text and "0xffff888000001000" in text


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=80, max_size=80), st.integers(0, 8))
def test_any_bytes_decode_or_raise_only_vmishell_errors(profile: Profile, data, depth) -> None:
    try:
        d = decode(profile, FakeMemory(data + bytes(0x1000)), "wrap", BASE, depth)
    except VmiError:
        return
    d.to_text()
    d._repr_html_()
    d.to_dict()


def test_anonymous_members_show_as_struct_braces_not_hashed_names() -> None:
    """pahole and drgn show an anonymous struct as `struct {…}`; its members follow."""
    inner = Struct(
        "unnamed_dbdd48c03bf27356",
        "struct",
        0x1000,
        4,
        (FieldValue("counter", 0, TypeRef("base", "int"), 0x1000, 4, 7),),
    )
    outer = Struct(
        "mm_struct",
        "struct",
        0x1000,
        4,
        (
            FieldValue(
                "mm_users", 0, TypeRef("struct", "unnamed_dbdd48c03bf27356"), 0x1000, 4, inner
            ),
        ),
    )
    for shown in (outer.to_text(), outer._repr_html_(), outer.frame().to_string()):
        assert "unnamed_" not in shown
        assert "struct {…}" in shown
    assert "counter" in outer.to_text()
    assert inner.header().startswith("struct {…} @ 0x1000")
