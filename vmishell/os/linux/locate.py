"""Which kernel locator serves a profile: x86 (`kernel`) or arm64 (`arm64`).

The architecture is the profile's, decided once here; neither locator asks.
The arm64 locator (and its walker) is imported only for an arm64 profile:
an x86 attach does not pay for it.
"""

from __future__ import annotations

from collections.abc import Callable

from vmishell.limits import Limits
from vmishell.os.linux.kernel import KernelLocation, locate_kernel
from vmishell.sources.base import PhysicalSource, Registers
from vmishell.symbols.profile import Profile


def is_arm64(profile: Profile) -> bool:
    """Whether the profile describes an arm64 kernel.

    The producer says so when vmishell built the profile (its `arch`, "aarch64");
    otherwise arm64's own CPU record (`struct cpuinfo_arm64`, in every arm64 BTF
    and DWARF) tells it apart from x86's `cpuinfo_x86`.
    """
    producer = profile.producer
    for key in ("arch", "architecture"):
        value = str(producer.get(key, "")).lower()
        if value in ("arm64", "aarch64"):
            return True
        if value:
            return False
    return profile.pointer_size == 8 and profile.has_type("cpuinfo_arm64")


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
        from vmishell.os.linux.arm64 import locate_arm64

        return locate_arm64(source, profile, limits, accept=accept, regs=regs)
    return locate_kernel(source, profile, limits, accept=accept, regs=regs)


__all__ = ["is_arm64", "locate"]
