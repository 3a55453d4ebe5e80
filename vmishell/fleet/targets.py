"""Fleet targets: the strings `Session.attach` takes, expanded and tagged with where they run.

Globs are expanded on the client for local paths (a worker on another host
sees the same names on shared storage). A target may carry a placement:
Dask `workers=` (addresses or names) or `resources=` (e.g. `{"host-hv1": 1}`
given to the workers of hypervisor host hv1), so a live guest is attached
only by a worker on its own host and its memory never crosses the network.
"""

from __future__ import annotations

import glob
import itertools
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Union

from vmishell.fleet.errors import FleetError

#: `scheme:` prefixes that name a target rather than a file (a Windows-like `C:` is not one).
_SCHEME = re.compile(r"^[a-z][a-z0-9+.-]+:")
_GLOB = re.compile(r"[*?\[]")
#: Paths one glob may expand to: a typo like `/*/*` must not become a million targets.
MAX_GLOB_MATCHES = 100_000


@dataclass(frozen=True)
class Target:
    """One target string and where it may run (None: on any worker)."""

    spec: str
    workers: tuple[str, ...] | None = None
    resources: Mapping[str, float] | None = field(default=None, hash=False)

    def __str__(self) -> str:
        return self.spec


TargetLike = Union[str, "os.PathLike[str]", Target]


def is_scheme(spec: str) -> bool:
    """Whether `spec` names a target kind (`lab:a`, `qmp:/run/q.sock`) rather than a path."""
    return bool(_SCHEME.match(spec)) and not os.path.exists(spec)


def _as_target(item: TargetLike) -> Target:
    if isinstance(item, Target):
        return item
    if isinstance(item, str | os.PathLike):
        return Target(os.fspath(item))
    raise FleetError(f"a fleet target is a string, a path or a Target, not {type(item).__name__}")


def expand(items: Iterable[TargetLike] | TargetLike) -> tuple[list[Target], dict[str, str]]:
    """Targets in order, globs of local paths expanded, duplicates once.

    Returns (targets, problems): a glob that matches nothing is a problem
    (target -> message), reported in the errors frame rather than raised,
    like any other target that gives no answer.
    """
    if isinstance(items, str | os.PathLike | Target):
        items = [items]
    out: list[Target] = []
    seen: set[str] = set()
    problems: dict[str, str] = {}
    for item in items:
        target = _as_target(item)
        spec = target.spec
        if not spec:
            raise FleetError("an empty fleet target")
        if is_scheme(spec) or not _GLOB.search(spec) or os.path.exists(spec):
            specs = [spec]
        else:
            matches = glob.iglob(os.path.expanduser(spec))
            specs = sorted(itertools.islice(matches, MAX_GLOB_MATCHES + 1))
            if len(specs) > MAX_GLOB_MATCHES:
                raise FleetError(f"{spec} matches over {MAX_GLOB_MATCHES} paths")
            if not specs:
                problems[spec] = f"no file matches {spec}"
                continue
            specs = [p for p in specs if not os.path.isdir(p)]
        for one in specs:
            if one in seen:
                continue
            seen.add(one)
            out.append(Target(one, target.workers, target.resources))
    return out, problems


__all__ = ["MAX_GLOB_MATCHES", "Target", "TargetLike", "expand", "is_scheme"]
