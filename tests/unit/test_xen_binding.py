"""The ctypes layouts and decoders of the Xen binding match Xen 4.17's public headers.

Offsets and sizes were compiled from xen/include/public (RELEASE-4.17.7) with
gcc on x86_64: struct xen_domctl_getdomaininfo is 112 bytes (flags at 4,
tot_pages 8, shared_info_frame 48, nr_online_vcpus 64, handle 76,
arch_config 104), vcpu_guest_context is 5168 bytes with ctrlreg at 4984 and
user_regs.rip/rflags/rsp at 648/664/672, struct hvm_hw_cpu is 1032 bytes
with rip 640, cr0 656, cr3 672, cr4 680 and msr_efer 992.
"""

from __future__ import annotations

import ctypes
import errno
import struct

import pytest

from vmishell.errors import SourceError
from vmishell.sources import xenlib
from vmishell.sources.xen import hvm_registers, pv_registers
from vmishell.sources.xenlib import DomainInfo


@pytest.mark.parametrize(
    ("field", "offset"),
    [
        ("flags", 4),
        ("tot_pages", 8),
        ("max_pages", 16),
        ("shared_info_frame", 48),
        ("nr_online_vcpus", 64),
        ("max_vcpu_id", 68),
        ("handle", 76),
        ("gpaddr_bits", 96),
        ("emulation_flags", 104),
    ],
)
def test_domaininfo_fields_lie_where_domctl_0x15_puts_them(field: str, offset: int) -> None:
    assert getattr(DomainInfo, field).offset == offset
    assert ctypes.sizeof(DomainInfo) == 112


def _domain(flags: int, emulation: int = 0) -> xenlib.Domain:
    raw = DomainInfo(domain=7, flags=flags, tot_pages=65536, emulation_flags=emulation)
    raw.handle[:] = list(range(16))
    return xenlib.Domain.from_struct(raw)


def test_pv_pvh_and_hvm_are_told_apart_by_flags_and_emulated_devices() -> None:
    assert _domain(0).kind == "pv"
    assert _domain(xenlib.DOMINF_HVM, emulation=1).kind == "pvh"  # a local APIC only
    assert _domain(xenlib.DOMINF_HVM, emulation=0x7FF).kind == "hvm"


def test_a_shutdown_domain_says_why_and_a_running_one_says_nothing() -> None:
    assert _domain(xenlib.DOMINF_RUNNING).shutdown is None
    crashed = _domain(xenlib.DOMINF_SHUTDOWN | (3 << xenlib.SHUTDOWN_SHIFT))
    assert crashed.shutdown == "crash"
    assert _domain(xenlib.DOMINF_SHUTDOWN | (1 << 16)).shutdown == "reboot"
    assert _domain(0).uuid == "00010203-0405-0607-0809-0a0b0c0d0e0f"


def test_unmappable_frames_say_why() -> None:
    assert "not populated" in xenlib.frame_error(-errno.EINVAL)
    assert "not this domain's" in xenlib.frame_error(-errno.EPERM)
    assert xenlib.frame_error(-errno.EIO) == "EIO"


def test_off_dom0_and_without_root_the_error_says_where_to_run(monkeypatch) -> None:
    monkeypatch.setattr(xenlib.os.path, "exists", lambda _p: False)
    with pytest.raises(SourceError, match=r"not a Xen dom0 .* run vmishell in dom0"):
        xenlib.check_host()
    monkeypatch.setattr(xenlib.os.path, "exists", lambda _p: True)
    monkeypatch.setattr(xenlib.os, "geteuid", lambda: 1000)
    with pytest.raises(SourceError, match="needs root in dom0"):
        xenlib.check_host()


def test_pv_registers_come_from_ctrlreg_with_long_mode_implied() -> None:
    ctx = bytearray(xenlib.VCPU_CONTEXT_SIZE)
    struct.pack_into("<8Q", ctx, 4984, 0x80050033, 0x1234000, 0xDEAD, 0x5B5A3000, 0x2660, 0, 0, 0)
    struct.pack_into("<Q", ctx, 648, 0xFFFFFFFF81000000)
    regs = pv_registers(bytes(ctx))
    assert (regs.arch, regs.cr3, regs.extra["user_cr3"]) == ("x86_64", 0x5B5A3000, 0x1234000)
    assert regs.cr4 & 0x20 and regs.efer & (1 << 10) and regs.cr0 & (1 << 31)
    assert regs.extra["rip"] == 0xFFFFFFFF81000000 and regs.extra["cr2"] == 0xDEAD

    from vmishell.arch import PagingMode, mode_from_registers

    assert mode_from_registers(regs) is PagingMode.LEVEL4


def test_hvm_registers_tell_a_32_bit_guest_by_efer() -> None:
    cpu = bytearray(xenlib.HVM_HW_CPU_SIZE)
    struct.pack_into("<4Q", cpu, 656, 0x80000011, 0, 0x1C60000, 0x20)
    struct.pack_into("<Q", cpu, 992, 0x800)
    regs = hvm_registers(bytes(cpu))
    assert (regs.arch, regs.cr3, regs.cr4, regs.efer) == ("i386", 0x1C60000, 0x20, 0x800)
    struct.pack_into("<Q", cpu, 992, 0xD01)
    assert hvm_registers(bytes(cpu)).arch == "x86_64"
