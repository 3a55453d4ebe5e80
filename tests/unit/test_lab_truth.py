"""The lab's ground truth, format 2: task start times, CPU widths, Meltdown status."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from vmishell.errors import LabError
from vmishell.lab.truth import parse_truth

DATA = Path(__file__).resolve().parents[1] / "lab" / "data"


def test_a_format_2_log_gives_start_times_and_cpu_facts() -> None:
    """Printed by the x86_64-pti guest (Skylake-Client-v4 under TCG)."""
    truth = parse_truth((DATA / "serial-x86_64-pti.log").read_text())
    assert (truth.phys_bits, truth.virt_bits) == (40, 48)
    assert truth.meltdown == "Mitigation: PTI"
    assert len(truth.processes) == 51
    assert all(t.start_ticks is not None and t.start_ticks >= 0 for t in truth.processes)
    assert truth.task(18).comm == "cpuhp/0" and truth.task(18).start_ticks == 138
    assert truth.task(truth.pids["stopped"]).state == "T"
    assert truth.task(truth.pids["frozen"]).state == "D"
    assert truth.pagemap_labels["text"] == 0x400000 and truth.pagemap[0x400000].present


def test_a_format_1_log_has_no_start_times() -> None:
    truth = parse_truth((DATA / "serial-i386.log").read_text())
    assert truth.task(1).comm == "init" and truth.task(1).start_ticks is None
    assert truth.phys_bits is None and truth.meltdown is None


def test_a_name_with_spaces_and_digits_stays_whole() -> None:
    text = (DATA / "serial-x86_64-pti.log").read_text()
    text = text.replace(" 138 cpuhp/0\n", " 138 7 8 nine\n")
    assert parse_truth(text).task(18).comm == "7 8 nine"


def test_a_short_format_2_task_line_is_an_error() -> None:
    text = (DATA / "serial-x86_64-pti.log").read_text()
    damaged = re.sub(r"(@@vmi task 18 18 2 0 1 S) 138 cpuhp/0", r"\1 cpuhp/0", text)
    with pytest.raises(LabError, match="malformed"):
        parse_truth(damaged)


def test_pagemap_frames_are_in_units_of_the_page_size_the_guest_reports() -> None:
    """Printed by the aarch64-16k guest: pagemap indices and PFNs count 16 KiB pages."""
    truth = parse_truth((DATA / "serial-aarch64-16k.log").read_text())
    assert truth.machine == "aarch64" and truth.page_size == 16384
    assert truth.marker_paddr == 0x107ED * 16384
    assert truth.counter_paddr == 0x107ED * 16384 + 0x40
    assert truth.system_ram == ((0x40000000, 0x4FFFFFFF),)
    assert truth.symbols["init_task"] - truth.symbols["_text"] == 0x20DF580
    assert [t.comm for t in truth.threads_of(truth.marker_pid)] == ["vmi-marker", "vmi-thread"]
    assert truth.phys_bits is None  # arm64's /proc/cpuinfo has no "address sizes"


def test_an_arm64_4k_log_has_4_kib_pages_and_no_data_symbols() -> None:
    """bookworm's arm64 kernel lacks CONFIG_KALLSYMS_ALL: /proc/kallsyms lists text only."""
    truth = parse_truth((DATA / "serial-aarch64.log").read_text())
    assert truth.page_size == 4096 and truth.marker_paddr is not None
    assert truth.marker_paddr >= 0x40000000
    assert "_stext" in truth.symbols and "init_task" not in truth.symbols


def test_a_log_without_a_page_size_means_4_kib() -> None:
    assert parse_truth((DATA / "serial-i386.log").read_text()).page_size == 4096


def test_a_page_size_no_kernel_has_is_an_error() -> None:
    text = (DATA / "serial-aarch64-16k.log").read_text()
    with pytest.raises(LabError, match="page size 0"):
        parse_truth(text.replace("@@vmi pagesize 16384", "@@vmi pagesize 0"))
