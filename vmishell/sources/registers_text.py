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


# aarch64 `info registers` (QEMU 7.2): PC, X00-X30, SP, PSTATE (with its decoded
# flags and mode, e.g. "PSTATE=404000c5 -Z-- EL1h"), then FP/SVE state. It shows
# no system registers: TTBR0_EL1, TTBR1_EL1 and TCR_EL1 are absent, so a walker
# learns the translation regime from the kernel (VMCOREINFO, swapper_pg_dir).
_A64_REG = re.compile(r"(?<![A-Za-z0-9\[])(PC|SP|PSTATE|X[0-3][0-9]) ?=([0-9a-fA-F]+)\b")
_A64_MODE = re.compile(r"\bEL([0-3])([th])\b")


def parse_aarch64_registers(text: str) -> Registers:
    """Registers from HMP `info registers` output of an aarch64 vCPU.

    `extra` holds PC, SP, PSTATE, X0-X30 and EL (the exception level, from
    PSTATE bits 2-3). The x86 control-register fields stay None.
    """
    values: dict[str, int] = {}
    for name, value in _A64_REG.findall(text):
        key = f"X{int(name[1:])}" if name.startswith("X") else name
        values.setdefault(key, int(value, 16))
    if "PC" not in values or "PSTATE" not in values:
        raise QmpError(f"no PC/PSTATE in aarch64 `info registers` output: {text[:200]!r}")
    values["EL"] = values["PSTATE"] >> 2 & 3
    return Registers(arch="aarch64", extra=values)


def parse_registers(text: str) -> Registers:
    """Registers from HMP `info registers` of either architecture QEMU runs in the lab."""
    if "PSTATE=" in text and "CR3=" not in text:
        return parse_aarch64_registers(text)
    return parse_x86_registers(text)
