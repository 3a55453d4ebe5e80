"""Caps on everything vmishell takes from guest memory.

A hostile guest controls every count, length and pointer that vmishell reads,
so each walk is bounded by one of these numbers. The defaults are generous
enough for real guests (thousands of processes, hundreds of thousands of
mappings) and small enough that a crafted structure cannot stall a notebook.

Two kinds of cap are needed. Per-structure caps (a list's length, a tree's
depth, a string's length) stop one structure from being endless. Per-call
budgets (`max_mapping_work`, `max_text`) stop a few crafted bytes from being
*multiplied*: page tables that point back at themselves describe 2**36 pages
with one table, and a thousand tasks can all name the same 128 KiB argument
area, so every structure is within its own cap while the call as a whole is
not. See SECURITY.md for the threat model and how each cap is tested.
"""

from __future__ import annotations

from dataclasses import dataclass

from vmishell.errors import GuestDataError


@dataclass(frozen=True, slots=True)
class Limits:
    """The caps a Session applies to guest data (pass your own to `Session(limits=...)`)."""

    #: Tasks in one walk of the task list (leaders and threads together).
    max_tasks: int = 65_536
    #: Threads of one thread group.
    max_threads_per_process: int = 65_536
    #: VMAs of one process (the kernel's own default vm.max_map_count is 65,530).
    max_vmas: int = 1_000_000
    #: Levels of a maple tree (a real one of a million entries has 6 or 7).
    max_tree_depth: int = 16
    #: Nodes of one maple tree.
    max_tree_nodes: int = 250_000
    #: Bytes of one C string or name (kernel-thread names, qstr names).
    max_string: int = 4096
    #: Components of one path (dentries and mount crossings).
    max_path_depth: int = 256
    #: Characters of one path, like the kernel's PATH_MAX.
    max_path_length: int = 4096
    #: Bytes of one process's argument area.
    max_cmdline: int = 128 * 1024
    #: Bytes one `read()` may return (a caller's request, not guest data).
    max_read: int = 1 << 30
    #: Kernels checked at banner-aligned places before giving up.
    max_banner_candidates: int = 64
    #: "Linux version " occurrences looked at when searching all of memory for banners.
    max_banner_scan: int = 4096
    #: Tables visited plus leaf entries seen by one `mappings()` enumeration: 2**21 is
    #: 8 GiB of individually mapped 4 KiB pages (large pages and runs cost far less),
    #: and bounds tables that alias each other to 1-3 s. Raise it, or pass
    #: `mappings(max_work=...)`, for bigger processes.
    max_mapping_work: int = 1 << 21
    #: Characters of guest text (command lines, paths, names) one call may return.
    max_text: int = 64 << 20
    #: Hits one search returns (the result says when it stopped there).
    max_hits: int = 100_000
    #: Bytes of context shown on each side of a search hit.
    max_context: int = 256
    #: Bytes of memory one search may scan (frames shared by processes count once).
    max_scan_bytes: int = 64 << 30
    #: Entries (mapped runs of processes and the kernel) of one frame-to-mapping reverse map.
    max_reverse_map: int = 4_000_000
    #: Rows (processes, threads, mappings, region hashes) one snapshot may hold.
    max_snapshot_rows: int = 2_000_000


class TextBudget:
    """Guest text one call has produced so far, against `Limits.max_text`.

    Text is charged before it is read, so a guest that makes many small
    structures name one huge buffer costs at most the budget, not their
    product.
    """

    __slots__ = ("limit", "used")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def charge(self, size: int, what: str) -> None:
        """Count `size` characters of `what`; GuestDataError once the call is over budget."""
        if self.used + size > self.limit:
            raise GuestDataError(
                f"{what}: the call has already returned {self.used} characters of guest "
                f"text; {size} more would pass the limit of {self.limit} (Limits.max_text)"
            )
        self.used += size
