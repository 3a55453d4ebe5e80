"""Choose the profile that matches the kernel in guest memory.

Profiles come from the folders `vmishell.symbols.locations` lists: the
project's `profiles/`, `$VMISHELL_PROFILE_PATH`,
`~/.local/share/vmishell/profiles` and the cache where `vmishell lab build`
and `vmishell profile build` leave theirs. A profile matches when its
`linux_banner` text sits in guest memory where a kernel image could have been
placed and `init_task` checks out beside it.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

from vmishell.errors import ProfileError, VmiError
from vmishell.limits import Limits
from vmishell.sources.base import PhysicalSource
from vmishell.symbols.locations import default_cache_dir, profile_dirs
from vmishell.symbols.placement import KernelHints, aligned_shifts, shifts_at
from vmishell.symbols.profile import Profile, load_profile

PROFILE_SUFFIXES = (".json", ".json.xz", ".json.gz")
_BANNER_RE = re.compile(rb"Linux version [0-9][\x20-\x7e]{10,400}")


def candidate_profiles(extra_dirs: list[Path] | None = None) -> Iterator[Path]:
    for d in [*(extra_dirs or []), *profile_dirs()]:
        for path in sorted(d.iterdir()):
            if path.name.endswith(PROFILE_SUFFIXES):
                yield path


def banners_in(
    source: PhysicalSource, limit: int = 8, scan: int | None = None
) -> list[tuple[int, str]]:
    """(physical address, text) of distinct `Linux version ...` banners in memory.

    At most `scan` occurrences of the prefix are looked at: a guest can fill
    its RAM with the words, and each costs a read and a match.
    """
    scan = Limits().max_banner_scan if scan is None else scan
    found: list[tuple[int, str]] = []
    texts: set[str] = set()
    for n, paddr in enumerate(source.find(b"Linux version ")):
        if n >= scan:
            break
        try:
            text = source.read(paddr, min(420, source.size - paddr))
        except VmiError:
            continue
        m = _BANNER_RE.match(text)
        if m:
            banner = m.group(0).decode("ascii", "replace")
            found.append((paddr, banner))
            texts.add(banner)
            if len(found) >= limit * 4 or len(texts) >= limit:
                break
    return found


class ProfileIndex:
    """What finding a kernel needs from each profile, cached by file identity.

    Choosing among many profiles then costs a few small reads of guest memory
    per profile, not a profile load each.
    """

    def __init__(self, path: Path | None = None) -> None:
        self.path = path or default_cache_dir() / "profile-index.json"
        try:
            self._entries: dict[str, dict[str, object]] = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self._entries = {}
        self._dirty = False

    @staticmethod
    def _key(path: Path) -> str:
        st = path.stat()
        return f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"

    def hints(self, path: Path) -> KernelHints | None:
        """The kernel hints of a profile file (None if it cannot locate a kernel)."""
        key = self._key(path)
        entry = self._entries.get(key)
        if entry is None:
            try:
                hints = KernelHints.from_profile(load_profile(path))
                entry = asdict(hints)
                entry["banner"] = hints.banner.decode("latin-1")
            except VmiError as exc:
                entry = {"error": str(exc)}
            self._entries[key] = entry
            self._dirty = True
        if "error" in entry:
            return None
        data = dict(entry)
        data["banner"] = str(data["banner"]).encode("latin-1")
        return KernelHints(**data)  # type: ignore[arg-type]

    def save(self) -> None:
        if not self._dirty:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(self._entries))
            tmp.replace(self.path)
        except OSError:
            pass  # an index is an optimisation; never fail an attach over it


def find_profile(
    source: PhysicalSource,
    extra_dirs: list[Path] | None = None,
    limits: Limits | None = None,
) -> Profile:
    """The profile whose kernel is in `source`; ProfileError says what was seen if none."""
    limits = limits or Limits()
    index = ProfileIndex()
    candidates: list[tuple[Path, KernelHints]] = []
    for path in candidate_profiles(extra_dirs):
        hints = index.hints(path)
        if hints is not None:
            candidates.append((path, hints))
    index.save()
    for path, hints in candidates:
        if aligned_shifts(source, hints, limits):
            return load_profile(path)
    # No kernel on the 2 MiB grid: look for banners anywhere, once for all profiles.
    # With no profile to match, the first banner is enough to say what is there.
    seen = banners_in(source, limit=8 if candidates else 1, scan=limits.max_banner_scan)
    for path, hints in candidates:
        paddrs = [a for a, text in seen if text.encode("latin-1") == hints.banner]
        if paddrs and shifts_at(source, hints, paddrs):
            return load_profile(path)
    texts = list(dict.fromkeys(text for _, text in seen))
    what = "; ".join(repr(b) for b in texts[:3]) if texts else "no Linux banner at all"
    raise ProfileError(
        f"no profile matches the kernel in {source.description} (found {what}; tried "
        f"{len(candidates)} profiles). Build one from the guest's kernel package with "
        "`vmishell profile build linux-image-<release>.deb` and put it in "
        "~/.local/share/vmishell/profiles or $VMISHELL_PROFILE_PATH"
    )
