"""Synthetic Linux kernel memory, laid out from a profile: the Linux layer tested without QEMU.

`SyntheticKernel` places a kernel image where a profile's symbols say (with
chosen KASLR shifts), maps it and a direct map through page tables at the
profile's own top-level table symbol, and builds the structures vmishell
reads (tasks and their lists, mm_structs, maple trees or VMA lists, files,
argument areas) with the offsets the profile gives. Every write goes through
a field name, so the same test runs on the shipped 6.1 profile and on the
hand-made layouts of `tests.support.isf`.

Like a real kernel, it keeps the structures consistent; tests then break
one thing on purpose (`write`, `set`) and check what vmishell says.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from tests.support.pagetables import XD, P, PageTableBuilder
from vmishell.arch import PagingMode
from vmishell.sources.memory import BufferSource
from vmishell.symbols.profile import Profile

MiB = 1 << 20
X86_64_KERNEL_MAP = 0xFFFFFFFF80000000
X86_64_DIRECT_MAP = 0xFFFF888000000000
PF_KTHREAD = 0x00200000
#: maple_tree.h encodings of node types and of pointers to nodes.
MAPLE_LEAF_64, MAPLE_ARANGE_64 = 1, 3
MAPLE_ENODE_NULL, MAPLE_ROOT_NODE, MA_ROOT_PARENT = 0x04, 0x02, 0x01


@dataclass
class Obj:
    """A kernel object: where it is (virtual and physical) and its struct type."""

    kernel: SyntheticKernel
    va: int
    pa: int
    struct: str

    def addr(self, path: str) -> int:
        """Virtual address of a field (a path such as "tasks.next")."""
        return self.va + self.kernel.profile.offset_of(self.struct, path)

    def set(self, path: str, value: int | bytes | str) -> Obj:
        """Write a field: ints in the field's own size, bytes or text into arrays."""
        f = self.kernel.profile.field(self.struct, path)
        pa = self.pa + f.offset
        if isinstance(value, str):
            value = value.encode()
        if isinstance(value, bytes):
            size = self.kernel.profile.size_of(f.type)
            if len(value) > size:
                raise ValueError(f"{len(value)} bytes do not fit {self.struct}.{path}")
            self.kernel.write(pa, value + bytes(size - len(value)))
        else:
            size = self.kernel.profile.size_of(f.type)
            self.kernel.write(pa, (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little"))
        return self

    def get(self, path: str) -> int:
        f = self.kernel.profile.field(self.struct, path)
        size = self.kernel.profile.size_of(f.type)
        return int.from_bytes(
            self.kernel.ram[self.pa + f.offset : self.pa + f.offset + size], "little"
        )


@dataclass
class Space:
    """A process's page tables: a PTI pair when the kernel runs with PTI."""

    kernel_copy: PageTableBuilder
    user_copy: PageTableBuilder | None
    pgd: Obj

    def map(self, vaddr: int, paddr: int, *, writable: bool = True, nx: bool = False) -> None:
        self.kernel_copy.map(vaddr, paddr, writable=writable, nx=nx)
        if self.user_copy is not None:
            self.user_copy.map(vaddr, paddr, writable=writable, nx=nx)


@dataclass
class Mm:
    obj: Obj
    space: Space
    vmas: list[Obj] = field(default_factory=list)


@dataclass
class Task:
    obj: Obj
    pid: int
    tgid: int
    threads: list[Task] = field(default_factory=list)
    signal: Obj | None = None
    parent: Task | None = None


class SyntheticKernel:
    """A kernel's memory built from `profile`, as a BufferSource sees it."""

    def __init__(
        self,
        profile: Profile,
        *,
        physical_shift: int = 0x2000000,
        virtual_shift: int = 0x1C000000,
        heap_mib: int = 16,
        mode: PagingMode | None = None,
        phys_bits: int = 40,
        pti: bool = False,
        page_offset: int | None = None,
    ) -> None:
        """`page_offset` (i386) is the kernel's PAGE_OFFSET when the profile cannot say."""
        self.profile = profile
        self.ptr = profile.pointer_size
        self.is64 = self.ptr == 8
        if self.is64:
            self.mode = mode or PagingMode.LEVEL4
            self.link_base = X86_64_KERNEL_MAP
            self.virtual_shift = virtual_shift
            self.direct_map = X86_64_DIRECT_MAP
            self.kernel_start = 0xFFFF800000000000
        else:
            pae = not profile.has_type("pgprot") or profile.size_of("pgprot") == 8
            self.mode = mode or (PagingMode.PAE if pae else PagingMode.LEGACY)
            self.link_base = page_offset or self.page_offset_of(profile)
            self.virtual_shift = physical_shift  # i386 moves both by one amount
            self.direct_map = self.link_base
            self.kernel_start = self.link_base
        self.physical_shift = physical_shift
        self.pti = pti
        image_start = self.sym_pa("_text")
        image_end = max(self.sym_pa(n) for n in self._image_symbols()) + 0x20000
        self.image = (image_start, _up(image_end, 4 * MiB))
        self.heap = self.image[1]
        self.ram = bytearray(self.heap + heap_mib * MiB)
        top = self.sym_pa("init_top_pgt" if self.is64 else "swapper_pg_dir")
        self.tables = PageTableBuilder(self.mode, ram=self.ram, allocate=self.page, top=top)
        self._map_kernel()
        self._write_banner()
        self.boot_cpu_data(phys_bits, pti)
        self.init_task = Task(self.symbol_obj("init_task", "task_struct"), 0, 0)
        self.leaders: list[Task] = []
        self._init_task()

    # -- placement ------------------------------------------------------------------------
    @staticmethod
    def page_offset_of(profile: Profile) -> int:
        if profile.has_symbol("phys_startup_32"):
            return profile.symbol_address("startup_32") - profile.symbol_address("phys_startup_32")
        return 0xC0000000

    def _image_symbols(self) -> list[str]:
        names = ["linux_banner", "init_task", "boot_cpu_data"]
        names.append("init_top_pgt" if self.is64 else "swapper_pg_dir")
        return [n for n in names if self.profile.has_symbol(n)]

    def sym_va(self, name: str) -> int:
        return self.profile.symbol_address(name) + self.virtual_shift

    def sym_pa(self, name: str) -> int:
        return self.profile.symbol_address(name) - self.link_base + self.physical_shift

    def symbol_obj(self, name: str, struct: str) -> Obj:
        return Obj(self, self.sym_va(name), self.sym_pa(name), struct)

    def va_of(self, pa: int) -> int:
        """The direct-map address of a physical address."""
        return self.direct_map + pa

    def _map_kernel(self) -> None:
        big = 4 * MiB if self.mode is PagingMode.LEGACY else 2 * MiB
        if self.is64:
            start, end = self.image
            link = self.link_base - self.physical_shift + start  # _text's link VA, rounded
            for off in range(0, end - start, big):
                self.tables.map(link + self.virtual_shift + off, start + off, big, user=False)
        for pa in range(0, len(self.ram), big):
            self.tables.map(self.direct_map + pa, pa, big, user=False, nx=self.is64)

    def _write_banner(self) -> None:
        banner = self.profile.banner
        assert banner, "the profile has no linux_banner text"
        self.write(self.sym_pa("linux_banner"), banner + b"\0")

    def boot_cpu_data(self, phys_bits: int, pti: bool) -> None:
        """What the kernel learned about its CPU: MAXPHYADDR and X86_FEATURE_PTI."""
        if not self.profile.has_symbol("boot_cpu_data"):
            return
        cpu = self.symbol_obj("boot_cpu_data", "cpuinfo_x86")
        cpu.set("x86_phys_bits", phys_bits)
        cpu.set("x86_capability[7]", (1 << 11) if pti else 0)

    # -- memory ----------------------------------------------------------------------------
    def write(self, pa: int, data: bytes) -> None:
        self.ram[pa : pa + len(data)] = data

    def write_word(self, va: int, value: int) -> None:
        """Write a pointer-sized value at a direct-mapped or image virtual address."""
        self.write(self.pa_of(va), value.to_bytes(self.ptr, "little"))

    def pa_of(self, va: int) -> int:
        if self.is64 and va >= self.link_base:
            return va - self.link_base - self.virtual_shift + self.physical_shift
        return va - self.direct_map

    def alloc(self, size: int, align: int = 64) -> tuple[int, int]:
        """(va, pa) of zeroed memory in the direct map."""
        pa = _up(self.heap, align)
        if pa + size > len(self.ram):
            raise MemoryError("synthetic kernel heap is full: raise heap_mib")
        self.heap = pa + size
        self.write(pa, bytes(size))
        return self.va_of(pa), pa

    def page(self) -> int:
        return self.alloc(0x1000, 0x1000)[1]

    def new(self, struct: str, align: int = 64) -> Obj:
        va, pa = self.alloc(self.profile.size_of(struct), align)
        return Obj(self, va, pa, struct)

    def cstring(self, text: str | bytes) -> int:
        data = text.encode() if isinstance(text, str) else text
        va, _ = self.alloc(len(data) + 1, 8)
        self.write(self.pa_of(va), data + b"\0")
        return va

    def source(self) -> BufferSource:
        return BufferSource([(0, self.ram)], description="synthetic kernel")

    # -- lists ------------------------------------------------------------------------------
    def link(self, head: int, nodes: Sequence[int]) -> None:
        """Make `head` a circular list_head list through `nodes` (list_head addresses)."""
        ring = [head, *nodes]
        for i, node in enumerate(ring):
            self.write_word(node, ring[(i + 1) % len(ring)])
            self.write_word(node + self.ptr, ring[i - 1])

    # -- tasks ------------------------------------------------------------------------------
    def _init_task(self) -> None:
        t = self.init_task.obj
        t.set("comm", "swapper/0").set("flags", PF_KTHREAD)
        t.set("real_parent", t.va)
        cred = self.new("cred")
        t.set("real_cred", cred.va).set("cred", cred.va)
        self.init_task.signal = self._signal()
        t.set("signal", self.init_task.signal.va)
        self._relink()

    def _signal(self) -> Obj | None:
        return self.new("signal_struct") if self.profile.has_type("signal_struct") else None

    def task(
        self,
        pid: int,
        comm: str,
        *,
        leader: Task | None = None,
        parent: Task | None = None,
        state: int = 0x1,
        exit_state: int = 0,
        kthread: bool = False,
        mm: Mm | None = None,
        uid: int = 0,
        start_boottime: int = 0,
    ) -> Task:
        """A new task: a thread of `leader`, or else a new thread-group leader."""
        obj = self.new("task_struct")
        tgid = leader.tgid if leader else pid
        task = Task(obj, pid, tgid)
        obj.set("pid", pid).set("tgid", tgid).set("comm", comm[:15])
        obj.set(self._state_field(), state).set("exit_state", exit_state)
        obj.set("flags", PF_KTHREAD if kthread else 0)
        # CLONE_THREAD: a thread's parent is its leader's parent.
        parent = parent or (leader.parent if leader else None) or self.init_task
        task.parent = parent
        obj.set("real_parent", parent.obj.va)
        cred = self.new("cred")
        cred.set("uid", uid).set("gid", uid)
        obj.set("real_cred", cred.va).set("cred", cred.va)
        obj.set("start_time", start_boottime).set("start_boottime", start_boottime)
        if mm is not None:
            obj.set("mm", mm.obj.va).set("active_mm", mm.obj.va)
        if leader is None:
            task.signal = self._signal()
            self.leaders.append(task)
        else:
            task.signal = leader.signal
            leader.threads.append(task)
        if task.signal is not None:
            obj.set("signal", task.signal.va)
        self._relink()
        return task

    def _state_field(self) -> str:
        return "__state" if self.profile.has_field("task_struct", "__state") else "state"

    def _relink(self) -> None:
        """Write every task list as the kernel keeps it: tasks, thread_group, thread_head."""
        p = self.profile
        self.link(self.init_task.obj.addr("tasks"), [t.obj.addr("tasks") for t in self.leaders])
        for group in [self.init_task, *self.leaders]:
            members = [group, *group.threads]
            if p.has_field("task_struct", "thread_group"):
                # No head of its own: each member's thread_group is on one ring.
                ring = [m.obj.addr("thread_group") for m in members]
                self.link(ring[0], ring[1:])
            if p.has_field("task_struct", "thread_node") and group.signal is not None:
                self.link(
                    group.signal.addr("thread_head"), [m.obj.addr("thread_node") for m in members]
                )

    # -- address spaces ---------------------------------------------------------------------
    def space(self) -> Space:
        """A process's page tables, sharing the kernel half (a PTI pair if PTI is on)."""
        if self.pti:
            pair = _up(self.heap, 0x2000)
            self.heap = pair
            kernel_pa, user_pa = self.page(), self.page()
            assert (kernel_pa, user_pa) == (pair, pair + 0x1000)
            kernel = PageTableBuilder(self.mode, ram=self.ram, allocate=self.page, top=kernel_pa)
            user = PageTableBuilder(self.mode, ram=self.ram, allocate=self.page, top=user_pa)
        else:
            top = self.page()
            kernel = PageTableBuilder(self.mode, ram=self.ram, allocate=self.page, top=top)
            user = None
        self._share_kernel_half(kernel)
        return Space(kernel, user, Obj(self, self.va_of(kernel.dtb), kernel.dtb, "mm_struct"))

    def _share_kernel_half(self, tables: PageTableBuilder) -> None:
        spec = self.mode.spec
        top = spec.levels[0]
        size = spec.entry_size
        for index in range(1 << top.bits):
            va = index << top.shift
            if (self.is64 and index >= (1 << top.bits) // 2) or (
                not self.is64 and va >= self.kernel_start
            ):
                at = index * size
                entry = self.ram[self.tables.dtb + at : self.tables.dtb + at + size]
                self.write(tables.dtb + at, bytes(entry))

    def finish_pti(self, space: Space) -> None:
        """Make the kernel copy's user half NX, as pti_set_user_pgtbl() does (x86_64)."""
        top = self.mode.spec.levels[0]
        for index in range((1 << top.bits) // 2):
            at = space.kernel_copy.dtb + index * 8
            entry = int.from_bytes(self.ram[at : at + 8], "little")
            if entry & P:
                self.write(at, (entry | XD).to_bytes(8, "little"))

    def mm(self, *, argv: Sequence[str] = ("/bin/prog",), user_page: int = 0x400000) -> Mm:
        """An mm_struct with its page tables and an argument area on one user page."""
        space = self.space()
        obj = self.new("mm_struct")
        obj.set("pgd", space.pgd.va)
        data = b"\0".join(a.encode() for a in argv) + b"\0"
        frame = self.page()
        self.write(frame, data)
        space.map(user_page, frame, writable=False)
        obj.set("arg_start", user_page).set("arg_end", user_page + len(data))
        if self.pti and self.is64:
            self.finish_pti(space)
        mm = Mm(obj, space)
        self.set_vmas(mm, [])
        return mm

    # -- VMAs -------------------------------------------------------------------------------
    def vma(self, mm: Mm, start: int, end: int, flags: int = 0x3, file: Obj | None = None) -> Obj:
        """A vm_area_struct of `mm` (not yet in its tree: see `set_vmas`)."""
        v = self.new("vm_area_struct")
        v.set("vm_start", start).set("vm_end", end).set("vm_mm", mm.obj.va)
        v.set("vm_flags", flags)
        if file is not None:
            v.set("vm_file", file.va)
        return v

    def set_vmas(
        self, mm: Mm, vmas: list[Obj], *, leaf_slots: int | None = None
    ) -> MapleBuilder | None:
        """Store `vmas` (sorted by start) in the mm's maple tree (returned), or its VMA list."""
        mm.vmas = list(vmas)
        mm.obj.set("map_count", len(vmas))
        if self.profile.has_field("mm_struct", "mm_mt"):
            tree = MapleBuilder(self, mm.obj.addr("mm_mt"), leaf_slots)
            tree.store([(v.get("vm_start"), v.get("vm_end") - 1, v.va) for v in vmas])
            return tree
        else:
            mm.obj.set("mmap", vmas[0].va if vmas else 0)
            for i, v in enumerate(vmas):
                v.set("vm_next", vmas[i + 1].va if i + 1 < len(vmas) else 0)
                if self.profile.has_field("vm_area_struct", "vm_prev"):
                    v.set("vm_prev", vmas[i - 1].va if i else 0)
        return None

    def file(self, path: str, *, ino: int = 1234, dev: int = (8 << 20) | 1) -> Obj:
        """An open file at `path` on a root mount (its own mount as parent)."""
        sb = self.new("super_block")
        sb.set("s_dev", dev)
        root = self.new("dentry")
        root.set("d_parent", root.va)
        mount = self.new("mount")
        mount.set("mnt_parent", mount.va).set("mnt_mountpoint", root.va)
        mnt = mount.addr("mnt")
        Obj(self, mnt, self.pa_of(mnt), "vfsmount").set("mnt_root", root.va)
        parent = root
        dentry = root
        for part in path.strip("/").split("/"):
            dentry = self.new("dentry")
            dentry.set("d_parent", parent.va)
            dentry.set("d_name.name", self.cstring(part)).set("d_name.len", len(part))
            parent = dentry
        inode = self.new("inode")
        inode.set("i_ino", ino).set("i_sb", sb.va)
        dentry.set("d_inode", inode.va)
        f = self.new("file")
        f.set("f_path.dentry", dentry.va).set("f_path.mnt", mnt)
        return f


class MapleBuilder:
    """Writes a maple tree as lib/maple_tree.c lays one out: leaf_64 leaves, arange_64 above.

    Entries are (first, last, value) sorted and disjoint; the gaps between
    them are stored as NULL ranges, as the mm's tree does. `leaf_slots`
    fills leaves less than full to make deeper trees from a few entries.
    """

    def __init__(self, kernel: SyntheticKernel, tree: int, leaf_slots: int | None) -> None:
        self.k = kernel
        self.tree = tree
        p = kernel.profile
        self.slots = p.field("maple_range_64", "slot").type.count or 0
        self.aslots = p.field("maple_arange_64", "slot").type.count or 0
        self.leaf_slots = leaf_slots or self.slots - 1
        self.max = (1 << (8 * kernel.ptr)) - 1
        #: Every node written, as (node, encoded pointer), leaves first, for tests to break.
        self.nodes: list[tuple[Obj, int]] = []
        self.leaves: list[Obj] = []

    def store(self, entries: list[tuple[int, int, int]]) -> None:
        ranges: list[tuple[int, int, int]] = []
        at = 0
        for first, last, value in entries:
            if first > at:
                ranges.append((at, first - 1, 0))
            ranges.append((first, last, value))
            at = last + 1
        if at <= self.max:
            ranges.append((at, self.max, 0))
        tree = Obj(self.k, self.tree, self.k.pa_of(self.tree), "maple_tree")
        if not entries:
            tree.set("ma_root", 0)
            return
        level = [
            self._node(MAPLE_LEAF_64, ranges[i : i + self.leaf_slots])
            for i in range(0, len(ranges), self.leaf_slots)
        ]
        while len(level) > 1:
            groups = [level[i : i + self.aslots] for i in range(0, len(level), self.aslots)]
            level = [self._internal(group) for group in groups]
        node, enode, _, _ = level[0]
        node.set("parent", self.tree | MA_ROOT_PARENT)
        tree.set("ma_root", enode | MAPLE_ROOT_NODE)

    def _node(self, kind: int, ranges: list[tuple[int, int, int]]) -> tuple[Obj, int, int, int]:
        node = self.k.new("maple_node", align=256)
        count = len(ranges)
        npivots = self.slots - 1
        for i, (_, last, value) in enumerate(ranges):
            node.set(f"mr64.slot[{i}]", value)
            if i < npivots:
                node.set(f"mr64.pivot[{i}]", last)
        if count < npivots:  # else the pivots say where the node ends (ma_data_end)
            node.set("mr64.meta.end", count - 1)
        enode = node.va | kind << 3 | MAPLE_ENODE_NULL
        self.nodes.append((node, enode))
        self.leaves.append(node)
        return node, enode, ranges[0][0], ranges[-1][1]

    def _internal(self, children: list[tuple[Obj, int, int, int]]) -> tuple[Obj, int, int, int]:
        node = self.k.new("maple_node", align=256)
        for i, (child, enode, _, last) in enumerate(children):
            node.set(f"ma64.slot[{i}]", enode)
            if i < self.aslots - 1:
                node.set(f"ma64.pivot[{i}]", last)
            child.set("parent", node.va | (i << 3) | 0x2)
        node.set("ma64.meta.end", len(children) - 1)
        enode = node.va | MAPLE_ARANGE_64 << 3 | MAPLE_ENODE_NULL
        self.nodes.append((node, enode))
        return node, enode, children[0][2], children[-1][3]


def _up(value: int, align: int) -> int:
    return -(-value // align) * align
