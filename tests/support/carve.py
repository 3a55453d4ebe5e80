"""A guest-physical memory holding a kernel's carvable parts, built in bytes.

What the carve relies on in a real kernel: a banner, the kallsyms tables
(as scripts/kallsyms.c lays them out, holding run-time addresses moved by a
KASLR slide), a BTF blob between `__start_BTF` and `__stop_BTF`, init_task's
comm, and optionally the kernel's VMCOREINFO text.
"""

from __future__ import annotations

from dataclasses import dataclass

from tests.unit.test_btf import sample_btf
from tests.unit.test_kallsyms import build_tables
from vmishell.sources import BufferSource
from vmishell.symbols.sysmap import Symbol

LINK_TEXT = 0xFFFFFFFF81000000
SLIDE = 0x1D400000  # a 2 MiB multiple, as KASLR moves the kernel
IMAGE_PADDR = 0x1000000
BANNER = b"Linux version 6.1.0-99-amd64 (debian-kernel@lists.debian.org) #1 SMP Debian 6.1.999-1"
# Offsets inside the image of what the symbols name.
BANNER_AT, TABLES_AT, BTF_AT, INIT_TASK_AT, END_AT = 0x10000, 0x20000, 0x80000, 0xC0000, 0x100000
#: x86_64's variables that lead to the VMCOREINFO page: page_offset_base and vmcoreinfo_data.
PAGE_OFFSET_BASE_AT, VMCOREINFO_DATA_AT = 0xD0000, 0xD0008
PAGE_OFFSET = 0xFFFF888000000000


@dataclass
class Guest:
    memory: bytearray
    link_symbols: dict[str, int]
    btf: bytes

    def source(self) -> BufferSource:
        return BufferSource([(0, self.memory)], description="synthetic guest")


def link_symbols(btf_len: int) -> list[Symbol]:
    syms = [Symbol("_text", "T", LINK_TEXT), Symbol("_stext", "T", LINK_TEXT)]
    for i in range(600):
        syms.append(Symbol(f"func_{i}_{i * 7 % 13}", "tT"[i % 2], LINK_TEXT + 0x1000 + 16 * i))
    syms += [
        Symbol("linux_banner", "D", LINK_TEXT + BANNER_AT),
        Symbol("__start_BTF", "R", LINK_TEXT + BTF_AT),
        Symbol("__stop_BTF", "R", LINK_TEXT + BTF_AT + btf_len),
        Symbol("init_task", "D", LINK_TEXT + INIT_TASK_AT),
        Symbol("page_offset_base", "D", LINK_TEXT + PAGE_OFFSET_BASE_AT),
        Symbol("vmcoreinfo_data", "b", LINK_TEXT + VMCOREINFO_DATA_AT),
        Symbol("_end", "B", LINK_TEXT + END_AT),
    ]
    return syms


def vmcoreinfo(slide: int = SLIDE) -> bytes:
    return (
        f"OSRELEASE=6.1.0-99-amd64\nPAGESIZE=4096\nSYMBOL(_stext)={LINK_TEXT + slide:x}\n"
        f"NUMBER(phys_base)=0\nKERNELOFFSET={slide:x}\n"
    ).encode()


def make_guest(
    *, btf: bytes | None = None, info: bytes | None = None, tables=None, size: int = 0x2000000
) -> Guest:
    btf = sample_btf()[0].bytes() if btf is None else btf
    syms = link_symbols(len(btf))
    moved = [Symbol(s.name, s.type, s.address + SLIDE) for s in syms]
    memory = bytearray(size)
    memory[0:16] = b"\xff" * 16
    base = IMAGE_PADDR
    memory[base + BANNER_AT : base + BANNER_AT + len(BANNER) + 1] = BANNER + b"\0"
    tables = build_tables(moved, ptr=8, mode="relative", seqs=True) if tables is None else tables
    memory[base + TABLES_AT : base + TABLES_AT + len(tables)] = tables
    memory[base + BTF_AT : base + BTF_AT + len(btf)] = btf
    comm = b"swapper/0"
    memory[base + INIT_TASK_AT : base + INIT_TASK_AT + len(comm)] = comm
    if info is not None:  # where the kernel's page is: vmcoreinfo_data points there
        memory[size - 0x100000 : size - 0x100000 + len(info)] = info
        pointers = (base + PAGE_OFFSET_BASE_AT, PAGE_OFFSET), (
            base + VMCOREINFO_DATA_AT, PAGE_OFFSET + size - 0x100000,
        )  # fmt: skip
        for at, value in pointers:
            memory[at : at + 8] = value.to_bytes(8, "little")
    return Guest(memory, {s.name: s.address for s in syms}, btf)
