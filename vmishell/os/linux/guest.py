"""A Linux guest: the kernel located once, then tasks, page-table bases and maps."""

from __future__ import annotations

from functools import cached_property

from vmishell.arch import AddressSpace, PagingMode, Translator
from vmishell.arch.registers import PTI_USER_PGD_BIT
from vmishell.errors import GuestDataError, VmiError
from vmishell.limits import Limits, TextBudget
from vmishell.os.linux.cpu import KernelCpu, kernel_cpu
from vmishell.os.linux.kernel import KernelLocation
from vmishell.os.linux.layout import maple_layout, mm_layout, task_layout, vma_layout
from vmishell.os.linux.locate import locate
from vmishell.os.linux.reader import KernelReader, decode_guest_string
from vmishell.os.linux.tasks import Task, TaskWalker
from vmishell.os.linux.vmas import Vma, VmaWalker
from vmishell.sources.base import PhysicalSource
from vmishell.sources.framespace import walk_source
from vmishell.symbols.profile import Profile

#: Paging modes in which Linux allocates a process's top-level table as a PTI pair
#: (x86_64, and i386 with PAE); legacy 2-level paging has no PTI.
_PTI_MODES = (PagingMode.LEVEL4, PagingMode.LEVEL5, PagingMode.PAE)


class LinuxGuest:
    """The OS layer over one source and one profile."""

    def __init__(
        self,
        source: PhysicalSource,
        profile: Profile,
        limits: Limits | None = None,
        location: KernelLocation | None = None,
    ) -> None:
        self.source = source
        self.profile = profile
        self.limits = limits or Limits()
        self.location = location or locate(source, profile, self.limits)
        #: MAXPHYADDR and PTI as the kernel found them at boot (see `cpu`).
        self.cpu: KernelCpu = kernel_cpu(source, profile, self.location)
        self.kernel_translator = self.translator(self.location.dtb)
        self.kernel_space = AddressSpace(self.kernel_translator)
        self.reader = KernelReader(self.kernel_space, profile.pointer_size)
        self._tasks = TaskWalker(self.reader, task_layout(profile), self.limits)
        self._mm = mm_layout(profile)
        special = frozenset(
            self.symbol(name)
            for name in ("special_mapping_vmops", "legacy_special_mapping_vmops")
            if profile.has_symbol(name)
        )
        self._vmas = VmaWalker(
            self.reader,
            self._mm,
            vma_layout(profile),
            maple_layout(profile),
            self.limits,
            special,
            kernel_start=self.location.page_offset,
            page_shift=self.page_size.bit_length() - 1,
        )

    @property
    def page_size(self) -> int:
        """The kernel's PAGE_SIZE: the arm64 granule, 4 KiB on x86."""
        mode = self.location.mode
        return 4096 if isinstance(mode, PagingMode) else mode.granule

    def symbol(self, name: str) -> int:
        """Run-time virtual address of a kernel symbol."""
        return self.location.virtual(self.profile.symbol_address(name))

    @cached_property
    def init_task(self) -> int:
        return self.symbol("init_task")

    def tasks(self) -> list[Task]:
        """Every task, leaders in list order each followed by its threads."""
        return self._tasks.all_tasks(self.init_task)

    def task_address(self, pid: int) -> int:
        for task in self.tasks():
            if task.pid == pid:
                return task.address
        raise GuestDataError(f"no task with pid {pid}")

    def pgd_physical(self, mm: int) -> int:
        """Physical page-table base of an mm_struct (its `pgd` is a kernel VA)."""
        pgd = self.reader.pointer(mm + self._mm.pgd)
        try:
            return self.kernel_translator.translate(pgd).paddr
        except VmiError as exc:
            raise GuestDataError(f"mm {mm:#x}: its pgd {pgd:#x} does not translate: {exc}") from exc

    @property
    def pti(self) -> bool:
        """Whether processes run on PTI pairs of page tables (the kernel says so)."""
        return bool(self.cpu.pti) and self.location.mode in _PTI_MODES

    def dtb_of(self, task: Task) -> int:
        """A task's page-table base as its CPU sees it in user mode.

        A kernel thread has no mm; its active_mm is whichever user mm it last
        borrowed, whose kernel half is the kernel's own, so the kernel's page
        tables are the stable answer. With page-table isolation, mm->pgd is
        the kernel's copy, in which every user page is NX (x86_64): the
        process itself runs on the next page, whose rights are the user's
        view, while the kernel half holds only the entry trampoline.
        """
        if not task.mm:
            return self.location.dtb
        pgd = self.pgd_physical(task.mm)
        if not self.pti:
            return pgd
        user = pgd | PTI_USER_PGD_BIT
        if pgd & PTI_USER_PGD_BIT or not self.source.is_valid(user, 4096):
            raise GuestDataError(
                f"mm {task.mm:#x}: PTI is on but its pgd {pgd:#x} is not the first page "
                "of a pair in RAM"
            )
        return user

    def translator(self, dtb: int) -> Translator:
        """A translator for one address space: the kernel's MAXPHYADDR, the session's caps.

        `dtb` and the translations are in the space page tables address (see
        `vmishell.sources.framespace`): machine addresses for a Xen PV guest.
        On arm64 `dtb` is the space's TTBR0 beside the kernel's TTBR1 (see
        `arm64`); the kernel's own table stands for a space with no user half.
        """
        if not isinstance(self.location.mode, PagingMode):  # arm64
            from vmishell.os.linux.arm64 import arm64_translator

            return arm64_translator(  # type: ignore[return-value]
                walk_source(self.source),
                self.location.mode,
                None if dtb == self.location.dtb else dtb,
                self.location.dtb,
                max_mapping_work=self.limits.max_mapping_work,
            )
        return Translator(
            walk_source(self.source),
            dtb,
            self.location.mode,
            maxphyaddr=self.cpu.maxphyaddr,
            max_mapping_work=self.limits.max_mapping_work,
        )

    def address_space(self, dtb: int) -> AddressSpace:
        return AddressSpace(self.translator(dtb))

    def vmas(self, task: Task, budget: TextBudget | None = None) -> list[Vma]:
        if not task.mm:
            return []
        return self._vmas.vmas(task.mm, budget)

    def cmdline(
        self, task: Task, space: AddressSpace, budget: TextBudget | None = None
    ) -> list[str] | None:
        """argv read from the process's own memory (None for kernel threads).

        The argument area's size is checked against `max_cmdline` and charged
        to `budget` before anything is read.
        """
        if not task.mm:
            return None
        mm, size = self._mm, self.reader.pointer_size
        if mm.arg_end == mm.arg_start + size:  # side by side, as in every kernel: one read
            start, end = self.reader.pointer_pair(task.mm + mm.arg_start)
        else:
            start = self.reader.pointer(task.mm + mm.arg_start)
            end = self.reader.pointer(task.mm + mm.arg_end)
        if not 0 <= end - start <= self.limits.max_cmdline:
            raise GuestDataError(f"pid {task.pid}: implausible argument area {start:#x}-{end:#x}")
        if budget is not None:
            budget.charge(end - start, f"pid {task.pid}: command line")
        raw = space.read(start, end - start, pad=True)
        return [decode_guest_string(a) for a in raw.rstrip(b"\0").split(b"\0")]
