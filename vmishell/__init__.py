"""vmishell: look inside running virtual machines from IPython and Jupyter.

`from vmishell import Session` is the plain API (`Session`, `Process`,
`Limits`, `VmiError`). Those names are imported on first use (PEP 562), and
`%load_ext vmishell` imports the magics only then, so `import vmishell`
stays cheap for scripts, the command line and IPython start-up.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vmishell.errors import VmiError
    from vmishell.limits import Limits
    from vmishell.session import Process, Session

__version__ = "0.1.0"

#: Public name -> the module that defines it, imported on first access.
_LAZY = {
    "Session": "vmishell.session",
    "Process": "vmishell.session",
    "Limits": "vmishell.limits",
    "VmiError": "vmishell.errors",
}

__all__ = [
    "Limits",
    "Process",
    "Session",
    "VmiError",
    "__version__",
    "load_ipython_extension",
    "unload_ipython_extension",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'vmishell' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


def load_ipython_extension(ipython: Any) -> None:
    """Called by `%load_ext vmishell`."""
    from vmishell.frontends.magics import load

    load(ipython)


def unload_ipython_extension(ipython: Any) -> None:
    """Called by `%unload_ext vmishell`: detaches every target and removes the magics."""
    from vmishell.frontends.magics import unload

    unload(ipython)
