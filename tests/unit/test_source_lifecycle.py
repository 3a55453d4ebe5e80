"""A source's lifecycle: closing releases the file, a shrunk file is refused, a VM's end is seen.

Real files, real processes and real unix sockets; the lab tests
(tests/lab/test_lifecycle_lab.py) do the same against a running QEMU.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.support.pagetables import PageTableBuilder
from vmishell.arch import AddressSpace, PagingMode, Translator
from vmishell.errors import SessionClosed, TargetEnded, VmiError
from vmishell.sources.files import QemuRamSource, RawImageSource
from vmishell.sources.vmwatch import ProcessWatch, QmpEvents, peer_pid

MARKER_VA = 0x600000


def _ram_file(tmp_path: Path) -> tuple[Path, int]:
    """A 16 MiB RAM file holding one address space that maps MARKER_VA to a marked frame."""
    b = PageTableBuilder(PagingMode.LEVEL4, 16 << 20)
    b.map(MARKER_VA, 0x800000, user=True)
    b.ram[0x800000:0x800010] = b"MARKER-AT-800000"
    b.ram[0x900000:0x900010] = b"MARKER-AT-900000"
    path = tmp_path / "ram"
    path.write_bytes(bytes(b.ram))
    return path, b.dtb


def _mapped(path: Path) -> bool:
    return str(path) in Path("/proc/self/maps").read_text()


def test_closing_a_source_unmaps_its_file_and_later_reads_say_it_is_closed(
    tmp_path: Path,
) -> None:
    path, dtb = _ram_file(tmp_path)
    source = QemuRamSource(path)
    space = AddressSpace(Translator(source, dtb, PagingMode.LEVEL4))
    assert space.read(MARKER_VA, 16) == b"MARKER-AT-800000"
    assert _mapped(path)
    source.close()
    assert not _mapped(path), "the RAM file is still mapped after close()"
    with pytest.raises(SessionClosed, match="is closed"):
        space.read(MARKER_VA, 16)
    with pytest.raises(SessionClosed):
        source.read(0x800000, 16)
    source.close()  # idempotent


def test_a_file_that_shrinks_under_the_source_ends_it_without_touching_the_map(
    tmp_path: Path,
) -> None:
    path, _ = _ram_file(tmp_path)
    source = RawImageSource(path)
    source.check()
    os.truncate(path, 4 << 20)
    with pytest.raises(TargetEnded, match="shrank from 0x1000000 to 0x400000"):
        source.check()
    with pytest.raises(TargetEnded):
        source.read(0x800000, 16)  # beyond the new end: a SIGBUS if it were read
    assert not _mapped(path)
    assert source.state == "ended"


def test_a_truncated_ram_file_cannot_kill_the_process(tmp_path: Path) -> None:
    """The same in a separate interpreter, reading right after truncation: it must live."""
    path, dtb = _ram_file(tmp_path)
    script = f"""
import os
from vmishell.arch import AddressSpace, PagingMode, Translator
from vmishell.errors import VmiError
from vmishell.sources.files import QemuRamSource
src = QemuRamSource({str(path)!r})
space = AddressSpace(Translator(src, {dtb}, PagingMode.LEVEL4))
space.read({MARKER_VA}, 16)
os.truncate({str(path)!r}, 0)
try:
    src.check()
    space.read({MARKER_VA}, 16)
except VmiError as exc:
    print("vmishell error:", exc)
"""
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == 0, out.stderr
    assert "vmishell error:" in out.stdout and "shrank" in out.stdout


def test_the_end_of_the_vm_process_ends_the_source(tmp_path: Path) -> None:
    path, _ = _ram_file(tmp_path)
    vm = subprocess.Popen(["sleep", "30"])
    try:
        source = QemuRamSource(path, pid=vm.pid)
        source.check()
        assert source.state == "running"
    finally:
        vm.kill()
        vm.wait()
    time.sleep(0.05)  # past the source's poll interval
    with pytest.raises(TargetEnded, match=f"pid {vm.pid}"):
        source.check()
    with pytest.raises(TargetEnded) as info:
        source.read(0x800000, 16)
    assert info.value.when <= time.time()
    assert source.state == "ended"
    source.close()


def test_a_zombie_vm_process_counts_as_ended() -> None:
    vm = subprocess.Popen(["true"])
    while Path(f"/proc/{vm.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
        time.sleep(0.01)  # not reaped yet: a zombie, as under a non-reaping init
    assert not ProcessWatch(vm.pid).alive()
    vm.wait()


# -- QMP events ---------------------------------------------------------------------------


class FakeMonitor:
    """A unix socket that speaks QMP's greeting and handshake, then sends what it is told."""

    def __init__(self, path: Path, greeting: bytes | None = None) -> None:
        self.path = path
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(str(path))
        self.server.listen(1)
        self.greeting = greeting or json.dumps({"QMP": {"version": {}}}).encode() + b"\n"
        self.conn: socket.socket | None = None
        self.ready = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        try:
            conn, _ = self.server.accept()
            self.conn = conn
            conn.sendall(self.greeting)
            if b"QMP" in self.greeting:
                conn.recv(4096)  # qmp_capabilities
                conn.sendall(b'{"event": "STOP"}\n{"return": {}}\n')
        except OSError:
            return  # the client left at once (peer_pid) or the test closed the socket
        self.ready.set()

    def send(self, *events: str) -> None:
        assert self.conn is not None
        self.conn.sendall(b"".join(json.dumps({"event": e}).encode() + b"\n" for e in events))

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
        self.server.close()


def test_events_count_resets_and_follow_the_run_state(tmp_path: Path) -> None:
    monitor = FakeMonitor(tmp_path / "events.sock")
    events = QmpEvents(monitor.path)
    assert monitor.ready.wait(5)
    assert events.running is False  # the STOP sent before the handshake's reply
    monitor.send("RESUME", "RESET", "RESET")
    deadline = time.monotonic() + 5
    while events.resets < 2 and time.monotonic() < deadline:
        events.poll()
    assert (events.resets, events.running) == (2, True)
    monitor.close()
    deadline = time.monotonic() + 5
    while not events.closed_by_peer and time.monotonic() < deadline:
        events.poll()
    assert events.closed_by_peer


def test_a_socket_that_is_not_qmp_is_refused_with_a_vmishell_error(tmp_path: Path) -> None:
    FakeMonitor(tmp_path / "notqmp.sock", greeting=b"SSH-2.0-OpenSSH\n")
    with pytest.raises(VmiError, match="not a QMP socket"):
        QmpEvents(tmp_path / "notqmp.sock")


def test_the_pid_behind_a_socket_is_its_servers(tmp_path: Path) -> None:
    monitor = FakeMonitor(tmp_path / "peer.sock")
    assert peer_pid(monitor.path) == os.getpid()
    assert peer_pid(tmp_path / "nothing.sock") is None
    monitor.close()


def test_a_dump_that_shrinks_under_libvmi_ends_the_source(tmp_path: Path) -> None:
    from vmishell.sources.libvmi import LibvmiSource, libvmi_available

    if not libvmi_available():
        pytest.fail("the libvmi wheel is a development dependency: install '.[dev]'")
    path, _ = _ram_file(tmp_path)
    source = LibvmiSource(path, "file")
    assert source.read(0x800000, 16) == b"MARKER-AT-800000"
    os.truncate(path, 4 << 20)
    with pytest.raises(TargetEnded, match="shrank"):
        source.check()
    with pytest.raises(TargetEnded):
        source.read(0x800000, 16)
    source.close()
