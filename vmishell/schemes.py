"""Kinds of target that layers above the session add: `lab:NAME` today, more as they come.

`Session.attach` knows its own layer's targets (images, `qemu:`, LibVMI) and
asks this registry for any other scheme. A package registers an opener by
calling `register` when imported, or by declaring an entry point in the
`vmishell.schemes` group (how the lab's `lab:` is found without the session
importing the lab: the arrows between layers keep pointing one way).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from vmishell.errors import SourceError

if TYPE_CHECKING:
    from vmishell.session import Session

#: `opener(rest_of_target, *, profile=..., limits=..., writable=...) -> Session`
Opener = Callable[..., "Session"]

GROUP = "vmishell.schemes"
_openers: dict[str, Opener] = {}
#: vmishell's own entry points (as in pyproject.toml), loaded by name without reading
#: any package metadata: importlib.metadata (email, calendar, ...) alone was a third
#: of the time `import vmishell.session` took, for every attach.
_OWN = {"lab": "vmishell.lab.target:open_lab"}


def register(scheme: str, opener: Opener) -> None:
    """Make `SCHEME:REST` targets open with `opener(REST, **options)`."""
    _openers[scheme] = opener


def opener(scheme: str) -> Opener | None:
    """The opener of `scheme`, from the registry or the installed entry points."""
    found = _openers.get(scheme)
    if found is not None:
        return found
    if scheme in _OWN:
        module, _, name = _OWN[scheme].partition(":")
        try:
            loaded: Any = getattr(importlib.import_module(module), name)
        except ImportError as exc:
            raise SourceError(f"target kind {scheme!r} cannot be loaded: {exc}") from exc
        _openers[scheme] = loaded
        return loaded
    from importlib.metadata import entry_points

    for ep in entry_points(group=GROUP, name=scheme):
        try:
            loaded = ep.load()
        except ImportError as exc:
            raise SourceError(f"target kind {scheme!r} cannot be loaded: {exc}") from exc
        _openers[scheme] = loaded
        return loaded
    return None


def known() -> list[str]:
    """Schemes that can be opened now."""
    from importlib.metadata import entry_points

    return sorted(set(_openers) | set(_OWN) | {ep.name for ep in entry_points(group=GROUP)})


__all__ = ["GROUP", "Opener", "known", "opener", "register"]
