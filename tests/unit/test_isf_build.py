"""BTF -> Volatility3 ISF: the output follows schema 6.2.0 and Volatility3 itself reads it right."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pytest
from test_btf import HOST_BTF, BtfWriter, need_host_btf_and_pahole, pahole_layout, sample_btf

from vmishell.errors import ProfileError
from vmishell.symbols.btf import BtfKind, parse_btf
from vmishell.symbols.isf import read_isf
from vmishell.symbols.isf_build import KNOWN_SYMBOL_TYPES, build_isf, write_isf

K = BtfKind
BANNER = b"Linux version 6.1.0-test (me@host) (gcc 12) #1 SMP PREEMPT_DYNAMIC\n"


def volatility_table(isf_path: Path, *, linux: bool = False):
    """Load an ISF file as Volatility3 does; returns (context, table).

    With `linux`, the table is the one Linux plugins use, which attaches
    Volatility's classes to task_struct, mm_struct, list_head, net, ...
    """
    import volatility3.framework.symbols.linux.extensions.network  # noqa: F401 (plugins do)
    from volatility3.framework import contexts
    from volatility3.framework.symbols import intermed
    from volatility3.framework.symbols.linux import LinuxKernelIntermedSymbols

    ctx = contexts.Context()
    cls = LinuxKernelIntermedSymbols if linux else intermed.IntermediateSymbolTable
    table = cls(ctx, "config", "kernel", isf_path.as_uri(), validate=False)
    ctx.symbol_space.append(table)
    return ctx, table


def volatility_object(ctx, type_name: str, data: bytes):
    """A Volatility3 object of `type_name` over `data` placed at offset 0."""
    from volatility3.framework.layers.physical import BufferDataLayer

    layer_name = ctx.layers.free_layer_name("buffer")
    ctx.add_layer(BufferDataLayer(ctx, "config.layer", layer_name, data))
    return ctx.object(type_name, layer_name, offset=0)


def schema_errors(isf: dict) -> list[str]:
    """Volatility3's own schema for the ISF's format version, checked with jsonschema."""
    import jsonschema
    import volatility3.schemas

    schema_path = Path(volatility3.schemas.__file__).with_name(
        f"schema-{isf['metadata']['format']}.json"
    )
    schema = json.loads(schema_path.read_text())
    # The schema's "$schema" names no draft; jsonschema (as Volatility3 calls it) uses the latest.
    checker = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    checker = checker(schema)
    return [f"{list(e.path)}: {e.message}" for e in checker.iter_errors(isf)]


# -- the host kernel's BTF ------------------------------------------------------------


@pytest.fixture(scope="module")
def host():
    """(btf, symbols, isf, seconds to build) for the host kernel with plausible symbols."""
    need_host_btf_and_pahole()
    data = HOST_BTF.read_bytes()
    btf = parse_btf(data)
    symbols: dict[str, int] = {}
    for t in btf:
        if t.kind == K.DATASEC:
            for v in t.extra:
                symbols[btf[v.type].name] = v.offset
    for i, name in enumerate(sorted(KNOWN_SYMBOL_TYPES)):
        symbols[name] = 0xFFFFFFFF82000000 + i * 0x1000
    stages: list[tuple[str, float]] = []
    start = time.perf_counter()
    isf = build_isf(data, symbols, banner=BANNER, progress=lambda s, f: stages.append((s, f)))
    elapsed = time.perf_counter() - start
    return btf, symbols, isf, elapsed, stages


@pytest.fixture(scope="module")
def host_table(host, tmp_path_factory):
    path = write_isf(host[2], tmp_path_factory.mktemp("isf") / "host.json.xz")
    return volatility_table(path, linux=True)


def test_the_host_isf_build_reports_its_progress_in_order(host) -> None:
    """(Its speed is measured in benchmarks/bench_profiles.py, not here.)"""
    _, _, isf, _elapsed, stages = host
    assert stages[0] == ("parsing BTF", 0.0) and stages[-1] == ("done", 1.0)
    assert [f for _, f in stages] == sorted(f for _, f in stages)
    assert len(isf["user_types"]) > 5000


def test_volatility_reads_task_struct_offsets_equal_to_pahole(host_table) -> None:
    _, table = host_table
    task = table.get_type("task_struct")
    size, members = pahole_layout("task_struct")
    assert task.vol.size == size
    for name in ("mm", "pid", "tgid", "comm", "tasks", "real_parent", "cred"):
        assert task.vol.members[name][0] == members[name][0], name
    comm = task.vol.members["comm"][1]
    assert comm.vol.count == 16


def test_volatility_reads_bitfields_and_enums_like_c_does(host_table) -> None:
    ctx, table = host_table
    _, members = pahole_layout("task_struct")
    offset, bit, unit = members["sched_reset_on_fork"]
    template = table.get_type("task_struct").vol.members["sched_reset_on_fork"]
    assert template[0] == offset
    assert (template[1].vol.start_bit, template[1].vol.end_bit) == (bit, bit + 1)
    data = bytearray(table.get_type("task_struct").vol.size)
    data[offset : offset + unit] = (1 << bit).to_bytes(unit, "little")
    pid_off = members["pid"][0]
    data[pid_off : pid_off + 4] = (4242).to_bytes(4, "little")
    comm_off = members["comm"][0]
    data[comm_off : comm_off + 8] = b"swapper\0"
    task = volatility_object(ctx, "kernel!task_struct", bytes(data))
    assert (task.sched_reset_on_fork, task.sched_contributes_to_load, task.pid) == (1, 0, 4242)
    assert type(task).__name__ == "task_struct"  # Volatility's Linux extension class
    from volatility3.framework.objects import utility

    assert utility.array_to_string(task.comm) == "swapper"
    pid_type = table.get_enumeration("pid_type")
    assert pid_type.choices["PIDTYPE_PID"] == 0 and "PIDTYPE_MAX" in pid_type.choices


def test_volatility_flattens_anonymous_unions_so_their_members_are_reachable(
    host_table,
) -> None:
    _, table = host_table
    size, members = pahole_layout("page")
    page = table.get_type("page")
    assert page.vol.size == size
    for name in ("lru", "mapping", "pp_magic", "compound_head", "_refcount"):
        assert page.vol.members[name][0] == members[name][0], name
    assert not any(name.startswith("unnamed_field") for name in page.vol.members)


def test_volatility_gets_symbol_types_and_the_banner(host, host_table) -> None:
    _, symbols, _, _, _ = host
    _, table = host_table
    init_task = table.get_symbol("init_task")
    assert init_task.address == symbols["init_task"]
    assert init_task.type.vol.type_name == "kernel!task_struct"
    assert table.get_symbol("linux_banner").constant_data == BANNER + b"\0"
    runqueues = table.get_symbol("runqueues")  # per-CPU: typed from BTF's DATASEC
    assert runqueues.address == symbols["runqueues"]
    assert runqueues.type.vol.type_name == "kernel!rq"
    init_mm = table.get_symbol("init_mm")
    assert init_mm.type.vol.type_name == "kernel!mm_struct"
    modules = table.get_symbol("modules")
    assert modules.type.vol.type_name == "kernel!list_head"


def test_a_sample_of_the_host_isf_passes_volatility_schema_6_2_0(host) -> None:
    isf = host[2]
    names = [*list(isf["user_types"])[:200], "task_struct", "page", "mm_struct"]
    names += [n for n in isf["user_types"] if n.startswith("unnamed_")][:50]
    sample = {
        "metadata": isf["metadata"],
        "base_types": isf["base_types"],
        "user_types": {n: isf["user_types"][n] for n in names},
        "enums": dict(list(isf["enums"].items())[:100]),
        "symbols": isf["symbols"],
    }
    assert schema_errors(sample) == []


def test_every_known_global_the_host_btf_can_type_gets_its_type(host) -> None:
    isf = host[2]
    typed = {n for n, s in isf["symbols"].items() if "type" in s}
    for name in ("init_task", "init_mm", "init_pid_ns", "init_files", "modules", "prb",
                 "tk_core", "idt_table", "net_namespace_list", "taint_flags", "_text"):  # fmt: skip
        assert name in typed, name
    assert isf["symbols"]["tk_core"]["type"] in (
        {"kind": "struct", "name": "tk_data"},
        {"kind": "struct", "name": isf["symbols"]["tk_core"]["type"]["name"]},
    )
    assert isf["symbols"]["idt_table"]["type"]["count"] == 256


# -- crafted BTF: exact output ----------------------------------------------------------


SAMPLE_SYMBOLS = {
    "runqueue_thing": 0x40,
    "linux_banner": 0xFFFFFFFF81E00000,
    "log_buf_len": 0xFFFFFFFF81F00000,
    "init_task": 0xFFFFFFFF82000000,
    "_text": 0xFFFFFFFF81000000,
}


def build_sample(endian: str = "<", **kwargs) -> dict:
    w, _ = sample_btf()
    return build_isf(
        w.bytes(endian), SAMPLE_SYMBOLS, endian="little" if endian == "<" else "big", **kwargs
    )


def test_the_sample_isf_passes_the_schema_and_names_its_parts_like_dwarf2json() -> None:
    isf = build_sample(banner=b"Linux version 1.2.3\n")
    assert schema_errors(isf) == []
    assert isf["metadata"]["format"] == "6.2.0"
    assert isf["base_types"]["pointer"] == {
        "size": 8, "signed": False, "kind": "int", "endian": "little"
    }  # fmt: skip
    assert isf["base_types"]["void"]["kind"] == "void"
    fields = isf["user_types"]["thing"]["fields"]
    anon = fields["unnamed_field_14"]
    assert anon["anonymous"] is True and anon["offset"] == 20
    assert re.fullmatch(r"unnamed_[0-9a-f]{16}", anon["type"]["name"])
    assert isf["user_types"][anon["type"]["name"]]["kind"] == "union"
    assert fields["comm"] == {
        "type": {"kind": "array", "count": 16, "subtype": {"kind": "base", "name": "char"}},
        "offset": 4,
    }
    assert fields["v"]["type"] == {"kind": "base", "name": "unsigned int"}  # qualifiers stripped
    assert fields["cb"]["type"] == {"kind": "pointer", "subtype": {"kind": "function"}}
    assert fields["o"]["type"] == {
        "kind": "pointer",
        "subtype": {"kind": "struct", "name": "opaque"},
    }
    assert isf["enums"]["state"] == {
        "size": 4, "base": "int", "constants": {"S_NEG": -1, "S_ZERO": 0, "S_ONE": 1}
    }  # fmt: skip
    assert isf["enums"]["big"]["base"] == "long unsigned int"
    assert isf["symbols"]["runqueue_thing"] == {
        "address": 0x40, "type": {"kind": "struct", "name": "thing"}
    }  # fmt: skip
    assert isf["symbols"]["linux_banner"]["constant_data"] == "TGludXggdmVyc2lvbiAxLjIuMwoA"
    assert isf["symbols"]["linux_banner"]["type"]["count"] == len(b"Linux version 1.2.3\n\0")
    assert isf["symbols"]["_text"]["type"]["count"] == 0
    assert isf["symbols"]["log_buf_len"]["type"] == {"kind": "base", "name": "unsigned int"}
    assert build_sample(banner=b"Linux version 1.2.3\n") == isf  # deterministic


@pytest.mark.parametrize(
    "endian, positions",
    [("<", {"a": (0, 0), "b": (3, 0), "st": (8, 0), "flag": (2, 1)}),
     (">", {"a": (29, 0), "b": (24, 0), "st": (22, 0), "flag": (5, 1)})],
)  # fmt: skip
def test_bitfields_get_volatility_positions_in_either_endianness(endian, positions) -> None:
    fields = build_sample(endian)["user_types"]["thing"]["fields"]
    got = {n: (fields[n]["type"]["bit_position"], fields[n]["offset"]) for n in positions}
    assert got == positions
    assert fields["st"]["type"]["type"] == {"kind": "enum", "name": "state"}
    assert fields["b"]["type"]["bit_length"] == 5


@pytest.mark.parametrize("endian", ["<", ">"])
def test_volatility_reads_the_sample_struct_as_c_lays_it_out(tmp_path: Path, endian: str) -> None:
    isf = build_sample(endian)
    ctx, _ = volatility_table(write_isf(isf, tmp_path / "sample.json"))
    order = "little" if endian == "<" else "big"
    data = bytearray(56)
    if endian == "<":  # a=5 b=17 st=S_ONE flag=1, C bit order LSB first
        data[0], data[1] = 5 | 17 << 3, 1 | 1 << 2
    else:  # MSB first
        data[0:4] = ((5 << 29) | (17 << 24) | (1 << 22) | (1 << 21)).to_bytes(4, "big")
    data[4:9] = b"init\0"
    data[20:28] = (0x1122334455667788).to_bytes(8, order)
    data[28:32] = (7).to_bytes(4, order)
    thing = volatility_object(ctx, "kernel!thing", bytes(data))
    assert (thing.a, thing.b, thing.st, thing.flag, thing.v) == (5, 17, 1, 1, 7)
    assert thing.comm.cast("string", max_length=16) == "init"
    assert thing.x == 0x1122334455667788  # member of the anonymous union, flattened
    assert thing.y == (0x55667788 if endian == "<" else 0x11223344)


def test_a_symbol_without_a_known_type_keeps_its_address_only() -> None:
    isf = build_sample()
    assert isf["symbols"]["init_task"] == {"address": SAMPLE_SYMBOLS["init_task"]}


def test_known_globals_resolve_typedefs_and_size_arrays_from_sizes_or_the_next_symbol() -> None:
    w = BtfWriter()
    uint = w.add(K.INT, "unsigned int", 0, 4, 32)
    w.add(K.TYPEDEF, "u32", 0, uint)
    w.add(K.INT, "char", 0, 1, 8)
    flag = w.add(K.STRUCT, "taint_flag", 1, 4, w.s("c"), uint, 0)
    w.add(K.STRUCT, "task_struct", 1, 4, w.s("pid"), uint, 0)
    w.add(K.PTR, "", 0, flag)
    symbols = {"log_buf_len": 0x1000, "taint_flags": 0x2000, "next": 0x2000 + 19 * 4,
               "init_task": 0x3000, "linux_banner": 0x4000}  # fmt: skip
    isf = build_isf(w.bytes(), symbols)
    assert isf["symbols"]["log_buf_len"]["type"] == {"kind": "base", "name": "unsigned int"}
    assert isf["symbols"]["taint_flags"]["type"] == {
        "kind": "array", "count": 19, "subtype": {"kind": "struct", "name": "taint_flag"}
    }  # fmt: skip
    assert isf["symbols"]["init_task"]["type"] == {"kind": "struct", "name": "task_struct"}
    assert isf["symbols"]["linux_banner"]["type"]["count"] == 0  # last symbol: no gap to measure
    sized = build_isf(w.bytes(), symbols, symbol_sizes={"taint_flags": 18 * 4})
    assert sized["symbols"]["taint_flags"]["type"]["count"] == 18
    assert "constant_data" not in isf["symbols"]["linux_banner"]


def test_old_style_int_encoded_bitfields_and_unnamed_padding_are_handled() -> None:
    w = BtfWriter()
    uint = w.add(K.INT, "unsigned int", 0, 4, 32)
    bits3 = w.add(K.INT, "unsigned int", 0, 4, 3)  # pre-kind_flag bitfield encoding
    w.add(K.STRUCT, "old", 3, 8, w.s("x"), bits3, 35, 0, bits3, 38, w.s("y"), uint, 0)
    fields = build_isf(w.bytes(), {})["user_types"]["old"]["fields"]
    assert fields["x"] == {
        "type": {"kind": "bitfield", "bit_position": 3, "bit_length": 3,
                 "type": {"kind": "base", "name": "unsigned int"}},
        "offset": 4,
    }  # fmt: skip
    assert set(fields) == {"x", "y"}  # the unnamed padding member is dropped


def test_a_packed_bitfield_straddling_its_unit_is_read_through_a_wider_integer() -> None:
    w = BtfWriter()
    uint = w.add(K.INT, "unsigned int", 0, 4, 32)
    w.add(K.INT, "long unsigned int", 0, 8, 64)
    w.add(K.STRUCT, "packed", 1, 8, w.s("z"), uint, (30 << 24) | 20, kflag=True)
    z = build_isf(w.bytes(), {})["user_types"]["packed"]["fields"]["z"]
    assert z["offset"] == 2
    assert z["type"]["bit_position"] == 4 and z["type"]["bit_length"] == 30
    assert z["type"]["type"] == {"kind": "base", "name": "long unsigned int"}


def test_same_named_structs_keep_the_plain_name_for_the_most_used_one() -> None:
    w = BtfWriter()
    uint = w.add(K.INT, "unsigned int", 0, 4, 32)
    small = w.add(K.STRUCT, "dup", 1, 4, w.s("a"), uint, 0)
    big = w.add(K.STRUCT, "dup", 2, 8, w.s("a"), uint, 0, w.s("b"), uint, 32)
    w.add(K.PTR, "", 0, big)
    w.add(K.PTR, "", 0, big)
    w.add(K.PTR, "", 0, small)
    isf = build_isf(w.bytes(), {})
    assert isf["user_types"]["dup"]["size"] == 8
    assert isf["user_types"][f"dup__btf{small}"]["size"] == 4


def test_an_endianness_mismatch_and_garbage_raise_profile_error() -> None:
    w, _ = sample_btf()
    with pytest.raises(ProfileError, match="big-endian but endian='little'"):
        build_isf(w.bytes(">"), {})
    with pytest.raises(ProfileError, match="not BTF"):
        build_isf(b"\0" * 64, {})


@pytest.mark.parametrize("suffix", [".json", ".json.xz", ".json.gz"])
def test_write_isf_compresses_by_suffix_and_reads_back_equal(tmp_path: Path, suffix) -> None:
    isf = build_sample(banner=b"Linux version 1.2.3\n")
    path = write_isf(isf, tmp_path / f"sample{suffix}")
    magic = path.read_bytes()[:6]
    assert {".json": b"{", ".json.xz": b"\xfd7zXZ\0", ".json.gz": b"\x1f\x8b"}[suffix] in magic
    assert read_isf(path) == json.loads(json.dumps(isf))
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp file left behind
    assert os.access(path, os.R_OK)
