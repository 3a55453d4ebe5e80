"""Kinds of target that layers above the session add: `lab:NAME` today, more as they come.

`Session.attach` knows its own layer's targets (images, `qemu:`, LibVMI) and
asks this registry for any other scheme. A package registers an opener by
calling `register` when imported, or by declaring an entry point in the
`vmishell.schemes` group (how the lab's `lab:` is found without the session
importing the lab: the arrows between layers keep pointing one way).
"""

from __future__ import annotations

from collections.abc import Callable
from importlib.metadata import EntryPoint, PackageNotFoundError, distribution, entry_points
from typing import TYPE_CHECKING, Any

from vmishell.errors import SourceError

if TYPE_CHECKING:
    from vmishell.session import Session

#: `opener(rest_of_target, *, profile=..., limits=..., writable=...) -> Session`
Opener = Callable[..., "Session"]

GROUP = "vmishell.schemes"
_openers: dict[str, Opener] = {}


def register(scheme: str, opener: Opener) -> None:
    """Make `SCHEME:REST` targets open with `opener(REST, **options)`."""
    _openers[scheme] = opener


def opener(scheme: str) -> Opener | None:
    """The opener of `scheme`, from the registry or the installed entry points."""
    found = _openers.get(scheme)
    if found is not None:
        return found
    for ep in _own_entry_points(scheme) or entry_points(group=GROUP, name=scheme):
        try:
            loaded: Any = ep.load()
        except ImportError as exc:
            raise SourceError(f"target kind {scheme!r} cannot be loaded: {exc}") from exc
        _openers[scheme] = loaded
        return loaded
    return None


def _own_entry_points(scheme: str) -> list[EntryPoint]:
    """vmishell's own schemes: found without reading every installed package's metadata."""
    try:
        eps = distribution("vmishell").entry_points
    except PackageNotFoundError:
        return []
    return [ep for ep in eps if ep.group == GROUP and ep.name == scheme]


def known() -> list[str]:
    """Schemes that can be opened now."""
    return sorted(set(_openers) | {ep.name for ep in entry_points(group=GROUP)})


__all__ = ["GROUP", "Opener", "known", "opener", "register"]
