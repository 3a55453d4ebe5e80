"""Which kernel locator serves a profile: x86 (`kernel`) or arm64 (`arm64`).

The architecture is the profile's, decided once here; neither locator asks.
"""

from __future__ import annotations

from collections.abc import Callable

from vmishell.limits import Limits
from vmishell.os.linux.arm64 import is_arm64, locate_arm64
from vmishell.os.linux.kernel import KernelLocation, locate_kernel
from vmishell.sources.base import PhysicalSource, Registers
from vmishell.symbols.profile import Profile


def locate(
    source: PhysicalSource,
    profile: Profile,
    limits: Limits | None = None,
    *,
    accept: Callable[[KernelLocation], bool] | None = None,
    regs: Registers | None = None,
) -> KernelLocation:
    """The kernel `profile` describes, found by the locator of its architecture."""
    if is_arm64(profile):
        return locate_arm64(source, profile, limits, accept=accept, regs=regs)
    return locate_kernel(source, profile, limits, accept=accept, regs=regs)


__all__ = ["locate"]
