"""The attached targets of one IPython shell: several sessions, one of them current.

The magics object owns a `Targets` (never a module global), so two shells
in one process, or a reloaded extension, do not share sessions. A target
also tracks the watchers started on it: detaching stops and joins them
before the session's source is closed, so no thread reads a closed file.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from vmishell.errors import VmiError

if TYPE_CHECKING:
    import pandas as pd

    from vmishell.frontends.watch import Watcher
    from vmishell.session import Session


class NoTargetError(VmiError):
    """A magic needs an attached target and there is none (or not that one)."""


@dataclass(eq=False)
class Target:
    """One attached session under a short name."""

    name: str
    spec: str
    session: Session
    watchers: list[Watcher] = field(default_factory=list)
    attached: bool = True

    @property
    def live(self) -> bool:
        return self.session.live

    @property
    def writable(self) -> bool:
        return bool(getattr(self.session.source, "writable", False))

    def describe(self) -> str:
        """'dev: lab:dev, live (running), read-only; linux-6.1…, x86_64 LEVEL4'."""
        s = self.session
        loc = s.guest.location
        live = f"live ({s.poll()})" if self.live else "image (not live)"
        rw = "writable" if self.writable else "read-only"
        return f"{self.name}: {s.name}, {live}, {rw}; {s.profile.name}, {loc.arch} {loc.mode.name}"

    def __repr__(self) -> str:
        return f"<{self.state} {self.describe()}>"

    @property
    def state(self) -> str:
        return "attached" if self.attached else "detached"

    def _repr_pretty_(self, p: object, cycle: bool) -> None:
        from vmishell.frontends.text import safe_text

        p.text(f"{self.state} {safe_text(self.describe())}")  # type: ignore[attr-defined]

    def stop_watchers(self, reason: str) -> None:
        for w in self.watchers:
            w.stop(reason)
        self.watchers.clear()


def default_name(spec: str) -> str:
    """A short name for a target string: the lab instance, or the file's name."""
    if spec.startswith("lab:"):
        return spec[4:]
    if spec.startswith("qemu:"):
        return Path(spec[5:].partition(",")[0]).name or "qemu"
    if spec.startswith("xen:"):
        return spec[4:] or "xen"
    if os.sep in spec or Path(spec).exists():
        return Path(spec).name
    return spec


Opener = Callable[..., "Session"]


def _open(spec: str, *, profile: str | None, writable: bool) -> Session:
    from vmishell.session import Session

    return Session.attach(spec, profile=profile, writable=writable)


class Targets:
    """Attached sessions by name, with a current one."""

    def __init__(self, opener: Opener = _open) -> None:
        self._open = opener
        self._targets: dict[str, Target] = {}
        self._current: str | None = None

    def __len__(self) -> int:
        return len(self._targets)

    def names(self) -> list[str]:
        return list(self._targets)

    def attach(
        self,
        spec: str,
        *,
        name: str | None = None,
        profile: str | None = None,
        writable: bool = False,
    ) -> Target:
        name = name or default_name(spec)
        if name in self._targets:
            raise VmiError(
                f"a target named {name!r} is already attached; %detach {name} first or pass --name"
            )
        session = self._open(spec, profile=profile, writable=writable)
        target = Target(name, spec, session)
        self._targets[name] = target
        self._current = name
        return target

    def get(self, name: str | None = None) -> Target:
        """The named target, or the current one."""
        if name is None:
            if self._current is None:
                raise NoTargetError("no target attached: use %attach TARGET first")
            return self._targets[self._current]
        try:
            return self._targets[name]
        except KeyError:
            known = ", ".join(self._targets) or "none"
            raise NoTargetError(f"no target named {name!r} (attached: {known})") from None

    @property
    def current(self) -> Target:
        return self.get()

    def use(self, name: str) -> Target:
        target = self.get(name)
        self._current = name
        return target

    def add_watcher(self, target: Target, watcher: Watcher) -> list[Watcher]:
        """Track `watcher`; a running watch of the same key (pid and address, or the same
        fields) is stopped and returned: re-running a `w = %watch` cell replaces it."""
        replaced = [w for w in target.watchers if w.running and w.key == watcher.key]
        for old in replaced:
            old.stop("replaced by a new watch of the same target")
        target.watchers[:] = [w for w in target.watchers if w.running]
        target.watchers.append(watcher)
        return replaced

    def watchers(self) -> list[tuple[Target, Watcher]]:
        """Every watch of every attached target, running or ended, oldest first."""
        return [(t, w) for t in self._targets.values() for w in t.watchers]

    def stop_all_watchers(self, reason: str = "%watch --stop-all") -> int:
        """Stop every running watch of every target; how many were running."""
        count = 0
        for _t, w in self.watchers():
            if w.running:
                w.stop(reason)
                count += 1
        return count

    def watchers_frame(self) -> pd.DataFrame:
        """One row per watch: target, pid, what it watches, state and counts."""
        import pandas as pd

        from vmishell.frontends.frames import guest_frame

        rows = [
            (t.name, w.pid, w.target, w.running, w.samples, len(w.history), w.status())
            for t, w in self.watchers()
        ]
        cols = ["target", "pid", "watch", "running", "samples", "changes", "status"]
        return guest_frame(pd.DataFrame(rows, columns=cols))

    def detach(self, name: str | None = None) -> Target:
        """Stop the target's watchers, close its session, pick another current one."""
        target = self.get(name)
        try:
            target.stop_watchers(f"target {target.name} detached")
        finally:
            del self._targets[target.name]
            if self._current == target.name:
                self._current = next(reversed(self._targets), None) if self._targets else None
            target.attached = False
            target.session.close()
        return target

    def detach_all(self) -> None:
        for name in list(self._targets):
            with contextlib.suppress(VmiError):
                self.detach(name)

    def frame(self) -> pd.DataFrame:
        import pandas as pd

        from vmishell.frontends.frames import guest_frame

        rows = []
        for t in self._targets.values():
            loc = t.session.guest.location
            rows.append(
                (
                    "*" if t.name == self._current else "",
                    t.name,
                    t.session.name,
                    t.session.poll() if t.attached else "detached",
                    t.live,
                    t.writable,
                    t.session.profile.name,
                    f"{loc.arch} {loc.mode.name}",
                    sum(1 for w in t.watchers if w.running),
                )
            )
        cols = [
            "current", "name", "target", "state", "live", "writable", "profile", "paging",
            "watches",
        ]  # fmt: skip
        return guest_frame(pd.DataFrame(rows, columns=cols))


__all__ = ["NoTargetError", "Target", "Targets", "default_name"]
