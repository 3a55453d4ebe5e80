"""Caps on everything vmishell takes from guest memory.

A hostile guest controls every count, length and pointer that vmishell reads,
so each walk is bounded by one of these numbers. The defaults are generous
enough for real guests (thousands of processes, hundreds of thousands of
mappings) and small enough that a crafted structure cannot stall a notebook.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Limits:
    max_tasks: int = 65_536
    max_threads_per_process: int = 65_536
    max_vmas: int = 1_000_000
    max_tree_depth: int = 16
    max_tree_nodes: int = 250_000
    max_string: int = 4096
    max_path_depth: int = 256
    max_cmdline: int = 128 * 1024
    max_read: int = 1 << 30
    max_banner_candidates: int = 64
