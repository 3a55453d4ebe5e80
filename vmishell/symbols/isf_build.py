"""Build a Volatility3 ISF (schema 6.2.0) from BTF and a symbol table.

The output follows what dwarf2json writes so Volatility3's Linux plugins
work on it unchanged: anonymous struct/union members become fields named
"unnamed_field_<hex offset>" flagged "anonymous" (Volatility3 >= 6.2 readers
flatten them, so task_struct members inside anonymous unions are reachable
by name), anonymous types are named "unnamed_<16 hex>" from a hash of their
definition, typedefs and qualifiers are stripped from type descriptors.

BTF types only per-CPU variables (and, with newer pahole, some globals); the
well-known globals the Linux plugins read get their type from a table here.
"""

from __future__ import annotations

import base64
import bz2
import gzip
import hashlib
import json
import logging
import lzma
import os
import re
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from vmishell import __version__
from vmishell.errors import ProfileError
from vmishell.symbols.btf import (
    INT_BOOL,
    INT_CHAR,
    INT_SIGNED,
    TRANSPARENT,
    Btf,
    BtfKind,
    BtfType,
    parse_btf,
    paused_gc,
)

log = logging.getLogger(__name__)

ISF_FORMAT = "6.2.0"

Progress = Callable[[str, float], None]

#: Types for globals that BTF leaves untyped, in C spelling. A tuple lists
#: alternatives (first that resolves wins). "[]" takes the count from
#: `symbol_sizes` or the gap to the next symbol; "[0]" marks linker symbols
#: whose address is all that matters. "struct {a,b}" is an anonymous struct
#: with exactly those members (tk_core before 6.12).
KNOWN_SYMBOL_TYPES: dict[str, str | tuple[str, ...]] = {
    "linux_banner": "char []",
    # processes, memory, namespaces
    "init_task": "struct task_struct",
    "init_mm": "struct mm_struct",
    "init_pid_ns": "struct pid_namespace",
    "init_files": "struct files_struct",
    "init_fs": "struct fs_struct",
    "init_nsproxy": "struct nsproxy",
    "init_net": "struct net",
    "init_uts_ns": "struct uts_namespace",
    "init_user_ns": "struct user_namespace",
    "init_ipc_ns": "struct ipc_namespace",
    "init_cred": "struct cred",
    "init_struct_pid": "struct pid",
    "kthreadd_task": "struct task_struct *",
    "pid_max": "int",
    "nr_threads": "int",
    "pid_hash": "struct hlist_head *",
    "pidhash_shift": "unsigned int",
    "cap_last_cap": "int",
    "mem_map": "struct page *",
    "mem_section": "struct mem_section **",
    "node_data": "struct pglist_data *[]",
    "vmemmap_base": "unsigned long",
    "page_offset_base": "unsigned long",
    "vmalloc_base": "unsigned long",
    "phys_base": "unsigned long",
    "max_pfn": "unsigned long",
    "high_memory": "void *",
    "totalram_pages": ("atomic_long_t", "unsigned long"),
    "pkmap_count": "int []",
    "swapper_pg_dir": "pgd_t []",
    "init_top_pgt": "pgd_t []",
    "init_level4_pgt": "pgd_t []",
    "__per_cpu_offset": "unsigned long []",
    "nr_cpu_ids": "unsigned int",
    "__cpu_online_mask": "struct cpumask",
    "__cpu_possible_mask": "struct cpumask",
    "__cpu_present_mask": "struct cpumask",
    "jiffies": "unsigned long",
    "jiffies_64": "u64",
    "system_state": "enum system_states",
    "saved_command_line": "char *",
    "boot_command_line": "char []",
    "slab_caches": "struct list_head",
    "vmap_area_list": "struct list_head",
    "vmap_area_root": "struct rb_root",
    # modules, kallsyms, tracing
    "modules": "struct list_head",
    "mod_tree": "struct mod_tree_root",
    "module_addr_min": "unsigned long",
    "module_addr_max": "unsigned long",
    "module_kset": "struct kset *",
    "kallsyms_num_syms": "unsigned int",
    "bpf_kallsyms": "struct list_head",
    "prog_idr": "struct idr",
    "ftrace_ops_list": "struct ftrace_ops *",
    "ftrace_list_end": "struct ftrace_ops",
    "ftrace_mod_maps": "struct list_head",
    "ftrace_ops_trampoline_list": "struct list_head",
    "taint_flags": "struct taint_flag []",
    "sys_call_table": ("sys_call_ptr_t []", "void *[]"),
    "ia32_sys_call_table": ("sys_call_ptr_t []", "void *[]"),
    "x32_sys_call_table": ("sys_call_ptr_t []", "void *[]"),
    "idt_table": ("gate_desc [256]", "struct gate_struct [256]"),
    "keyboard_notifier_list": "struct atomic_notifier_head",
    # printk
    "prb": "struct printk_ringbuffer *",
    "printk_rb_static": "struct printk_ringbuffer",
    "printk_rb_dynamic": "struct printk_ringbuffer",
    "log_buf": "char *",
    "log_buf_len": ("u32", "unsigned int"),
    "log_first_idx": ("u32", "unsigned int"),
    "log_next_idx": ("u32", "unsigned int"),
    "log_end": "unsigned int",
    # time
    "tk_core": ("struct tk_data", "struct {seq,timekeeper}"),
    "timekeeper": "struct timekeeper",
    "wall_to_monotonic": "struct timespec",
    "total_sleep_time": ("struct timespec", "struct timespec64"),
    # files, network, devices
    "super_blocks": "struct list_head",
    "file_systems": "struct file_system_type *",
    "mount_hashtable": "struct hlist_head *",
    "socket_file_ops": "struct file_operations",
    "sockfs_dentry_operations": "struct dentry_operations",
    "net_namespace_list": "struct list_head",
    "tcp_hashinfo": "struct inet_hashinfo",
    "udp_table": "struct udp_table",
    "iomem_resource": "struct resource",
    "ioport_resource": "struct resource",
    "tty_drivers": "struct list_head",
    "registered_fb": "struct fb_info *[32]",
    "num_registered_fb": "int",
    "cgroup_roots": "struct list_head",
    "cgrp_dfl_root": "struct cgroup_root",
    # linker symbols: only the address matters
    "_text": "char [0]",
    "_stext": "char [0]",
    "_etext": "char [0]",
    "_sdata": "char [0]",
    "_edata": "char [0]",
    "_end": "char [0]",
    "__bss_start": "char [0]",
    "__per_cpu_start": "char [0]",
    "__per_cpu_end": "char [0]",
    "__start___tracepoints_ptrs": "char [0]",
    "__stop___tracepoints_ptrs": "char [0]",
}

# C spellings of base types -> the names BTF (like DWARF) uses.
_BASE_ALIASES = {
    "unsigned": "unsigned int",
    "unsigned long": "long unsigned int",
    "long": "long int",
    "unsigned long long": "long long unsigned int",
    "long long": "long long int",
    "unsigned short": "short unsigned int",
    "short": "short int",
    "bool": "_Bool",
}
_MAX_GAP_COUNT = 1 << 16  # an array sized from the next symbol's address stays below this

_STRUCT, _UNION = BtfKind.STRUCT.value, BtfKind.UNION.value
_ENUM, _ENUM64 = BtfKind.ENUM.value, BtfKind.ENUM64.value
_INT, _FLOAT, _PTR, _ARRAY = (
    BtfKind.INT.value,
    BtfKind.FLOAT.value,
    BtfKind.PTR.value,
    BtfKind.ARRAY.value,
)
_FWD, _FUNC, _FUNC_PROTO = BtfKind.FWD.value, BtfKind.FUNC.value, BtfKind.FUNC_PROTO.value
_VAR, _DATASEC, _TYPEDEF = BtfKind.VAR.value, BtfKind.DATASEC.value, BtfKind.TYPEDEF.value
_TRANSPARENT = frozenset(int(k) for k in TRANSPARENT)
_AGGREGATES = frozenset({_STRUCT, _UNION})
_VOID_DESC = {"kind": "base", "name": "void"}
_FUNCTION_DESC = {"kind": "function"}


def build_isf(
    btf: bytes,
    symbols: Mapping[str, int],
    *,
    banner: bytes | None = None,
    pointer_size: int | None = None,
    endian: str = "little",
    producer: dict | None = None,
    progress: Progress | None = None,
    symbol_sizes: Mapping[str, int] | None = None,
) -> dict:
    """Return an ISF dict for a kernel described by raw `btf` bytes.

    `symbols` maps names to link-time (unrelocated) addresses. `banner` is the
    kernel's linux_banner string; it becomes the symbol's constant_data (with
    its trailing NUL, as dwarf2json stores it) so Volatility3 can match it.
    `symbol_sizes` (optional, e.g. from an ELF symtab) sizes arrays of unknown
    length; without it the gap to the next symbol is used. Descriptor dicts may
    be shared between fields: treat the result as read-only.
    """
    report = progress or (lambda stage, fraction: None)
    if endian not in ("little", "big"):
        raise ProfileError(f"endian must be 'little' or 'big', not {endian!r}")
    report("parsing BTF", 0.0)
    parsed = parse_btf(btf)
    if parsed.endian != endian:
        raise ProfileError(
            f"the BTF is {parsed.endian}-endian but endian={endian!r} was asked; "
            f"pass endian={parsed.endian!r}"
        )
    with paused_gc():
        builder = _IsfBuilder(parsed, endian, pointer_size, report)
        isf = builder.build(symbols, banner, symbol_sizes or {}, producer)
    report("done", 1.0)
    return isf


def write_isf(isf: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write `isf` as JSON: xz-compressed for *.xz, gzip for *.gz, bzip2 for *.bz2.

    The file is replaced atomically, so a reader never sees half an ISF.
    """
    path = Path(path)
    data = json.dumps(isf, separators=(",", ":")).encode()
    suffix = path.suffix
    if suffix == ".xz":
        data = lzma.compress(data, preset=1)  # level 1: 4x faster than 6, ~10% larger
    elif suffix == ".gz":
        data = gzip.compress(data, compresslevel=6, mtime=0)
    elif suffix == ".bz2":
        data = bz2.compress(data)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        # mkstemp makes the file private; a profile is meant to be shared.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


class _IsfBuilder:
    """One conversion: names every aggregate, then emits types, enums, symbols."""

    def __init__(self, btf: Btf, endian: str, pointer_size: int | None, report: Progress):
        self.btf = btf
        self.types = btf.types
        self.endian = endian
        self.report = report
        self.pointer_size = pointer_size or self._guess_pointer_size()
        self.base_types: dict[str, dict] = {}
        self.names: dict[int, str] = {}  # aggregate/enum id -> ISF name
        self.plain: dict[tuple[str, str], int] = {}  # ("struct"|"enum", C name) -> id
        self._desc: dict[int, dict] = {0: _VOID_DESC}
        self._sig: dict[int, str] = {}
        self._sig_busy: set[int] = set()

    def _guess_pointer_size(self) -> int:
        for name in ("long unsigned int", "long int", "unsigned long", "long"):
            for t in self.btf.find(name, BtfKind.INT):
                return t.size
        return 8

    # -- driver ----------------------------------------------------------

    def build(
        self,
        symbols: Mapping[str, int],
        banner: bytes | None,
        sizes: Mapping[str, int],
        producer: dict | None,
    ) -> dict:
        self._collect_base_types()
        self.report("naming types", 0.2)
        self._name_types()
        self.report("converting structs and unions", 0.3)
        user_types = self._user_types()
        self.report("converting enums", 0.8)
        enums = self._enums()
        self.report("typing symbols", 0.9)
        isf_symbols = self._symbols(symbols, banner, sizes)
        meta_producer = {"name": "vmishell", "version": __version__}
        if producer:
            meta_producer.update(producer)
        return {
            "metadata": {"format": ISF_FORMAT, "producer": meta_producer, "linux": {}},
            "base_types": self.base_types,
            "user_types": user_types,
            "enums": enums,
            "symbols": isf_symbols,
        }

    # -- base types ------------------------------------------------------

    def _collect_base_types(self) -> None:
        endian = self.endian
        bases = self.base_types
        for t in self.types:
            if t.kind == _INT and t.name and t.name not in bases:
                encoding = t.extra[0]
                if encoding & INT_BOOL:
                    kind = "bool"
                elif encoding & INT_CHAR or t.name in ("char", "signed char", "unsigned char"):
                    kind = "char"
                else:
                    kind = "int"
                signed = bool(encoding & INT_SIGNED)
                bases[t.name] = {"size": t.size, "signed": signed, "kind": kind, "endian": endian}
            elif t.kind == _FLOAT and t.name and t.name not in bases:
                bases[t.name] = {"size": t.size, "signed": True, "kind": "float", "endian": endian}
        bases["void"] = {"size": 0, "signed": False, "kind": "void", "endian": endian}
        bases["pointer"] = {
            "size": self.pointer_size,
            "signed": False,
            "kind": "int",
            "endian": endian,
        }

    def _int_base(self, size: int, signed: bool, kinds: tuple[str, ...] = ("int",)) -> str:
        """The first (sorted) base type of that size and sign; added if none exists."""
        for kind in kinds:
            for name in sorted(self.base_types):
                b = self.base_types[name]
                if b["kind"] == kind and b["size"] == size and b["signed"] == signed:
                    return name
        name = f"{'' if signed else 'u'}int{size * 8}_t"
        self.base_types.setdefault(
            name, {"size": size, "signed": signed, "kind": "int", "endian": self.endian}
        )
        return name

    # -- names -----------------------------------------------------------

    def _name_types(self) -> None:
        """Give each struct/union/enum a unique ISF name.

        Same-named distinct types (BTF keeps them apart when they differ) are
        rare; the most referenced keeps the plain name, the others get
        "<name>__btf<id>".
        """
        groups: dict[tuple[str, str], list[BtfType]] = {}
        for t in self.types:
            if t.kind in _AGGREGATES or t.kind == _ENUM or t.kind == _ENUM64:
                space = "enum" if t.kind in (_ENUM, _ENUM64) else "struct"
                if t.name:
                    groups.setdefault((space, t.name), []).append(t)
                else:
                    self.names[t.id] = self._anonymous_name(t)
        refs = self._reference_counts() if any(len(g) > 1 for g in groups.values()) else {}
        taken = set(self.names.values())
        for (space, name), group in groups.items():
            if len(group) > 1:
                group.sort(key=lambda t: (-refs.get(t.id, 0), -t.vlen, t.id))
            self.plain[(space, name)] = group[0].id
            self.names[group[0].id] = name
            for t in group[1:]:
                alias = f"{name}__btf{t.id}"
                while alias in taken:
                    alias += "_"
                self.names[t.id] = alias
            taken.add(name)

    def _reference_counts(self) -> dict[int, int]:
        refs: dict[int, int] = {}
        for t in self.types:
            if t.kind in _AGGREGATES:
                for m in t.extra:
                    refs[m.type] = refs.get(m.type, 0) + 1
            elif t.ref:
                refs[t.ref] = refs.get(t.ref, 0) + 1
        return refs

    def _anonymous_name(self, t: BtfType) -> str:
        digest = hashlib.sha1(self._signature(t.id).encode()).hexdigest()[:16]
        return f"unnamed_{digest}"

    def _signature(self, tid: int) -> str:
        """A C-like rendering of a type, used to name anonymous types stably."""
        sig = self._sig.get(tid)
        if sig is not None:
            return sig
        if tid in self._sig_busy:
            return "..."
        self._sig_busy.add(tid)
        t = self.types[tid]
        kind = t.kind
        if tid == 0:
            sig = "void"
        elif kind in _AGGREGATES or kind == _FWD:
            word = "union" if kind == _UNION or (kind == _FWD and t.kind_flag) else "struct"
            if t.name:
                sig = f"{word} {t.name}"
            else:
                body = ";".join(
                    f"{self._signature(m.type)} {m.name}@{m.bit_offset}:{m.bitfield_size}"
                    for m in t.extra
                )
                sig = f"{word}[{t.size}]{{{body}}}"
        elif kind in (_ENUM, _ENUM64):
            if t.name:
                sig = f"enum {t.name}"
            else:
                body = ",".join(f"{n}={v}" for n, v in t.extra)
                sig = f"enum[{t.size}]{{{body}}}"
        elif kind == _PTR:
            sig = "*" + self._signature(t.ref)
        elif kind == _ARRAY:
            sig = f"{self._signature(t.extra.type)}[{t.extra.nelems}]"
        elif kind == _FUNC_PROTO:
            params = ",".join(self._signature(p.type) for p in t.extra)
            sig = f"fn({params})->{self._signature(t.ref)}"
        elif kind in (_TYPEDEF, _INT, _FLOAT):
            sig = t.name
        else:
            sig = self._signature(t.ref)
        self._sig_busy.discard(tid)
        self._sig[tid] = sig
        return sig

    # -- descriptors -----------------------------------------------------

    def desc(self, tid: int) -> dict:
        """The ISF type descriptor for a BTF type id (typedefs/qualifiers stripped)."""
        d = self._desc.get(tid)
        if d is not None:
            return d
        t = self.types[tid]
        kind = t.kind
        if kind in _TRANSPARENT or kind == _VAR:
            d = self.desc(t.ref)
        elif kind in _AGGREGATES:
            d = {"kind": "union" if kind == _UNION else "struct", "name": self.names[tid]}
        elif kind == _PTR:
            d = {"kind": "pointer", "subtype": self.desc(t.ref)}
        elif kind == _ARRAY:
            d = {"kind": "array", "count": t.extra.nelems, "subtype": self.desc(t.extra.type)}
        elif kind == _INT:
            signed = bool(t.extra[0] & INT_SIGNED)
            d = {"kind": "base", "name": t.name or self._int_base(t.size, signed)}
        elif kind == _FLOAT:
            d = {"kind": "base", "name": t.name or self._int_base(t.size, True)}
        elif kind in (_ENUM, _ENUM64):
            d = {"kind": "enum", "name": self.names[tid]}
        elif kind in (_FUNC_PROTO, _FUNC):
            d = _FUNCTION_DESC
        elif kind == _FWD:
            d = {"kind": "union" if t.kind_flag else "struct", "name": t.name}
        else:  # DATASEC, DECL_TAG: not value types
            d = _VOID_DESC
        self._desc[tid] = d
        return d

    # -- user types ------------------------------------------------------

    def _user_types(self) -> dict[str, dict]:
        out: dict[str, dict] = {}
        types = self.types
        resolve = self.btf.resolve
        desc = self.desc
        for t in types:
            if t.kind not in _AGGREGATES:
                continue
            name = self.names[t.id]
            if name in out:  # an anonymous type identical to one already emitted
                continue
            fields: dict[str, dict] = {}
            for m in t.extra:
                target = resolve(m.type)
                mname = m.name
                if not mname:
                    if target.kind not in _AGGREGATES:
                        continue  # unnamed padding bit-field
                    mname = f"unnamed_field_{m.bit_offset // 8:x}"
                    while mname in fields:
                        mname += "_"
                    fields[mname] = {
                        "type": desc(target.id),
                        "offset": m.bit_offset // 8,
                        "anonymous": True,
                    }
                    continue
                bits = m.bitfield_size
                if not bits and target.kind == _INT:
                    _, int_offset, int_bits = target.extra
                    if int_offset or int_bits != target.size * 8 or m.bit_offset % 8:
                        bits = int_bits  # pre-kind_flag BTF encodes bit-fields in the INT
                        fields[mname] = self._bitfield(m.bit_offset + int_offset, bits, target)
                        continue
                if bits:
                    fields[mname] = self._bitfield(m.bit_offset, bits, target)
                else:
                    fields[mname] = {"type": desc(m.type), "offset": m.bit_offset // 8}
            out[name] = {
                "kind": "union" if t.kind == _UNION else "struct",
                "size": t.size,
                "fields": fields,
            }
        return out

    def _bitfield(self, bit_offset: int, bits: int, target: BtfType) -> dict:
        """A bit-field as Volatility3 reads it: storage unit at `offset`, LSB-based position."""
        unit = target.size if target.kind in (_INT, _ENUM, _ENUM64) else 0
        if target.kind == _INT:
            storage = {"kind": "base", "name": target.name}
        elif target.kind in (_ENUM, _ENUM64):
            storage = self.desc(target.id)
        else:
            storage = None
        if unit not in (1, 2, 4, 8, 16):
            unit, storage = 0, None
        start = None
        if unit:
            aligned = bit_offset // (unit * 8) * unit
            if bit_offset + bits <= (aligned + unit) * 8:
                start = aligned
            elif bit_offset % 8 + bits <= unit * 8:
                start = bit_offset // 8
        if start is None:  # straddles its unit (packed struct): widen to a plain integer
            start = bit_offset // 8
            unit = next((u for u in (1, 2, 4, 8) if bit_offset - start * 8 + bits <= u * 8), 8)
            storage = {"kind": "base", "name": self._int_base(unit, False, ("int", "char"))}
        rel = bit_offset - start * 8
        position = rel if self.endian == "little" else unit * 8 - rel - bits
        return {
            "type": {
                "kind": "bitfield",
                "bit_position": position,
                "bit_length": bits,
                "type": storage,
            },
            "offset": start,
        }

    # -- enums -----------------------------------------------------------

    def _enums(self) -> dict[str, dict]:
        out: dict[str, dict] = {}
        for t in self.types:
            if t.kind != _ENUM and t.kind != _ENUM64:
                continue
            name = self.names[t.id]
            if name in out:
                continue
            constants = dict(t.extra)
            signed = any(v < 0 for v in constants.values())
            size = t.size or 4
            out[name] = {
                "size": size,
                "base": self._int_base(size, signed, ("int", "char", "bool")),
                "constants": constants,
            }
        return out

    # -- symbols ---------------------------------------------------------

    def _symbols(
        self, symbols: Mapping[str, int], banner: bytes | None, sizes: Mapping[str, int]
    ) -> dict[str, dict]:
        var_types = self._var_types()
        ordered = sorted(set(symbols.values()))
        # Most symbols are an address alone: one pass makes those, a second types the few.
        out: dict[str, dict] = {name: {"address": address} for name, address in symbols.items()}
        typed = (var_types.keys() | KNOWN_SYMBOL_TYPES.keys()) & out.keys()
        for name in [n for n in symbols if n in typed]:  # in symbol order, as before
            if name in var_types:
                out[name]["type"] = self.desc(var_types[name])
                continue
            spec = KNOWN_SYMBOL_TYPES[name]
            address = symbols[name]
            for alternative in (spec,) if isinstance(spec, str) else spec:
                d = self._resolve_spec(alternative, name, address, ordered, sizes)
                if d is not None:
                    out[name]["type"] = d
                    break
        if banner is not None:
            if "linux_banner" in out:
                data = bytes(banner)
                if not data.endswith(b"\0"):
                    data += b"\0"
                out["linux_banner"]["constant_data"] = base64.b64encode(data).decode()
                out["linux_banner"]["type"] = {
                    "kind": "array",
                    "count": len(data),
                    "subtype": {"kind": "base", "name": self._char_name()},
                }
            else:
                log.warning("banner given but no linux_banner symbol: the banner is not stored")
        return out

    def _char_name(self) -> str:
        return "char" if "char" in self.base_types else self._int_base(1, True, ("char", "int"))

    def _var_types(self) -> dict[str, int]:
        """Types of variables BTF describes (per-CPU ones, and globals with newer pahole)."""
        found: dict[str, int] = {}
        ambiguous: set[str] = set()
        for t in self.types:
            if t.kind == _VAR and t.name:
                previous = found.get(t.name)
                if previous is not None and self.desc(previous) != self.desc(t.ref):
                    ambiguous.add(t.name)
                found[t.name] = t.ref
        for name in ambiguous:  # same-named statics of different types: cannot tell which
            del found[name]
        return found

    _SPEC = re.compile(
        r"^\s*(?P<base>(?:struct|union|enum)\s+(?:\{[\w,\s]*\}|\w+)|[\w\s]+?)"
        r"\s*(?P<stars>\**)\s*(?:\[(?P<count>\d*)\])?\s*$"
    )

    def _resolve_spec(
        self,
        spec: str,
        symbol: str,
        address: int,
        ordered: list[int],
        sizes: Mapping[str, int],
    ) -> dict | None:
        """A descriptor for a C type spelling such as "struct fb_info *[32]", or None."""
        m = self._SPEC.match(spec)
        if m is None:  # pragma: no cover - the table is static and tested
            raise ValueError(f"bad type spelling {spec!r}")
        base = self._resolve_base(" ".join(m["base"].split()))
        if base is None:
            return None
        d, elem_size = base
        for _ in m["stars"]:
            d, elem_size = {"kind": "pointer", "subtype": d}, self.pointer_size
        count = m["count"]
        if count is None:
            return d
        if count:
            n = int(count)
        elif symbol in sizes and elem_size:
            n = sizes[symbol] // elem_size
        else:
            n = self._gap_count(address, ordered, elem_size)
        return {"kind": "array", "count": n, "subtype": d}

    def _resolve_base(self, spelling: str) -> tuple[dict, int] | None:
        """(descriptor, size) for "struct x", "enum x", "struct {a,b}", a typedef or base."""
        word, _, rest = spelling.partition(" ")
        if word in ("struct", "union"):
            if rest.startswith("{"):
                wanted = [n.strip() for n in rest.strip("{}").split(",")]
                for t in self.types:
                    if t.kind == _STRUCT and not t.name and [m.name for m in t.extra] == wanted:
                        return self.desc(t.id), t.size
                return None
            tid = self.plain.get(("struct", rest))
            if tid is None or self.types[tid].kind != (_UNION if word == "union" else _STRUCT):
                return None
            return self.desc(tid), self.types[tid].size
        if word == "enum":
            tid = self.plain.get(("enum", rest))
            return None if tid is None else (self.desc(tid), self.types[tid].size)
        if spelling == "void":
            return _VOID_DESC, 0
        name = _BASE_ALIASES.get(spelling, spelling)
        if name in self.base_types and name not in ("void", "pointer"):
            return {"kind": "base", "name": name}, self.base_types[name]["size"]
        for t in self.btf.find(spelling, BtfKind.TYPEDEF):
            return self.desc(t.id), self.btf.size_of(t.id, self.pointer_size)
        return None

    @staticmethod
    def _gap_count(address: int, ordered: list[int], elem_size: int) -> int:
        """Elements that fit before the next symbol (0 when unknown or implausible)."""
        from bisect import bisect_right

        i = bisect_right(ordered, address)
        if not elem_size or i >= len(ordered):
            return 0
        count = (ordered[i] - address) // elem_size
        return count if 0 < count <= _MAX_GAP_COUNT else 0
