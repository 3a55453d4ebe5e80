"""Is the located kernel still the one running? Signs read from guest memory and the CPU.

A guest that reboots leaves the old kernel's bytes in RAM: its banner and
`init_task` still check out at the old addresses, so "the kernel is still
there" is no proof of life. Two signs are:

- the kernel's tick counter (`jiffies_64`) moves while the guest runs. It
  goes back on a new boot at the same place, and freezes at the old place
  when the new kernel lies elsewhere (`KernelPulse`);
- the vCPU's page tables (CR3) map the kernel's `linux_banner` onto the
  located physical address: only the running kernel's do (`runs_on_cpu`).

The second needs registers (QMP), which cost a few milliseconds, so it is
used only to choose among kernels found in memory after a reset, never per call.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from vmishell.arch import PagingMode, Translator, kernel_dtb
from vmishell.arch.registers import PTI_USER_PGD_BIT
from vmishell.errors import VmiError
from vmishell.os.linux.kernel import KernelLocation
from vmishell.sources.base import PhysicalSource, Registers
from vmishell.sources.framespace import to_walk, walk_source
from vmishell.symbols.profile import Profile

#: Seconds between two looks at the tick counter during top-level calls.
PULSE_INTERVAL = 0.2
#: Seconds the counter may stand still (an idle tickless guest, a pause by another
#: tool) before the session checks that the kernel it located is still the one running.
STILL_SECONDS = 2.0
#: Seconds to watch a candidate kernel's counter for a tick when no registers tell.
TICK_WAIT = 1.5

Accept = Callable[[KernelLocation], bool]


class KernelPulse:
    """Watches one located kernel's `jiffies_64`."""

    def __init__(self, source: PhysicalSource, location: KernelLocation, profile: Profile) -> None:
        self.source = source
        self.paddr = _jiffies_paddr(location, profile)
        self.value = self._read()
        self._changed = time.monotonic()
        self._next = 0.0

    def _read(self) -> int | None:
        if self.paddr is None:
            return None
        try:
            return int.from_bytes(self.source.read(self.paddr, 8), "little")
        except VmiError:
            return None

    def check(self) -> str | None:
        """None while the kernel ticks (or between looks); else why it may be gone.

        "went back" means a new boot for sure; "still" only that the session
        should verify (the guest may be paused or idle).
        """
        now = time.monotonic()
        if now < self._next or self.paddr is None:
            return None
        self._next = now + PULSE_INTERVAL
        value = self._read()
        if value is None or self.value is None:
            self.value = value
            return None
        if value < self.value:
            old, self.value = self.value, value
            return f"the kernel's tick counter went back from {old} to {value}"
        if value != self.value:
            self.value = value
            self._changed = now
            return None
        if now - self._changed > STILL_SECONDS:
            self._changed = now  # verify at most once per STILL_SECONDS
            return "still"
        return None


def _jiffies_paddr(location: KernelLocation, profile: Profile) -> int | None:
    if not profile.has_symbol("jiffies_64"):
        return None
    return location.physical(profile.symbol_address("jiffies_64"))


def runs_on_cpu(source: PhysicalSource, profile: Profile, regs: Registers) -> Accept | None:
    """A check that a located kernel is the one the vCPU's page tables map, if CR3 is known."""
    if regs.cr3 is None:
        return None
    banner = profile.symbol_address("linux_banner")

    def accept(location: KernelLocation) -> bool:
        try:
            want = to_walk(source, location.physical(banner))
        except VmiError:
            return False
        # A vCPU caught in user mode under PTI holds the user copy of a pair, one
        # page after the kernel's: on x86_64 (kernel_dtb) and on i386 PAE too.
        dtbs = {regs.cr3, kernel_dtb(regs.cr3, location.mode)}
        if location.mode is PagingMode.PAE:
            dtbs.add(regs.cr3 & ~PTI_USER_PGD_BIT)
        for dtb in dtbs:
            try:
                tr = Translator(walk_source(source), dtb, location.mode)
                if tr.translate(location.virtual(banner)).paddr == want:
                    return True
            except VmiError:
                continue
        return False

    return accept


def ticks(source: PhysicalSource, profile: Profile, wait: float = TICK_WAIT) -> Accept:
    """A check that a located kernel's tick counter moves within `wait` seconds."""

    def accept(location: KernelLocation) -> bool:
        pulse = KernelPulse(source, location, profile)
        if pulse.paddr is None:
            return True  # nothing to watch: take the kernel found
        start = pulse.value
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            time.sleep(0.02)
            if pulse._read() != start:
                return True
        return False

    return accept


__all__ = ["KernelPulse", "runs_on_cpu", "ticks"]
