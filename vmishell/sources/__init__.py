"""Sources of guest-physical memory: live QEMU RAM files, raw, ELF and LiME images, LibVMI."""

from __future__ import annotations

import os
from pathlib import Path

from vmishell.errors import SourceError
from vmishell.sources.base import PhysicalSource, PhysRange, Registers, Segment
from vmishell.sources.memory import BufferSource

__all__ = [
    "BufferSource",
    "PhysRange",
    "PhysicalSource",
    "Registers",
    "Segment",
    "open_image",
]


def open_image(path: str | os.PathLike[str]) -> PhysicalSource:
    """Open a memory image, choosing the format from its first bytes."""
    p = Path(path)
    try:
        with p.open("rb") as f:
            magic = f.read(16)
    except FileNotFoundError:
        raise SourceError(f"no such image: {p}") from None
    except OSError as exc:
        raise SourceError(f"cannot open {p}: {exc.strerror}") from None
    if magic[:4] == b"\x7fELF":
        from vmishell.sources.elfcore import ElfCoreSource

        return ElfCoreSource(p)
    from vmishell.sources.kdump import is_kdump

    if is_kdump(magic):  # makedumpfile's format, plain or flattened (virsh dump, kdump-tools)
        from vmishell.sources.kdump import KdumpSource

        return KdumpSource(p)
    if magic[:4] in (b"EMiL", b"AVML"):  # LiME; AVML's compressed LiME
        from vmishell.sources.lime import LimeSource

        return LimeSource(p)
    from vmishell.sources.files import RawImageSource

    return RawImageSource(p)
