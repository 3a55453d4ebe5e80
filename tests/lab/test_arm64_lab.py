"""The arm64 lab guests: they boot, their RAM is where `virt` puts it, their truth parses.

`aarch64` (bookworm 6.1, 4 KiB pages, 48-bit VA) and `aarch64-16k` (trixie
6.12, 16 KiB pages, 52-bit VA with LPA2) run on QEMU's `virt` machine, whose
RAM starts at physical 0x40000000. Each boots once (with VMCOREINFO exported
to QEMU), serves every test here, and is stopped before the other one boots.
The oracle is the guest's own ground truth (its pagemap, /proc/iomem, its
kallsyms) and the kernel package's own files, never a kernel version.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from vmishell.lab.guests import GUESTS
from vmishell.lab.truth import GroundTruth
from vmishell.lab.workload import MARKER, THREAD_NAME, layout
from vmishell.sources.files import QemuRamSource

pytestmark = pytest.mark.lab

VIRT_RAM_BASE = 0x4000_0000
ARM64_GUESTS = ["aarch64", "aarch64-16k"]
#: What each guest's kernel is built for (its package's config), which the guest must show.
PAGE_SIZE = {"aarch64": 4096, "aarch64-16k": 16384}

#: Boot times, printed at the end of the module (`pytest -s` shows them).
TIMES: dict[str, float] = {}


@dataclass
class Arm:
    guest: object  # RunningGuest
    truth: GroundTruth
    source: QemuRamSource


@pytest.fixture(scope="module", autouse=True)
def _module_clock() -> Iterator[None]:
    started = time.monotonic()
    yield
    TIMES["module wall time"] = round(time.monotonic() - started, 1)
    print("\narm64:", ", ".join(f"{k} {v} s" for k, v in TIMES.items()))


@pytest.fixture(scope="module", params=ARM64_GUESTS)
def arm(request: pytest.FixtureRequest) -> Iterator[Arm]:
    """One arm64 guest, booted with qemu_fw_cfg loaded (VMCOREINFO to QEMU), stopped after."""
    from tests.conftest import lab_unavailable
    from vmishell.errors import VmiError
    from vmishell.lab import runner

    name = request.param
    try:
        guest = runner.up(name, f"t-{os.getpid()}-{name}-vmcoreinfo", vmcoreinfo=True, timeout=300)
    except VmiError as exc:
        lab_unavailable(f"{name}: {exc}")
    TIMES[f"{name} boot"] = guest.boot_seconds or -1.0
    source = QemuRamSource(guest.ram_path, guest.qmp_path, machine=guest.spec.machine)
    try:
        yield Arm(guest, guest.truth(), source)
    finally:
        source.close()
        guest.down()


def test_both_guests_are_in_the_catalogue_on_the_virt_machine() -> None:
    for name in ARM64_GUESTS:
        spec = GUESTS[name]
        assert (spec.arch, spec.machine, spec.console) == ("aarch64", "virt", "ttyAMA0")
        assert spec.phys_offset == VIRT_RAM_BASE


def test_the_guest_reports_its_marker_process_and_thread(arm: Arm) -> None:
    truth, lay = arm.truth, layout("aarch64")
    assert truth.machine == "aarch64"
    assert (truth.marker_va, truth.counter_va) == (lay.marker_va, lay.counter_va)
    assert truth.marker.comm == "vmi-marker"
    assert [t.comm for t in truth.threads_of(truth.marker_pid)] == ["vmi-marker", THREAD_NAME]
    data = [m for m in truth.maps if m.start == lay.data_va]
    assert len(data) == 1 and data[0].perms == "rw-p" and data[0].path == "/bin/vmi-marker"


def test_pagemap_entries_count_pages_of_the_kernels_page_size(arm: Arm) -> None:
    truth = arm.truth
    assert truth.page_size == PAGE_SIZE[arm.guest.spec.name]
    for label in ("marker", "counter", "text", "stack"):
        entry = truth.pagemap[truth.pagemap_labels[label]]
        assert entry.present, label
        assert entry.pfn * truth.page_size >= VIRT_RAM_BASE, label
    # The marker and the counter share one page, whatever its size.
    assert truth.pagemap[truth.marker_va] == truth.pagemap[truth.counter_va]


def test_the_ram_file_starts_at_physical_0x40000000(arm: Arm) -> None:
    src, truth = arm.source, arm.truth
    assert [(r.start, r.end) for r in src.ranges()] == [
        (VIRT_RAM_BASE, VIRT_RAM_BASE + arm.guest.ram_size)
    ]
    assert [(start, end + 1) for start, end in truth.system_ram] == [
        (r.start, r.end) for r in src.ranges()
    ]


def test_a_qmp_target_learns_the_virt_layout_from_qemu(arm: Arm) -> None:
    """`qmp:SOCKET` asks QEMU where RAM is (memory tree, gpa2hva) and maps the shared file."""
    from vmishell.sources.qemuproc import open_qmp

    with open_qmp(arm.guest.qmp_path) as src:
        assert isinstance(src, QemuRamSource)
        assert [(r.start, r.end) for r in src.ranges()] == [
            (r.start, r.end) for r in arm.source.ranges()
        ]
        paddr = arm.truth.marker_paddr
        assert paddr is not None and src.read(paddr, len(MARKER)) == MARKER


def test_the_guests_own_frame_numbers_find_its_marker_in_the_ram_file(arm: Arm) -> None:
    paddr = arm.truth.marker_paddr
    assert paddr is not None and paddr >= VIRT_RAM_BASE
    assert arm.source.read(paddr, len(MARKER)) == MARKER


def test_the_kernel_banner_lies_in_ram_above_0x40000000(arm: Arm) -> None:
    banner = f"Linux version {arm.truth.release} ".encode()
    hits = list(arm.source.find(banner))
    assert hits and all(hit >= VIRT_RAM_BASE for hit in hits)
    start, end = arm.truth.system_ram[0]
    assert any(start <= hit <= end for hit in hits)


def test_the_kernels_vmcoreinfo_is_in_ram_with_the_translation_facts(arm: Arm) -> None:
    """What the arm64 kernel exports for dump tools: VA_BITS, T1SZ, offsets, PAGESIZE."""
    hits = list(arm.source.find(f"OSRELEASE={arm.truth.release}\n".encode()))
    assert hits
    text = arm.source.read(hits[0], 4096).split(b"\0")[0].decode("ascii", "replace")
    info = dict(re.findall(r"^(\S+?)=(\S*)$", text, re.M))
    assert int(info["PAGESIZE"]) == arm.truth.page_size
    assert int(info["NUMBER(PHYS_OFFSET)"], 16) == VIRT_RAM_BASE
    # The kernel is built for the VA width its package's config names, and `-cpu max`
    # offers LPA2/LVA, so it runs with all of it (16k: 52 bits; 4k: 48).
    from vmishell.lab.build import build_guest

    config = build_guest(arm.guest.spec).manifest["config"]
    configured = re.search(r"^CONFIG_ARM64_VA_BITS=(\d+)$", Path(config).read_text(), re.M)
    assert configured is not None
    va_bits, t1sz = int(info["NUMBER(VA_BITS)"]), int(info["NUMBER(TCR_EL1_T1SZ)"], 16)
    assert va_bits == int(configured.group(1)) == 64 - t1sz
    assert int(info["SYMBOL(swapper_pg_dir)"], 16) >> 63


def test_qmp_registers_say_aarch64_with_pc_sp_and_exception_level(arm: Arm) -> None:
    regs = arm.source.registers()
    assert regs.arch == "aarch64" and regs.cr3 is None
    assert {"PC", "SP", "PSTATE", "EL", "X0", "X30"} <= set(regs.extra)
    assert regs.extra["EL"] in (0, 1)  # the kernel runs at EL1 (no hypervisor under TCG)


def test_dumps_keep_physical_addresses(arm: Arm, tmp_path: Path) -> None:
    """An ELF core places RAM by its program headers; a raw dump is offset = physical."""
    from vmishell.sources import open_image
    from vmishell.sources.elfcore import ElfCoreSource

    paddr = arm.truth.marker_paddr
    assert paddr is not None
    elf = arm.guest.dump(tmp_path / "core.elf", "elf")
    with open_image(elf) as core:
        assert isinstance(core, ElfCoreSource)
        assert core.ranges()[0].start == VIRT_RAM_BASE
        assert core.read(paddr, len(MARKER)) == MARKER
        assert core.vmcoreinfo is not None and "NUMBER(VA_BITS)=" in core.vmcoreinfo
    elf.unlink()
    raw = arm.guest.dump(tmp_path / "ram.raw", "raw")
    with open_image(raw) as image:
        assert image.read(paddr, len(MARKER)) == MARKER


def test_the_profile_comes_from_the_package_and_knows_the_machine(arm: Arm) -> None:
    """BTF types; addresses from kallsyms (16k: KALLSYMS_ALL) or the -dbg System.map (4k)."""
    from vmishell.lab.build import build_guest
    from vmishell.lab.profiles import ensure_profile
    from vmishell.symbols.profile import load_profile

    profile = load_profile(ensure_profile(build_guest(arm.guest.spec)))
    assert profile.producer["arch"] == "aarch64"
    assert int(profile.producer["page_size"]) == arm.truth.page_size
    assert profile.producer["types_from"] == "BTF in the kernel image"
    for name in ("init_task", "init_mm", "linux_banner", "swapper_pg_dir", "_stext"):
        assert profile.has_symbol(name), name
    assert profile.symbol_type("init_task") is not None
    assert profile.size_of("task_struct") > 0 and profile.has_field("mm_struct", "pgd")
    # KASLR moves the kernel as a whole: distances between symbols are the guest's own.
    truth = arm.truth.symbols
    base = "_stext"
    for name in set(truth) & {"_etext", "init_task", "linux_banner", "swapper_pg_dir", "_end"}:
        expected = truth[name] - truth[base]
        assert profile.symbol_address(name) - profile.symbol_address(base) == expected, name


def _built(name: str):  # -> BuiltGuest
    from tests.conftest import lab_unavailable
    from vmishell.errors import VmiError
    from vmishell.lab.build import build_guest

    try:
        return build_guest(name)
    except VmiError as exc:
        lab_unavailable(f"{name}: {exc}")


def test_the_4k_profile_agrees_with_the_dbg_package(tmp_path: Path) -> None:
    """Addresses from System.map where kallsyms lacks data symbols (bookworm: no
    KALLSYMS_ALL), layouts from the image's BTF equal to DWARF's."""
    from vmishell.lab.dbgprofiles import check_profile, debug_files
    from vmishell.lab.profiles import ensure_profile
    from vmishell.symbols.profile import load_profile

    built = _built("aarch64")
    kernel = built.manifest["packages"]["kernel"]
    profile = load_profile(ensure_profile(built), cache_dir=tmp_path / "cache")
    config = Path(built.manifest["config"]).read_text()
    kallsyms_all = re.search(r"^CONFIG_KALLSYMS_ALL=y$", config, re.M) is not None
    expected = "kallsyms" if kallsyms_all else "System.map file"
    assert profile.producer["symbols_from"].startswith(expected)
    dbg = debug_files("arm64", kernel["name"], kernel["version"])
    assert check_profile(profile, dbg) == []


@pytest.mark.parametrize("name", ARM64_GUESTS)
def test_volatility3_loads_the_arm64_profile(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """It has no arm64 layer, but its Linux symbol table reads our ISF: types and symbols.

    (The schema is Volatility's own check at load time; the unit tests run it on a
    small ISF: jsonschema takes minutes over a whole kernel's.)"""
    from vmishell.lab.profiles import ensure_profile

    path = ensure_profile(_built(name))  # the lab's own profile cache, before XDG moves
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))  # Volatility's cache
    import volatility3.framework.symbols.linux.extensions.network  # noqa: F401 (plugins do)
    from volatility3.framework import contexts
    from volatility3.framework.symbols.linux import LinuxKernelIntermedSymbols

    ctx = contexts.Context()
    table = LinuxKernelIntermedSymbols(ctx, "config", "kernel", path.as_uri(), validate=False)
    assert table.get_symbol("init_task").type_name.endswith("task_struct")
    assert table.get_type("task_struct").size > 0
    assert "pgd" in table.get_type("mm_struct").vol.members
    assert table.get_symbol("linux_banner").address > 0
