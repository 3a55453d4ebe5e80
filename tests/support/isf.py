"""Small hand-made ISFs: the Linux structures vmishell reads, in other kernels' layouts.

The shipped 6.1 profile gives the real layout of one kernel; these give the
layouts it does not have (threads on `signal->thread_head` only, as from
6.7; VMAs on the `mm->mmap` list, as before 6.1; the older `state` field;
32-bit pointers) so the Linux layer is tested on each without a guest.
Fields are laid out in the order given, each aligned to its size, so the
offsets differ from any real kernel's: code that hard-codes an offset
instead of asking the profile fails here.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any

#: Link-time placement of the tiny kernels' symbols, relative to the link base.
SYMBOL_OFFSETS = {
    "_text": 0x1000000,
    "linux_banner": 0x1100000,
    "top_table": 0x1200000,
    "init_task": 0x1210000,
    "boot_cpu_data": 0x1220000,
    "special_mapping_vmops": 0x1230000,
    "jiffies_64": 0x1240000,
    "__pgtable_l5_enabled": 0x1250000,
}
TINY_BANNER = b"Linux version 9.9.9-tiny (vmishell@tests) #1 SMP PREEMPT_DYNAMIC\n"


@dataclass(frozen=True)
class Variant:
    """Which layout generation a tiny ISF describes."""

    pointer_size: int = 8
    threads: str = "thread_node"  # or "thread_group" (before 6.7), or "both" (3.14-6.6)
    vmas: str = "maple"  # or "list" (before 6.1)
    state_field: str = "__state"  # or "state" (before 5.14, a long)
    pae: bool = True  # 32-bit only: 8-byte page-table entries
    page_offset: int = 0xC0000000  # 32-bit only
    phys_startup: bool = True  # 32-bit only: the profile has phys_startup_32 (System.map)
    banner: bytes = TINY_BANNER

    @property
    def link_base(self) -> int:
        return 0xFFFFFFFF80000000 if self.pointer_size == 8 else self.page_offset


def _base_types(ptr: int) -> dict[str, Any]:
    def t(size: int, signed: bool, kind: str = "int") -> dict[str, Any]:
        return {"size": size, "signed": signed, "kind": kind, "endian": "little"}

    return {
        "char": t(1, True, "char"),
        "unsigned char": t(1, False, "char"),
        "int": t(4, True),
        "unsigned int": t(4, False),
        "long int": t(ptr, True),
        "long unsigned int": t(ptr, False),
        "long long unsigned int": t(8, False),
        "pointer": t(ptr, False),
        "void": {"size": 0, "signed": False, "kind": "void", "endian": "little"},
    }


class _Layout:
    """Lays out one struct's fields in order, each aligned to its own size."""

    def __init__(self, ptr: int, types: dict[str, Any]) -> None:
        self.ptr = ptr
        self.types = types

    def size(self, spec: Any) -> int:
        kind = spec["kind"]
        if kind == "pointer":
            return self.ptr
        if kind == "array":
            return spec["count"] * self.size(spec["subtype"])
        if kind == "base":
            return _base_types(self.ptr)[spec["name"]]["size"]
        return self.types[spec["name"]]["size"]

    def struct(self, name: str, fields: list[tuple[str, Any]], *, align: int = 0) -> None:
        offset, out = 0, {}
        for fname, spec in fields:
            size = self.size(spec)
            unit = min(size, self.ptr) or 1
            offset = -(-offset // unit) * unit
            out[fname] = {"type": spec, "offset": offset}
            offset += size
        size = -(-offset // self.ptr) * self.ptr
        if align:
            size = max(size, align)
        self.types[name] = {"kind": "struct", "size": size, "fields": out}


def _b(name: str) -> dict[str, Any]:
    return {"kind": "base", "name": name}


def _p(to: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"kind": "pointer", "subtype": to or _b("void")}


def _s(name: str) -> dict[str, Any]:
    return {"kind": "struct", "name": name}


def _a(count: int, of: dict[str, Any]) -> dict[str, Any]:
    return {"kind": "array", "count": count, "subtype": of}


def tiny_isf(v: Variant = Variant()) -> dict[str, Any]:
    """An ISF with just the structures and symbols vmishell's Linux layer reads."""
    ptr = v.pointer_size
    types: dict[str, Any] = {}
    lay = _Layout(ptr, types)
    ulong, uint, u8 = _b("long unsigned int"), _b("unsigned int"), _b("unsigned char")
    lay.struct("list_head", [("next", _p(_s("list_head"))), ("prev", _p(_s("list_head")))])
    lay.struct("cred", [("usage", uint), ("uid", uint), ("gid", uint), ("euid", uint)])
    lay.struct("kthread", [("flags", ulong), ("full_name", _p(_b("char")))])
    lay.struct("signal_struct", [("sigcnt", uint), ("thread_head", _s("list_head"))])
    state = (v.state_field, _b("unsigned int") if v.state_field == "__state" else _b("long int"))
    task = [
        ("thread_info", ulong),
        state,
        ("stack", _p()),
        ("flags", uint),
        ("prio", _b("int")),
        ("tasks", _s("list_head")),
        ("mm", _p(_s("mm_struct"))),
        ("active_mm", _p(_s("mm_struct"))),
        ("exit_state", _b("int")),
        ("pid", _b("int")),
        ("tgid", _b("int")),
        ("real_parent", _p(_s("task_struct"))),
        ("parent", _p(_s("task_struct"))),
    ]
    if v.threads in ("thread_group", "both"):
        task.append(("thread_group", _s("list_head")))
    if v.threads in ("thread_node", "both"):
        task.append(("thread_node", _s("list_head")))
    task += [
        ("start_time", _b("long long unsigned int")),
        ("start_boottime", _b("long long unsigned int")),
        ("real_cred", _p(_s("cred"))),
        ("cred", _p(_s("cred"))),
        ("comm", _a(16, _b("char"))),
        ("signal", _p(_s("signal_struct"))),
        ("worker_private", _p()),
    ]
    lay.struct("task_struct", task)
    lay.struct("qstr", [("hash", uint), ("len", uint), ("name", _p(_b("unsigned char")))])
    lay.struct("super_block", [("s_list", _s("list_head")), ("s_dev", uint)])
    lay.struct("inode", [("i_mode", uint), ("i_ino", ulong), ("i_sb", _p(_s("super_block")))])
    lay.struct(
        "dentry",
        [
            ("d_flags", uint),
            ("d_parent", _p(_s("dentry"))),
            ("d_name", _s("qstr")),
            ("d_inode", _p(_s("inode"))),
        ],
    )
    lay.struct("vfsmount", [("mnt_root", _p(_s("dentry"))), ("mnt_flags", _b("int"))])
    lay.struct(
        "mount",
        [
            ("mnt_hash", _s("list_head")),
            ("mnt_parent", _p(_s("mount"))),
            ("mnt_mountpoint", _p(_s("dentry"))),
            ("mnt", _s("vfsmount")),
        ],
    )
    lay.struct("path", [("mnt", _p(_s("vfsmount"))), ("dentry", _p(_s("dentry")))])
    lay.struct("file", [("f_count", ulong), ("f_path", _s("path"))])
    vma = [("vm_start", ulong), ("vm_end", ulong)]
    if v.vmas == "list":
        vma += [("vm_next", _p(_s("vm_area_struct"))), ("vm_prev", _p(_s("vm_area_struct")))]
    vma += [
        ("vm_mm", _p(_s("mm_struct"))),
        ("vm_page_prot", ulong),
        ("vm_flags", ulong),
        ("vm_ops", _p()),
        ("vm_pgoff", ulong),
        ("vm_file", _p(_s("file"))),
        ("vm_private_data", _p()),
    ]
    lay.struct("vm_area_struct", vma)
    mm: list[tuple[str, Any]] = []
    if v.vmas == "maple":
        _maple_types(lay, ptr)
        mm.append(("mm_mt", _s("maple_tree")))
    else:
        mm.append(("mmap", _p(_s("vm_area_struct"))))
    mm += [
        ("pgd", _p()),
        ("map_count", _b("int")),
        ("start_brk", ulong),
        ("brk", ulong),
        ("start_stack", ulong),
        ("arg_start", ulong),
        ("arg_end", ulong),
    ]
    lay.struct("mm_struct", mm)
    lay.struct(
        "cpuinfo_x86",
        [("x86", u8), ("x86_phys_bits", u8), ("x86_capability", _a(24, uint))],
    )
    entry = 8 if ptr == 8 or v.pae else 4
    lay.struct("pgprot", [("pgprot", _b("long long unsigned int") if entry == 8 else uint)])
    return {
        "metadata": {"format": "6.2.0", "producer": {"name": "vmishell-tests", "version": "1"}},
        "base_types": _base_types(ptr),
        "user_types": types,
        "enums": {},
        "symbols": _symbols(v),
    }


def _maple_types(lay: _Layout, ptr: int) -> None:
    """maple_tree.h: 256-byte nodes; range_64 keeps its metadata in its last slot."""
    ulong, u8 = _b("long unsigned int"), _b("unsigned char")
    slots = 16 if ptr == 8 else 32
    aslots = 10 if ptr == 8 else 21
    lay.struct("maple_metadata", [("end", u8), ("gap", u8)])
    lay.struct(
        "maple_tree",
        [("ma_lock", _b("unsigned int")), ("ma_root", _p()), ("ma_flags", _b("unsigned int"))],
    )
    lay.struct(
        "maple_range_64",
        [("parent", _p()), ("pivot", _a(slots - 1, ulong)), ("slot", _a(slots, _p()))],
    )
    meta = lay.types["maple_range_64"]["fields"]["slot"]["offset"] + (slots - 1) * ptr
    lay.types["maple_range_64"]["fields"]["meta"] = {
        "type": _s("maple_metadata"),
        "offset": meta,
    }
    lay.struct(
        "maple_arange_64",
        [
            ("parent", _p()),
            ("pivot", _a(aslots - 1, ulong)),
            ("slot", _a(aslots, _p())),
            ("gap", _a(aslots, ulong)),
            ("meta", _s("maple_metadata")),
        ],
    )
    dense = 256 // ptr - 1
    lay.types["maple_node"] = {
        "kind": "union",
        "size": 256,
        "fields": {
            "parent": {"type": _p(), "offset": 0},
            "slot": {"type": _a(dense, _p()), "offset": ptr},
            "mr64": {"type": _s("maple_range_64"), "offset": 0},
            "ma64": {"type": _s("maple_arange_64"), "offset": 0},
        },
    }


def _symbols(v: Variant) -> dict[str, Any]:
    base = v.link_base
    out: dict[str, Any] = {}
    for name, offset in SYMBOL_OFFSETS.items():
        if name == "top_table":
            name = "init_top_pgt" if v.pointer_size == 8 else "swapper_pg_dir"
        if name == "__pgtable_l5_enabled" and v.pointer_size != 8:
            continue
        out[name] = {"address": base + offset}
    banner = v.banner + b"\0"
    out["linux_banner"]["type"] = _a(len(banner), _b("char"))
    out["linux_banner"]["constant_data"] = base64.b64encode(banner).decode()
    out["init_task"]["type"] = _s("task_struct")
    if v.pointer_size == 4 and v.phys_startup:
        out["startup_32"] = {"address": base + SYMBOL_OFFSETS["_text"]}
        out["phys_startup_32"] = {"address": SYMBOL_OFFSETS["_text"]}
    return out
