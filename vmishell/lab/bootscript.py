"""Render the guest's /init from the readable template vmishell/lab/init.sh.

The script is kept as a shell file (not a Python string) so that it can be
read, linted and changed as shell; Python only fills in what depends on the
guest: the workload's addresses and the kernel symbols to report.
"""

from __future__ import annotations

import re
from importlib import resources

from vmishell.lab.workload import WorkloadLayout

#: Kernel symbols the guest reports from /proc/kallsyms when it has them
#: (kernels without CONFIG_KALLSYMS_ALL list text symbols only).
TRUTH_SYMBOLS = (
    "_text",
    "_stext",
    "_etext",
    "_end",
    "init_task",
    "linux_banner",
    "swapper_pg_dir",
    "init_top_pgt",
    "page_offset_base",
    "vmemmap_base",
    "phys_base",
)

#: Seconds /init waits after starting the workload so that its thread exists
#: and its counter ticked before the truth is taken.
SETTLE_SECONDS = 1

_PLACEHOLDER = re.compile(r"\{\{([A-Z_]+)\}\}")


def template() -> str:
    """The unrendered init.sh shipped with the package."""
    return resources.files("vmishell.lab").joinpath("init.sh").read_text(encoding="utf-8")


def render_init(lay: WorkloadLayout) -> str:
    """The /init script for a guest whose workload has layout `lay`."""
    values = {
        "MARKER_VA": f"{lay.marker_va:#x}",
        "COUNTER_VA": f"{lay.counter_va:#x}",
        "SETTLE_SECONDS": str(SETTLE_SECONDS),
        "SYMBOLS": "|".join(TRUTH_SYMBOLS),
    }

    def fill(m: re.Match[str]) -> str:
        try:
            return values[m.group(1)]
        except KeyError:
            raise ValueError(f"init.sh uses unknown placeholder {m.group(0)}") from None

    return _PLACEHOLDER.sub(fill, template())
