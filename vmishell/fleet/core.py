"""`Fleet`: the same vmishell question asked of many guests and images at once, on Dask.

Only target strings, options and functions travel to the workers, and only
bounded result frames travel back: each worker attaches to its targets
itself (in a sandbox process that a per-target timeout can kill), resolving
profiles from its own cache and the shipped ones.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

import pandas as pd

from vmishell.fleet.assemble import Sweep, combine
from vmishell.fleet.bounds import Bounds
from vmishell.fleet.cluster import connect, dashboard_link, show_dashboard
from vmishell.fleet.errors import FleetError, WorkerLost
from vmishell.fleet.targets import Target, TargetLike, expand
from vmishell.fleet.task import Outcome, run_batch, warm

if TYPE_CHECKING:
    from vmishell.session import Session

#: Seconds one target may take (attach and question) before it is cut off and reported.
DEFAULT_TIMEOUT = 600.0


def progress_bar(total: int, enabled: bool | None) -> Any:
    """A tqdm bar counting targets (terminal or Jupyter, as search's), when tqdm is there."""
    if enabled is False or total == 0:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit="target", desc="fleet", leave=False)


def _outcome(spec: str, result: Any, killed: type[BaseException]) -> Outcome:
    """A task's result as an Outcome: its own, or the failure Dask reported for it."""
    if isinstance(result, Outcome):
        return result
    if isinstance(result, tuple) and len(result) == 3 and isinstance(result[1], BaseException):
        result = result[1]  # (type, exception, traceback), as Dask hands back a failed task
    if isinstance(result, killed):
        lost = WorkerLost(f"the worker running it died, also on the retry: {result}")
        return Outcome(spec, error_type=type(lost).__name__, error=str(lost))
    if isinstance(result, BaseException):
        return Outcome(spec, error_type=type(result).__name__, error=str(result))
    return Outcome(spec, error_type="FleetError", error=f"a task returned {type(result).__name__}")


def _batches(jobs: list[tuple[Target, bytes]], size: int) -> list[list[tuple[Target, bytes]]]:
    """Consecutive jobs of the same placement, `size` at most per batch."""
    out: list[list[tuple[Target, bytes]]] = []
    for job in jobs:
        last = out[-1] if out else None
        place = (job[0].workers, job[0].resources)
        if last and len(last) < size and (last[0][0].workers, last[0][0].resources) == place:
            last.append(job)
        else:
            out.append([job])
    return out


class Fleet:
    """Many targets, one question at a time: each method returns one DataFrame with a
    `target` column; targets that gave no answer are rows of `errors` instead.

    Each target is one Dask task by default, so a worker that dies loses only the
    target it was on; `batch=k` sends k targets per task (less scheduling per
    target for many small images, but a dying worker then loses its whole batch).

    `scheduler` is a Dask scheduler address (default: DASK_SCHEDULER_ADDRESS, else a
    local cluster of `n_workers` processes, started on first use); or pass a `client`.
    """

    def __init__(
        self,
        targets: Iterable[TargetLike] | TargetLike,
        scheduler: str | None = None,
        *,
        client: Any = None,
        n_workers: int | None = None,
        profile: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        bounds: Bounds | None = None,
        progress: bool | None = None,
        batch: int = 1,
    ) -> None:
        self.targets, self._problems = expand(targets)
        if not self.targets and not self._problems:
            raise FleetError("a fleet needs at least one target")
        if batch < 1:
            raise FleetError(f"a batch holds at least one target, not {batch}")
        if timeout <= 0:
            raise FleetError(f"the per-target timeout must be positive, not {timeout}")
        self.scheduler = scheduler
        self.n_workers = n_workers
        self.profile = profile
        self.timeout = timeout
        self.bounds = bounds or Bounds()
        self.progress = progress
        self.batch = batch
        self._client = client
        self._cluster: Any = None
        self._owns_client = client is None
        #: Targets of the last sweep that gave no answer: target, error_type, error, worker.
        self.errors = combine([]).errors
        #: What was cut or noticed on the last sweep (bounds reached, search problems).
        self.notes = combine([]).notes
        #: Seconds per target of the last sweep (in the sandbox, and on the worker).
        self.timings = combine([]).timings

    # -- the cluster ------------------------------------------------------------------------
    @property
    def client(self) -> Any:
        """The Dask client, connecting (or starting a local cluster) on first use."""
        if self._client is None:
            self._client, self._cluster = connect(self.scheduler, n_workers=self.n_workers)
            show_dashboard(self._client)
        return self._client

    @property
    def dashboard_link(self) -> str | None:
        return dashboard_link(self.client)

    def warm(self) -> list[str]:
        """Start every worker's sandbox now (imports done), so the first sweep does not pay."""
        return sorted(self.client.run(warm, self.profile))

    def close(self) -> None:
        """Close the client and the local cluster this fleet started (not a given client)."""
        if self._owns_client and self._client is not None:
            self._client.close()
            if self._cluster is not None:
                self._cluster.close()
            self._client = self._cluster = None

    def __enter__(self) -> Fleet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- questions ---------------------------------------------------------------------------
    def processes(self, *, threads: bool = False, cmdline: bool = True) -> pd.DataFrame:
        """Every target's `Session.processes()`."""
        return self.ask("processes", threads=threads, cmdline=cmdline)

    def search(self, pattern: Any, **options: Any) -> pd.DataFrame:
        """Every target's `Session.search(pattern, **options)`."""
        return self.ask("search", pattern=pattern, **options)

    def maps(self, pid_or_comm: int | str) -> pd.DataFrame:
        """The memory maps of one pid, or of every process with that comm, on every target."""
        return self.ask("maps", pid_or_comm=pid_or_comm)

    def run(self, fn: Callable[[Session], Any]) -> pd.DataFrame:
        """`fn(session)` on every target (a frame, a dict or rows, or one value each)."""
        return self.ask("run", fn=fn)

    def snapshot(self, **options: Any) -> dict[str, Any]:
        """A Snapshot per target that answered (target -> Snapshot), for `diff`."""
        outcomes = self._sweep("snapshot", lambda _t: options)
        return {o.target: o.answer for o in outcomes if o.ok}

    def diff(self, before: Mapping[str, Any]) -> pd.DataFrame:
        """What changed on each target since its snapshot in `before` (from `snapshot()`)."""

        def options(target: Target) -> dict[str, Any] | None:
            snap = before.get(target.spec)
            return None if snap is None else {"before": snap}

        return self._finish(self._sweep("diff", options))

    def ask(self, question: str, **options: Any) -> pd.DataFrame:
        """One named question (see `vmishell.fleet.questions`) of every target."""
        return self._finish(self._sweep(question, lambda _t: options))

    # -- the sweep ---------------------------------------------------------------------------
    def _finish(self, outcomes: list[Outcome]) -> pd.DataFrame:
        from vmishell.frontends.frames import guest_frame

        sweep: Sweep = combine(outcomes)
        self.errors, self.notes, self.timings = sweep.errors, sweep.notes, sweep.timings
        return guest_frame(sweep.frame, hex=sweep.frame.attrs.get("vmishell.hex", ()))

    def _sweep(
        self, question: str, options_of: Callable[[Target], dict[str, Any] | None]
    ) -> list[Outcome]:
        import cloudpickle
        from distributed import KilledWorker, as_completed

        done: dict[str, Outcome] = {
            spec: Outcome(spec, error_type="FleetError", error=msg)
            for spec, msg in self._problems.items()
        }
        client = self.client
        jobs: list[tuple[Target, bytes]] = []
        for target in self.targets:
            options = options_of(target)
            if options is None:
                done[target.spec] = Outcome(
                    target.spec, error_type="FleetError", error=f"no {question} input for it"
                )
            else:
                jobs.append((target, cloudpickle.dumps(options)))
        futures: dict[Any, list[str]] = {}
        tag = uuid.uuid4().hex[:8]
        for i, batch in enumerate(_batches(jobs, self.batch)):
            first = batch[0][0]
            future = client.submit(
                run_batch,
                [(t.spec, blob) for t, blob in batch],
                question,
                self.profile,
                self.bounds,
                self.timeout,
                key=f"vmishell-{question}-{tag}-{i}",
                workers=list(first.workers) if first.workers else None,
                resources=dict(first.resources) if first.resources else None,
                allow_other_workers=False,
                retries=1,
                pure=False,
            )
            futures[future] = [t.spec for t, _ in batch]
        bar = progress_bar(len(jobs), self.progress)
        try:
            # Results come with their futures (fetched as they finish, not one round trip
            # each); a failed task's result is its exception.
            for future, result in as_completed(
                list(futures), with_results=True, raise_errors=False
            ):
                specs = futures[future]
                answers = result if isinstance(result, list) else [result] * len(specs)
                for spec, answer in zip(specs, answers, strict=True):
                    done[spec] = _outcome(spec, answer, KilledWorker)
                if bar is not None:
                    bar.update(len(specs))
        finally:
            if bar is not None:
                bar.close()
            for future in futures:
                future.release()
        for specs in futures.values():  # a task Dask cancelled (the client went away)
            for spec in specs:
                done.setdefault(spec, Outcome(spec, error_type="FleetError", error="cancelled"))
        order = [t.spec for t in self.targets] + list(self._problems)
        return [done[spec] for spec in order if spec in done]

    def __repr__(self) -> str:
        where = self.scheduler or ("local cluster" if self._cluster else "not connected")
        return f"<Fleet of {len(self.targets)} targets on {where}>"


__all__ = ["DEFAULT_TIMEOUT", "Fleet", "progress_bar"]
