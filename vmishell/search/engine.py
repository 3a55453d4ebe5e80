"""The scan: each physical frame once, seams between runs once, hits to every mapping.

Two passes find every match a process sees in its virtual memory:

1. The merged physical intervals that the runs cover are scanned in large
   chunks that overlap by `span - 1` bytes. A hit is reported for each run
   that holds all of it physically.
2. Where two runs of a process follow each other virtually (a page whose
   neighbour sits in another frame), the few bytes around the seam are put
   together as the process sees them and scanned for matches that cross
   it. A window is keyed by the frames it reads, so processes that share
   them are scanned once.

Bounds: hits (`max_hits`), bytes scanned (`Limits.max_scan_bytes`), context
(`Limits.max_context`); Ctrl-C stops the scan and keeps the hits so far.
What stopped a scan is in the result's `attrs["vmishell.search"]["stopped"]`.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from vmishell.errors import VmiError
from vmishell.search.patterns import Matcher
from vmishell.search.regions import Region, Regions

if TYPE_CHECKING:
    import pandas as pd

    from vmishell.session import Session

#: Bytes read and scanned at once.
CHUNK = 16 << 20
SEARCH_COLUMNS = [
    "pid", "comm", "vaddr", "paddr", "start", "end", "perms", "path", "file_offset",
    "rule", "match", "context",
]  # fmt: skip
META_KEY = "vmishell.search"


class StopScan(Exception):
    """Internal: a bound was reached (the message names it)."""


def escape(data: bytes) -> str:
    """Bytes as printable ASCII: `\\xNN` for everything else (as `repr` of bytes shows)."""
    return repr(bytes(data))[2:-1]


@dataclass
class Scan:
    """One search's state: bounds, counters and the rows found so far."""

    session: Session
    matcher: Matcher
    max_hits: int
    context: int
    progress: Any = None
    rows: list[tuple[Any, ...]] = field(default_factory=list)
    scanned: int = 0
    stopped: str | None = None
    problems: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)

    def __post_init__(self) -> None:
        self.budget = self.session.limits.max_scan_bytes
        self.read = self.session.source.read

    def charge(self, size: int) -> None:
        if self.scanned + size > self.budget:
            raise StopScan(
                f"stopped after {self.scanned} bytes scanned "
                f"(Limits.max_scan_bytes = {self.budget})"
            )
        self.scanned += size
        if self.progress is not None:
            self.progress.update(size)

    def add(self, row: tuple[Any, ...]) -> None:
        if len(self.rows) >= self.max_hits:
            raise StopScan(f"stopped at {self.max_hits} hits (max_hits)")
        self.rows.append(row)

    def chunks(self, start: int, end: int) -> Iterator[tuple[int, bytes, int]]:
        """(base, data, limit) over [start, end): hits starting at or past `limit` come later."""
        overlap = max(self.matcher.span - 1, 0)
        pos = start
        while pos < end:
            n = min(CHUNK + overlap, end - pos)
            self.charge(min(CHUNK, n))
            try:
                data = self.read(pos, n)
            except VmiError as exc:
                self.problems.append(f"physical {pos:#x}+{n:#x}: {exc}")
                pos += CHUNK
                continue
            yield pos, data, (CHUNK if pos + n < end else n)
            pos += CHUNK

    def context_of(self, paddr: int, size: int, lo: int, hi: int) -> str:
        """Escaped bytes around a hit, clipped to physical [lo, hi) (the run that holds it)."""
        if not self.context:
            return ""
        a, b = max(lo, paddr - self.context), min(hi, paddr + size + self.context)
        try:
            data = self.read(a, b - a)
        except VmiError:
            return ""
        return (
            f"{escape(data[: paddr - a])}[{escape(data[paddr - a : paddr - a + size])}]"
            + escape(data[paddr - a + size :])
        )

    def finish(self, columns: list[str], hex_cols: list[str]) -> pd.DataFrame:
        import pandas as pd

        from vmishell.frontends.frames import guest_frame

        if self.progress is not None:
            self.progress.close()
        df = guest_frame(pd.DataFrame(self.rows, columns=columns), hex=hex_cols)
        seconds = time.perf_counter() - self.started
        df.attrs[META_KEY] = {
            "pattern": self.matcher.name,
            "scanned_bytes": self.scanned,
            "seconds": seconds,
            "stopped": self.stopped,
            "problems": list(self.problems),
        }
        if self.stopped:
            warnings.warn(f"search {self.stopped}; {len(self.rows)} hits kept", RuntimeWarning, 3)
        return df


def run(scan: Scan, body: Any) -> None:
    """Run `body()`, turning a reached bound or Ctrl-C into `scan.stopped`."""
    try:
        body()
    except StopScan as stop:
        scan.stopped = str(stop)
    except KeyboardInterrupt:
        scan.stopped = "interrupted (Ctrl-C)"


def progress_bar(total: int, enabled: bool | None, what: str) -> Any:
    """A tqdm bar (terminal or Jupyter) when asked for, or for long scans when tqdm is there."""
    if enabled is False or (enabled is None and total < (256 << 20)):
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit="B", unit_scale=True, desc=what, leave=False)


# -- virtual search -------------------------------------------------------------------------


def search_regions(scan: Scan, regions: Regions) -> None:
    """Both passes over `regions`; rows in SEARCH_COLUMNS."""
    for start, end in regions.frames():
        for base, data, limit in scan.chunks(start, end):
            for s, e, rule in scan.matcher.finditer(data):
                if s >= limit:
                    break
                paddr = base + s
                for region in regions.covering(paddr, e - s):
                    _row(scan, regions, region, paddr - region.paddr, data[s:e], rule, paddr)
    if scan.matcher.span > 1:
        _seams(scan, regions)


def _row(
    scan: Scan,
    regions: Regions,
    region: Region,
    off: int,
    match: bytes,
    rule: str,
    paddr: int,
    context: str | None = None,
) -> None:
    owner = regions.owners[region.owner]
    vaddr = region.vaddr + off
    if region.vma >= 0:
        v = regions.vmas[region.vma]
        start, end, perms, path = v.start, v.end, v.perms, v.path
        file_offset = v.offset + (vaddr - v.start) if v.inode or v.path.startswith("/") else None
    else:
        start, end, path, file_offset = region.vaddr, region.vaddr + region.size, "", None
        perms = "r" + ("w" if region.writable else "-") + ("-" if region.nx else "x") + "p"
    if context is None:
        context = scan.context_of(paddr, len(match), region.paddr, region.paddr + region.size)
    scan.add(
        (
            owner.pid,
            owner.comm,
            vaddr,
            paddr,
            start,
            end,
            perms,
            path,
            file_offset,
            rule,
            match,
            context,
        )
    )


def _seams(scan: Scan, regions: Regions) -> None:
    """Matches across the boundary of two virtually adjacent runs, once per set of frames."""
    reach = scan.matcher.span - 1
    ctx = scan.context
    done: dict[tuple[tuple[int, int], ...], list[tuple[int, int, str, bytes, str]]] = {}
    for chain in regions.chains():
        for k in range(len(chain) - 1):
            seam = chain[k].vaddr + chain[k].size
            pieces = _window(chain, k, reach + ctx)
            key = tuple((p, n) for _, p, n in pieces)
            found = done.get(key)
            if found is None:
                data = b"".join(scan.read(p, n) for _, p, n in pieces)
                scan.charge(len(data))
                w0 = pieces[0][0]
                found = []
                for s, e, rule in scan.matcher.finditer(data):
                    # Crossing this seam, and starting in the run just before it (a match
                    # crossing an earlier seam too is reported there).
                    if w0 + s < seam < w0 + e and w0 + s >= chain[k].vaddr:
                        around = escape(data[max(0, s - ctx) : s]) if ctx else ""
                        after = escape(data[e : e + ctx]) if ctx else ""
                        shown = f"{around}[{escape(data[s:e])}]{after}" if ctx else ""
                        found.append((s, e, rule, data[s:e], shown))
                done[key] = found
            if not found:
                continue
            w0 = pieces[0][0]
            region = chain[k]
            for s, _e, rule, match, shown in found:
                off = w0 + s - region.vaddr
                _row(scan, regions, region, off, match, rule, region.paddr + off, shown)


def _window(chain: list[Region], k: int, reach: int) -> list[tuple[int, int, int]]:
    """(vaddr, paddr, size) pieces covering `reach` bytes either side of the seam after run k."""
    pieces: list[tuple[int, int, int]] = []
    need, i = reach, k
    while need > 0 and i >= 0:
        r = chain[i]
        n = min(need, r.size)
        pieces.insert(0, (r.vaddr + r.size - n, r.paddr + r.size - n, n))
        need -= n
        i -= 1
    need, i = reach, k + 1
    while need > 0 and i < len(chain):
        r = chain[i]
        n = min(need, r.size)
        pieces.append((r.vaddr, r.paddr, n))
        need -= n
        i += 1
    return pieces


# -- physical search --------------------------------------------------------------------------


def search_physical(scan: Scan, regions: Regions) -> None:
    """Every RAM range; each hit once per mapping that sees it, or once as unmapped."""
    for r in scan.session.source.ranges():
        for base, data, limit in scan.chunks(r.start, r.end):
            for s, e, rule in scan.matcher.finditer(data):
                if s >= limit:
                    break
                paddr = base + s
                match = data[s:e]
                seen = False
                for region in regions.covering(paddr):
                    seen = True
                    _row(scan, regions, region, paddr - region.paddr, match, rule, paddr)
                if not seen:
                    context = scan.context_of(paddr, e - s, r.start, r.end)
                    scan.add(
                        (None, "", None, paddr, None, None, "", "", None, rule, match, context)
                    )


__all__ = [
    "META_KEY",
    "SEARCH_COLUMNS",
    "Scan",
    "escape",
    "progress_bar",
    "run",
    "search_physical",
    "search_regions",
]
