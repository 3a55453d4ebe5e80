"""Decode the kallsyms tables from a window of guest memory, with the work bounded.

The table decoders are `vmishell.symbols.kallsyms`'s (every layout it knows:
4.x-6.1 with or without `kallsyms_offsets`, 6.2+ `kallsyms_seqs_of_names`,
later kernels' offsets after the token index). What differs for memory is the
threat: the guest can plant many "0\\01\\0...9\\0" digit runs, each of which
starts a search of up to tens of MiB, and any byte can be anything. So the
candidates are capped, any decoding fault of a candidate only rejects it, and
the result must look like a kernel's table: sorted, of a plausible size, with
`_text` or `_stext`.
"""

from __future__ import annotations

import struct

import numpy as np

from vmishell.errors import ProfileError
from vmishell.symbols.kallsyms import _DIGITS, Kallsyms, _Finder, _NotHere

#: Digit-run candidates tried before giving up (a real image holds one or two).
MAX_CANDIDATES = 8
#: Fewest symbols a kernel's table plausibly has (a tiny kernel has thousands).
MIN_SYMBOLS = 256


def carve_kallsyms(
    window: bytes,
    *,
    pointer_size: int = 8,
    endian: str = "little",
    max_candidates: int = MAX_CANDIDATES,
    start: int = 0,
) -> Kallsyms:
    """The kallsyms of the kernel whose read-only data lies in `window`.

    Addresses are as the tables hold them in memory: relocated by KASLR when
    the kernel relocated itself. Candidates are the token-table digit runs from
    `start` on. ProfileError says what was tried.
    """
    finder = _MemoryFinder(window, pointer_size, endian)
    rejected: list[str] = []
    pos = window.find(_DIGITS, start)
    tried = 0
    while pos >= 0 and tried < max_candidates:
        tried += 1
        try:
            table = finder._from_token_table(pos)
        except (_NotHere, ProfileError, IndexError, struct.error, ValueError) as exc:
            rejected.append(f"{pos:#x}: {exc or type(exc).__name__}")
        else:
            problem = _implausible(table)
            if problem is None:
                return table
            rejected.append(f"{pos:#x}: {problem}")
        pos = window.find(_DIGITS, pos + 1)
    more = " (and more, not tried)" if pos >= 0 else ""
    detail = "; ".join(rejected[:3]) if rejected else "no kallsyms_token_table digit run"
    raise ProfileError(
        f"no kallsyms tables in {len(window):#x} bytes of guest memory: {tried} candidates "
        f"rejected{more}: {detail}. The kernel may lack CONFIG_KALLSYMS, or its tables a "
        "layout vmishell does not know"
    )


def _implausible(table: Kallsyms) -> str | None:
    if len(table) < MIN_SYMBOLS:
        return f"only {len(table)} symbols"
    if table.get("_text") is None and table.get("_stext") is None:
        return "no _text or _stext among the symbols"
    return None


class _MemoryFinder(_Finder):
    """The kallsyms decoders, with the 6.2+ search for `kallsyms_num_syms` vectorised.

    That search tests every aligned word up to 32 MiB below the token table,
    which in Python costs about a second per candidate; numpy keeps only the
    words that can be a count whose tables fit (a handful), and the reader's
    own checks (`_Finder._names_and_markers`) run on those, so layouts it
    learns are carved too.
    """

    def _count_positions(self, table: int) -> list[int]:
        """Word positions below `table`, nearest first, holding a count n >= 256 whose
        names (at least 8 bytes each with markers and seqs) fit before the table."""
        top = table - 4 - (table % 4)
        lo = max(0, table - (1 << 25))
        lo += (top - lo) % 4
        if top <= lo:
            return []
        count = (top - lo) // 4 + 1
        words = np.frombuffer(self.data, dtype=self.bo + "u4", count=count, offset=lo)
        # (table - p) // 8 for every word position p, in 32 bits: the distance is < 32 MiB.
        room = (np.uint32(table - lo) - np.arange(count, dtype=np.uint32) * np.uint32(4)) >> 3
        hits = np.nonzero((words >= 256) & (words <= room))[0]
        return [lo + 4 * int(i) for i in hits[::-1]]
