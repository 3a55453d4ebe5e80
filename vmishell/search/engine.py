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

import bisect
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from vmishell.errors import VmiError
from vmishell.search.patterns import Buffer, Matcher
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
        source = self.session.source
        self.budget = self.session.limits.max_scan_bytes
        self.read = source.read
        self._segments = list(source.segments() or ())
        self._segment_starts = [seg.start for seg in self._segments]

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

    def view(self, paddr: int, size: int) -> tuple[Buffer, int] | None:
        """(buffer, offset) holding physical [paddr, paddr+size): a view of RAM when the
        source is memory-mapped (no copy), else the bytes read; None if unreadable."""
        segments = self._segments
        if segments:
            i = bisect.bisect_right(self._segment_starts, paddr) - 1
            if i >= 0 and paddr + size <= segments[i].end:
                seg = segments[i]
                return seg.view, paddr - seg.start
        try:
            return self.read(paddr, size), 0
        except VmiError as exc:
            self.problems.append(f"physical {paddr:#x}+{size:#x}: {exc}")
            return None

    def slice(self, paddr: int, size: int) -> Buffer:
        """Physical [paddr, paddr+size) as a view of RAM (or bytes; zeros if unreadable)."""
        got = self.view(paddr, size)
        if got is None:
            return bytes(size)
        buf, off = got
        return buf[off : off + size]

    def chunks(self, start: int, end: int) -> Iterator[tuple[int, Buffer, int, int, int]]:
        """(base, buffer, lo, hi, limit) over physical [start, end): scan buffer[lo:hi],
        where buffer[i] is physical base + i; hits starting at or past `limit` are the
        next chunk's (chunks overlap by the pattern's span)."""
        overlap = max(self.matcher.span - 1, 0)
        pos = start
        while pos < end:
            n = min(CHUNK + overlap, end - pos)
            self.charge(min(CHUNK, n))
            got = self.view(pos, n)
            if got is not None:
                buf, lo = got
                limit = lo + (CHUNK if pos + n < end else n)
                yield pos - lo, buf, lo, lo + n, limit
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
    finditer = scan.matcher.finditer
    for start, end in regions.frames():
        for base, buf, lo, hi, limit in scan.chunks(start, end):
            for s, e, rule in finditer(buf, lo, hi):
                if s >= limit:
                    break
                paddr = base + s
                match = bytes(buf[s:e])
                for region in regions.covering(paddr, e - s):
                    _row(scan, regions, region, paddr - region.paddr, match, rule, paddr)
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
    """Matches across the boundary of two virtually adjacent runs, once per set of frames.

    A window is the `span - 1` bytes (plus context) either side of a seam as the
    process sees them, keyed by the frames it reads, so a library mapped by fifty
    processes costs one window. All windows are put into one buffer (from views of
    RAM, one copy); literal patterns and YARA scan it at once (a match straddling two
    windows is dropped), regular expressions window by window.
    """
    ctx = scan.context
    need = scan.matcher.span - 1 + ctx
    parts: list[Buffer] = []
    index: dict[Any, int] = {}
    #: Per window: offset in the joined buffer, length, the seam's and the first
    #: allowed start's positions in the window.
    wins: list[tuple[int, int, int, int]] = []
    jobs: list[tuple[int, Region, int]] = []
    pos = 0
    # One memory-mapped RAM segment (the usual case): slice it directly.
    segs = scan._segments
    mv, lo, hi = (segs[0].view, segs[0].start, segs[0].end) if len(segs) == 1 else (None, 0, 0)
    for chain in regions.chains():
        for k in range(len(chain) - 1):
            a, b = chain[k], chain[k + 1]
            seam = a.vaddr + a.size
            if a.size >= need and b.size >= need:  # the usual case: two pieces
                tail, head = a.paddr + a.size, b.paddr
                key: Any = (tail, head)
                w = index.get(key)
                if w is None:
                    if mv is not None and lo <= tail - need and head + need <= hi:
                        parts.append(mv[tail - need - lo : tail - lo])
                        parts.append(mv[head - lo : head + need - lo])
                    else:
                        parts.append(scan.slice(tail - need, need))
                        parts.append(scan.slice(head, need))
                    w = index[key] = len(wins)
                    wins.append((pos, 2 * need, need, 0))
                    pos += 2 * need
                jobs.append((w, a, seam - need))
                continue
            pieces = _window(chain, k, need)
            w0 = pieces[0][0]
            last = next(p for p in reversed(pieces) if p[0] < seam)
            key = (tuple((p, n) for _, p, n in pieces), seam - w0, last[0] - w0)
            w = index.get(key)
            if w is None:
                size = 0
                for _, p, n in pieces:
                    parts.append(scan.slice(p, n))
                    size += n
                w = index[key] = len(wins)
                wins.append((pos, size, seam - w0, last[0] - w0))
                pos += size
            jobs.append((w, a, w0))
    if not jobs:
        return
    scan.charge(pos)
    joined = b"".join(parts)
    found = _scan_windows(scan, joined, wins)
    for w, region, w0 in jobs:
        hits = found.get(w)
        if not hits:
            continue
        off0 = wins[w][0]
        for s, e, rule in hits:
            off = w0 + s - region.vaddr
            match = joined[off0 + s : off0 + e]
            shown = ""
            if ctx:
                lo = max(off0, off0 + s - ctx)
                before = escape(joined[lo : off0 + s])
                after = escape(joined[off0 + e : min(off0 + wins[w][1], off0 + e + ctx)])
                shown = f"{before}[{escape(match)}]{after}"
            _row(scan, regions, region, off, match, rule, region.paddr + off, shown)


def _scan_windows(
    scan: Scan, joined: bytes, wins: list[tuple[int, int, int, int]]
) -> dict[int, list[tuple[int, int, str]]]:
    """Per window, matches (window positions) that cross its seam and start after `first`."""
    found: dict[int, list[tuple[int, int, str]]] = {}
    finditer = scan.matcher.finditer

    def keep(w: int, s: int, e: int, rule: str) -> None:
        off, size, seam, first = wins[w]
        s, e = s - off, e - off
        if e <= size and s < seam < e and s >= first:
            found.setdefault(w, []).append((s, e, rule))

    if not scan.matcher.batchable:
        for w, (off, size, _seam, _first) in enumerate(wins):
            for s, e, rule in finditer(joined, off, off + size):
                keep(w, s, e, rule)
        return found
    offsets = [win[0] for win in wins]
    for s, e, rule in finditer(joined):
        keep(bisect.bisect_right(offsets, s) - 1, s, e, rule)
    return found


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
        for base, buf, lo, hi, limit in scan.chunks(r.start, r.end):
            for s, e, rule in scan.matcher.finditer(buf, lo, hi):
                if s >= limit:
                    break
                paddr = base + s
                match = bytes(buf[s:e])
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
