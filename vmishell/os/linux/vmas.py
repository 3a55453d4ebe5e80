"""A process's memory map: its VMAs from the maple tree (6.1+) or the older list.

The output matches `/proc/<pid>/maps` line for line: start, end, permissions,
offset, device, inode and path, with [heap], [stack], [vdso] and [vvar] labels.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace

from vmishell.errors import GuestDataError, VmiError
from vmishell.limits import Limits, TextBudget
from vmishell.os.linux.layout import MapleLayout, MmLayout, VmaLayout
from vmishell.os.linux.maple import MAPLE_NODE_MASK, MapleReader
from vmishell.os.linux.reader import KernelReader, decode_guest_string

__all__ = ["MAPLE_NODE_MASK", "Vma", "VmaWalker"]

VM_READ, VM_WRITE, VM_EXEC, VM_SHARED = 0x1, 0x2, 0x4, 0x8


@dataclass(frozen=True, slots=True)
class _Found:
    """A VMA structure found in the mm, with the range(s) the structure that holds it gives."""

    address: int
    ranges: list[tuple[int, int]]
    problem: str | None = None


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
        kernel_start: int | None = None,
        page_shift: int = 12,
    ) -> None:
        self.r = reader
        self.mm = mm
        self.v = vma
        self.maple = maple
        self.limits = limits
        self.special_mapping_ops = special_mapping_ops
        #: The lowest address a kernel object can have (i386: PAGE_OFFSET).
        self.kernel_start = kernel_start or default_kernel_start(reader.pointer_size)
        #: log2(PAGE_SIZE): vm_pgoff counts the kernel's pages (16 KiB on arm64-16k).
        self.page_shift = page_shift

    # -- finding the VMA structures --------------------------------------------------
    def vma_addresses(self, mm: int) -> list[int]:
        """Addresses of the mm's VMA structures; raises on the first problem met."""
        found, problems = self.find_vmas(mm)
        if problems:
            raise GuestDataError(problems[0][1])
        return found

    def find_vmas(self, mm: int) -> tuple[list[int], list[tuple[int, str]]]:
        """(distinct VMA addresses, [(where, problem)]) of an mm, best effort."""
        found, problems = self._find(mm)
        return [f.address for f in found], problems

    def _find(self, mm: int) -> tuple[list[_Found], list[tuple[int, str]]]:
        """The mm's VMA structures with the ranges they are stored at, and the problems met.

        A corrupt node or link costs the entries below it, not the whole map:
        every other part of the structure is still read, and each problem is
        returned with the address where it was met.
        """
        problems: list[tuple[int, str]] = []
        if self.mm.mm_mt is not None and self.maple is not None:
            walk = self._maple_vmas(mm + self.mm.mm_mt, problems)
        elif self.mm.mmap is not None and self.v.vm_next is not None:
            walk = self._linked_vmas(mm, problems)
        else:
            raise GuestDataError("profile has neither mm_struct.mm_mt nor mm_struct.mmap")
        found: dict[int, _Found] = {}
        try:
            for item in walk:
                known = found.get(item.address)
                if known is not None:
                    # One VMA in several slots: decode it once (a crafted tree could
                    # otherwise multiply every VMA's work by its number of slots).
                    known.ranges.extend(item.ranges)
                    continue
                if len(found) >= self.limits.max_vmas:
                    problems.append((mm, f"mm {mm:#x} has more than {self.limits.max_vmas} VMAs"))
                    break
                found[item.address] = item
        except VmiError as exc:
            problems.append((mm, f"VMAs of mm {mm:#x}: {exc}"))
        return list(found.values()), problems

    def _linked_vmas(self, mm: int, problems: list[tuple[int, str]]) -> Iterator[_Found]:
        """The VMA list before 6.1 (mm->mmap, vm_next), its vm_prev links checked."""
        assert self.mm.mmap is not None and self.v.vm_next is not None
        node = self.r.pointer(mm + self.mm.mmap)
        before = 0
        seen: set[int] = set()
        while node:
            if node in seen:
                problems.append((node, f"VMA list of mm {mm:#x} loops at {node:#x}"))
                return
            seen.add(node)
            problem = None
            if self.v.vm_prev is not None:
                prev = self.r.pointer(node + self.v.vm_prev)
                if prev != before:
                    problem = (
                        f"VMA list of mm {mm:#x}: {node:#x} reached from {before:#x} "
                        f"but its vm_prev names {prev:#x}"
                    )
            # The list gives no range of its own: only the order is checked.
            yield _Found(node, [], problem)
            before = node
            node = self.r.pointer(node + self.v.vm_next)

    def _maple_vmas(self, tree: int, problems: list[tuple[int, str]]) -> Iterator[_Found]:
        assert self.maple is not None
        maple = MapleReader(self.r, self.maple, self.limits, self.kernel_start)
        for entry in maple.entries(tree, problems):
            if not self._kernel_pointer(entry.value):
                problems.append(
                    (
                        entry.value,
                        f"maple tree at {tree:#x}: slot value {entry.value:#x} "
                        f"at {entry.first:#x}..{entry.last:#x} is not a VMA pointer"
                        + (f" ({entry.problem})" if entry.problem else ""),
                    )
                )
                continue
            yield _Found(entry.value, [(entry.first, entry.last)], entry.problem)

    def _kernel_pointer(self, value: int) -> bool:
        """Whether a slot value can be a kernel object's address."""
        return value >= self.kernel_start and value % self.r.pointer_size == 0

    # -- decoding ------------------------------------------------------------------
    def vmas(self, mm: int, budget: TextBudget | None = None) -> list[Vma]:
        """The mm's VMAs sorted by address, suspect ones marked, never dropped.

        A VMA that names another mm, whose range is empty or disagrees with
        the range the tree stores it at, or that overlaps the one before it
        is a row with `error` set, at the place it claims. What cannot be
        decoded at all is a row with start and end 0 after the others, so
        one corrupt structure neither hides the rest of the map nor passes
        for a mapping. Files and dentries shared by several VMAs are decoded
        once per call, and the paths' text is charged to `budget`.
        """
        v, r = self.v, self.r
        budget = budget or TextBudget(self.limits.max_text)
        start_brk = r.pointer(mm + self.mm.start_brk)
        brk = r.pointer(mm + self.mm.brk)
        start_stack = r.pointer(mm + self.mm.start_stack)
        found, problems = self._find(mm)
        files = _FileCache(self, budget)
        rows: list[Vma] = []
        bad: list[Vma] = [_error_row(where, problem) for where, problem in problems]
        for item in found:
            address = item.address
            try:
                raw = r.read(address, v.size)
            except VmiError as exc:
                bad.append(_error_row(address, f"VMA at {address:#x} of mm {mm:#x}: {exc}"))
                continue
            ptr = self._ptr
            start, end = ptr(raw, v.vm_start), ptr(raw, v.vm_end)
            suspect = [item.problem] if item.problem else []
            suspect += _range_problems(address, mm, ptr(raw, v.vm_mm), start, end, item.ranges)
            flags = ptr(raw, v.vm_flags)
            file = ptr(raw, v.vm_file)
            pgoff = ptr(raw, v.vm_pgoff)
            device, inode, path = "00:00", 0, ""
            offset = 0
            try:
                if file:
                    offset = pgoff << self.page_shift
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
                suspect.append(str(exc))
            error = "; ".join(suspect) or None
            rows.append(Vma(address, start, end, flags, offset, device, inode, path, error))
        rows.sort(key=lambda row: (row.start, row.end, row.address))
        return _mark_overlaps(rows) + bad

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


def default_kernel_start(pointer_size: int) -> int:
    """Where the kernel half starts when the kernel's own layout is not known."""
    return 0xFF00_0000_0000_0000 if pointer_size == 8 else 0xC000_0000


def _range_problems(
    address: int, mm: int, vm_mm: int, start: int, end: int, ranges: list[tuple[int, int]]
) -> list[str]:
    """Why a VMA cannot be trusted as a mapping of `mm` (empty list: it can)."""
    out = []
    if vm_mm != mm:
        out.append(f"VMA at {address:#x} belongs to mm {vm_mm:#x}, not {mm:#x}")
    if end <= start:
        out.append(f"VMA at {address:#x} ends at {end:#x}, not after its start {start:#x}")
    elif ranges and (start, end - 1) not in ranges:
        where = ", ".join(f"{first:#x}..{last:#x}" for first, last in ranges)
        out.append(
            f"VMA at {address:#x} spans {start:#x}..{end - 1:#x} but the tree stores it at {where}"
        )
    return out


def _mark_overlaps(rows: list[Vma]) -> list[Vma]:
    """Mark each VMA that starts before the previous good one ends (shown, not dropped)."""
    out = []
    reach, owner = -1, 0
    for row in rows:
        if row.start < reach:
            problem = f"overlaps the VMA at {owner:#x}, which ends at {reach:#x}"
            row = replace(row, error=f"{row.error}; {problem}" if row.error else problem)
        elif row.error is None:
            reach, owner = row.end, row.address
        out.append(row)
    return out


def _error_row(address: int, problem: str) -> Vma:
    """A row for something in a memory map that could not be decoded."""
    return Vma(address, 0, 0, 0, 0, "00:00", 0, "", problem)
