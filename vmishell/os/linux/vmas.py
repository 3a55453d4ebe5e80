"""A process's memory map: its VMAs from the maple tree (6.1+) or the older list.

The output matches `/proc/<pid>/maps` line for line: start, end, permissions,
offset, device, inode and path, with [heap], [stack], [vdso] and [vvar] labels.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from vmishell.errors import GuestDataError, VmiError
from vmishell.limits import Limits, TextBudget
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
        """Addresses of the mm's VMA structures; raises on the first problem met."""
        found, problems = self.find_vmas(mm)
        if problems:
            raise GuestDataError(problems[0][1])
        return found

    def find_vmas(self, mm: int) -> tuple[list[int], list[tuple[int, str]]]:
        """(distinct VMA addresses, [(where, problem)]) of an mm, best effort.

        A corrupt node or link costs the entries below it, not the whole map:
        every other part of the structure is still read, and each problem is
        returned with the address where it was met.
        """
        found: list[int] = []
        problems: list[tuple[int, str]] = []
        if self.mm.mm_mt is not None and self.maple is not None:
            walk = self._maple_entries(mm + self.mm.mm_mt, problems)
        elif self.mm.mmap is not None and self.v.vm_next is not None:
            walk = self._linked_vmas(mm, problems)
        else:
            raise GuestDataError("profile has neither mm_struct.mm_mt nor mm_struct.mmap")
        seen: set[int] = set()
        try:
            for address in walk:
                if address in seen:
                    # One VMA in several slots: decode it once (a crafted tree could
                    # otherwise multiply every VMA's work by its number of slots).
                    continue
                if len(found) >= self.limits.max_vmas:
                    problems.append((mm, f"mm {mm:#x} has more than {self.limits.max_vmas} VMAs"))
                    break
                seen.add(address)
                found.append(address)
        except VmiError as exc:
            problems.append((mm, f"VMAs of mm {mm:#x}: {exc}"))
        return found, problems

    def _linked_vmas(self, mm: int, problems: list[tuple[int, str]]) -> Iterator[int]:
        assert self.mm.mmap is not None and self.v.vm_next is not None
        node = self.r.pointer(mm + self.mm.mmap)
        seen: set[int] = set()
        while node:
            if node in seen:
                problems.append((node, f"VMA list of mm {mm:#x} loops at {node:#x}"))
                return
            seen.add(node)
            yield node
            node = self.r.pointer(node + self.v.vm_next)

    def _maple_entries(self, tree: int, problems: list[tuple[int, str]]) -> Iterator[int]:
        """Every entry stored in a maple tree, bounded by depth, node count and a seen-set.

        A node that fails a check (reached twice, wrong parent, unknown type,
        unreadable) is reported in `problems` and its subtree skipped. The
        stack holds at most depth x slots entries, so memory stays bounded.
        """
        m = self.maple
        assert m is not None
        root = self.r.pointer(tree + m.tree_root)
        if root == 0:
            return
        if not _is_node(root):
            # A tree holding one entry at index 0 keeps it in ma_root itself.
            yield root
            return
        where = f"maple tree at {tree:#x}"
        seen: set[int] = set()
        stack = [(root, tree, 1)]
        while stack:
            entry, parent, depth = stack.pop()
            node = entry & ~MAPLE_NODE_MASK
            if node in seen:
                problems.append((node, f"{where}: node {node:#x} reached twice"))
                continue
            if depth > self.limits.max_tree_depth:
                problems.append(
                    (node, f"{where}: deeper than {self.limits.max_tree_depth} levels at {node:#x}")
                )
                continue
            seen.add(node)
            if len(seen) > self.limits.max_tree_nodes:
                problems.append((node, f"{where}: over {self.limits.max_tree_nodes} nodes"))
                return
            try:
                raw_parent = self.r.pointer(node + m.node_parent)
                if (raw_parent & ~MAPLE_NODE_MASK) != (parent & ~MAPLE_NODE_MASK):
                    problems.append(
                        (
                            node,
                            f"{where}: node {node:#x} names parent "
                            f"{raw_parent & ~MAPLE_NODE_MASK:#x}, "
                            f"expected {parent & ~MAPLE_NODE_MASK:#x}",
                        )
                    )
                    continue
                kind = (entry >> MAPLE_NODE_TYPE_SHIFT) & MAPLE_NODE_TYPE_MASK
                if kind == MAPLE_ARANGE_64:
                    slots = self._slots(node + m.arange_slot, m.arange_slots)
                elif kind in (MAPLE_RANGE_64, MAPLE_LEAF_64):
                    slots = self._slots(node + m.range_slot, m.range_slots)
                elif kind == MAPLE_DENSE:
                    slots = self._slots(node + m.dense_slot, m.dense_slots)
                else:
                    problems.append((node, f"{where}: node {node:#x} has type {kind}"))
                    continue
            except VmiError as exc:
                problems.append((node, f"{where}: node {node:#x} is unreadable: {exc}"))
                continue
            if kind in (MAPLE_LEAF_64, MAPLE_DENSE):
                # The last slot of a partly filled node holds its metadata, not an entry.
                yield from (s for s in slots if self._kernel_pointer(s))
            else:
                for child in reversed(slots):
                    if child and self._kernel_pointer(child & ~MAPLE_NODE_MASK):
                        if not _is_node(child):
                            problems.append(
                                (
                                    node,
                                    f"{where}: internal node {node:#x} "
                                    f"holds a non-node slot {child:#x}",
                                )
                            )
                            continue
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
    def vmas(self, mm: int, budget: TextBudget | None = None) -> list[Vma]:
        """The mm's VMAs sorted by address; stale or foreign entries are dropped.

        What cannot be decoded is kept as a row with `error` set (start and
        end 0 when the VMA itself is unreadable), after the good rows, so
        one corrupt structure neither hides the rest of the map nor passes
        for a mapping. Files and dentries shared by several VMAs are decoded
        once per call, and the paths' text is charged to `budget`.
        """
        v, r = self.v, self.r
        budget = budget or TextBudget(self.limits.max_text)
        start_brk = r.pointer(mm + self.mm.start_brk)
        brk = r.pointer(mm + self.mm.brk)
        start_stack = r.pointer(mm + self.mm.start_stack)
        addresses, problems = self.find_vmas(mm)
        files = _FileCache(self, budget)
        out: dict[int, Vma] = {}
        bad: list[Vma] = [_error_row(where, problem) for where, problem in problems]
        for address in addresses:
            try:
                raw = r.read(address, v.size)
            except VmiError as exc:
                bad.append(_error_row(address, f"VMA at {address:#x} of mm {mm:#x}: {exc}"))
                continue
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
                    path, device, inode = files.identity(file)
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
        return [out[k] for k in sorted(out)] + bad

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
        return _FileCache(self, TextBudget(self.limits.max_text)).identity(file)

    def dentry_path(self, dentry: int, mnt: int) -> str:
        """The path of a dentry, crossing mount points, bounded in depth and length."""
        return _FileCache(self, TextBudget(self.limits.max_text)).path(dentry, mnt)


class _FileCache:
    """Files and paths decoded during one `vmas()` call, each once.

    A thousand VMAs of one file cost one path walk, and their rows share
    one string, so a crafted map cannot multiply a deep path by its VMAs.
    """

    def __init__(self, walker: VmaWalker, budget: TextBudget) -> None:
        self.w = walker
        self.budget = budget
        self._files: dict[int, tuple[str, str, int] | VmiError] = {}
        self._paths: dict[tuple[int, int], tuple[str, int] | VmiError] = {}

    def identity(self, file: int) -> tuple[str, str, int]:
        known = self._files.get(file)
        if known is None:
            try:
                known = self._identity(file)
            except VmiError as exc:
                known = exc
            self._files[file] = known
        if isinstance(known, VmiError):
            raise known
        return known

    def _identity(self, file: int) -> tuple[str, str, int]:
        v, r = self.w.v, self.w.r
        dentry = r.pointer(file + v.file_path + v.path_dentry)
        mnt = r.pointer(file + v.file_path + v.path_mnt)
        path = self.path(dentry, mnt)
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

    def path(self, dentry: int, mnt: int) -> str:
        """The path of a dentry under a vfsmount ("/" for a root)."""
        prefix, _ = self._prefix(dentry, mnt)
        return prefix or "/"

    def _prefix(self, dentry: int, mnt: int) -> tuple[str, int]:
        """(path without its trailing "/", depth) of a dentry, each ancestor walked once.

        Walks d_parent (and mount points) up to the root or to an ancestor
        already known from this call, then builds the paths back down,
        keeping every ancestor's: many files under one deep directory cost
        one walk of it, not one each. Loops, chains deeper than
        `max_path_depth` and paths longer than `max_path_length` are errors,
        remembered for every dentry they concern.
        """
        w = self.w
        v, r, limits = w.v, w.r, w.limits
        chain: list[tuple[tuple[int, int], str | None]] = []  # leaf first; None: a mount
        visited: set[tuple[int, int]] = set()
        key = (dentry, mnt)
        try:
            while True:
                known = self._paths.get(key)
                if known is not None:
                    if isinstance(known, VmiError):
                        raise known
                    base, depth = known
                    break
                if key in visited:
                    raise GuestDataError(f"path of dentry {dentry:#x}: d_parent chain loops")
                if len(chain) >= limits.max_path_depth:
                    raise GuestDataError(f"path deeper than {limits.max_path_depth} components")
                visited.add(key)
                current, current_mnt = key
                parent = r.pointer(current + v.dentry_parent)
                mnt_root = (
                    r.pointer(current_mnt + v.vfsmount_root)
                    if current_mnt and v.vfsmount_root is not None
                    else 0
                )
                if current in (mnt_root, parent):
                    mount = (
                        current_mnt - v.mount_mnt if current_mnt and v.mount_mnt is not None else 0
                    )
                    if mount and v.mount_parent is not None and v.mount_mountpoint is not None:
                        parent_mount = r.pointer(mount + v.mount_parent)
                        if parent_mount and parent_mount != mount:
                            chain.append((key, None))
                            key = (
                                r.pointer(mount + v.mount_mountpoint),
                                parent_mount + (v.mount_mnt or 0),
                            )
                            continue
                    base, depth = "", 0  # the root
                    break
                name_ptr = r.pointer(current + v.dentry_name + v.qstr_name)
                size = r.u32(current + v.dentry_name + v.qstr_len)
                if size + 1 > limits.max_path_length:
                    raise GuestDataError(
                        f"path of dentry {current:#x} is longer than {limits.max_path_length} bytes"
                    )
                name = decode_guest_string(r.read(name_ptr, size)) if size else ""
                chain.append((key, name))
                key = (parent, current_mnt)
            path = base
            for link, component in reversed(chain):
                depth += 1
                if depth > limits.max_path_depth:
                    raise GuestDataError(f"path deeper than {limits.max_path_depth} components")
                if component is not None:
                    if len(path) + 1 + len(component) > limits.max_path_length:
                        raise GuestDataError(
                            f"path of dentry {link[0]:#x} is longer than "
                            f"{limits.max_path_length} bytes"
                        )
                    path = f"{path}/{component}"
                    self.budget.charge(len(path), f"path of dentry {link[0]:#x}")
                self._paths[link] = (path, depth)
        except VmiError as exc:
            for link, _ in chain:
                self._paths.setdefault(link, exc)
            self._paths.setdefault((dentry, mnt), exc)
            raise
        return path, depth


def _error_row(address: int, problem: str) -> Vma:
    """A row for something in a memory map that could not be decoded."""
    return Vma(address, 0, 0, 0, 0, "00:00", 0, "", problem)


def _is_node(entry: int) -> bool:
    """xa_is_node(): maple node pointers end in 0b10 and are above 4096."""
    return (entry & 3) == 2 and entry > 4096
