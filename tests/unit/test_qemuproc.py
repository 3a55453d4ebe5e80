"""`qmp:` pieces that need no QEMU: the monitor's RAM layout, and reads of a real process.

The layout texts are what QEMU 7.2 printed for real machines. Process reads
go to a child Python process holding known bytes in anonymous memory, the way
QEMU holds guest RAM; the lab tests (tests/lab/test_attach_any_lab.py) do the
same against QEMU itself.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmishell.errors import PhysicalReadError, SessionClosed, SourceError, TargetEnded
from vmishell.sources import qemuproc
from vmishell.sources.qemuproc import (
    Memdev,
    QemuProcessSource,
    QemuRamLayout,
    RamPiece,
    check_socket,
    expect_qmp,
    parse_flat_ram,
    parse_gpa2hva,
    shared_file_layout,
)

# `info mtree -f` of `qemu-system-x86_64 -M q35 -m 3072M`: RAM above 4 GiB too.
Q35_3G = """\
FlatView #0
 AS "memory", root: system
 AS "cpu-memory-0", root: system
 AS "ich9-ahci", root: bus master container
 Root memory region: system
  0000000000000000-00000000000c2fff (prio 0, ram): pc.ram
  00000000000c3000-00000000000e7fff (prio 0, rom): pc.ram @00000000000c3000
  00000000000e8000-00000000000effff (prio 0, ram): pc.ram @00000000000e8000
  00000000000f0000-00000000000fffff (prio 0, rom): pc.ram @00000000000f0000
  0000000000100000-000000007fffffff (prio 0, ram): pc.ram @0000000000100000
  00000000b0000000-00000000bfffffff (prio 0, i/o): pcie-mmcfg-mmio
  00000000fec00000-00000000fec00fff (prio 0, i/o): ioapic
  00000000fffc0000-00000000ffffffff (prio 0, rom): pc.bios
  0000000100000000-000000013fffffff (prio 0, ram): pc.ram @0000000080000000

FlatView #1
 AS "I/O", root: io
 Root memory region: io
  0000000000000000-0000000000000007 (prio 0, i/o): dma-chan
"""

# `qemu-system-i386 -M pc -m 256`: option ROM and BIOS shadows are not RAM.
PC_256M = """\
FlatView #0
 AS "memory", root: system
 AS "cpu-memory-0", root: system
 Root memory region: system
  0000000000000000-00000000000bffff (prio 0, ram): pc.ram
  00000000000c0000-00000000000dffff (prio 1, rom): pc.rom
  00000000000e0000-00000000000fffff (prio 0, rom): pc.bios @0000000000020000
  0000000000100000-000000000fffffff (prio 0, ram): pc.ram @0000000000100000
  00000000fffc0000-00000000ffffffff (prio 0, rom): pc.bios
"""

GIB = 1 << 30


def test_the_flat_view_gives_ram_below_and_above_4_gib_with_the_block_offsets() -> None:
    assert parse_flat_ram(Q35_3G, {"pc.ram"}) == [
        RamPiece(0, 2 * GIB, "pc.ram", 0),
        RamPiece(4 * GIB, 5 * GIB, "pc.ram", 2 * GIB),
    ]


def test_rom_regions_that_are_not_a_ram_backend_are_left_out() -> None:
    assert parse_flat_ram(PC_256M, {"pc.ram"}) == [
        RamPiece(0, 0xC0000, "pc.ram", 0),
        RamPiece(0x100000, 0x10000000, "pc.ram", 0x100000),
    ]


def test_without_memdevs_any_ram_typed_region_counts() -> None:
    assert [p.block for p in parse_flat_ram(PC_256M, None)] == ["pc.ram", "pc.ram"]


SMM_VIEW = """\
FlatView #2
 AS "cpu-smm-0", root: memory
  0000000200000000-0000000200000fff (prio 0, ram): node1
"""


def test_two_backends_stay_two_pieces_and_other_address_spaces_are_ignored() -> None:
    node1 = "0000000100000000-000000013fffffff (prio 0, ram): node1"
    numa = Q35_3G.replace(
        "0000000100000000-000000013fffffff (prio 0, ram): pc.ram @0000000080000000", node1
    )
    pieces = parse_flat_ram(numa + SMM_VIEW, {"pc.ram", "node1"})
    assert [(p.start, p.block, p.offset) for p in pieces] == [
        (0, "pc.ram", 0),
        (4 * GIB, "node1", 0),
    ]


def test_gpa2hva_answers_are_parsed_and_refusals_say_what_qemu_said() -> None:
    assert parse_gpa2hva("Host virtual address for 0x100000 (pc.ram) is 0x7f2a57f00000\r\n") == (
        0x7F2A57F00000
    )
    with pytest.raises(SourceError, match="No memory is mapped"):
        parse_gpa2hva("No memory is mapped at address 0xfee00000\r\n")


def test_a_shared_ram_file_is_taken_as_the_fast_path_only_when_it_fits(tmp_path: Path) -> None:
    ram = tmp_path / "ram"
    ram.write_bytes(b"\0" * (1 << 20))
    pieces = (RamPiece(0, 0xC0000, "mem", 0), RamPiece(0x100000, 1 << 20, "mem", 0x100000))
    shared = Memdev("mem", 1 << 20, True, "memory-backend-file", str(ram))
    layout = QemuRamLayout(pieces, (0, 0), (shared,))
    assert shared_file_layout(layout) == (shared, "q35")
    private = Memdev("mem", 1 << 20, False, "memory-backend-file", str(ram))
    assert shared_file_layout(QemuRamLayout(pieces, (0, 0), (private,))) is None
    anonymous = Memdev("mem", 1 << 20, False, "memory-backend-ram")
    assert shared_file_layout(QemuRamLayout(pieces, (0, 0), (anonymous,))) is None
    bigger = Memdev("mem", 2 << 20, True, "memory-backend-file", str(ram))
    assert shared_file_layout(QemuRamLayout(pieces, (0, 0), (bigger,))) is None


# -- reads from a real process --------------------------------------------------------

CHILD = r"""
import ctypes, mmap, sys
m = mmap.mmap(-1, 3 * 4096)
m[0:16] = b"LOW-RAM-PAGE-000"
m[8192:8208] = b"HIGH-RAM-PAGE-00"
print(ctypes.addressof(ctypes.c_char.from_buffer(m)), flush=True)
for line in sys.stdin:
    if line.startswith("w "):  # w OFFSET HEX: the "guest" changes its memory
        _, off, data = line.split()
        m[int(off):int(off) + len(data) // 2] = bytes.fromhex(data)
        print("ok", flush=True)
        continue
    off = int(line)
    print(m[off:off + 16].hex(), flush=True)
"""


@pytest.fixture
def child() -> Iterator[tuple[subprocess.Popen[str], int]]:
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    base = int(proc.stdout.readline())
    yield proc, base
    proc.kill()
    proc.wait()


def _layout(base: int) -> QemuRamLayout:
    # Guest RAM at 0..8 KiB and 4 GiB..+4 KiB, the second piece at the child's third page.
    pieces = (RamPiece(0, 0x2000, "ram", 0), RamPiece(4 * GIB, 4 * GIB + 0x1000, "ram", 0x2000))
    return QemuRamLayout(pieces, (base, base + 0x2000), ())


def test_guest_ram_is_read_from_the_process_at_each_pieces_host_address(child) -> None:
    proc, base = child
    with QemuProcessSource(proc.pid, _layout(base)) as src:
        assert src.live and not src.writable
        assert src.read(0, 16) == b"LOW-RAM-PAGE-000"
        assert src.read(4 * GIB, 16) == b"HIGH-RAM-PAGE-00"
        assert list(src.find(b"HIGH-RAM-PAGE")) == [4 * GIB]
        with pytest.raises(PhysicalReadError, match="outside guest RAM"):
            src.read(0x3000, 16)
    with pytest.raises(SessionClosed):
        src.read(0, 16)


def test_a_read_only_source_refuses_writes_and_a_writable_one_changes_the_process(child) -> None:
    proc, base = child
    assert proc.stdin is not None and proc.stdout is not None
    with QemuProcessSource(proc.pid, _layout(base)) as src, pytest.raises(SourceError):
        src.write(0, b"x")
    with QemuProcessSource(proc.pid, _layout(base), writable=True) as src:
        src.write(4 * GIB, b"WRITTEN-BY-TEST!")
    proc.stdin.write(f"{0x2000}\n")
    proc.stdin.flush()
    assert bytes.fromhex(proc.stdout.readline()) == b"WRITTEN-BY-TEST!"


def test_small_reads_see_one_snapshot_of_a_page_per_generation(child) -> None:
    proc, base = child
    assert proc.stdin is not None and proc.stdout is not None
    with QemuProcessSource(proc.pid, _layout(base)) as src:
        assert src.read(0, 8) == b"LOW-RAM-"
        proc.stdin.write(f"w 0 {b'CHANGED!'.hex()}\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "ok"
        assert src.read(0, 8) == b"LOW-RAM-"  # the same page, the same call: kept
        assert src.read(0, 4096)[:8] == b"CHANGED!"  # large reads always go to the process
        src.refresh()  # what the session does at every top-level call
        assert src.read(0, 8) == b"CHANGED!"


def test_the_end_of_the_process_ends_the_source_with_one_clear_error(child) -> None:
    proc, base = child
    src = QemuProcessSource(proc.pid, _layout(base))
    proc.kill()
    proc.wait()
    with pytest.raises(TargetEnded, match=f"pid {proc.pid}.* has exited"):
        src.read(0, 16)
    with pytest.raises(TargetEnded):
        src.check()
    assert src.state == "ended"
    src.close()


def test_a_layout_the_process_does_not_map_is_refused_at_attach(child) -> None:
    proc, _ = child
    with pytest.raises(SourceError, match="no readable memory at 0x1000 for guest RAM at 0x0"):
        QemuProcessSource(proc.pid, QemuRamLayout((RamPiece(0, 0x1000, "ram", 0),), (0x1000,), ()))


def test_without_ptrace_rights_one_line_names_the_missing_right(child) -> None:
    proc, base = child
    # As root, the probe drops to the nobody user (after its imports); otherwise it is
    # our own user against pid 1.
    target = proc.pid if os.geteuid() == 0 else 1
    probe = (
        "import os\n"
        "from vmishell.sources.qemuproc import QemuProcessSource, QemuRamLayout, RamPiece\n"
        "from vmishell.errors import SourceError\n"
        "if os.geteuid() == 0:\n    os.setgid(65534)\n    os.setuid(65534)\n"
        f"layout = QemuRamLayout((RamPiece(0, 0x1000, 'ram', 0),), ({base},), ())\n"
        f"try:\n    QemuProcessSource({target}, layout)\n"
        "except SourceError as exc:\n    print(exc)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=False
    )
    assert out.stdout.count("\n") == 1, out
    assert "needs ptrace rights" in out.stdout and "CAP_SYS_PTRACE" in out.stdout


# -- sockets that are not QMP ---------------------------------------------------------


def _serve(path: Path, greeting: bytes | None) -> socket.socket:
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)

    def run() -> None:
        conn, _ = server.accept()
        if greeting is not None:
            conn.sendall(greeting)
        conn.recv(1)  # hold the connection until the client closes it
        conn.close()

    threading.Thread(target=run, daemon=True).start()
    return server


def test_a_socket_that_says_something_else_is_not_qmp(tmp_path: Path) -> None:
    path = tmp_path / "serial.sock"
    expected = r"is not a QMP socket: it said b'login: '"
    with _serve(path, b"login: "), pytest.raises(SourceError, match=expected):
        expect_qmp(path, os.getpid())


def test_a_silent_socket_is_not_waited_for_long(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(qemuproc, "GREETING_TIMEOUT", 0.2)
    path = tmp_path / "silent.sock"
    with _serve(path, None), pytest.raises(SourceError, match=r"sent no QMP greeting in 0\.2 s"):
        expect_qmp(path, os.getpid())


def test_a_qmp_greeting_passes(tmp_path: Path) -> None:
    path = tmp_path / "qmp.sock"
    with _serve(path, b'{"QMP": {"version": {}, "capabilities": []}}\r\n'):
        expect_qmp(path, os.getpid())


def test_paths_that_are_not_sockets_are_named(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="no such QMP socket"):
        check_socket(tmp_path / "absent")
    (tmp_path / "file").write_text("x")
    with pytest.raises(SourceError, match="is not a unix socket"):
        check_socket(tmp_path / "file")
