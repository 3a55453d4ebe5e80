"""A process's memory map: its VMAs from the maple tree (6.1+) or the older list.

The output matches `/proc/<pid>/maps` line for line: start, end, permissions,
offset, device, inode and path, with [heap], [stack], [vdso] and [vvar] labels.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from vmishell.errors import GuestDataError, VmiError
from vmishell.limits import Limits
from vmishell.os.linux.layout import MapleLayout, MmLayout, VmaLayout
from vmishell.os.linux.reader import KernelReader, decode_guest_string

VM_READ, VM_WRITE, VM_EXEC, VM_SHARED = 0x1, 0x2, 0x4, 0x8

# include/linux/maple_tree.h
MAPLE_NODE_MASK = 0xFF
MAPLE_NODE_TYPE_SHIFT = 3
MAPLE_NODE_TYPE_MASK = 0x0F
MAPLE_DENSE, MAPLE_LEAF_64, MAPLE_RANGE_64, MAPLE_ARANGE_64 = 0, 1, 2, 3


@dataclass(frozen=True, slots=True)
class Vma:
    """One mapping of a process, as `/proc/<pid>/maps` shows it."""

    address: int
    start: int
    end: int
    flags: int
    offset: int
    device: str
    inode: int
    path: str
    error: str | None = None

    @property
    def perms(self) -> str:
        f = self.flags
        return (
            ("r" if f & VM_READ else "-")
            + ("w" if f & VM_WRITE else "-")
            + ("x" if f & VM_EXEC else "-")
            + ("s" if f & VM_SHARED else "p")
        )

    @property
    def size(self) -> int:
        return self.end - self.start


class VmaWalker:
    """Reads a process's VMAs through the kernel's address space."""

    def __init__(
        self,
        reader: KernelReader,
        mm: MmLayout,
        vma: VmaLayout,
        maple: MapleLayout | None,
        limits: Limits,
        special_mapping_ops: frozenset[int] = frozenset(),
    ) -> None:
        self.r = reader
        self.mm = mm
        self.v = vma
        self.maple = maple
        self.limits = limits
        self.special_mapping_ops = special_mapping_ops

    # -- finding the VMA structures --------------------------------------------------
    def vma_addresses(self, mm: int) -> list[int]:
        if self.mm.mm_mt is not None and self.maple is not None:
            found = list(self._maple_entries(mm + self.mm.mm_mt))
        elif self.mm.mmap is not None and self.v.vm_next is not None:
            found = list(self._linked_vmas(mm))
        else:
            raise GuestDataError("profile has neither mm_struct.mm_mt nor mm_struct.mmap")
        return found

    def _linked_vmas(self, mm: int) -> Iterator[int]:
        assert self.mm.mmap is not None and self.v.vm_next is not None
        node = self.r.pointer(mm + self.mm.mmap)
        seen: set[int] = set()
        while node:
            if node in seen:
                raise GuestDataError(f"VMA list of mm {mm:#x} loops at {node:#x}")
            if len(seen) >= self.limits.max_vmas:
                raise GuestDataError(f"mm {mm:#x} has more than {self.limits.max_vmas} VMAs")
            seen.add(node)
            yield node
            node = self.r.pointer(node + self.v.vm_next)

    def _maple_entries(self, tree: int) -> Iterator[int]:
        """Every entry stored in a maple tree, bounded by depth, node count and a seen-set."""
        m = self.maple
        assert m is not None
        root = self.r.pointer(tree + m.tree_root)
        if root == 0:
            return
        if not _is_node(root):
            # A tree holding one entry at index 0 keeps it in ma_root itself.
            yield root
            return
        seen: set[int] = set()
        stack = [(root, tree, 1)]
        while stack:
            entry, parent, depth = stack.pop()
            node = entry & ~MAPLE_NODE_MASK
            if node in seen:
                raise GuestDataError(f"maple tree at {tree:#x}: node {node:#x} reached twice")
            if depth > self.limits.max_tree_depth:
                raise GuestDataError(
                    f"maple tree at {tree:#x}: deeper than {self.limits.max_tree_depth} levels"
                )
            seen.add(node)
            if len(seen) > self.limits.max_tree_nodes:
                raise GuestDataError(
                    f"maple tree at {tree:#x}: over {self.limits.max_tree_nodes} nodes"
                )
            raw_parent = self.r.pointer(node + m.node_parent)
            if (raw_parent & ~MAPLE_NODE_MASK) != (parent & ~MAPLE_NODE_MASK):
                raise GuestDataError(
                    f"maple tree at {tree:#x}: node {node:#x} names parent "
                    f"{raw_parent & ~MAPLE_NODE_MASK:#x}, expected {parent & ~MAPLE_NODE_MASK:#x}"
                )
            kind = (entry >> MAPLE_NODE_TYPE_SHIFT) & MAPLE_NODE_TYPE_MASK
            if kind == MAPLE_ARANGE_64:
                slots = self._slots(node + m.arange_slot, m.arange_slots)
            elif kind in (MAPLE_RANGE_64, MAPLE_LEAF_64):
                slots = self._slots(node + m.range_slot, m.range_slots)
            elif kind == MAPLE_DENSE:
                slots = self._slots(node + m.dense_slot, m.dense_slots)
            else:
                raise GuestDataError(f"maple tree at {tree:#x}: node {node:#x} has type {kind}")
            if kind in (MAPLE_LEAF_64, MAPLE_DENSE):
                # The last slot of a partly filled node holds its metadata, not an entry.
                yield from (s for s in slots if self._kernel_pointer(s))
            else:
                for child in reversed(slots):
                    if child and self._kernel_pointer(child & ~MAPLE_NODE_MASK):
                        if not _is_node(child):
                            raise GuestDataError(
                                f"maple tree at {tree:#x}: internal node {node:#x} "
                                f"holds a non-node slot {child:#x}"
                            )
                        stack.append((child, node, depth + 1))

    def _kernel_pointer(self, value: int) -> bool:
        """Whether a slot value can be a kernel object's address."""
        if self.r.pointer_size == 8:
            return value >> 56 == 0xFF and value & 7 == 0  # kernel half, 4- or 5-level
        return value >= 0xC0000000 and value & 3 == 0

    def _slots(self, address: int, count: int) -> list[int]:
        size = self.r.pointer_size
        raw = self.r.read(address, size * count)
        return [int.from_bytes(raw[i : i + size], "little") for i in range(0, len(raw), size)]

    # -- decoding ------------------------------------------------------------------
    def vmas(self, mm: int) -> list[Vma]:
        """The mm's VMAs sorted by address; stale or foreign entries are dropped."""
        v, r = self.v, self.r
        start_brk = r.pointer(mm + self.mm.start_brk)
        brk = r.pointer(mm + self.mm.brk)
        start_stack = r.pointer(mm + self.mm.start_stack)
        out: dict[int, Vma] = {}
        for address in self.vma_addresses(mm):
            if len(out) >= self.limits.max_vmas:
                raise GuestDataError(f"mm {mm:#x} has more than {self.limits.max_vmas} VMAs")
            try:
                raw = r.read(address, v.size)
            except VmiError as exc:
                raise GuestDataError(f"VMA at {address:#x} of mm {mm:#x}: {exc}") from exc
            ptr = self._ptr
            start, end = ptr(raw, v.vm_start), ptr(raw, v.vm_end)
            if ptr(raw, v.vm_mm) != mm or not start < end:
                continue  # a stale slot: the kernel does not count it either
            flags = ptr(raw, v.vm_flags)
            file = ptr(raw, v.vm_file)
            pgoff = ptr(raw, v.vm_pgoff)
            error = None
            device, inode, path = "00:00", 0, ""
            offset = 0
            try:
                if file:
                    offset = pgoff << 12
                    path, device, inode = self.file_identity(file)
                elif self._is_special(raw):
                    assert v.vm_private_data is not None
                    name = r.pointer(ptr(raw, v.vm_private_data))
                    path = decode_guest_string(r.cstring(name, 64))
                elif start <= brk and end >= start_brk:
                    path = "[heap]"
                elif start <= start_stack <= end:
                    path = "[stack]"
            except VmiError as exc:
                error = str(exc)
            out[start] = Vma(address, start, end, flags, offset, device, inode, path, error)
        return [out[k] for k in sorted(out)]

    def _is_special(self, raw: bytes) -> bool:
        """Whether a VMA is a named special mapping ([vdso], [vvar])."""
        v = self.v
        if v.vm_ops is None or v.vm_private_data is None:
            return False
        return self._ptr(raw, v.vm_ops) in self.special_mapping_ops

    def _ptr(self, raw: bytes, off: int) -> int:
        size = self.r.pointer_size
        return int.from_bytes(raw[off : off + size], "little")

    def file_identity(self, file: int) -> tuple[str, str, int]:
        """(path, "major:minor", inode number) of an open file."""
        v, r = self.v, self.r
        dentry = r.pointer(file + v.file_path + v.path_dentry)
        mnt = r.pointer(file + v.file_path + v.path_mnt)
        path = self.dentry_path(dentry, mnt)
        device, inode = "00:00", 0
        if v.dentry_inode is not None and v.inode_ino is not None:
            ino = r.pointer(dentry + v.dentry_inode)
            if ino:
                inode = r.pointer(ino + v.inode_ino)
                if v.inode_sb is not None and v.sb_dev is not None:
                    sb = r.pointer(ino + v.inode_sb)
                    dev = r.u32(sb + v.sb_dev)
                    device = f"{dev >> 20:02x}:{dev & 0xFFFFF:02x}"
        return path, device, inode

    def dentry_path(self, dentry: int, mnt: int) -> str:
        """The path of a dentry, crossing mount points, bounded in depth."""
        v, r = self.v, self.r
        parts: list[str] = []
        mount = mnt - v.mount_mnt if mnt and v.mount_mnt is not None else 0
        for _ in range(self.limits.max_path_depth):
            parent = r.pointer(dentry + v.dentry_parent)
            mnt_root = (
                r.pointer(mnt + v.vfsmount_root) if mnt and v.vfsmount_root is not None else 0
            )
            if dentry in (mnt_root, parent):
                if mount and v.mount_parent is not None and v.mount_mountpoint is not None:
                    parent_mount = r.pointer(mount + v.mount_parent)
                    if parent_mount and parent_mount != mount:
                        dentry = r.pointer(mount + v.mount_mountpoint)
                        mount = parent_mount
                        mnt = mount + (v.mount_mnt or 0)
                        continue
                break
            name_ptr = r.pointer(dentry + v.dentry_name + v.qstr_name)
            length = min(r.u32(dentry + v.dentry_name + v.qstr_len), self.limits.max_string)
            parts.append(decode_guest_string(r.read(name_ptr, length)) if length else "")
            dentry = parent
        else:
            raise GuestDataError(f"path deeper than {self.limits.max_path_depth} components")
        return "/" + "/".join(reversed(parts))


def _is_node(entry: int) -> bool:
    """xa_is_node(): maple node pointers end in 0b10 and are above 4096."""
    return (entry & 3) == 2 and entry > 4096
