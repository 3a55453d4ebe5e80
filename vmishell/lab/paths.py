"""Where the lab keeps downloads, built images and the files of running guests.

Downloads and images are large and reusable, so they live in a cache that
survives reboots; run directories hold sockets and pid files that mean
nothing after a reboot, so they prefer $XDG_RUNTIME_DIR. Guest RAM lives in
/dev/shm so that reading it is reading memory, not disk.

Layout under the cache root ($VMISHELL_CACHE, else $XDG_CACHE_HOME/vmishell/lab,
else ~/.cache/vmishell/lab):

    apt/<debian-arch>/        private apt state (lists/, cache/): the system's is untouched
    debs/<debian-arch>/       downloaded .deb files, kept (the profile builder reads them)
    images/<image>/           vmlinuz, initramfs.cpio.gz, config, manifest.json
    run/<instance>/           run dirs when $XDG_RUNTIME_DIR is unset
"""

from __future__ import annotations

import os
from pathlib import Path

#: Where guest RAM files go: tmpfs, so the host reads guest memory at memory speed.
SHM_DIR = Path("/dev/shm")


def cache_root() -> Path:
    """The lab's cache directory (not created here)."""
    explicit = os.environ.get("VMISHELL_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "vmishell" / "lab"


def run_root() -> Path:
    """The parent of every instance's run directory."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return Path(runtime) / "vmishell" / "lab"
    return cache_root() / "run"


def ram_path(name: str) -> Path:
    """The RAM file of instance `name`."""
    return SHM_DIR / f"vmishell-{name}.ram"
