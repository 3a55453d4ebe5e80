"""Fuzzing vmishell's whole pipeline against a real lab dump, one mutation set at a time.

The dump is mapped once, privately (`mmap.ACCESS_COPY`: writes go to
copy-on-write pages of this process, never to the file), and attached once.
A case writes a few patches into that private map, bumps the source's
generation so every translation cache is dropped, runs the pipeline, and
puts the original bytes back. A case therefore costs what the pipeline
costs on a few changed structures (milliseconds), not a 256 MiB copy.

Mutations are symbolic, named after the structures found in the clean dump
(`Mutation("task:vmi-marker.tasks.next", "ref", "task:init.tasks.next")`:
the marker's list link pointed back at init's), so a failure found on one
dump replays on any other dump of the same lab guest: regression tests
store the symbolic mutation, not addresses.

Two sessions share the map: one over the zero-copy `BufferSource` (the path
real images and live guests take) and one over a source without segments
(the path remote sources such as LibVMI take), so both readers are fuzzed.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import random
import signal
import sys
import time
import traceback
import tracemalloc
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from vmishell.errors import VmiError
from vmishell.frontends.text import hexdump, safe_text, walk_table
from vmishell.lab.workload import MARKER, X86_64_DATA_VA
from vmishell.limits import Limits
from vmishell.os.linux.layout import maple_layout, mm_layout, task_layout, vma_layout
from vmishell.os.linux.tasks import PF_KTHREAD
from vmishell.os.linux.vmas import MAPLE_NODE_MASK
from vmishell.session import Process, Session
from vmishell.sources.base import PhysicalSource, PhysRange
from vmishell.sources.memory import BufferSource
from vmishell.symbols.profile import Profile

#: Per-case bounds the fuzz tests assert (the campaign records the real figures).
#: Work: function calls, Python and C (see `work_meter`). A count, so machine load
#: cannot change it: the worst case known, page tables that alias enumerated up to
#: the default `Limits.max_mapping_work`, makes 6.2 million; a case may hit that cap
#: in both enumerations of the pipeline (the marker's and the kernel's).
CASE_CALLS = 20_000_000
#: Bytes of Python heap at the peak of a case (tracemalloc).
CASE_PEAK_BYTES = 64 << 20
#: The watchdog's CPU seconds: a hang detector, not a bound. A correct case needs at
#: most a few seconds of CPU even under tracemalloc and the work meter; a hang (a loop
#: in C that makes no call, a wait) is stopped here, and at WALL_FACTOR times this in
#: wall-clock time if it waits instead of computing.
HANG_SECONDS = 60.0
#: A CPU-time bound that test_crafted.py and test_regressions.py still assert.
CASE_SECONDS = 5.0
#: The user half of x86_64's 4-level address space, for bounded process enumerations.
USER_END = 0x0000_8000_0000_0000


def fuzz_settings(examples: int) -> Any:
    """Hypothesis settings for a seeded, bounded CI run.

    `VMISHELL_FUZZ_SCALE=20` runs twenty times the examples and
    `VMISHELL_FUZZ_SEED=n` draws other ones (random, not derandomized), for
    longer local runs without editing the tests.
    """
    from hypothesis import HealthCheck, settings

    scale = float(os.environ.get("VMISHELL_FUZZ_SCALE", "1"))
    seeded = "VMISHELL_FUZZ_SEED" not in os.environ
    return settings(
        max_examples=max(1, int(examples * scale)),
        deadline=None,
        derandomize=seeded,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )


# -- sources ------------------------------------------------------------------------------


class FuzzSource(BufferSource):
    """A private copy-on-write map of a dump that a case may patch and restore."""

    def __init__(self, path: Path) -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            self.map = mmap.mmap(fd, os.fstat(fd).st_size, access=mmap.ACCESS_COPY)
        finally:
            os.close(fd)
        super().__init__([(0, self.map)], description=f"fuzzed copy of {path}", writable=True)

    def touch(self) -> None:
        """Declare the memory changed: every translator drops its caches."""
        self._generation += 1

    def close(self) -> None:
        """Kept open: every case shares this map (a case's failed attach closes its source)."""

    @contextlib.contextmanager
    def patched(self, patches: Sequence[tuple[int, bytes]]) -> Iterator[None]:
        """Apply (physical address, bytes) patches for the duration of the block."""
        saved: list[tuple[int, bytes]] = []
        try:
            for paddr, data in patches:
                if not self.is_valid(paddr, len(data)):
                    continue
                saved.append((paddr, bytes(self.map[paddr : paddr + len(data)])))
                self.map[paddr : paddr + len(data)] = data
            self.touch()
            yield
        finally:
            for paddr, data in reversed(saved):
                self.map[paddr : paddr + len(data)] = data
            self.touch()


class CopyingSource(PhysicalSource):
    """The same memory without zero-copy segments: every read goes through `read()`."""

    def __init__(self, base: FuzzSource) -> None:
        super().__init__()
        self.base = base
        self.description = f"{base.description} (copying reads)"

    def close(self) -> None:
        """Kept open, like the FuzzSource it reads through."""

    @property
    def generation(self) -> int:
        return self.base.generation

    def ranges(self) -> Sequence[PhysRange]:
        return self.base.ranges()

    def _read(self, paddr: int, size: int) -> bytes:
        return self.base._read(paddr, size)


# -- what can be mutated ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Spot:
    """One mutable place in the clean dump: a field, a page-table entry, a table, a struct."""

    name: str
    kind: str  # "ptr", "int", "text", "pte", "table", "blob"
    paddr: int
    size: int
    vaddr: int | None = None
    #: For a pte: the physical addresses of its own table and of the table above it.
    table: int | None = None
    upper: int | None = None


@dataclass
class Targets:
    """Every spot found in the clean dump, by name and by kind."""

    #: Reads the clean dump (mutations are computed from the clean values).
    read: Callable[[int, int], bytes]
    spots: dict[str, Spot] = field(default_factory=dict)
    marker_pid: int = -1
    ram_size: int = 0

    def add(self, spot: Spot) -> None:
        self.spots.setdefault(spot.name, spot)

    def of_kind(self, *kinds: str) -> list[str]:
        return sorted(n for n, s in self.spots.items() if s.kind in kinds)

    def __getitem__(self, name: str) -> Spot:
        return self.spots[name]


def _task_names(tasks: Sequence[Any]) -> dict[int, str]:
    """A stable name per task: its comm, with #n for repeats (in list order)."""
    names: dict[int, str] = {}
    count: dict[str, int] = {}
    for task in tasks:
        n = count.get(task.comm, 0)
        count[task.comm] = n + 1
        names[task.address] = f"task:{task.comm}" + (f"#{n}" if n else "")
    return names


def discover(session: Session) -> Targets:
    """Find the structures worth mutating in a clean lab x86_64 session."""
    guest = session.guest
    profile: Profile = session.profile
    kt = guest.kernel_translator
    r = guest.reader
    t = task_layout(profile)
    out = Targets(session.source.read, ram_size=session.source.size)

    def add(name: str, kind: str, vaddr: int, size: int) -> None:
        try:
            paddr = kt.translate(vaddr).paddr
        except VmiError:
            return
        size = min(size, 0x1000 - (paddr & 0xFFF))  # stay within the page
        out.add(Spot(name, kind, paddr, size, vaddr))

    tasks = session.tasks()
    names = _task_names(tasks)
    for task in tasks:
        n, a = names[task.address], task.address
        for fname, off in (("tasks.next", t.tasks), ("tasks.prev", t.tasks + 8)):
            add(f"{n}.{fname}", "ptr", a + off, 8)
        for fname, off in (
            ("mm", t.mm),
            ("active_mm", t.active_mm),
            ("real_parent", t.real_parent),
            ("real_cred", t.real_cred),
            ("cred", t.cred),
            ("signal", t.signal),
            ("worker_private", t.worker_private),
        ):
            if off is not None:
                add(f"{n}.{fname}", "ptr", a + off, 8)
        if t.thread_group is not None:
            add(f"{n}.thread_group.next", "ptr", a + t.thread_group, 8)
            add(f"{n}.thread_group.prev", "ptr", a + t.thread_group + 8, 8)
        for fname, off in (("pid", t.pid), ("tgid", t.tgid), ("flags", t.flags)):
            add(f"{n}.{fname}", "int", a + off, 4)
        add(f"{n}.comm", "text", a + t.comm, t.comm_size)
        add(f"{n}.struct", "blob", a, 0x1000)
        add(f"{n}.struct+tasks", "blob", a + t.tasks - 64, 512)
        cred = r.pointer(a + (t.real_cred or t.cred or 0))
        add(f"{n}.cred.uid", "int", cred + t.cred_uid, 4)
        flags = r.u32(a + t.flags)
        if flags & PF_KTHREAD and t.worker_private and t.kthread_full_name:
            kthread = r.pointer(a + t.worker_private)
            if kthread:
                add(f"{n}.kthread.full_name", "ptr", kthread + t.kthread_full_name, 8)
        if task.mm and task.is_thread_group_leader:
            _discover_mm(session, out, n, task, add)
    _discover_kernel_tables(session, out, tasks)
    return out


def _discover_mm(
    session: Session,
    out: Targets,
    n: str,
    task: Any,
    add: Callable[[str, str, int, int], None],
) -> None:
    """The mm of a user process: its fields, maple tree, VMAs, files and page tables."""
    guest = session.guest
    profile = session.profile
    r = guest.reader
    mml, v, maple = mm_layout(profile), vma_layout(profile), maple_layout(profile)
    mm = task.mm
    for fname, off in (("pgd", mml.pgd),):
        add(f"{n}.mm.{fname}", "ptr", mm + off, 8)
    for fname, off in (
        ("arg_start", mml.arg_start),
        ("arg_end", mml.arg_end),
        ("start_brk", mml.start_brk),
        ("brk", mml.brk),
        ("start_stack", mml.start_stack),
    ):
        add(f"{n}.mm.{fname}", "int", mm + off, 8)
    add(f"{n}.mm.struct", "blob", mm, 0x200)
    if maple is not None and mml.mm_mt is not None:
        root_field = mm + mml.mm_mt + maple.tree_root
        add(f"{n}.maple.root", "ptr", root_field, 8)
        stack = [(r.pointer(root_field), "maple")]
        index = 0
        while stack and index < 64:
            entry, label = stack.pop()
            if entry & 3 != 2 or entry < 4096:
                continue
            node = entry & ~MAPLE_NODE_MASK
            kind = (entry >> 3) & 0xF
            label = f"{n}.{label}[{index}]"
            index += 1
            add(f"{label}.parent", "ptr", node + maple.node_parent, 8)
            add(f"{label}.node", "blob", node, maple.node_size)
            if kind == 3:
                slot0, count = maple.arange_slot, maple.arange_slots
            else:
                slot0, count = maple.range_slot, maple.range_slots
            for i in range(count):
                value = r.pointer(node + slot0 + 8 * i)
                if value:
                    add(f"{label}.slot{i}", "ptr", node + slot0 + 8 * i, 8)
                    if kind in (2, 3):
                        stack.append((value, "node"))
    files: dict[int, str] = {}
    for i, vma in enumerate(guest.vmas(task)):
        vn = f"{n}.vma{i}"
        a = vma.address
        for fname, off in (
            ("vm_mm", v.vm_mm),
            ("vm_file", v.vm_file),
            ("vm_ops", v.vm_ops),
            ("vm_private_data", v.vm_private_data),
        ):
            if off is not None:
                add(f"{vn}.{fname}", "ptr", a + off, 8)
        for fname, off in (
            ("vm_start", v.vm_start),
            ("vm_end", v.vm_end),
            ("vm_flags", v.vm_flags),
            ("vm_pgoff", v.vm_pgoff),
        ):
            add(f"{vn}.{fname}", "int", a + off, 8)
        add(f"{vn}.struct", "blob", a, v.size)
        file = r.pointer(a + v.vm_file)
        if file and file not in files:
            fn = files[file] = f"{n}.file{len(files)}"
            add(f"{fn}.dentry", "ptr", file + v.file_path + v.path_dentry, 8)
            add(f"{fn}.mnt", "ptr", file + v.file_path + v.path_mnt, 8)
            dentry = r.pointer(file + v.file_path + v.path_dentry)
            depth = 0
            while dentry and depth < 4:
                dn = f"{fn}.dentry{depth}"
                add(f"{dn}.d_parent", "ptr", dentry + v.dentry_parent, 8)
                add(f"{dn}.d_name.len", "int", dentry + v.dentry_name + v.qstr_len, 4)
                add(f"{dn}.d_name.name", "ptr", dentry + v.dentry_name + v.qstr_name, 8)
                if v.dentry_inode is not None:
                    add(f"{dn}.d_inode", "ptr", dentry + v.dentry_inode, 8)
                name = r.pointer(dentry + v.dentry_name + v.qstr_name)
                length = r.u32(dentry + v.dentry_name + v.qstr_len)
                if length:
                    add(f"{dn}.name", "text", name, length)
                add(f"{dn}.struct", "blob", dentry, 192)
                parent = r.pointer(dentry + v.dentry_parent)
                if parent == dentry:
                    break
                dentry, depth = parent, depth + 1
    # The page walk of the process's first data page (the marker's marker).
    proc = Process(session, task, guest.dtb_of(task))
    walk = proc.walk(X86_64_DATA_VA)
    upper = None
    for step in walk.steps:
        out.add(
            Spot(f"{n}.pte.{step.level}", "pte", step.entry_address, 8, None, step.table, upper)
        )
        out.add(Spot(f"{n}.table.{step.level}", "table", step.table, 0x1000, None, step.table))
        upper = step.table
    if task.comm == "vmi-marker":
        out.marker_pid = task.pid


def _discover_kernel_tables(session: Session, out: Targets, tasks: Sequence[Any]) -> None:
    """Page-table entries and tables the kernel's own walks go through."""
    kernel = session.kernel
    for label, vaddr in (
        ("init_task", session.guest.init_task),
        ("banner", session.symbol("linux_banner")),
        ("task", tasks[-1].address),
    ):
        walk = kernel.walk(vaddr)
        upper = None
        for step in walk.steps:
            out.add(
                Spot(
                    f"kernel.{label}.pte.{step.level}",
                    "pte",
                    step.entry_address,
                    8,
                    None,
                    step.table,
                    upper,
                )
            )
            out.add(
                Spot(f"kernel.{label}.table.{step.level}", "table", step.table, 0x1000, None, None)
            )
            upper = step.table


# -- mutations ------------------------------------------------------------------------------

#: Strings a hostile guest would put where vmishell shows names.
HOSTILE_TEXT = (
    b"<script>alert(1)</script>",
    b"\x1b]0;pwned\x07",
    b"\x1b[2J\x1b[H",
    b"<img src=x onerror=alert(1)>",
    b"\xff\xfe\xc3(\xed\xa0\x80",
    b"a\nb\r\tc\x00d",
    b"\xe2\x80\xaetxt.exe",
    b"$\\frac{1}{0}$",
    b"%s%n%x{0}{}",
    b"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
)
#: Pointer values that are wrong in instructive ways.
SPECIAL_POINTERS = (
    0,
    1,
    0xDEADBEEF,
    0xFFFF_FFFF_FFFF_FFFF,
    0x8000_0000_0000_0000,  # non-canonical
    0x0000_7FFF_FFFF_F000,  # user half
    0xFFFF_8880_0000_0000,  # direct map, physical 0
    0xFFFF_8880_8000_0000,  # direct map, beyond a small guest's RAM
    0xFFFF_FFFF_FFFF_F000,
    0xFFFF_FFFF_8000_0000,  # kernel image base
)
SPECIAL_INTS = (0, 1, 0x7FFF_FFFF, 0x8000_0000, 0xFFFF_FFFF, 1 << 32, (1 << 63), (1 << 64) - 1)
#: Page-table entry flag sets: present+rw+user+accessed(+dirty), plus PS.
PTE_FLAGS = 0x67


@dataclass(frozen=True, slots=True)
class Mutation:
    """One symbolic change: `op` applied to the spot named `target`.

    ops: "set" (an integer), "add" (a delta), "xor" (a mask), "ref" (the
    virtual address of another spot: cycles, sharing), "self" (the spot's own
    address), "text" (bytes), "pte-self" / "pte-up" / "pte-phys" (a page
    table entry pointing at its own table, the table above, or a physical
    address), "fill-self" / "fill-alias" (every entry of a table at the table
    itself, or at one shared child), "flip" (xor one byte at an offset).
    """

    target: str
    op: str
    arg: Any = None

    def __str__(self) -> str:
        arg = self.arg
        shown = f"{arg:#x}" if isinstance(arg, int) and not isinstance(arg, bool) else repr(arg)
        return f"{self.target} {self.op} {shown}"

    def patches(self, targets: Targets) -> list[tuple[int, bytes]]:
        """The (physical address, bytes) patches this mutation makes in the clean dump."""
        spot = targets.spots.get(self.target)
        if spot is None:
            return []
        op, arg = self.op, self.arg
        bits = 8 * min(spot.size, 8)
        mask = (1 << bits) - 1

        def word(value: int) -> bytes:
            return (value & mask).to_bytes(bits // 8, "little")

        current = int.from_bytes(targets.read(spot.paddr, min(spot.size, 8)), "little")
        if op == "set":
            return [(spot.paddr, word(arg))]
        if op == "add":
            return [(spot.paddr, word(current + arg))]
        if op == "xor":
            return [(spot.paddr, word(current ^ arg))]
        if op == "ref":
            other = targets.spots.get(arg)
            if other is None or other.vaddr is None:
                return []
            return [(spot.paddr, word(other.vaddr))]
        if op == "self":
            return [(spot.paddr, word(spot.vaddr if spot.vaddr is not None else spot.paddr))]
        if op == "text":
            data = bytes(arg)[: spot.size]
            if spot.kind == "text" and len(data) < spot.size:
                data += b"\0"
            return [(spot.paddr, data)]
        if op == "flip":
            offset, bitmask = arg
            offset %= spot.size
            old = targets.read(spot.paddr + offset, 1)[0]
            return [(spot.paddr + offset, bytes([old ^ (bitmask or 1)]))]
        if op in ("pte-self", "pte-up", "pte-phys"):
            flags = current & 0xFFF if current & 1 else PTE_FLAGS
            if op == "pte-self":
                frame = spot.table if spot.table is not None else spot.paddr & ~0xFFF
            elif op == "pte-up":
                frame = spot.upper if spot.upper is not None else spot.paddr & ~0xFFF
            else:
                frame = arg & ~0xFFF
            return [(spot.paddr, word((frame & 0x000F_FFFF_FFFF_F000) | flags))]
        if op in ("fill-self", "fill-alias"):
            table = spot.paddr & ~0xFFF
            child = table if op == "fill-self" else int(arg) & 0x000F_FFFF_FFFF_F000
            entry = (child | PTE_FLAGS).to_bytes(8, "little")
            return [(table, entry * 512)]
        raise ValueError(f"unknown mutation op {op!r}")


class Chooser(Protocol):
    """Where a case's choices come from: a seeded Random (campaign) or hypothesis."""

    def choice(self, items: Sequence[Any]) -> Any: ...

    def integer(self, lo: int, hi: int) -> int: ...

    def binary(self, max_size: int) -> bytes: ...


class RandomChooser:
    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def choice(self, items: Sequence[Any]) -> Any:
        return items[self.rng.randrange(len(items))]

    def integer(self, lo: int, hi: int) -> int:
        return self.rng.randint(lo, hi)

    def binary(self, max_size: int) -> bytes:
        return self.rng.randbytes(self.rng.randint(0, max_size))


class HypothesisChooser:
    def __init__(self, data: Any) -> None:
        from hypothesis import strategies as st

        self.data = data
        self.st = st

    def choice(self, items: Sequence[Any]) -> Any:
        return self.data.draw(self.st.sampled_from(list(items)))

    def integer(self, lo: int, hi: int) -> int:
        return self.data.draw(self.st.integers(lo, hi))

    def binary(self, max_size: int) -> bytes:
        return self.data.draw(self.st.binary(max_size=max_size))


#: How often each kind of spot is picked (page tables and links are where bugs hide).
KIND_WEIGHTS = (
    ("ptr", 6),
    ("pte", 3),
    ("int", 3),
    ("text", 2),
    ("table", 1),
    ("blob", 2),
)


def choose_mutation(targets: Targets, c: Chooser) -> Mutation:
    """One mutation, drawn from `c`."""
    kinds = [k for k, w in KIND_WEIGHTS for _ in range(w) if targets.of_kind(k)]
    kind = c.choice(kinds)
    name = c.choice(targets.of_kind(kind))
    spot = targets[name]
    if kind == "ptr":
        op = c.choice(["set", "set", "ref", "ref", "self", "add", "xor"])
        if op == "set":
            special = c.choice([*SPECIAL_POINTERS, None])
            return Mutation(
                name, "set", special if special is not None else c.integer(0, 2**64 - 1)
            )
        if op == "ref":
            return Mutation(name, "ref", c.choice(targets.of_kind("ptr", "int", "text", "blob")))
        if op == "add":
            return Mutation(name, "add", c.choice([-16, -8, 8, 16, 0x100, 0x1000, -0x1000]))
        if op == "xor":
            return Mutation(name, "xor", 1 << c.integer(0, 63))
        return Mutation(name, "self")
    if kind == "int":
        op = c.choice(["set", "add", "xor"])
        if op == "set":
            special = c.choice([*SPECIAL_INTS, None])
            top = (1 << (8 * spot.size)) - 1
            return Mutation(name, "set", special if special is not None else c.integer(0, top))
        if op == "add":
            return Mutation(name, "add", c.choice([-1, 1, 0x1000, -0x1000, 1 << 20, 1 << 40]))
        return Mutation(name, "xor", 1 << c.integer(0, 8 * spot.size - 1))
    if kind == "text":
        return Mutation(name, "text", c.choice([*HOSTILE_TEXT, None]) or c.binary(spot.size))
    if kind == "pte":
        op = c.choice(["pte-self", "pte-up", "pte-phys", "set", "xor"])
        if op == "pte-phys":
            frame = c.choice([targets.ram_size, targets.ram_size * 4, 1 << 40, 0, None])
            if frame is None:
                frame = c.integer(0, targets.ram_size - 1)
            return Mutation(name, "pte-phys", frame)
        if op == "set":
            return Mutation(name, "set", c.choice([0, PTE_FLAGS, (1 << 64) - 1, 0x80 | 1]))
        if op == "xor":
            return Mutation(name, "xor", 1 << c.choice([0, 1, 2, 7, 63, c.integer(12, 51)]))
        return Mutation(name, op)
    if kind == "table":
        op = c.choice(["fill-self", "fill-alias"])
        if op == "fill-alias":
            tables = [s.paddr for s in targets.spots.values() if s.kind == "table"]
            return Mutation(name, "fill-alias", c.choice(tables))
        return Mutation(name, "fill-self")
    return Mutation(name, "flip", (c.integer(0, spot.size - 1), c.integer(1, 255)))


def choose_case(targets: Targets, c: Chooser) -> list[Mutation]:
    """A case: one to three mutations."""
    return [choose_mutation(targets, c) for _ in range(c.integer(1, 3))]


# -- running a case ------------------------------------------------------------------------


class CaseTimeout(BaseException):
    """A case hung: the watchdog's alarm fired."""


class CaseOverWork(BaseException):
    """A case made more function calls than its work bound (raised by the work meter)."""


#: The wall-clock alarm fires at this multiple of the CPU alarm: it ends a case that
#: waits instead of computing, and leaves room for a machine shared with other work.
WALL_FACTOR = 4


@contextlib.contextmanager
def work_meter(budget: int) -> Iterator[list[int]]:
    """Count the function calls (Python and C) the block makes; CaseOverWork past `budget`.

    The count is the case's work: it depends on the case and the code, not on
    how busy the machine is, so it bounds a case where CPU time cannot (a fuzz
    case once failed at 5.05 s of a 5 s CPU bound on a loaded machine). The
    meter is a profile hook of this thread, which roughly doubles the case's
    CPU time. Yields a one-element list holding the count so far.
    """
    count = [0]

    def meter(frame: object, event: str, arg: object) -> None:
        if event == "call" or event == "c_call":
            count[0] += 1
            if count[0] > budget:
                sys.setprofile(None)
                raise CaseOverWork(f"case made more than {budget} function calls")

    previous = sys.getprofile()
    sys.setprofile(meter)
    try:
        yield count
    finally:
        sys.setprofile(previous)


@contextlib.contextmanager
def watchdog(seconds: float) -> Iterator[None]:
    """Interrupt the block with CaseTimeout after `seconds` of CPU time (main thread only).

    A hang detector: the bound on a case is its work (`work_meter`). The CPU
    alarm (ITIMER_PROF) ends a case that loops without making calls; the
    wall-clock alarm at WALL_FACTOR times `seconds` ends one that waits.
    """

    def cpu(signum: int, frame: object) -> None:
        raise CaseTimeout(f"case used more than {seconds} s of CPU")

    def wall(signum: int, frame: object) -> None:
        raise CaseTimeout(f"case ran longer than {seconds * WALL_FACTOR} s (wall clock)")

    previous = signal.signal(signal.SIGPROF, cpu), signal.signal(signal.SIGALRM, wall)
    signal.setitimer(signal.ITIMER_PROF, seconds)
    signal.setitimer(signal.ITIMER_REAL, seconds * WALL_FACTOR)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_PROF, 0)
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGPROF, previous[0])
        signal.signal(signal.SIGALRM, previous[1])


@dataclass
class Outcome:
    """What one case did: its errors (VmiError text by step), time and peak memory."""

    mutations: list[Mutation]
    work: int = 0  # function calls the case made (what the bound applies to)
    seconds: float = 0.0  # CPU time of the case (recorded; only the watchdog acts on it)
    wall: float = 0.0
    peak: int = 0
    vmi_errors: dict[str, str] = field(default_factory=dict)
    failure: str | None = None  # a non-vmishell exception, a timeout or a bound exceeded
    rows: int = 0


class Harness:
    """A lab dump mapped copy-on-write and attached once, ready to run cases."""

    def __init__(self, dump: Path, *, limits: Limits | None = None) -> None:
        self.dump = Path(dump)
        self.limits = limits or Limits()
        self.source = FuzzSource(self.dump)
        self.session = Session(self.source, limits=self.limits)
        self.profile = self.session.profile
        self.copying = CopyingSource(self.source)
        self.copying_session = Session(self.copying, self.profile, limits=self.limits)
        self.targets = discover(self.session)
        if self.targets.marker_pid < 0:
            raise RuntimeError(f"{dump}: no vmi-marker process (not a lab x86_64 dump?)")
        # One clean run first: imports (pandas) and lazy profile decoding are not a case's cost.
        clean = self.run([], memory="none")
        if clean.failure or clean.vmi_errors:
            raise RuntimeError(f"{dump}: the clean dump does not pass: {clean}")

    def patches(self, mutations: Sequence[Mutation]) -> list[tuple[int, bytes]]:
        out: list[tuple[int, bytes]] = []
        for m in mutations:
            out.extend(m.patches(self.targets))
        return out

    def prefault(self) -> None:
        """Touch every page of the dump once, so its file pages do not count as case growth."""
        view = self.source.map
        for offset in range(0, len(view), 4096):
            view[offset]  # reading faults the page in

    def run(
        self,
        mutations: Sequence[Mutation],
        *,
        work: int = CASE_CALLS,
        seconds: float = HANG_SECONDS,
        reattach: bool | None = None,
        copying: bool = False,
        memory: str = "tracemalloc",
        kernel_span: tuple[int, int] | None = None,
    ) -> Outcome:
        """Run the pipeline on the dump with `mutations` applied; never raises for the case.

        `memory` is how the case's peak is measured: "tracemalloc" (the Python
        heap, exact, 5-40x slower), "rss" (growth of the resident set over
        the case, from the kernel's high-water mark; cheap) or "none".
        `kernel_span` narrows the kernel's mapping enumeration (default: all).
        A case fails when it makes more than `work` function calls, and is
        stopped as hung after `seconds` of CPU time (see `watchdog`).
        """
        outcome = Outcome(list(mutations))
        patches = self.patches(mutations)
        touches_tables = any(
            self.targets.spots[m.target].kind in ("pte", "table")
            for m in mutations
            if m.target in self.targets.spots
        )
        if reattach is None:
            reattach = any(m.target.startswith("kernel.") for m in mutations)
        session = self.copying_session if copying else self.session
        rss_before = 0
        if memory == "tracemalloc":
            tracemalloc.start()
        elif memory == "rss":
            rss_before = reset_peak_rss()
        calls = [0]
        start, start_cpu = time.perf_counter(), time.process_time()
        try:
            with self.source.patched(patches), watchdog(seconds), work_meter(work) as calls:
                outcome.rows = pipeline(
                    self,
                    session,
                    outcome.vmi_errors,
                    reattach=reattach,
                    kernel_mappings=touches_tables,
                    kernel_span=kernel_span,
                )
        except CaseTimeout as exc:
            outcome.failure = f"timeout: {exc}"
        except CaseOverWork as exc:
            outcome.failure = f"over work bound: {exc}"
        except Exception as exc:  # the point: anything but a VmiError is a bug
            outcome.failure = "".join(traceback.format_exception(exc))
        finally:
            outcome.work = calls[0]
            outcome.seconds = time.process_time() - start_cpu
            outcome.wall = time.perf_counter() - start
            if memory == "tracemalloc":
                outcome.peak = tracemalloc.get_traced_memory()[1]
                tracemalloc.stop()
            elif memory == "rss":
                outcome.peak = max(0, peak_rss() - rss_before)
        return outcome


def _status_kib(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    return 0


def reset_peak_rss() -> int:
    """Reset the kernel's resident-set high-water mark (Linux 4.0+); the current RSS in bytes."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_kib("VmRSS") * 1024


def peak_rss() -> int:
    """The resident-set high-water mark since the last reset, in bytes."""
    return _status_kib("VmHWM") * 1024


def _step(errors: dict[str, str], name: str, call: Callable[[], Any]) -> Any:
    """Run one pipeline step; a VmiError is an answer (recorded), anything else propagates."""
    try:
        return call()
    except VmiError as exc:
        errors[name] = f"{type(exc).__name__}: {exc}"
        return None


def pipeline(
    harness: Harness,
    session: Session,
    errors: dict[str, str],
    *,
    reattach: bool = False,
    kernel_mappings: bool = False,
    kernel_span: tuple[int, int] | None = None,
) -> int:
    """Everything an analyst does first, on whatever the guest's memory now says.

    Returns the number of process rows. Rendering goes through the terminal
    escaping, whose output must hold no control character whatever the guest
    wrote.
    """
    if reattach:
        fresh = _step(
            errors,
            "attach",
            lambda: Session(session.source, harness.profile, limits=harness.limits),
        )
        if fresh is None:
            return 0
        session = fresh
    frame = _step(errors, "processes", lambda: session.processes(threads=True))
    rows = list(frame.itertuples()) if frame is not None else []
    rendered: list[str] = []
    for row in rows:
        rendered.append(safe_text(f"{row.pid} {row.comm} {row.cmdline or ''} {row.error or ''}"))
    tasks = _step(errors, "tasks", session.tasks) or []
    seen_mm: set[int] = set()
    for task in tasks:
        if not task.mm or task.mm in seen_mm or task.error or not task.is_thread_group_leader:
            continue
        seen_mm.add(task.mm)
        dtb = _step(errors, f"dtb {task.pid}", lambda t=task: session.guest.dtb_of(t))
        if dtb is None:
            continue
        proc = Process(session, task, dtb)
        vmas = _step(errors, f"vmas {task.pid}", proc.vmas) or []
        if task.pid == harness.targets.marker_pid:
            _step(errors, "maps", proc.maps)
        for vma in vmas:
            rendered.append(safe_text(f"{vma.start:x}-{vma.end:x} {vma.perms} {vma.path}"))
        argv = _step(errors, f"cmdline {task.pid}", proc.cmdline)
        rendered.append(safe_text(" ".join(argv or ())))
        if task.pid == harness.targets.marker_pid:
            _marker_steps(proc, errors, rendered)
    kernel = _step(errors, "kernel", lambda: session.kernel)
    if kernel is not None:
        init_task = session.guest.init_task
        _step(errors, "kernel translate", lambda: kernel.translate(init_task))
        banner = _step(
            errors, "kernel read", lambda: kernel.read(session.symbol("linux_banner"), 64)
        )
        if banner is not None:
            rendered.append(hexdump(banner, 0))
        walk = _step(errors, "kernel walk", lambda: kernel.walk(init_task))
        if walk is not None:
            rendered.append(walk_table(walk))
        if kernel_mappings:
            lo, hi = kernel_span or (0, 1 << 64)
            _step(errors, "kernel mappings", lambda: sum(1 for _ in kernel.mappings(lo, hi)))
    for text in rendered:
        assert_no_control(text)
    return len(rows)


def _marker_steps(proc: Process, errors: dict[str, str], rendered: list[str]) -> None:
    va = X86_64_DATA_VA
    _step(errors, "marker translate", lambda: proc.translate(va))
    data = _step(errors, "marker read", lambda: proc.read(va, len(MARKER) + 64, pad=True))
    if data is not None:
        rendered.append(hexdump(data, va))
    walk = _step(errors, "marker walk", lambda: proc.walk(va))
    if walk is not None:
        rendered.append(walk_table(walk))
    _step(errors, "marker mappings", lambda: sum(1 for _ in proc.mappings(0, USER_END)))


#: Layout characters `safe_text` keeps (tables and dumps are multi-line text).
_LAYOUT = frozenset("\t\n")
_CONTROL_CHARS = frozenset(chr(c) for c in (*range(0x00, 0x20), *range(0x7F, 0xA0))) - _LAYOUT
_BIDI = frozenset("\u2028\u2029\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def assert_no_control(text: str) -> None:
    """Terminal output must carry no escape, control or bidi character."""
    bad = (_CONTROL_CHARS | _BIDI).intersection(text)
    if bad:
        raise AssertionError(f"rendered text holds control characters {sorted(bad)!r}: {text!r}")
