"""Where profiles live, and what a profile's folder says about where it came from.

Four places, searched in this order: the folders in `$VMISHELL_PROFILE_PATH`,
the project's `profiles/` (shipped with vmishell for the lab's kernels),
`~/.local/share/vmishell/profiles` (the user's) and the cache where
`vmishell profile build` and the lab leave the profiles they build. A user
told "profile: shipped ..." or "profile: built ..." knows whether a profile
came with vmishell or was made on this machine from a kernel package.
"""

from __future__ import annotations

import os
from pathlib import Path

#: origin -> what it means, for messages.
ORIGINS = {
    "shipped": "shipped with vmishell",
    "built": "built on this machine",
    "user": "from a profile folder",
    "file": "from a file",
    "memory": "built in memory",
    "carved": "carved from guest memory",
}


def default_cache_dir() -> Path:
    """$XDG_CACHE_HOME/vmishell, else ~/.cache/vmishell."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "vmishell"


def shipped_dir() -> Path:
    """The project's profiles/ folder (profiles of the lab's kernels).

    In a checkout it is the top-level `profiles/`; an installed wheel carries the
    same files as package data in `vmishell/profiles/` (see setup.py).
    """
    here = Path(__file__).resolve()
    checkout = here.parents[2] / "profiles"
    return checkout if checkout.is_dir() else here.parents[1] / "profiles"


def built_dir() -> Path:
    """Where built profiles go by default."""
    return default_cache_dir() / "built-profiles"


def carved_dir() -> Path:
    """Where profiles carved from guest memory are cached (named by banner and BTF)."""
    return default_cache_dir() / "carved-profiles"


def _env_dirs() -> list[Path]:
    return [Path(p) for p in os.environ.get("VMISHELL_PROFILE_PATH", "").split(os.pathsep) if p]


def _home_dir() -> Path:
    return Path.home() / ".local" / "share" / "vmishell" / "profiles"


def user_dirs() -> list[Path]:
    """$VMISHELL_PROFILE_PATH's folders, then ~/.local/share/vmishell/profiles."""
    return [*_env_dirs(), _home_dir()]


def profile_dirs() -> list[Path]:
    """Where profiles are looked for, in order of preference (existing folders only)."""
    dirs = [*_env_dirs(), shipped_dir(), _home_dir(), built_dir(), carved_dir()]
    return [d for d in dirs if d.is_dir()]


def origin_of(path: Path | None) -> str:
    """The origin (a key of ORIGINS) of a profile file, from the folder it is in."""
    if path is None:
        return "memory"
    folder = path.resolve().parent
    if folder == shipped_dir().resolve():
        return "shipped"
    if folder == built_dir().resolve():
        return "built"
    if folder == carved_dir().resolve():
        return "carved"
    if any(folder == d.resolve() for d in user_dirs()):
        return "user"
    return "file"
