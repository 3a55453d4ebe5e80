"""vmishell's error types: the only exceptions that leave the library.

Every message says what failed and where (address, level, structure), so an
analyst reading one line in a notebook knows what to look at next.
"""

from __future__ import annotations


class VmiError(Exception):
    """Root of every error vmishell raises on purpose."""

    def _render_traceback_(self) -> list[str]:
        """Let IPython show a vmishell error as one line (`%tb` shows the rest)."""
        return [f"{type(self).__name__}: {self}"]


class SourceError(VmiError):
    """A memory source could not be opened or used."""


class PhysicalReadError(SourceError):
    """A physical read touched an address outside the guest's RAM."""

    def __init__(self, paddr: int, size: int, reason: str = "outside guest RAM") -> None:
        self.paddr = paddr
        self.size = size
        super().__init__(f"cannot read {size} bytes at physical {paddr:#x}: {reason}")


class RegistersUnavailable(SourceError):
    """The source cannot tell the guest's CPU registers."""


class TranslationError(VmiError):
    """A virtual address could not be translated."""


class PageFault(TranslationError):
    """A page walk met a non-present entry or an invalid address.

    `level` names the paging level ("PML4", "PDPT", "PD", "PT", ...) whose entry
    stopped the walk; `entry` is that entry's raw value (None for a
    non-canonical address, caught before any table is read).
    """

    def __init__(
        self,
        vaddr: int,
        level: str,
        entry: int | None = None,
        entry_address: int | None = None,
        reason: str = "not present",
    ) -> None:
        self.vaddr = vaddr
        self.level = level
        self.entry = entry
        self.entry_address = entry_address
        self.reason = reason
        where = f" at {level}"
        if entry_address is not None:
            where += f" entry {entry_address:#x}"
        if entry is not None:
            where += f" = {entry:#x}"
        super().__init__(f"page fault translating {vaddr:#x}{where}: {reason}")


class ProfileError(VmiError):
    """A kernel profile (ISF, BTF, kallsyms) is missing, malformed or does not match."""


class SymbolNotFound(ProfileError):
    """A symbol, type or field is absent from the profile."""


class KernelImageError(ProfileError):
    """A file is not a kernel image vmishell can read (or is truncated)."""


class PackageError(VmiError):
    """A distribution package (.deb) is malformed, truncated or cannot be read."""


class GuestDataError(VmiError):
    """Guest memory holds data that cannot be trusted (cycle, bad pointer, over a limit)."""


class LabError(VmiError):
    """A lab guest could not be built, started, reached or stopped."""


class NoSuchInstance(LabError):
    """No lab instance (or VM) of that name exists at all (as opposed to one that died)."""


class MissingToolError(LabError):
    """A host program vmishell needs is not installed; names the Debian package."""

    def __init__(self, program: str, package: str) -> None:
        self.program = program
        self.package = package
        super().__init__(f"{program} not found: install it with `apt-get install {package}`")


class QmpError(SourceError):
    """A QMP command to a QEMU guest failed or the socket could not be reached."""


class TargetGone(SourceError):
    """The target can no longer answer: the session was closed or the guest ended."""


class SessionClosed(TargetGone):
    """The session (or source) was closed; nothing of the target is mapped any more."""


class TargetEnded(TargetGone):
    """A live target ended (VM process exited, RAM file truncated or removed).

    `when` is the host time (seconds since the epoch) at which vmishell noticed.
    """

    def __init__(self, message: str, when: float) -> None:
        self.when = when
        super().__init__(message)


class StaleObjectError(VmiError):
    """An object (a Process) was taken from a boot of the guest that has since ended."""


class GuestRebooting(SourceError):
    """The guest was reset and its new kernel cannot be found yet (it is still booting)."""
