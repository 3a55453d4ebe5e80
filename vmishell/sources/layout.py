"""Where QEMU's machines place a RAM file's bytes in the physical address space.

QEMU splits x86 guest RAM below and above 4 GiB once it no longer fits under
the PCI hole: q35 keeps at most 2 GiB low when RAM is 2.75 GiB or more, pc keeps
3 GiB low when RAM is 3.5 GiB or more. Below those sizes the file offset is the
physical address. Arm's `virt` machine puts all RAM in one piece from 1 GiB
(0x40000000): physical = file offset + 0x40000000.
"""

from __future__ import annotations

FOUR_GIB = 1 << 32

_LOW_LIMITS = {
    # machine: (RAM size from which the split happens, bytes kept below 4 GiB)
    "q35": (0xB0000000, 0x80000000),
    "pc": (0xE0000000, 0xC0000000),
}


def qemu_x86_ram_layout(ram_size: int, machine: str = "q35") -> list[tuple[int, int, int]]:
    """(physical start, file offset, size) triples for a QEMU x86 RAM file."""
    if machine not in _LOW_LIMITS:
        return [(0, 0, ram_size)]
    split_from, low = _LOW_LIMITS[machine]
    if ram_size < split_from:
        return [(0, 0, ram_size)]
    return [(0, 0, low), (FOUR_GIB, low, ram_size - low)]


#: Machines whose RAM is one block starting at a fixed physical address.
RAM_BASE = {"virt": 0x4000_0000}


def qemu_ram_layout(ram_size: int, machine: str = "q35") -> list[tuple[int, int, int]]:
    """(physical start, file offset, size) triples for a QEMU RAM file of `machine`."""
    base = RAM_BASE.get(machine)
    if base is not None:
        return [(base, 0, ram_size)]
    return qemu_x86_ram_layout(ram_size, machine)


def flat_layout(size: int) -> list[tuple[int, int, int]]:
    """A file whose offset is the physical address."""
    return [(0, 0, size)]
