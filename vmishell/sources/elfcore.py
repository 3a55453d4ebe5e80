"""QEMU's ELF core dumps (`dump-guest-memory`, `virsh dump`): RAM plus CPU state.

Each PT_LOAD segment places file bytes at a guest-physical address (p_paddr).
QEMU adds one "QEMU" note per vCPU with a QEMUCPUState that carries the control
registers, so a dump tells how to translate addresses without a live monitor.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

from vmishell.errors import SourceError
from vmishell.sources.base import Registers
from vmishell.sources.files import MappedFileSource

_PT_LOAD = 1
_PT_NOTE = 4
_EM_386 = 3
_EM_X86_64 = 62
_EM_AARCH64 = 183

# QEMUCPUState (target/i386/arch_dump.c): version, size, 18 GPRs + rip/rflags as
# u64, ten segment descriptors of 24 bytes, then cr[5] and kernel_gs_base.
_QEMU_CPU_CR_OFFSET = 8 + 18 * 8 + 10 * 24
_GPR_NAMES = (
    *("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp"),
    *("r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags"),
)
#: EFER.LME | EFER.LMA | EFER.NXE: what a 64-bit Linux guest runs with.
_EFER_LONG_MODE_NX = (1 << 8) | (1 << 10) | (1 << 11)


@dataclass(frozen=True, slots=True)
class ElfNote:
    name: str
    type: int
    desc: bytes


def _parse_elf(data: memoryview, path: Path) -> tuple[int, list[tuple[int, int, int, int]], int]:
    """(machine, [(type, offset, paddr, filesz)], class) from an ELF header, checked."""
    if len(data) < 52 or bytes(data[:4]) != b"\x7fELF":
        raise SourceError(f"{path} is not an ELF file")
    elf_class, endian = data[4], data[5]
    if endian != 1:
        raise SourceError(f"{path}: big-endian ELF cores are not supported")
    if elf_class == 2:
        if len(data) < 64:
            raise SourceError(f"{path}: ELF header is cut short ({len(data)} of 64 bytes)")
        hdr = struct.unpack_from("<HHIQQQIHHHHHH", data, 16)
        (_, machine, _, _, phoff, _, _, _, phentsize, phnum, _, _, _) = hdr
        fmt = "<IIQQQQQQ"
    elif elf_class == 1:
        hdr = struct.unpack_from("<HHIIIIIHHHHHH", data, 16)
        (_, machine, _, _, phoff, _, _, _, phentsize, phnum, _, _, _) = hdr
        fmt = "<IIIIIIII"
    else:
        raise SourceError(f"{path}: unknown ELF class {elf_class}")
    if phentsize < struct.calcsize(fmt) or phoff + phnum * phentsize > len(data):
        raise SourceError(f"{path}: program headers lie outside the file (truncated?)")
    headers = []
    for i in range(phnum):
        fields = struct.unpack_from(fmt, data, phoff + i * phentsize)
        if elf_class == 2:
            p_type, _, p_offset, _, p_paddr, p_filesz, _, _ = fields
        else:
            p_type, p_offset, _, p_paddr, p_filesz, _, _, _ = fields
        headers.append((p_type, p_offset, p_paddr, p_filesz))
    return machine, headers, elf_class


def _parse_notes(blob: bytes) -> list[ElfNote]:
    notes, pos = [], 0
    while pos + 12 <= len(blob):
        namesz, descsz, ntype = struct.unpack_from("<III", blob, pos)
        pos += 12
        name_end = pos + ((namesz + 3) & ~3)
        desc_end = name_end + ((descsz + 3) & ~3)
        if desc_end > len(blob) + 3:
            break
        name = blob[pos : pos + namesz].rstrip(b"\0").decode("ascii", "replace")
        notes.append(ElfNote(name, ntype, bytes(blob[name_end : name_end + descsz])))
        pos = desc_end
    return notes


class ElfCoreSource(MappedFileSource):
    """A QEMU ELF core: PT_LOAD segments as RAM, CPU registers from its notes."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        probe = MappedFileSource(path, kind="ELF file")
        try:
            machine, headers, _ = _parse_elf(probe._view, self.path)
            layout = []
            notes: list[ElfNote] = []
            for p_type, offset, paddr, filesz in headers:
                if p_type == _PT_LOAD and filesz:
                    layout.append((paddr, offset, filesz))
                elif p_type == _PT_NOTE:
                    if offset + filesz > len(probe._view):
                        raise SourceError(f"{self.path}: note segment lies outside the file")
                    notes.extend(_parse_notes(bytes(probe._view[offset : offset + filesz])))
        finally:
            probe.close()
        if not layout:
            raise SourceError(f"{self.path}: ELF file has no PT_LOAD segments (not a memory dump)")
        self.machine = machine
        self.notes = notes
        super().__init__(path, _merge_layout(layout), kind="ELF core")
        self._registers_from_notes = _registers(machine, notes)

    def registers(self) -> Registers:
        if self._registers_from_notes is None:
            return super().registers()
        return self._registers_from_notes

    @property
    def vmcoreinfo(self) -> str | None:
        """The guest kernel's VMCOREINFO text, when QEMU had `-device vmcoreinfo`."""
        for note in self.notes:
            if note.name == "VMCOREINFO":
                return note.desc.decode("ascii", "replace")
        return None


def _merge_layout(layout: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    """Join segments adjacent in both physical space and file (QEMU splits at 4 GiB)."""
    merged: list[tuple[int, int, int]] = []
    for phys, off, size in sorted(layout):
        if merged:
            p, o, s = merged[-1]
            if p + s == phys and o + s == off:
                merged[-1] = (p, o, s + size)
                continue
        merged.append((phys, off, size))
    return merged


def _registers(machine: int, notes: list[ElfNote]) -> Registers | None:
    """The first vCPU's control registers from QEMU's note (None if absent)."""
    qemu = [n for n in notes if n.name == "QEMU"]
    if not qemu or machine not in (_EM_386, _EM_X86_64):
        return None
    desc = qemu[0].desc
    if len(desc) < _QEMU_CPU_CR_OFFSET + 5 * 8:
        return None
    cr = struct.unpack_from("<5Q", desc, _QEMU_CPU_CR_OFFSET)
    gprs = dict(zip(_GPR_NAMES, struct.unpack_from("<18Q", desc, 8), strict=True))
    extra = {k: v for k, v in gprs.items() if k in ("rip", "rsp", "rflags")}
    extra["cr2"] = cr[2]
    if machine == _EM_X86_64:
        # The note has no EFER; a 64-bit dump means long mode was active.
        return Registers(
            "x86_64", cr0=cr[0], cr3=cr[3], cr4=cr[4], efer=_EFER_LONG_MODE_NX, extra=extra
        )
    return Registers("i386", cr0=cr[0], cr3=cr[3], cr4=cr[4], efer=None, extra=extra)
