"""Search guest memory: every process's mappings, the kernel's, or all of physical RAM.

`search()` is what `Session.search`, `%search` and `vmishell search` call;
`PhysicalView.search()` is `s.physical.search(...)`. Both return one row per
hit and per mapping that sees it (see `engine` for how frames shared by
several processes are scanned once).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import TYPE_CHECKING

from vmishell.search.engine import META_KEY, SEARCH_COLUMNS, Scan, progress_bar, run
from vmishell.search.engine import search_physical as _search_physical
from vmishell.search.engine import search_regions as _search_regions
from vmishell.search.patterns import DEFAULT_OVERLAP, PatternError, compile_pattern
from vmishell.search.regions import collect, user_processes

if TYPE_CHECKING:
    import pandas as pd

    from vmishell.session import Session

Pattern = bytes | str | re.Pattern[bytes]
DEFAULT_CONTEXT = 16
_HEX = ["vaddr", "paddr", "start", "end", "file_offset"]


def _scan(
    session: Session,
    pattern: Pattern,
    kind: str | None,
    encoding: str,
    overlap: int,
    max_hits: int | None,
    context: int,
    progress: bool | None,
) -> Scan:
    limits = session.limits
    if context < 0 or context > limits.max_context:
        raise PatternError(f"context must be 0..{limits.max_context} bytes (Limits.max_context)")
    hits = limits.max_hits if max_hits is None else max_hits
    if not 0 < hits <= limits.max_hits:
        raise PatternError(f"max_hits must be 1..{limits.max_hits} (Limits.max_hits)")
    matcher = compile_pattern(pattern, kind=kind, encoding=encoding, overlap=overlap)
    return Scan(session, matcher, hits, context)


def search(
    session: Session,
    pattern: Pattern,
    *,
    pids: Iterable[int] | None = None,
    kernel: bool = False,
    kind: str | None = None,
    encoding: str = "utf-8",
    max_hits: int | None = None,
    context: int = DEFAULT_CONTEXT,
    overlap: int = DEFAULT_OVERLAP,
    progress: bool | None = None,
) -> pd.DataFrame:
    """Hits of `pattern` in the user memory of processes (all, or `pids`), and the kernel's.

    `kind` is "bytes", "text" (in `encoding`), "hex" ("de ad ?? ef"), "regex"
    or "yara" (rule text); by default bytes are bytes and a str is text.
    """
    scan = _scan(session, pattern, kind, encoding, overlap, max_hits, context, progress)
    pid_list = None if pids is None else list(pids)
    processes = [] if pid_list == [0] else user_processes(session, pid_list)
    regions = collect(session, processes, kernel=kernel or (pid_list is not None and 0 in pid_list))
    scan.problems.extend(regions.problems)
    if regions.stopped:
        scan.problems.append(regions.stopped)
    total = sum(end - start for start, end in regions.frames())
    scan.progress = progress_bar(total, progress, "search")
    run(scan, lambda: _search_regions(scan, regions))
    return scan.finish(SEARCH_COLUMNS, _HEX)


class PhysicalView:
    """Guest-physical memory as a whole: `s.physical.search(...)`."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def search(
        self,
        pattern: Pattern,
        *,
        kind: str | None = None,
        encoding: str = "utf-8",
        max_hits: int | None = None,
        context: int = DEFAULT_CONTEXT,
        overlap: int = DEFAULT_OVERLAP,
        reverse_map: bool = True,
        progress: bool | None = None,
    ) -> pd.DataFrame:
        """Hits anywhere in RAM, mapped or not; each mapped hit once per process or kernel
        address that maps it (a reverse map built once for this call), an unmapped one
        once with an empty pid."""
        session = self.session
        scan = _scan(session, pattern, kind, encoding, overlap, max_hits, context, progress)
        session._begin()
        if reverse_map:
            regions = collect(session, user_processes(session, None), kernel=True)
        else:
            regions = collect(session, [], kernel=False)
        scan.problems.extend(regions.problems)
        if regions.stopped:
            scan.problems.append(regions.stopped)
        total = sum(r.size for r in session.source.ranges())
        scan.progress = progress_bar(total, progress, "physical search")
        run(scan, lambda: _search_physical(scan, regions))
        return scan.finish(SEARCH_COLUMNS, _HEX)

    def __repr__(self) -> str:
        return f"<PhysicalView of {self.session.name}>"


__all__ = [
    "META_KEY",
    "SEARCH_COLUMNS",
    "PatternError",
    "PhysicalView",
    "compile_pattern",
    "search",
]
