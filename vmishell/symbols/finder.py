"""Choose the profile that matches the kernel in guest memory.

Profiles come from the project's `profiles/` folder, the folders in
`$VMISHELL_PROFILE_PATH`, `~/.local/share/vmishell/profiles` and the cache
where `vmishell lab build` and `vmishell profile build` leave theirs. A
profile matches when its `linux_banner` text sits in guest memory where a
kernel image could have been placed and `init_task` checks out beside it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

from vmishell.errors import ProfileError, VmiError
from vmishell.limits import Limits
from vmishell.sources.base import PhysicalSource
from vmishell.symbols.profile import Profile, load_profile

PROFILE_SUFFIXES = (".json", ".json.xz", ".json.gz")
_BANNER_RE = re.compile(rb"Linux version [0-9][\x20-\x7e]{10,400}")


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "vmishell"


def profile_dirs() -> list[Path]:
    """Where profiles are looked for, in order of preference."""
    dirs = [Path(p) for p in os.environ.get("VMISHELL_PROFILE_PATH", "").split(os.pathsep) if p]
    repo_profiles = Path(__file__).resolve().parents[2] / "profiles"
    dirs += [
        repo_profiles,
        Path.home() / ".local" / "share" / "vmishell" / "profiles",
        default_cache_dir() / "built-profiles",
    ]
    return [d for d in dirs if d.is_dir()]


def candidate_profiles(extra_dirs: list[Path] | None = None) -> Iterator[Path]:
    for d in [*(extra_dirs or []), *profile_dirs()]:
        for path in sorted(d.iterdir()):
            if path.name.endswith(PROFILE_SUFFIXES):
                yield path


def banners_in(source: PhysicalSource, limit: int = 8) -> list[str]:
    """Distinct `Linux version ...` texts in guest memory (for error messages)."""
    found: list[str] = []
    for paddr in source.find(b"Linux version "):
        try:
            text = source.read(paddr, min(420, source.size - paddr))
        except VmiError:
            continue
        m = _BANNER_RE.match(text)
        if m:
            banner = m.group(0).decode("ascii", "replace")
            if banner not in found:
                found.append(banner)
                if len(found) >= limit:
                    break
    return found


def find_profile(
    source: PhysicalSource,
    extra_dirs: list[Path] | None = None,
    limits: Limits | None = None,
) -> Profile:
    """The profile whose kernel is in `source`; ProfileError says what was seen if none."""
    from vmishell.os.linux.kernel import arch_of, banner_candidates

    limits = limits or Limits()
    tried = []
    for path in candidate_profiles(extra_dirs):
        try:
            profile = load_profile(path)
            if not profile.banner or not profile.has_symbol("linux_banner"):
                continue
            if banner_candidates(source, profile, limits, arch_of(profile)):
                return profile
        except VmiError:
            continue
        tried.append(path.name)
    seen = banners_in(source)
    what = "; ".join(repr(b) for b in seen[:3]) if seen else "no Linux banner at all"
    raise ProfileError(
        f"no profile matches the kernel in {source.description} (found {what}; tried "
        f"{len(tried)} profiles). Build one from the guest's kernel package with "
        "`vmishell profile build linux-image-<release>.deb` and put it in "
        "~/.local/share/vmishell/profiles or $VMISHELL_PROFILE_PATH"
    )
