"""`%fleet ps|search|maps|run|errors ...`: a Fleet sweep from IPython, returning its frame.

The fleet (and its Dask cluster) lives on the magics object and is reused
while the scheduler and worker count stay the same, so a second `%fleet`
does not start another cluster.
"""

from __future__ import annotations

import sys
from typing import Any

from IPython.core.magic import Magics, line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments
from IPython.utils.process import arg_split

from vmishell.fleet.errors import FleetError

ACTIONS = ("ps", "search", "maps", "run", "errors")


@magics_class
class FleetMagics(Magics):
    """The `%fleet` magic."""

    def __init__(self, shell: Any) -> None:
        super().__init__(shell)
        #: The fleet of the last sweep (`%fleet errors` shows its errors).
        self.last: Any = None
        self._client: Any = None
        self._cluster_key: tuple[Any, ...] | None = None

    def _fleet_for(self, args: Any, targets: list[str]) -> Any:
        from vmishell.fleet import Fleet
        from vmishell.fleet.cluster import connect, show_dashboard

        key = (args.scheduler, args.workers)
        if self._client is None or key != self._cluster_key:
            self.close()
            self._client, self._cluster = connect(args.scheduler, n_workers=args.workers)
            self._cluster_key = key
            show_dashboard(self._client)
        self.last = Fleet(targets, client=self._client, timeout=args.timeout)
        return self.last

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            if self._cluster is not None:
                self._cluster.close()
        self._client = self._cluster = self._cluster_key = None

    @magic_arguments()
    @argument("action", choices=ACTIONS, help="what to ask every target")
    @argument(
        "words",
        nargs="*",
        help="ps: TARGET...; search: PATTERN TARGET...; maps: PID|COMM TARGET...; "
        "run: FUNCTION TARGET... (a function of this namespace taking a Session)",
    )
    @argument("-n", "--name", help="ps: only processes with this comm")
    @argument("--threads", action="store_true", help="ps: one row per thread")
    @argument("--scheduler", help="Dask scheduler address (default: a local cluster)")
    @argument("--workers", type=int, help="workers of the local cluster (default: cores)")
    @argument("--timeout", type=float, default=600.0, help="seconds per target (600)")
    @line_magic
    def fleet(self, line: str = "") -> Any:
        """Ask many guests and images at once; e.g. `%fleet ps -n sshd lab:a images/*.raw`."""
        # Options may come after the targets (`%fleet ps lab:a -n sshd`): intermixed.
        args = self.fleet.parser.parse_intermixed_args(arg_split(line))
        if args.action == "errors":
            if self.last is None:
                raise FleetError("no fleet sweep yet")
            return self.last.errors
        words = list(args.words)
        first = words.pop(0) if args.action != "ps" and words else ""
        if not words:
            raise FleetError(f"%fleet {args.action} needs targets")
        fleet = self._fleet_for(args, words)
        if args.action == "ps":
            df = fleet.processes(threads=args.threads)
            if args.name is not None:
                df = df[df.comm == args.name].reset_index(drop=True)
        elif args.action == "search":
            df = fleet.search(first)
        elif args.action == "maps":
            df = fleet.maps(int(first, 0) if first[:1].isdigit() else first)
        else:
            fn = self.shell.user_ns.get(first) if self.shell is not None else None
            if not callable(fn):
                raise FleetError(f"%fleet run: {first!r} is not a function of this namespace")
            df = fleet.run(fn)
        if len(fleet.errors):
            print(
                f"%fleet: {len(fleet.errors)} of {len(fleet.timings)} targets gave no answer "
                "(%fleet errors)",
                file=sys.stderr,
            )
        return df


def load(ip: Any) -> FleetMagics:
    magics = FleetMagics(ip)
    ip.register_magics(magics)
    return magics


__all__ = ["ACTIONS", "FleetMagics", "load"]
