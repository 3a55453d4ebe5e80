"""The same vmishell question asked of a fleet of guests and images at once, on Dask.

    from vmishell.fleet import Fleet

    with Fleet(["lab:a", "lab:b", "images/*.raw"]) as fleet:
        ps = fleet.processes()          # one frame, a `target` column first
        fleet.errors                    # targets that gave no answer, and why

See `core.Fleet`; targets and placement in `targets`, bounds in `bounds`.
Names load on first use, so `vmishell fleet -h` and the sandbox stay light.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "Bounds": "vmishell.fleet.bounds",
    "Fleet": "vmishell.fleet.core",
    "FleetError": "vmishell.fleet.errors",
    "OutputTooLarge": "vmishell.fleet.errors",
    "Target": "vmishell.fleet.targets",
    "TargetTimeout": "vmishell.fleet.errors",
    "WorkerLost": "vmishell.fleet.errors",
}


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'vmishell.fleet' has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name]), name)


__all__ = sorted(_WHERE)
