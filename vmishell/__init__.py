"""vmishell: look inside running virtual machines from IPython and Jupyter.

`%load_ext vmishell` adds the magics (%attach, %ps, %peek, %translate, %maps,
%dt, %watch, %vol); they are imported only then, so `import vmishell` stays
cheap for scripts and the command line.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def load_ipython_extension(ipython: Any) -> None:
    """Called by `%load_ext vmishell`."""
    from vmishell.frontends.magics import load

    load(ipython)


def unload_ipython_extension(ipython: Any) -> None:
    """Called by `%unload_ext vmishell`: detaches every target and removes the magics."""
    from vmishell.frontends.magics import unload

    unload(ipython)
