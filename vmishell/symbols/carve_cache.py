"""Carved profiles: built in memory for the attach, cached on disk for the next one.

The cache file is named by banner and BTF checksum (`CarvedKernel.filename`)
in `locations.carved_dir()`, a folder the finder searches; a cached profile
matched by banner is used only if the guest's BTF still has its checksum.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vmishell.errors import ProfileError, VmiError
from vmishell.limits import Limits
from vmishell.sources.base import PhysicalSource
from vmishell.symbols.carve_btf import read_btf
from vmishell.symbols.locations import carved_dir

if TYPE_CHECKING:  # the carver (numpy) is imported only when a profile is carved
    from vmishell.symbols.carve import Progress


def _warn(message: str, *args: object) -> None:
    """Log a warning; `logging` is imported only then (it costs every attach ~4 ms)."""
    import logging

    logging.getLogger(__name__).warning(message, *args)


def carve_profile(
    source: PhysicalSource,
    limits: Limits | None = None,
    *,
    cache: bool = True,
    progress: Progress | None = None,
) -> Any:
    """A Profile carved from `source`; written to the carved-profiles cache in the background.

    The cache file is named by banner and BTF checksum, and the finder searches
    that folder, so the next attach to this kernel loads it instead of carving.
    """
    from vmishell.symbols.carve import CARVED_SUFFIX, carve_kernel, carved_isf
    from vmishell.symbols.profile import Profile

    carved = carve_kernel(source, limits, progress)
    isf = carved_isf(carved, source.description, progress)
    name = carved.filename().removesuffix(CARVED_SUFFIX)
    profile = Profile.from_isf(isf, name=name, lazy_types=True)
    if cache:
        path = carved_dir() / carved.filename()
        profile.path = path
        _save_in_background(isf, path)
    return profile


_writers: list[threading.Thread] = []


def _save_in_background(isf: dict, path: Path) -> None:
    """Write the ISF (and compile it into the profile cache) without delaying the attach.

    The work (JSON, gzip, compiling: seconds of CPU) runs in a forked child
    where the platform allows, so it neither holds this process's GIL nor
    makes the caller wait; a thread reaps the child. Elsewhere a thread does it.
    """

    def save() -> None:
        from vmishell.symbols.isf_build import write_isf
        from vmishell.symbols.profile import load_profile

        try:
            write_isf(isf, path)
            load_profile(path)
        except (OSError, VmiError) as exc:
            _warn("carved profile not cached at %s: %s", path, exc)

    fork = getattr(os, "fork", None)
    if fork is None:
        thread = threading.Thread(target=save, name="vmishell-carve-save")
    else:
        pid = fork()
        if pid == 0:  # the child: save, then leave without running the parent's cleanup
            code = 1
            try:
                with contextlib.suppress(OSError):
                    os.nice(10)  # background work: the attach that goes on comes first
                save()
                code = 0
            finally:
                os._exit(code)
        # The reaper holds the ISF until the child is gone: freed here meanwhile, its
        # ~10^6 objects would each cost a copy-on-write page copy of what the child reads.
        thread = threading.Thread(target=_reap, args=(pid, isf), name="vmishell-carve-save")
    _writers.append(thread)
    thread.start()


def _reap(pid: int, isf: dict) -> None:
    """Wait for the saving child; `isf` is released (and freed) only after it exits."""
    os.waitpid(pid, 0)


def wait_for_cache() -> None:
    """Block until carved profiles started in the background are on disk (tests, CLI)."""
    while _writers:
        _writers.pop().join()


def find_or_carve(source: PhysicalSource, limits: Limits | None = None) -> Any:
    """The matching profile on disk, else one carved from `source` (verify it before use).

    A carved profile from the cache matched by banner is kept only if the BTF in
    memory still has its checksum: another build with the same banner is carved anew.
    """
    from vmishell.symbols.finder import find_profile

    try:
        found = find_profile(source, limits=limits)
    except ProfileError as missing:
        from vmishell.symbols.carve import MissingBtf

        try:
            return carve_profile(source, limits)
        except MissingBtf as exc:
            raise MissingBtf(f"{missing}. Carving from memory failed too: {exc}") from exc
        except ProfileError as exc:
            raise ProfileError(f"{missing}. Carving from memory failed too: {exc}") from exc
    wanted = found.producer.get("btf_sha256")
    if wanted and not _btf_in_memory_is(source, found, wanted, limits or Limits()):
        _warn("cached %s: the guest's BTF differs; carving again", found.name)
        return carve_profile(source, limits)
    return found


def _btf_in_memory_is(source: PhysicalSource, profile: Any, wanted: str, limits: Limits) -> bool:
    """Whether the BTF where the profile's kernel sits in `source` has checksum `wanted`."""
    from vmishell.symbols.placement import KernelHints, aligned_shifts, kernel_phys

    if not profile.has_symbol("__start_BTF"):
        return False
    hints = KernelHints.from_profile(profile)
    start = profile.symbol_address("__start_BTF")
    for shift in aligned_shifts(source, hints, limits):
        try:
            _, blob = read_btf(source, kernel_phys(hints.arch, start, shift))
        except ProfileError:
            continue
        if hashlib.sha256(blob).hexdigest() == wanted:
            return True
    return False


def is_carved(profile: Any) -> bool:
    """Whether a profile came from guest memory (fresh or from the carved cache)."""
    return bool(profile.producer.get("btf_sha256")) or profile.origin == "carved"
