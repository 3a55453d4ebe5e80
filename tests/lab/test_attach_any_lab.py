"""Attach to VMs nobody started for introspection, and to the dumps their tools write.

Two guests of their own, neither with a shared RAM file: a plain QEMU (`lab up
--plain --vmcoreinfo`: RAM in QEMU's anonymous memory, 3 GiB so that RAM also
lies above 4 GiB) for `qmp:`, and a transient TCG libvirt domain (`lab up
--libvirt`) for `libvirt:` and `virsh dump`. Both load qemu_fw_cfg, so their
dumps carry VMCOREINFO. Each target must give the guest's own process list,
the marker process's maps and the marker's bytes, as the guest printed them.
"""

from __future__ import annotations

import contextlib
import os
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.conftest import lab_unavailable
from tests.unit.test_kdump import _compress
from vmishell.errors import SourceError, TargetEnded, VmiError
from vmishell.lab import runner
from vmishell.lab.truth import GroundTruth
from vmishell.lab.workload import MARKER, layout
from vmishell.session import Session
from vmishell.sources.files import QemuRamSource
from vmishell.sources.kdump import KdumpSource, _decode
from vmishell.sources.qemuproc import QemuProcessSource, open_qmp
from vmishell.sources.qmp import QmpClient
from vmishell.sources.vmwatch import ProcessWatch

pytestmark = pytest.mark.lab

GIB = 1 << 30
PLAIN_MEMORY_MB = 3072


@pytest.fixture(scope="module")
def boots(
    request: pytest.FixtureRequest, lab_pool
) -> Iterator[dict[str, Future[runner.RunningGuest]]]:
    """Boot this module's guests at once (each boot is ~10 s of TCG), stop them at the end.

    The libvirt domain is booted only when a selected test needs it. The lab pool
    comes first: it sweeps instances it judges stale, and a domain still being
    created has no pid yet.
    """
    mine = [item for item in request.session.items if item.module is request.module]
    wanted = {"plain"} if any("plain" in item.fixturenames for item in mine) else set()
    if any("libvirt_guest" in item.fixturenames for item in mine):
        wanted.add("virt")
    options = {"plain": {"plain": True, "memory_mb": PLAIN_MEMORY_MB}, "virt": {}}
    if "virt" in wanted:
        try:
            options["virt"]["libvirt"] = request.getfixturevalue("libvirtd")
        except pytest.skip.Exception:  # no libvirt here (a failure under CI): qmp: still runs
            wanted.discard("virt")
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {what: pool.submit(runner.up, "x86_64", f"t-{os.getpid()}-{what}",
                                     vmcoreinfo=True, timeout=300, **options[what])
                   for what in sorted(wanted)}  # fmt: skip
        yield futures
    for future in futures.values():
        if future.exception() is None:
            with contextlib.suppress(VmiError):
                runner.down(future.result().name)


def _booted(boots: dict[str, Future[runner.RunningGuest]], what: str) -> runner.RunningGuest:
    if what not in boots:
        lab_unavailable(f"x86_64 ({what}): libvirtd is not available")
    try:
        return boots[what].result()
    except VmiError as exc:
        lab_unavailable(f"x86_64 ({what}): {exc}")
        raise AssertionError("unreachable") from exc


@pytest.fixture(scope="module")
def plain(boots) -> runner.RunningGuest:
    return _booted(boots, "plain")


def assert_is_the_guest(s: Session, truth: GroundTruth) -> None:
    """Processes, the marker's maps and its bytes equal what the guest said of itself."""
    df = s.processes(threads=True)
    assert df.error.isna().all(), df[df.error.notna()]
    ours = {row.pid: row for row in df.itertuples()}
    for task in truth.processes:
        if task.comm.startswith("kworker/") and task.pid not in ours:
            continue  # idle kworkers come and go
        row = ours[task.pid]
        assert (row.tgid, row.ppid, row.uid, row.kernel_thread) == (
            task.tgid,
            task.ppid,
            task.uid,
            task.kernel_thread,
        ), task
        assert task.comm.startswith(row.comm) if task.kernel_thread else row.comm == task.comm
    extra = df[~df.pid.isin({t.pid for t in truth.processes}) & (df.pid != 0)]
    assert all(c.startswith("kworker/") for c in extra.comm), extra
    marker = s.process(truth.marker_pid)
    ours_maps = [
        (v.start, v.end, v.perms, v.offset, v.device, v.inode, v.path) for v in marker.vmas()
    ]
    theirs = [(m.start, m.end, m.perms, m.offset, m.dev, m.inode, m.path) for m in truth.maps]
    assert ours_maps == theirs
    assert marker.translate(truth.marker_va).paddr == truth.marker_paddr
    assert marker.read(truth.marker_va, len(MARKER)) == MARKER


# -- qmp: ---------------------------------------------------------------------------------


def test_qmp_attaches_to_a_plain_qemu_and_sees_the_guest_as_it_sees_itself(plain) -> None:
    with Session.attach(f"qmp:{plain.qmp_path}") as s:
        assert isinstance(s.source, QemuProcessSource)
        assert s.source.pid == plain.pid
        assert s.live and s.name == f"qmp:{plain.qmp_path}"
        assert_is_the_guest(s, plain.truth())


def test_ram_above_4_gib_is_found_and_reads_what_qemu_itself_reads(plain, tmp_path) -> None:
    truth = plain.truth()
    with open_qmp(plain.qmp_path) as src:
        starts = [(r.start, r.end) for r in src.ranges()]
        assert starts[-1] == (4 * GIB, 4 * GIB + (PLAIN_MEMORY_MB << 20) - 2 * GIB)
        for first, last in truth.system_ram:  # all RAM the guest knows is RAM to us too
            assert src.is_valid(first, last + 1 - first), hex(first)
        with src.paused():
            for paddr in (4 * GIB + 0x12345000, truth.marker_paddr, 0x100000):
                pmem = tmp_path / f"{paddr:x}.bin"
                with QmpClient(plain.qmp_path) as q:
                    q.command("pmemsave", val=paddr, size=1 << 16, filename=str(pmem))
                assert src.read(paddr, 1 << 16) == pmem.read_bytes(), hex(paddr)


def test_pausing_through_qmp_holds_the_counter_still(plain) -> None:
    lay = layout(plain.spec.arch)
    with Session.attach(f"qmp:{plain.qmp_path}") as s:
        proc = s.process(plain.truth().marker_pid)
        with s.paused():
            first = proc.read(lay.counter_va, 8)
            time.sleep(1.0)
            assert proc.read(lay.counter_va, 8) == first
        deadline = time.monotonic() + 10
        while proc.read(lay.counter_va, 8) == first:
            assert time.monotonic() < deadline, "the counter did not move after the resume"
            time.sleep(0.1)
        assert s.source.registers().cr3 is not None


def test_the_lab_attaches_to_its_plain_guests_through_the_process_too(plain) -> None:
    with Session.attach(f"lab:{plain.name}") as s:
        assert isinstance(s.source, QemuProcessSource)
        assert s.source.resets == 0  # it listens on the guest's event socket
        assert_is_the_guest(s, plain.truth())


def test_vmishell_ps_takes_a_qmp_socket(plain) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "vmishell.cli", "ps", f"qmp:{plain.qmp_path}"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert out.returncode == 0, out.stderr
    assert "vmi-marker" in out.stdout and "/bin/vmi-marker" in out.stdout


def test_qmp_picks_the_shared_ram_file_when_qemu_has_one(x86_64_guest) -> None:
    with Session.attach(f"qmp:{x86_64_guest.qmp_path}") as s:
        assert isinstance(s.source, QemuRamSource)
        assert s.source.path == x86_64_guest.ram_path
        assert s.source.pid == x86_64_guest.pid
        assert_is_the_guest(s, x86_64_guest.truth())


def test_a_socket_that_is_not_qmp_gives_one_clear_error(plain) -> None:
    serial = plain.run_dir / "serial.sock"
    with pytest.raises(SourceError, match="QMP greeting"):
        Session.attach(f"qmp:{serial}")
    with pytest.raises(SourceError, match="no such QMP socket"):
        Session.attach(f"qmp:{plain.run_dir / 'absent.sock'}")


@pytest.fixture
def bare_qemu(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """A QEMU with no guest at all (stopped before its first instruction): cheap to kill."""
    qmp = tmp_path / "qmp.sock"
    pidfile = tmp_path / "qemu.pid"
    try:
        subprocess.run(
            ["qemu-system-x86_64", "-M", "q35", "-m", "64M", "-S", "-display", "none",
             "-nodefaults", "-daemonize", "-pidfile", str(pidfile),
             "-qmp", f"unix:{qmp},server=on,wait=off"],
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError) as exc:
        lab_unavailable(f"qemu-system-x86_64 -S: {exc}")
    pid = int(pidfile.read_text())
    yield pid, qmp
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def test_a_qemu_that_exits_ends_the_source_with_one_clear_error(bare_qemu) -> None:
    pid, qmp = bare_qemu
    src = open_qmp(qmp)
    assert isinstance(src, QemuProcessSource)
    assert src.read(0x1000, 16) == bytes(16)
    os.kill(pid, signal.SIGKILL)
    watch = ProcessWatch(pid)
    deadline = time.monotonic() + 10
    while watch.alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    watch.close()
    with pytest.raises(TargetEnded, match=f"pid {pid}"):
        src.read(0x1000, 1 << 20)
    assert src.state == "ended"
    src.close()


# -- libvirt: -----------------------------------------------------------------------------

LIBVIRT_URI = "qemu:///system"


def _libvirt_answers() -> bool:
    try:
        import libvirt
    except ImportError:
        return False
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    try:
        libvirt.open(LIBVIRT_URI).close()
    except libvirt.libvirtError:
        return False
    return True


@pytest.fixture(scope="module")
def libvirtd() -> Iterator[str]:
    """libvirt's system daemon, started here (with virtlogd) when it is not running yet."""
    started: list[Path] = []
    if not _libvirt_answers():
        for daemon, pidfile in (
            ("virtlogd", "/run/virtlogd.pid"),
            ("libvirtd", "/run/libvirtd.pid"),
        ):
            try:
                subprocess.run([daemon, "-d"], check=True, capture_output=True, timeout=30)
            except (OSError, subprocess.SubprocessError) as exc:
                lab_unavailable(
                    f"cannot start {daemon} (apt-get install libvirt-daemon-system): {exc}"
                )
            started.append(Path(pidfile))
        deadline = time.monotonic() + 30
        while not _libvirt_answers():
            if time.monotonic() > deadline:
                lab_unavailable(f"libvirtd started but {LIBVIRT_URI} does not answer")
            time.sleep(0.2)
    yield LIBVIRT_URI
    for pidfile in reversed(started):  # only the daemons this fixture started
        with contextlib.suppress(OSError, ValueError):
            os.kill(int(pidfile.read_text().strip()), signal.SIGTERM)


@pytest.fixture(scope="module")
def libvirt_guest(boots) -> runner.RunningGuest:
    """The lab's x86_64 kernel and initramfs as a transient TCG libvirt domain (no RAM file)."""
    return _booted(boots, "virt")


def _domain_state(guest: runner.RunningGuest) -> int:
    import libvirt

    conn = libvirt.open(LIBVIRT_URI)
    try:
        return conn.lookupByName(guest.name).state()[0]
    finally:
        conn.close()


def test_libvirt_attaches_to_a_domain_by_name_and_sees_the_guest(libvirt_guest) -> None:
    from vmishell.sources.libvirt import LibvirtSource

    for target in (f"libvirt:{libvirt_guest.name}", f"libvirt:{libvirt_guest.name}@{LIBVIRT_URI}"):
        with Session.attach(target) as s:
            assert isinstance(s.source, LibvirtSource)
            assert s.source.pid == libvirt_guest.pid
            assert_is_the_guest(s, libvirt_guest.truth())
    with Session.attach(f"lab:{libvirt_guest.name}") as s:
        assert isinstance(s.source, LibvirtSource)


def test_libvirt_pauses_with_suspend_and_resumes_only_what_it_paused(libvirt_guest) -> None:
    import libvirt

    lay = layout(libvirt_guest.spec.arch)
    with Session.attach(f"libvirt:{libvirt_guest.name}@{LIBVIRT_URI}") as s:
        proc = s.process(libvirt_guest.truth().marker_pid)
        with s.paused():
            assert _domain_state(libvirt_guest) == libvirt.VIR_DOMAIN_PAUSED
            assert s.state == "paused"
            first = proc.read(lay.counter_va, 8)
            time.sleep(1.0)
            assert proc.read(lay.counter_va, 8) == first
        assert _domain_state(libvirt_guest) == libvirt.VIR_DOMAIN_RUNNING
        assert s.source.registers().cr3 is not None


def test_libvirt_refuses_what_would_change_the_domain_and_bad_names(libvirt_guest) -> None:
    from vmishell.sources.libvirt import LibvirtSource

    boots = libvirt_guest.serial_log.read_text(errors="replace").count("@@vmi boot")
    with pytest.raises(SourceError, match="opened read-only"):
        Session.attach(f"libvirt:{libvirt_guest.name}", writable=True)
    with Session.attach(f"libvirt:{libvirt_guest.name}") as s:
        assert isinstance(s.source, LibvirtSource)
        with s.source._monitor() as monitor:
            for command in ("quit", "system_reset", "stop", "cont", "pmemsave"):
                with pytest.raises(SourceError, match="could change the domain"):
                    monitor.command(command)
            with pytest.raises(SourceError, match="could change the domain"):
                monitor.hmp("system_reset")
    with pytest.raises(SourceError, match=f"no libvirt domain named 'absent' at {LIBVIRT_URI}"):
        Session.attach(f"libvirt:absent@{LIBVIRT_URI}")
    with pytest.raises(SourceError, match="cannot connect to libvirt at qemu\\+unix"):
        Session.attach(f"libvirt:{libvirt_guest.name}@qemu+unix:///system?socket=/nonexistent")
    assert libvirt_guest.alive()
    assert libvirt_guest.serial_log.read_text(errors="replace").count("@@vmi boot") == boots


# -- dumps: ELF with VMCOREINFO and kdump-compressed, as virsh and QEMU write them -----------


@pytest.fixture(scope="module")
def dumps(plain, libvirt_guest, tmp_path_factory) -> Iterator[dict[str, tuple[Path, object]]]:
    """Dumps written by the tools people use, each with the guest it came from, made once.

    `virsh dump --memory-only` (ELF, kdump-zlib) of the libvirt domain, and QEMU's
    own kdump-zlib of the plain 3 GiB guest (RAM above 4 GiB) through QMP.
    """
    where = tmp_path_factory.mktemp("dumps")
    made: dict[str, tuple[Path, object]] = {}
    for fmt in ("elf", "kdump-zlib"):
        path = where / f"virsh.{fmt}"
        virsh = subprocess.run(
            ["virsh", "-c", LIBVIRT_URI, "dump", "--memory-only", "--format", fmt,
             libvirt_guest.name, str(path)],
            capture_output=True, text=True, timeout=300, check=False,
        )  # fmt: skip
        assert virsh.returncode == 0, virsh.stderr
        made[f"virsh-{fmt}"] = (path, libvirt_guest)
    made["qmp-kdump-zlib"] = (plain.dump(where / "plain.kdump", "kdump-zlib"), plain)
    yield made
    for path, _ in made.values():
        path.unlink(missing_ok=True)


def transcode(path: Path, codec: str, out: Path) -> Path:
    """The same kdump with its pages stored with another codec (plain, not flattened).

    Debian 12's QEMU writes kdump-zlib only; the other codecs makedumpfile and
    newer QEMUs write are checked on the very same guest pages this way.
    """
    with KdumpSource(path) as k:
        bs, total = k.block_size, k._groups[-1]
        head = bytearray(k._file.pread(0, k._desc_at, "headers"))
        head[0:8] = b"KDUMP   "
        descs = k._file.pread(k._desc_at, total * 24, "descriptors")
        data_at = k._desc_at + total * 24
        out_descs, data = bytearray(), bytearray()
        stored_at: dict[int, tuple[int, int, int]] = {}  # QEMU shares one zero page
        for i in range(total):
            offset, size, flags, page_flags = struct.unpack_from("<qIIQ", descs, i * 24)
            if offset not in stored_at:
                page = _decode(k._file.pread(offset, size, "page"), flags, bs)
                blob, new_flags = _compress(codec, page)
                if len(blob) >= bs:
                    blob, new_flags = page, 0
                stored_at[offset] = (data_at + len(data), len(blob), new_flags)
                data += blob
            new_offset, new_size, new_flags = stored_at[offset]
            out_descs += struct.pack("<qIIQ", new_offset, new_size, new_flags, page_flags)
    out.write_bytes(bytes(head + out_descs + data))
    return out


@pytest.mark.parametrize(
    "kind",
    ["virsh-elf", "virsh-kdump-zlib", "qmp-kdump-zlib", "kdump-lzo", "kdump-snappy", "kdump-zstd"],
)
def test_dumps_are_the_guest_and_place_its_kernel_by_vmcoreinfo(dumps, kind, tmp_path) -> None:
    if kind in dumps:
        path, guest = dumps[kind]
    else:  # the virsh kdump's very pages stored with the other codecs
        source, guest = dumps["virsh-kdump-zlib"]
        path = transcode(source, kind[6:], tmp_path / f"guest.{kind}")
    with Session.image(path) as s:
        assert s.found_by == "VMCOREINFO", s.events
        assert s.events == []
        truth = guest.truth()
        assert s.symbol("_text") == truth.symbols["_text"]
        assert_is_the_guest(s, truth)
        regs = s.source.registers()
        assert regs.arch == "x86_64" and regs.cr3 is not None


def test_a_vmcoreinfo_that_lies_is_caught_and_the_banner_search_decides(dumps, tmp_path) -> None:
    path, guest = dumps["virsh-kdump-zlib"]
    with KdumpSource(path) as k:
        text = k.vmcoreinfo
    assert text is not None
    line = next(x for x in text.splitlines() if x.startswith("KERNELOFFSET="))
    wrong = f"KERNELOFFSET={int(line.split('=')[1], 16) + 0x200000:x}"
    assert len(wrong) == len(line)
    forged = tmp_path / "forged.kdump"
    forged.write_bytes(path.read_bytes().replace(line.encode(), wrong.encode()))
    with Session.image(forged) as s:
        assert s.found_by == "banner"
        assert any("VMCOREINFO not used" in e for e in s.events), s.events
        assert_is_the_guest(s, guest.truth())


def test_a_truncated_kdump_gives_one_clear_error(dumps, tmp_path) -> None:
    cut = tmp_path / "cut.kdump"
    data = dumps["virsh-kdump-zlib"][0].read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(SourceError, match=r"runs past the end of the file|without its end record"):
        Session.image(cut)
