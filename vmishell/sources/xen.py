"""A running Xen domain, read from dom0 through Xen's foreign-memory interface.

`XenDomainSource("NAME")` (or a domain id) is what `Session.attach("xen:NAME")`
opens. It uses vmishell's own binding over Xen's libraries (`xenlib`); the
LibVMI-based source (`libvmi.LibvmiSource`, `libvmi-xen:`) is the alternative.

Frame spaces, decided from the domain's info (never guessed):

- **HVM and PVH** guests have one guest-physical space: the source reads
  guest frames, and page tables hold the same frames.
- **PV** guests' page tables hold *machine* frames, while their kernel's own
  physical addresses (`__pa()`, pfns) are *pseudo-physical*. The source's
  addresses are pseudo-physical (the kernel is found there, as in any
  guest), read through the guest's p2m (see `xenp2m`); page walks read
  `walk_source`, a view of the domain's machine frames, from a DTB that
  `to_walk` converts. Translations of a PV guest therefore give machine
  addresses, as its page tables do.

Live truth and lifecycle: reads go through kept foreign mappings (see
`xenmap`), which are dropped when the domain's memory layout changes (its
page count, a PV guest's p2m generation). `check()` looks at the domain at
most every `POLL_INTERVAL` seconds: a destroyed or dying domain ends the
source; a reboot (Xen reports the shutdown reason, then the toolstack
builds a new domain of the same name) is followed when the source was
opened by name, and counted in `resets`.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from vmishell.errors import GuestRebooting, PhysicalReadError, RegistersUnavailable, SourceError
from vmishell.sources.base import PhysicalSource, PhysRange, Registers
from vmishell.sources.vmwatch import Throttle
from vmishell.sources.xenlib import PAGE_SIZE, Domain, Xen
from vmishell.sources.xenmap import DEFAULT_CHUNK, DEFAULT_MAX_CHUNKS, FrameCache
from vmishell.sources.xenp2m import INVALID, ArchSharedInfo, mfn_runs, p2m_size, read_p2m

#: Seconds between two looks at the domain's state in `check()`.
POLL_INTERVAL = 0.1
#: Seconds a domain that announced a reboot may take to reappear under its name.
REBOOT_GRACE = 60.0
#: Frames surveyed per batch when finding an HVM or PVH guest's populated memory.
SURVEY_CHUNK = 512

CR0_PE, CR0_PG = 1, 1 << 31
CR4_PAE = 1 << 5
EFER_SCE, EFER_LME, EFER_LMA, EFER_NXE = 1, 1 << 8, 1 << 10, 1 << 11
# Offsets in the x86_64 vcpu_guest_context and in struct hvm_hw_cpu (see xenlib).
_PV64_CTRLREG = 4984
_PV64_RIP, _PV64_RFLAGS, _PV64_RSP = 648, 664, 672
_HVM_RIP, _HVM_CR0 = 640, 656
_HVM_EFER = 992


class XenDomainSource(PhysicalSource):
    """Memory and vCPU state of one running Xen domain, from dom0 (needs root)."""

    live = True

    def __init__(
        self,
        domain: str | int,
        *,
        writable: bool = False,
        xen: Xen | None = None,
        chunk: int = DEFAULT_CHUNK,
        max_chunks: int = DEFAULT_MAX_CHUNKS,
    ) -> None:
        super().__init__()
        self.xen = xen or Xen.shared()
        self.writable = writable
        self._chunk, self._max_chunks = chunk, max_chunks
        text = str(domain)
        self.by_name = not (isinstance(domain, int) or text.isdigit())
        self.name: str | None = text if self.by_name else None
        self.domid = self.xen.find(text) if self.by_name else int(text)
        self._resets = 0
        self._throttle = Throttle(POLL_INTERVAL)
        self._reboot_since: float | None = None
        self._frames: FrameCache | None = None
        self._shinfo: FrameCache | None = None
        self._attach(self.domid)

    # -- attaching ----------------------------------------------------------------------
    def _attach(self, domid: int) -> None:
        info = self.xen.domain(domid)
        if info is None:
            raise SourceError(f"no such domain: {domid} is not running")
        if info.dying:
            raise SourceError(f"domain {domid} is being destroyed")
        self.domid = domid
        self.info = info
        self.name = self.xen.name(domid) or self.name
        self.kind = info.kind
        self.pv = self.kind == "pv"
        self.description = f"Xen {self.kind.upper()} domain {self.name or domid} (id {domid})"
        if self.pv:
            width = self.xen.guest_width(domid)
            if width != 8:
                raise SourceError(
                    f"{self.description} is a 32-bit PV guest: vmishell reads 64-bit PV guests "
                    "and 32-bit guests running as PVH or HVM"
                )
        self._frames = FrameCache(
            self.xen,
            domid,
            space="machine" if self.pv else "guest",
            chunk=self._chunk,
            max_chunks=self._max_chunks,
            write=self.writable,
        )
        self._layout()

    def _layout(self) -> None:
        """Find the guest's RAM (and, for PV, its p2m) as it is now."""
        assert self._frames is not None
        self._pages = self.info.tot_pages
        self._starts = None
        if self.pv:
            self._load_p2m()
        else:
            self._ranges = survey(self._frames, self.xen.nr_gpfns(self.domid))
            self._p2m_generation = None
            self._machine = None

    def _load_p2m(self) -> None:
        frames = self._frames
        assert frames is not None
        if self._shinfo is None:
            self._shinfo = FrameCache(self.xen, self.domid, space="machine", chunk=1, max_chunks=1)
        shared = self._shinfo.read(self.info.shared_info_frame, 0, PAGE_SIZE)
        arch = ArchSharedInfo.parse(shared)
        nr = p2m_size(arch, self.xen.nr_gpfns(self.domid))
        self._p2m = read_p2m(frames.read_frames, arch, nr)
        self._p2m_generation = arch.p2m_generation
        runs = []
        start = None
        for pfn, mfn in enumerate(self._p2m):
            if mfn != INVALID and start is None:
                start = pfn
            elif mfn == INVALID and start is not None:
                runs.append(PhysRange(start * PAGE_SIZE, pfn * PAGE_SIZE))
                start = None
        if start is not None:
            runs.append(PhysRange(start * PAGE_SIZE, len(self._p2m) * PAGE_SIZE))
        self._ranges = runs
        self._machine = XenMachineView(
            self, [(a * PAGE_SIZE, b * PAGE_SIZE) for a, b in mfn_runs(self._p2m)]
        )

    @classmethod
    def list_domains(cls, xen: Xen | None = None) -> list[tuple[Domain, str | None]]:
        """Every domain with its name (dom0 included)."""
        xen = xen or Xen.shared()
        return [(d, xen.name(d.domid)) for d in xen.domains()]

    # -- frame spaces ---------------------------------------------------------------------
    @property
    def walk_source(self) -> PhysicalSource:
        """What page-table entries address: the machine view for PV, else this source."""
        return self._machine if self.pv and self._machine is not None else self

    def to_walk(self, paddr: int) -> int:
        """A pseudo-physical address as the machine address page tables use (PV), else itself."""
        if not self.pv:
            return paddr
        return self.machine_frame(paddr >> 12) << 12 | (paddr & 0xFFF)

    def machine_frame(self, pfn: int) -> int:
        """The machine frame of a PV guest's pseudo-physical frame (PhysicalReadError if none)."""
        if not 0 <= pfn < len(self._p2m) or self._p2m[pfn] == INVALID:
            raise PhysicalReadError(
                pfn * PAGE_SIZE, PAGE_SIZE, f"pseudo-physical frame {pfn:#x} has no machine frame"
            )
        return self._p2m[pfn]

    # -- PhysicalSource -------------------------------------------------------------------
    def ranges(self) -> Sequence[PhysRange]:
        return self._ranges

    def _read(self, paddr: int, size: int) -> bytes:
        frames = self._frames
        if frames is None:
            self.check()
            raise SourceError(f"{self.description} is closed")
        parts = []
        pos, end = paddr, paddr + size
        while pos < end:
            n = min(end, (pos | 0xFFF) + 1) - pos
            frame = self.machine_frame(pos >> 12) if self.pv else pos >> 12
            try:
                parts.append(frames.read(frame, pos & 0xFFF, n))
            except PhysicalReadError as exc:
                raise PhysicalReadError(paddr, size, f"at {pos:#x}: {exc}") from None
            pos += n
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def write(self, paddr: int, data: bytes) -> None:
        """Write guest memory; refused unless the source was opened writable."""
        if not self.writable:
            raise SourceError(f"{self.description} was opened read-only")
        self.check()
        if not self.is_valid(paddr, len(data)):
            raise PhysicalReadError(paddr, len(data), "outside guest RAM")
        assert self._frames is not None
        pos = 0
        while pos < len(data):
            a = paddr + pos
            n = min(len(data) - pos, PAGE_SIZE - (a & 0xFFF))
            frame = self.machine_frame(a >> 12) if self.pv else a >> 12
            self._frames.write_bytes(frame, a & 0xFFF, data[pos : pos + n])
            pos += n

    # -- vCPUs -----------------------------------------------------------------------------
    def registers(self, vcpu: int = 0) -> Registers:
        """A vCPU's control registers: CR3 in the space page tables use (machine for PV)."""
        self.check()
        try:
            if self.pv:
                return pv_registers(self.xen.vcpu_context(self.domid, vcpu))
            return hvm_registers(self.xen.hvm_cpu(self.domid, vcpu))
        except SourceError as exc:
            raise RegistersUnavailable(f"{self.description}: {exc}") from exc

    # -- lifecycle -------------------------------------------------------------------------
    @property
    def resets(self) -> int | None:
        return self._resets

    @property
    def state(self) -> str:
        state = super().state
        if state == "running" and getattr(self, "info", None) is not None and self.info.paused:
            return "paused"
        return state

    def _check_alive(self) -> None:
        if not self._throttle():
            return
        info = self.xen.domain(self.domid)
        if info is None or info.dying:
            self._gone("destroyed" if info is None else "being destroyed")
            return
        self.info = info
        if info.shutdown is not None:
            if info.shutdown == "reboot" and self.by_name:
                self._reboot_since = self._reboot_since or time.monotonic()
                return
            if info.shutdown not in ("suspend",):
                self._end(f"the guest shut down ({info.shutdown})")
        if info.tot_pages != self._pages or (self.pv and self._p2m_changed()):
            self._relayout()

    def _gone(self, how: str) -> None:
        if self._reboot_since is None or not self.by_name or self.name is None:
            self._end(f"domain {self.domid} was {how}")
        try:
            new = self.xen.find(self.name)
        except SourceError:
            new = None
        if new is None or new == self.domid:
            if time.monotonic() - (self._reboot_since or 0) > REBOOT_GRACE:
                self._end(f"domain {self.name} rebooted but did not come back")
            raise GuestRebooting(f"{self.description} is rebooting (no new domain yet)")
        self._close_maps()
        self._reboot_since = None
        self._attach(new)
        self._resets += 1
        self._generation += 1

    def _p2m_changed(self) -> bool:
        if self._shinfo is None:
            return False
        try:
            shared = self._shinfo.read(self.info.shared_info_frame, 0, PAGE_SIZE)
        except PhysicalReadError:
            return True
        gen = ArchSharedInfo.parse(shared).p2m_generation
        return gen != self._p2m_generation or gen & 1 == 1

    def _relayout(self) -> None:
        assert self._frames is not None
        self._frames.flush()
        self._layout()
        self._generation += 1

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Pause the domain for a consistent view; Xen counts pauses, so nesting is safe."""
        self.check()
        self.xen.pause(self.domid)
        self.refresh()
        try:
            yield
        finally:
            if self._ended is None and not self._closed:
                self.xen.unpause(self.domid)
            self.refresh()

    # -- statistics and teardown -----------------------------------------------------------
    @property
    def map_stats(self):  # -> MapStats
        assert self._frames is not None
        return self._frames.stats

    def _close_maps(self) -> None:
        for cache in (self._frames, self._shinfo):
            if cache is not None:
                cache.flush()
        self._frames = None
        self._shinfo = None

    def close(self) -> None:
        self._close_maps()
        super().close()


class XenMachineView(PhysicalSource):
    """A PV domain's machine frames, as its page tables address them (read-only).

    Its ranges are the machine frames the guest's p2m names; a page table
    entry pointing elsewhere (Xen's own tables in the hypervisor's slots, a
    foreign page) reads as outside RAM, which a walk reports as a PageFault.
    """

    live = True

    def __init__(self, owner: XenDomainSource, runs: list[tuple[int, int]]) -> None:
        super().__init__()
        self.owner = owner
        self.description = f"machine frames of {owner.description}"
        self._ranges = [PhysRange(a, b) for a, b in runs]

    @property
    def generation(self) -> int:  # type: ignore[override]
        return self.owner.generation

    def refresh(self) -> None:
        self.owner.refresh()

    def check(self) -> None:
        self.owner.check()

    @property
    def closed(self) -> bool:  # type: ignore[override]
        return self.owner.closed

    @property
    def ended(self) -> bool:  # type: ignore[override]
        return self.owner.ended

    def ranges(self) -> Sequence[PhysRange]:
        return self._ranges

    def _read(self, paddr: int, size: int) -> bytes:
        frames = self.owner._frames
        if frames is None:
            self.owner.check()
            raise SourceError(f"{self.description} is closed")
        parts = []
        pos, end = paddr, paddr + size
        while pos < end:
            n = min(end, (pos | 0xFFF) + 1) - pos
            parts.append(frames.read(pos >> 12, pos & 0xFFF, n))
            pos += n
        return parts[0] if len(parts) == 1 else b"".join(parts)


def survey(frames: FrameCache, nr_gpfns: int, chunk: int = SURVEY_CHUNK) -> list[PhysRange]:
    """The populated ranges of an HVM or PVH guest's frame space.

    Looks at the first frame of every `chunk`-frame block in one batch, then
    maps in full the first block (the VGA hole) and the blocks on both sides
    of every change (the ends of RAM), so a few batches cover gigabytes.
    Runs that hold a block's first frame are found with exact edges; a few
    frames alone inside an otherwise empty block (Xen's special pages, not
    RAM) are not, and a read there fails per frame as any unmapped one does.
    """
    firsts = list(range(0, nr_gpfns, chunk))
    heads = frames.probe(firsts) if firsts else []
    populated: list[bool] = [False] * nr_gpfns
    full = {0}
    for i in range(len(heads)):
        if i + 1 < len(heads) and heads[i] != heads[i + 1]:
            full.update((i, i + 1))
    for i, ok in enumerate(heads):
        lo, hi = i * chunk, min(nr_gpfns, (i + 1) * chunk)
        if i in full:
            oks = frames.probe(range(lo, hi))
            populated[lo:hi] = oks
        elif ok:
            populated[lo:hi] = [True] * (hi - lo)
    ranges: list[PhysRange] = []
    start = None
    for f, ok in enumerate(populated):
        if ok and start is None:
            start = f
        elif not ok and start is not None:
            ranges.append(PhysRange(start * PAGE_SIZE, f * PAGE_SIZE))
            start = None
    if start is not None:
        ranges.append(PhysRange(start * PAGE_SIZE, nr_gpfns * PAGE_SIZE))
    return ranges


def pv_registers(ctx: bytes) -> Registers:
    """Registers of a 64-bit PV vCPU from its `vcpu_guest_context` (x86_64 layout).

    A PV guest always runs in long mode with PAE paging and NX (Xen enables
    them); its CR3 holds the machine frame of its kernel page tables.
    """
    ctrl = struct.unpack_from("<8Q", ctx, _PV64_CTRLREG)
    rip, rflags, rsp = (
        struct.unpack_from("<Q", ctx, off)[0] for off in (_PV64_RIP, _PV64_RFLAGS, _PV64_RSP)
    )
    return Registers(
        "x86_64",
        cr0=ctrl[0] | CR0_PG | CR0_PE,
        cr3=ctrl[3] & ~0xFFF,
        cr4=ctrl[4] | CR4_PAE,
        efer=EFER_SCE | EFER_LME | EFER_LMA | EFER_NXE,
        extra={"rip": rip, "rsp": rsp, "rflags": rflags, "cr2": ctrl[2], "user_cr3": ctrl[1]},
    )


def hvm_registers(cpu: bytes) -> Registers:
    """Registers of an HVM or PVH vCPU from its `struct hvm_hw_cpu`."""
    rip, rflags = struct.unpack_from("<2Q", cpu, _HVM_RIP)
    cr0, cr2, cr3, cr4 = struct.unpack_from("<4Q", cpu, _HVM_CR0)
    efer = struct.unpack_from("<Q", cpu, _HVM_EFER)[0]
    rsp = struct.unpack_from("<Q", cpu, 512 + 7 * 8)[0]
    arch = "x86_64" if efer & EFER_LMA else "i386"
    return Registers(
        arch,
        cr0=cr0,
        cr3=cr3,
        cr4=cr4,
        efer=efer,
        extra={"rip": rip, "rsp": rsp, "rflags": rflags, "cr2": cr2},
    )
