"""The vCPU registers in QEMU's `info registers` text, parsed (no QMP client needed)."""

from __future__ import annotations

import re

from vmishell.errors import QmpError
from vmishell.sources.base import Registers

_EFER_LMA = 1 << 10

# `info registers` prints NAME=hexvalue pairs, padding short names ("R8 =...").
# Segment lines ("ES =0000 base limit flags") match too but only their
# selector is caught, and the whitelist below drops them.
_REG = re.compile(r"(?<![A-Za-z0-9])([A-Z][A-Z0-9]{1,4}) ?=([0-9a-fA-F]+)\b")
_GPRS = ("AX", "BX", "CX", "DX", "SI", "DI", "BP", "SP", "IP")
_EXTRA = frozenset(
    [f"R{r}" for r in _GPRS]
    + [f"E{r}" for r in _GPRS]
    + [f"R{i}" for i in range(8, 16)]
    + [f"DR{i}" for i in range(8)]
    + ["RFL", "EFL", "CR2", "CPL", "HLT", "SMM", "A20"]
)


def parse_x86_registers(text: str) -> Registers:
    """Registers from HMP `info registers` output of an x86 vCPU (32- or 64-bit QEMU).

    The guest is "x86_64" when EFER.LMA is set (long mode) or QEMU prints
    64-bit register names (RAX); otherwise "i386".
    """
    values: dict[str, int] = {}
    for name, value in _REG.findall(text):
        values.setdefault(name, int(value, 16))
    if "CR3" not in values:
        raise QmpError(f"no CR3 in `info registers` output: {text[:200]!r}")
    efer = values.get("EFER")
    long_mode = (efer is not None and efer & _EFER_LMA) or "RAX" in values
    return Registers(
        arch="x86_64" if long_mode else "i386",
        cr0=values.get("CR0"),
        cr3=values.get("CR3"),
        cr4=values.get("CR4"),
        efer=efer,
        extra={k: v for k, v in values.items() if k in _EXTRA},
    )
