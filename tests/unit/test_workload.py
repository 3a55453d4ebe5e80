"""Run the generated workloads on this host and check the layout they promise."""

from __future__ import annotations

import errno
import io
import platform
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile

from vmishell.lab.workload import MARKER, THREAD_NAME, build_workload, layout

RUNNABLE = ["x86_64", "i386"]  # on an x86_64 host; aarch64 runs in the arm64 lab guests
ARCHES = [*RUNNABLE, "aarch64"]
ELF_FIELDS = {
    "x86_64": ("ELFCLASS64", "EM_X86_64"),
    "i386": ("ELFCLASS32", "EM_386"),
    "aarch64": ("ELFCLASS64", "EM_AARCH64"),
}


def _skip_unless_linux_x86_64() -> None:
    if platform.system() != "Linux" or platform.machine() != "x86_64":
        pytest.skip(f"workload needs an x86_64 Linux host, not {platform.machine()}")


def _read_mem(pid: int, va: int, size: int) -> bytes:
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        mem.seek(va)
        return mem.read(size)


def _threads(pid: int) -> dict[int, str]:
    task = Path(f"/proc/{pid}/task")
    return {int(t.name): (t / "comm").read_text().strip() for t in task.iterdir()}


@pytest.fixture(params=RUNNABLE)
def running(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, int]]:
    """Start the workload as `vmi-marker`, wait for its thread to name itself; kill it after."""
    arch = request.param
    _skip_unless_linux_x86_64()
    exe = tmp_path / "vmi-marker"
    exe.write_bytes(build_workload(arch))
    exe.chmod(0o755)
    try:
        proc = subprocess.Popen([str(exe)])
    except OSError as exc:
        if arch == "i386" and exc.errno == errno.ENOEXEC:
            pytest.skip("kernel has no IA32 emulation (or it is disabled): cannot run i386 here")
        raise
    try:
        deadline = time.monotonic() + 5
        while THREAD_NAME not in _threads(proc.pid).values():
            assert proc.poll() is None, f"{arch} workload exited with {proc.returncode}"
            assert time.monotonic() < deadline, f"{arch} workload thread never named itself"
            time.sleep(0.02)
        yield arch, proc.pid
    finally:
        proc.kill()
        proc.wait(timeout=5)


def test_process_and_thread_names(running: tuple[str, int]) -> None:
    _, pid = running
    assert Path(f"/proc/{pid}/comm").read_text().strip() == "vmi-marker"
    threads = _threads(pid)
    assert len(threads) == 2
    assert threads.pop(pid) == "vmi-marker"
    assert list(threads.values()) == [THREAD_NAME]


def test_marker_and_data_mapping(running: tuple[str, int]) -> None:
    arch, pid = running
    lay = layout(arch)
    assert _read_mem(pid, lay.marker_va, len(MARKER)) == MARKER
    maps = Path(f"/proc/{pid}/maps").read_text().splitlines()
    data = [line for line in maps if int(line.split("-")[0], 16) == lay.data_va]
    assert len(data) == 1, maps
    assert data[0].split()[1] == "rw-p"
    assert data[0].endswith("/vmi-marker")
    assert lay.marker_va // 0x1000 == lay.counter_va // 0x1000 == lay.data_va // 0x1000


def test_counter_ticks_every_second(running: tuple[str, int]) -> None:
    arch, pid = running
    lay = layout(arch)

    def counter() -> int:
        return int.from_bytes(_read_mem(pid, lay.counter_va, lay.counter_size), "little")

    before = counter()
    time.sleep(2.2)
    assert 1 <= counter() - before <= 3


@pytest.mark.parametrize("arch", ARCHES)
def test_elf_header(arch: str) -> None:
    elf = ELFFile(io.BytesIO(build_workload(arch)))
    elf_class, machine = ELF_FIELDS[arch]
    assert elf.header["e_ident"]["EI_CLASS"] == elf_class
    assert elf.header["e_machine"] == machine
    assert elf.header["e_type"] == "ET_EXEC"
    assert elf.header["e_entry"] == layout(arch).entry
    loads = [seg for seg in elf.iter_segments() if seg["p_type"] == "PT_LOAD"]
    assert [seg["p_vaddr"] for seg in loads] == [layout(arch).code_va, layout(arch).data_va]
    code, data = loads
    assert code["p_flags"] == 5 and data["p_flags"] == 6  # R+X, R+W
    assert data["p_memsz"] > data["p_filesz"]
    assert code["p_vaddr"] <= layout(arch).entry < code["p_vaddr"] + code["p_filesz"]


@pytest.mark.parametrize("arch", ARCHES)
def test_layout_sizes(arch: str) -> None:
    lay = layout(arch)
    assert lay.arch == arch
    assert lay.counter_size == {"x86_64": 8, "i386": 4, "aarch64": 8}[arch]
    assert lay.data_va % 0x1000 == 0 and lay.code_va % 0x1000 == 0


@pytest.mark.parametrize("arch", ARCHES)
def test_segments_map_on_every_page_size_of_the_arch(arch: str) -> None:
    """Linux maps a segment only if its file offset and address agree modulo PAGE_SIZE:
    arm64 kernels run with 4, 16 or 64 KiB pages, x86 with 4 KiB."""
    largest = 0x10000 if arch == "aarch64" else 0x1000
    elf = ELFFile(io.BytesIO(build_workload(arch)))
    for seg in elf.iter_segments():
        if seg["p_type"] == "PT_LOAD":
            assert seg["p_align"] == largest
            assert (seg["p_vaddr"] - seg["p_offset"]) % largest == 0


def _a64_words() -> list[int]:
    lay = layout("aarch64")
    image = build_workload("aarch64")
    code = ELFFile(io.BytesIO(image)).get_segment(0)
    start, end = lay.entry - lay.code_va, code["p_filesz"]
    return [int.from_bytes(image[i : i + 4], "little") for i in range(start, end, 4)]


def test_the_aarch64_program_makes_the_same_system_calls() -> None:
    """clone (220), nanosleep (101), prctl (167), exit (93): each `svc #0` after `movz x8`."""
    words = _a64_words()
    svc = [i for i, w in enumerate(words) if w == 0xD4000001]
    numbers = []
    for i in svc:
        movz_x8 = [w for w in words[:i] if w & 0xFFE0001F == 0xD2800008]
        numbers.append(movz_x8[-1] >> 5 & 0xFFFF)
    assert numbers == [220, 101, 167, 101, 93]


def test_every_aarch64_branch_lands_on_an_instruction_of_the_program() -> None:
    words = _a64_words()
    targets = []
    for i, w in enumerate(words):
        if w >> 26 == 0b000101:  # b imm26
            rel = w & 0x3FFFFFF
            rel -= (rel & 1 << 25) << 1
        elif w >> 24 in (0xB4, 0xB7):  # cbz x / tbnz x (imm19 / imm14 at bit 5)
            bits = 19 if w >> 24 == 0xB4 else 14
            rel = w >> 5 & (1 << bits) - 1
            rel -= (rel & 1 << (bits - 1)) << 1
        else:
            continue
        targets.append(i + rel)
    assert len(targets) == 4
    assert all(0 <= t < len(words) for t in targets)


@pytest.mark.parametrize("arch", ["arm64", "x86-64", ""])
def test_unknown_arch(arch: str) -> None:
    with pytest.raises(ValueError, match="no workload for arch"):
        layout(arch)
    with pytest.raises(ValueError):
        build_workload(arch)
