"""Where a fleet runs: an existing Dask scheduler, or a local cluster of worker processes.

Processes, not threads: attaching and walking guest structures is pure
Python and holds the GIL. One thread per worker, so the number of workers is
the number of targets in flight.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from vmishell.fleet.errors import FleetError

#: Times a target is started again after the worker running it died (then: WorkerLost).
ALLOWED_FAILURES = 1


def _has_bokeh() -> bool:
    try:
        import bokeh  # noqa: F401
    except ImportError:
        return False
    return True


def connect(scheduler: str | None = None, *, n_workers: int | None = None) -> tuple[Any, Any]:
    """(client, cluster): a client of `scheduler` (or DASK_SCHEDULER_ADDRESS; cluster None),
    else of a new LocalCluster with `n_workers` (default: the cores) single-thread processes."""
    try:
        import dask
        from distributed import Client, LocalCluster
    except ImportError as exc:
        raise FleetError(
            f"a fleet needs dask.distributed (pip install 'vmishell[fleet]'): {exc}"
        ) from exc
    address = scheduler or os.environ.get("DASK_SCHEDULER_ADDRESS")
    try:
        if address:
            return Client(address, timeout="30s"), None
        # The scheduler reads allowed-failures when it starts: one retry, then KilledWorker.
        with dask.config.set({"distributed.scheduler.allowed-failures": ALLOWED_FAILURES}):
            cluster = LocalCluster(
                n_workers=n_workers or os.cpu_count() or 1,
                threads_per_worker=1,
                processes=True,
                dashboard_address=":0" if _has_bokeh() else None,
                silence_logs=logging.ERROR,
            )
        return Client(cluster), cluster
    except (OSError, TimeoutError, RuntimeError) as exc:
        raise FleetError(f"cannot reach the Dask scheduler {address or '(local)'}: {exc}") from exc


def dashboard_link(client: Any) -> str | None:
    """The dashboard's address, when the scheduler serves one."""
    try:
        link = client.dashboard_link
    except (AttributeError, KeyError):
        return None
    return str(link) if link else None


def show_dashboard(client: Any) -> None:
    """In Jupyter (a ZMQ kernel), show the dashboard link once under the cell."""
    try:
        from IPython import get_ipython
        from IPython.display import HTML, display
    except ImportError:
        return
    shell = get_ipython()
    link = dashboard_link(client)
    if link is None or shell is None or "ZMQ" not in type(shell).__name__:
        return
    from html import escape

    display(HTML(f'Dask dashboard: <a href="{escape(link)}" target="_blank">{escape(link)}</a>'))


__all__ = ["ALLOWED_FAILURES", "connect", "dashboard_link", "show_dashboard"]
