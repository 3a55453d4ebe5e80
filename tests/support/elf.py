"""A tiny static x86_64 program with many mappings, and a lab scenario that runs it.

Busybox processes have half a dozen VMAs, which fit one maple-tree leaf; a
process needs more than 15 (with the gaps between them) before its tree grows
internal nodes. This program maps `MAPPINGS` anonymous pages with alternating
rights (so none merge) and then waits in pause(). The scenario writes it into
the guest with printf (the initramfs has busybox only), starts it and prints
its /proc/PID/maps as the guest's own record.
"""

from __future__ import annotations

import struct

MAPPINGS = 40
PREFIX = "@@many "
_BASE = 0x400000

# mov $MAPPINGS,%r12d
# 1: mov $9,%eax; xor %edi,%edi; mov $0x1000,%esi          mmap(NULL, 4096,
#    mov %r12d,%edx; and $1,%edx; add %edx,%edx; inc %edx    PROT_READ or READ|WRITE,
#    mov $0x22,%r10d; mov $-1,%r8; xor %r9d,%r9d; syscall    MAP_PRIVATE|MAP_ANONYMOUS)
#    dec %r12d; jnz 1b
# 2: mov $34,%eax; syscall; jmp 2b                          pause() forever
_CODE = (
    bytes.fromhex("41bc") + struct.pack("<I", MAPPINGS)
    + bytes.fromhex(
        "b809000000" "31ff" "be00100000" "4489e2" "83e201" "01d2" "ffc2"
        "41ba22000000" "49c7c0ffffffff" "4531c9" "0f05" "41ffcc" "75d3"
        "b822000000" "0f05" "ebf7"
    )
)  # fmt: skip


def many_mappings_elf() -> bytes:
    """An ELF64 executable: one read+execute PT_LOAD holding headers and code."""
    ehsize, phsize = 64, 56
    entry = _BASE + ehsize + phsize
    size = ehsize + phsize + len(_CODE)
    header = struct.pack(
        "<4sBBBBB7xHHIQQQIHHHHHH",
        b"\x7fELF", 2, 1, 1, 0, 0,  # 64-bit, little-endian, version 1, System V
        2, 0x3E, 1, entry, ehsize, 0, 0,  # ET_EXEC, x86-64, entry, phoff, no sections
        ehsize, phsize, 1, 0, 0, 0,
    )  # fmt: skip
    program = struct.pack("<IIQQQQQQ", 1, 5, 0, _BASE, _BASE, size, size, 0x1000)
    return header + program + _CODE


def scenario() -> str:
    """A `lab up --init` script: write the program, run it, print its maps."""
    octal = "".join(f"\\{b:03o}" for b in many_mappings_elf())
    return (
        f"printf '{octal}' >/tmp/many-maps\n"
        "chmod +x /tmp/many-maps\n"
        "/tmp/many-maps &\n"
        "pid=$!\n"
        "sleep 1\n"
        f'echo "{PREFIX}pid $pid"\n'
        f'while IFS= read -r line; do echo "{PREFIX}map $line"; done </proc/$pid/maps\n'
        f'echo "{PREFIX}end"\n'
    )
