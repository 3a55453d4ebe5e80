"""Start, watch, dump and stop lab guests: QEMU processes running in the background.

`up` builds the guest image if needed, starts a daemonized QEMU whose RAM is
a file in /dev/shm, and returns only once the guest printed `@@vmi ready` on
its serial console, so callers can immediately compare RAM with the ground
truth. Every failure path kills the QEMU it started and removes the
instance's files, and says why with the tail of the serial log. Instances are
named so that several guests (or several test sessions) can run side by side.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import lzma
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmishell.errors import LabError, MissingToolError, QmpError
from vmishell.lab import instances
from vmishell.lab.build import BuiltGuest, build_guest
from vmishell.lab.guests import DEFAULT_MEMORY_MB, GuestSpec, check_accel, get_guest
from vmishell.lab.initramfs import Cpio, compress, scenario_archive
from vmishell.lab.paths import run_root
from vmishell.lab.qemucmd import LaunchFiles, libvirt_domain_xml, qemu_command
from vmishell.lab.truth import GroundTruth, is_ready, read_truth
from vmishell.sources.base import Registers
from vmishell.sources.qmp import QmpClient
from vmishell.symbols import deb

log = logging.getLogger(__name__)

Progress = Callable[[str], None]

MIB = 1 << 20
#: Below 2 GiB, x86 `pc`/`q35` map all RAM at physical 0..size, so that the RAM
#: file offset is the physical address; above it RAM is split around the PCI hole.
MAX_MEMORY_MB = 2047
#: A plain guest (no RAM file) is read through QEMU's process, which knows its layout.
MAX_PLAIN_MEMORY_MB = 8192
MIN_MEMORY_MB = 64
TAIL_LINES = 20


@dataclass
class RunningGuest:
    """A live lab instance and where to reach it."""

    name: str
    spec: GuestSpec
    run_dir: Path
    #: The shared RAM file (None for a plain guest, whose RAM lives in QEMU's process).
    ram_path: Path | None
    ram_size: int
    qmp_path: Path
    serial_log: Path
    pid: int
    #: A QMP socket reserved for listening to events (None for instances of older records).
    events_path: Path | None = None
    #: Whether a guest reset boots it again (False: a reset or panic ends QEMU).
    reboot: bool = False
    accel: str = "tcg"
    started_at: float = 0.0
    boot_seconds: float | None = None
    manifest: dict[str, Any] = field(default_factory=dict, repr=False)
    notes: tuple[str, ...] = ()
    #: The libvirt URI of a guest run as a libvirt domain (`up(libvirt=...)`), else None.
    libvirt_uri: str | None = None

    @property
    def target(self) -> str:
        """How vmishell attaches to this guest without the lab (`libvirt:` or `qmp:`)."""
        if self.libvirt_uri is not None:
            return f"libvirt:{self.name}" + (f"@{self.libvirt_uri}" if self.libvirt_uri else "")
        return f"qmp:{self.qmp_path}"

    @property
    def plain(self) -> bool:
        """Started without a RAM file (`up(plain=True)`): attach through `qmp:`."""
        return self.ram_path is None

    def truth(self) -> GroundTruth:
        """The ground truth the guest printed when it booted."""
        return read_truth(self.serial_log)

    def qmp(self, timeout: float = 30.0) -> QmpClient:
        """A new QMP connection (close it, or use it as a context manager)."""
        return QmpClient(self.qmp_path, timeout=timeout)

    def registers(self) -> Registers:
        """The vCPU's control registers, read through QMP."""
        with self.qmp() as q:
            return q.registers()

    def alive(self) -> bool:
        return instances.pid_alive(self.pid, self.run_dir)

    def status(self) -> GuestStatus:
        return status(self.name)

    def dump(self, path: str | Path, fmt: str = "raw") -> Path:
        return dump(self.name, path, fmt)

    def down(self) -> list[str]:
        return down(self.name)


@dataclass(frozen=True)
class GuestStatus:
    """What `lab status` reports about one instance."""

    name: str
    guest: str
    #: "running", "paused", ... from QMP; "starting" while `up` runs; "stale" when QEMU is gone
    state: str
    pid: int | None
    run_dir: str
    ram_path: str
    memory_mb: int | None
    accel: str | None
    started_at: float | None
    boot_seconds: float | None
    ready: bool
    kernel_release: str | None


# -- helpers ------------------------------------------------------------------------


def _tail(path: Path, lines: int = TAIL_LINES) -> str:
    try:
        text = path.read_bytes().decode("utf-8", "replace").replace("\r", "")
    except OSError:
        return "(no serial log)"
    tail = text.rstrip("\n").splitlines()[-lines:]
    return "\n".join(tail) if tail else "(serial log is empty)"


@contextlib.contextmanager
def _name_lock(name: str) -> Iterator[None]:
    """Serialise up/down of one instance name across processes.

    The lock file is removed again when no instance of that name remains, so
    locks do not pile up; a racing third process could then lock a fresh file,
    which is acceptable for a developer tool (up/down of one name at once).
    """
    locks = run_root() / ".locks"
    locks.mkdir(parents=True, exist_ok=True)
    path = locks / f"{name}.lock"
    with path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            if not instances.leftovers(instances.files_for(name)):
                with contextlib.suppress(OSError):
                    path.unlink()
            fcntl.flock(f, fcntl.LOCK_UN)


def _wait_dead(pid: int, run_dir: Path, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not instances.pid_alive(pid, run_dir):
            return True
        time.sleep(0.05)
    return not instances.pid_alive(pid, run_dir)


def _stop_qemu(files: LaunchFiles, pid: int | None, grace: float = 5.0) -> str:
    """Stop a QEMU: QMP quit, then SIGTERM, then SIGKILL. Returns how it ended."""
    if not instances.pid_alive(pid, files.run_dir):
        return "not running"
    assert pid is not None
    with contextlib.suppress(QmpError):
        QmpClient(files.qmp, timeout=grace).quit()
    if _wait_dead(pid, files.run_dir, grace):
        return "quit via QMP"
    for sig in (signal.SIGTERM, signal.SIGKILL):
        instances.kill(pid, sig)
        if _wait_dead(pid, files.run_dir, grace):
            return f"stopped with {sig.name}"
    raise LabError(f"QEMU pid {pid} survived SIGKILL; its files in {files.run_dir} are kept")


def _qemu_binary(spec: GuestSpec) -> str:
    path = shutil.which(spec.qemu_binary)
    if path is None:
        raise MissingToolError(spec.qemu_binary, spec.qemu_package)
    return path


def _guest_from_record(record: dict[str, Any], files: LaunchFiles) -> RunningGuest:
    return RunningGuest(
        name=record["name"],
        spec=get_guest(record["guest"]),
        run_dir=files.run_dir,
        ram_path=Path(record["ram_path"]) if record.get("ram_path") else None,
        libvirt_uri=record.get("libvirt_uri"),
        ram_size=int(record["ram_size"]),
        qmp_path=Path(record["qmp_path"]),
        serial_log=Path(record["serial_log"]),
        pid=int(record["pid"]),
        events_path=Path(record["events_path"]) if record.get("events_path") else None,
        reboot=bool(record.get("reboot", False)),
        accel=record.get("accel", "tcg"),
        started_at=float(record.get("started_at", 0.0)),
        boot_seconds=record.get("boot_seconds"),
        manifest=record.get("manifest", {}),
        notes=tuple(record.get("notes", ())),
    )


# -- public API ---------------------------------------------------------------------


def up(
    guest: str | GuestSpec,
    name: str | None = None,
    *,
    memory_mb: int = DEFAULT_MEMORY_MB,
    init_script: str | Path | None = None,
    accel: str = "tcg",
    timeout: float = 120.0,
    progress: Progress | None = None,
    cache_dir: Path | None = None,
    extra_kernel_args: tuple[str, ...] = (),
    built: BuiltGuest | None = None,
    reboot: bool = False,
    plain: bool = False,
    vmcoreinfo: bool = False,
    libvirt: str | None = None,
) -> RunningGuest:
    """Boot `guest` as instance `name` (default: the guest's name) and wait until ready.

    `init_script` is a shell script copied into the guest as /vmi/scenario and
    started in the background by /init before the ground truth is printed.
    `built` overrides the image (tests use it to boot deliberately broken ones).
    With `reboot`, a reset or reboot of the guest boots it again in the same
    QEMU (the serial log then holds one ground truth per boot). With `plain`,
    QEMU keeps guest RAM in its own memory (no shared RAM file), as VMs that
    were not started for introspection do; up to MAX_PLAIN_MEMORY_MB, RAM
    above 4 GiB included. With `vmcoreinfo`, the guest loads the kernel's
    qemu_fw_cfg module (from the same kernel package) so that QEMU's dumps
    (ELF, kdump) carry its VMCOREINFO note. With `libvirt` (a URI, "" for
    libvirt's default), the guest runs as a transient libvirt domain named
    like the instance (plain: no RAM file), for `libvirt:NAME` and `virsh`.
    """
    spec = get_guest(guest)
    check_accel(accel)
    plain = plain or libvirt is not None
    if libvirt is not None and reboot:
        raise LabError("a libvirt lab guest cannot reboot (its domain ends on reset)")
    name = instances.check_name(name or spec.name)
    most = MAX_PLAIN_MEMORY_MB if plain else MAX_MEMORY_MB
    if not MIN_MEMORY_MB <= memory_mb <= most:
        raise LabError(f"memory must be {MIN_MEMORY_MB}..{most} MiB, not {memory_mb}")
    qemu = _qemu_binary(spec)
    scenario = None
    if init_script is not None:
        try:
            scenario = Path(init_script).read_bytes()
        except OSError as exc:
            raise LabError(f"cannot read init script {init_script}: {exc}") from exc
    say = progress or (lambda msg: log.info("%s", msg))
    files = instances.files_for(name)

    with _name_lock(name):
        notes = _reclaim(name, files, say)
        image = built or build_guest(spec, progress=progress, cache_dir=cache_dir)
        if built is None and cache_dir is None:
            notes.extend(_profile_note(image, say))
        files.run_dir.mkdir(parents=True, mode=0o700)
        initrd = image.initramfs
        extra = b""
        if vmcoreinfo:
            extra += module_archive(image, FW_CFG_MODULE)
            scenario = f"insmod /vmi/{FW_CFG_MODULE}.ko\n".encode() + (scenario or b"")
        if scenario is not None:
            extra += scenario_archive(scenario)
        # A libvirt QEMU gets its serial log as a descriptor: the per-instance initrd is
        # what names the run directory on its command line (see instances.pid_alive).
        if extra or libvirt is not None:
            files.initrd.write_bytes(image.initramfs.read_bytes() + extra)
            initrd = files.initrd
        cmd = qemu_command(
            spec,
            qemu=qemu,
            files=files,
            kernel=image.vmlinuz,
            initrd=initrd,
            memory_mb=memory_mb,
            accel=accel,
            name=name,
            extra_kernel_args=extra_kernel_args,
            reboot=reboot,
            plain=plain,
        )
        domain_xml = None
        if libvirt is not None:
            domain_xml = libvirt_domain_xml(
                spec,
                name=name,
                emulator=qemu,
                files=files,
                kernel=image.vmlinuz,
                initrd=initrd,
                memory_mb=memory_mb,
                accel=accel,
                extra_kernel_args=extra_kernel_args,
            )
        record: dict[str, Any] = {
            "name": name,
            "guest": spec.name,
            "image": spec.image_name,
            "run_dir": str(files.run_dir),
            "ram_path": None if plain else str(files.ram_path),
            "plain": plain,
            "vmcoreinfo": vmcoreinfo,
            "ram_size": memory_mb * MIB,
            "memory_mb": memory_mb,
            "phys_offset": spec.phys_offset,
            "qmp_path": str(files.qmp),
            "events_path": str(files.events),
            "reboot": reboot,
            "serial_log": str(files.serial_log),
            "accel": accel,
            "command": None if domain_xml else cmd,
            "libvirt_uri": libvirt,
            "domain_xml": domain_xml,
            "init_script": str(init_script) if init_script is not None else None,
            "manifest": image.manifest,
            "notes": notes,
            "pid": None,
            "starting": os.getpid(),
        }
        instances.write_record(files, record)
        say(f"{name}: starting {spec.qemu_binary} ({spec.name}, {memory_mb} MiB, {accel})")
        started = time.time()
        if domain_xml is not None:
            pid = _start_domain(name, libvirt or "", domain_xml, files)
        else:
            pid = _start_qemu(name, spec, cmd, files)
        record.update(pid=pid, started_at=started)
        instances.write_record(files, record)
        try:
            _wait_ready(name, spec, files, pid, timeout)
        except BaseException:
            _abort(files, pid)  # also on Ctrl-C: never leave a half-booted QEMU behind
            raise
        record["boot_seconds"] = round(time.time() - started, 2)
        instances.write_record(files, record)
        say(f"{name}: ready after {record['boot_seconds']} s (pid {pid})")
        return _guest_from_record(record, files)


def _start_qemu(name: str, spec: GuestSpec, cmd: list[str], files: LaunchFiles) -> int:
    """Run the daemonizing QEMU command; its pid once it is in the background."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    except subprocess.TimeoutExpired:
        _abort(files, instances.read_pid(files))
        raise LabError(f"{name}: QEMU did not daemonize within 60 s") from None
    pid = instances.read_pid(files)
    if proc.returncode != 0 or pid is None:
        _abort(files, pid)
        raise LabError(
            f"{name}: {spec.qemu_binary} failed to start (exit code {proc.returncode}):\n"
            f"{(proc.stderr or proc.stdout).strip()}"
        )
    return pid


def _libvirt_conn(uri: str) -> tuple[Any, Any]:
    """(libvirt module, connection to `uri`), or a LabError saying why not."""
    from vmishell.errors import SourceError
    from vmishell.sources.libvirt import _libvirt, _message

    try:
        libvirt, _ = _libvirt()
    except SourceError as exc:
        raise LabError(str(exc)) from None
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    try:
        return libvirt, libvirt.open(uri or None)
    except libvirt.libvirtError as exc:
        where = uri or "libvirt's default URI"
        raise LabError(f"cannot connect to libvirt at {where}: {_message(exc)}") from None


def _start_domain(name: str, uri: str, xml: str, files: LaunchFiles) -> int:
    """Create the transient domain; the pid of its QEMU (also written to the pid file)."""
    from vmishell.errors import SourceError
    from vmishell.sources.libvirt import _message, qemu_pid

    libvirt, conn = _libvirt_conn(uri)
    try:
        try:
            domain = conn.createXML(xml, 0)
        except libvirt.libvirtError as exc:
            instances.remove_files(files)
            raise LabError(f"{name}: libvirt could not start the domain: {_message(exc)}") from None
        try:
            pid = qemu_pid(domain, name)
        except SourceError as exc:
            with contextlib.suppress(libvirt.libvirtError):
                domain.destroy()
            instances.remove_files(files)
            raise LabError(str(exc)) from None
    finally:
        conn.close()
    files.pidfile.write_text(f"{pid}\n")
    return pid


def _destroy_domain(record: dict[str, Any]) -> None:
    """Destroy an instance's libvirt domain (when it still exists)."""
    try:
        libvirt, conn = _libvirt_conn(record.get("libvirt_uri") or "")
    except LabError:
        return  # the QEMU is then stopped by its pid
    try:
        with contextlib.suppress(libvirt.libvirtError):
            conn.lookupByName(record["name"]).destroy()
    finally:
        conn.close()


#: The kernel module that hands the guest's VMCOREINFO to QEMU's `-device vmcoreinfo`.
FW_CFG_MODULE = "qemu_fw_cfg"


def module_archive(image: BuiltGuest, module: str) -> bytes:
    """An initramfs archive holding /vmi/MODULE.ko from the guest's own kernel package.

    The module is taken from the .deb once and kept beside the image.
    """
    cached = image.image_dir / "modules" / f"{module}.ko"
    try:
        data = cached.read_bytes()
    except OSError:
        # bookworm: lib/modules/R/.../M.ko; trixie (merged /usr): usr/lib/modules/R/.../M.ko.xz
        prefixes = tuple(f"{u}lib/modules/{image.kernel_release}/" for u in ("", "usr/"))
        suffixes = (f"/{module}.ko", f"/{module}.ko.xz")
        found = deb.extract(
            image.kernel_deb,
            lambda n: n.startswith(prefixes) and n.endswith(suffixes),
            stop_when=bool,
        )
        if not found:
            raise LabError(f"{image.kernel_deb.name} has no {module}.ko") from None
        member, data = next(iter(found.items()))
        if member.endswith(".xz"):  # busybox insmod takes the plain module only
            data = lzma.decompress(data)
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_name(f".{cached.name}.{os.getpid()}.tmp")
        tmp.write_bytes(data)
        tmp.replace(cached)
    cpio = Cpio()
    cpio.add_file(f"vmi/{module}.ko", data)
    return compress(bytes(cpio))


def _profile_note(image: BuiltGuest, say: Progress) -> list[str]:
    """Make sure vmishell can attach to the guest; a failure is a note, not a failed boot."""
    from vmishell.errors import VmiError
    from vmishell.lab.profiles import ensure_profile

    try:
        ensure_profile(image, say)
    except VmiError as exc:
        return [f"no profile for {image.kernel_release}: {exc}"]
    return []


def _reclaim(name: str, files: LaunchFiles, say: Progress) -> list[str]:
    """Refuse a name in use; clean up what a dead instance of that name left behind."""
    pid = instances.read_pid(files)
    if instances.pid_alive(pid, files.run_dir):
        raise LabError(
            f"instance name {name!r} is in use by a running QEMU (pid {pid}); "
            f"stop it with `vmishell lab down {name}` or choose another --name"
        )
    if not instances.leftovers(files):
        return []
    removed = instances.remove_files(files)
    why = f"QEMU pid {pid} is dead" if pid else "no QEMU was recorded"
    note = f"cleaned up stale instance {name!r} ({why}): removed {', '.join(removed)}"
    say(note)
    log.warning("%s", note)
    return [note]


def _abort(files: LaunchFiles, pid: int | None) -> None:
    """Kill a QEMU that failed to come up and remove its files."""
    with contextlib.suppress(LabError):
        _stop_qemu(files, pid, grace=2.0)
    instances.remove_files(files)


def _wait_ready(name: str, spec: GuestSpec, files: LaunchFiles, pid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    reason = f"no `@@vmi ready` line within {timeout:g} s"
    while time.monotonic() < deadline:
        try:
            text = files.serial_log.read_bytes().decode("utf-8", "replace")
        except OSError:
            text = ""
        if is_ready(text):
            return
        if not instances.pid_alive(pid, files.run_dir):
            panicked = "Kernel panic" in text
            reason = "the kernel panicked" if panicked else "QEMU exited during boot"
            break
        time.sleep(0.2)
    raise LabError(
        f"guest {name!r} ({spec.name}) failed to boot: {reason}\n"
        f"--- last {TAIL_LINES} lines of the serial console ---\n{_tail(files.serial_log)}"
    )


def attach(name: str) -> RunningGuest:
    """The running instance `name` (e.g. started by another process)."""
    return _guest_from_record(instances.live_record(name), instances.files_for(name))


def _running_hint() -> str:
    names = instances.known_names()
    return f" (known: {', '.join(names)})" if names else " (none is running)"


def down(name: str, *, grace: float = 5.0) -> list[str]:
    """Stop instance `name` and remove its files (only its own). Returns what was done."""
    files = instances.files_for(name)
    with _name_lock(name):
        if not instances.leftovers(files):
            raise LabError(f"no lab instance named {name!r}{_running_hint()}")
        pid = instances.read_pid(files)
        record = instances.read_record(files) or {}
        if record.get("libvirt_uri") is not None and instances.pid_alive(pid, files.run_dir):
            _destroy_domain(record)
        how = _stop_qemu(files, pid, grace)
        removed = instances.remove_files(files)
    return [f"{name}: QEMU {how}", *(f"removed {p}" for p in removed)]


def status(name: str) -> GuestStatus:
    """The state of instance `name` (LabError if there is none)."""
    files = instances.files_for(name)
    if not instances.leftovers(files):
        raise LabError(f"no lab instance named {name!r}{_running_hint()}")
    record = instances.read_record(files) or {}
    pid = instances.read_pid(files)
    state = "stale"
    starter = record.get("starting")
    if pid is None and isinstance(starter, int) and instances.pid_alive(starter):
        state = "starting"  # `up` of another process is still bringing its QEMU up
    elif instances.pid_alive(pid, files.run_dir) and record.get("libvirt_uri") is not None:
        state = _domain_state(record)
    elif instances.pid_alive(pid, files.run_dir):
        try:
            with QmpClient(files.qmp, timeout=5.0) as q:
                state = q.status()
        except QmpError:
            state = "unreachable"
    try:
        ready = is_ready(files.serial_log.read_bytes().decode("utf-8", "replace"))
    except OSError:
        ready = False
    manifest = record.get("manifest") or {}
    return GuestStatus(
        name=name,
        guest=record.get("guest", "?"),
        state=state,
        pid=pid,
        run_dir=str(files.run_dir),
        ram_path=str(files.ram_path),
        memory_mb=record.get("memory_mb"),
        accel=record.get("accel"),
        started_at=record.get("started_at"),
        boot_seconds=record.get("boot_seconds"),
        ready=ready,
        kernel_release=manifest.get("kernel_release"),
    )


def list_guests() -> list[GuestStatus]:
    """Every instance with files on this host, running or stale."""
    out = []
    for name in instances.known_names():
        with contextlib.suppress(LabError):
            out.append(status(name))
    return out


#: kdump-* are makedumpfile's compressed format as QEMU writes it (flattened); which
#: codecs a QEMU offers depends on its build (Debian 12's 7.2: kdump-zlib only).
DUMP_FORMATS = ("raw", "elf", "kdump-zlib", "kdump-lzo", "kdump-snappy")


def dump(name: str, path: str | Path, fmt: str = "raw", *, timeout: float = 600.0) -> Path:
    """Write guest RAM of instance `name` to `path`.

    raw: the RAM file copied while the vCPUs are paused (offset = physical
    address: on arm64 `virt` RAM lands at 0x40000000, after a sparse hole);
    elf: QEMU's `dump-guest-memory` (paging off) with PT_LOAD
    segments per RAM block and QEMU/VMCOREINFO notes carrying registers;
    kdump-*: the same in makedumpfile's compressed format.
    """
    if fmt not in DUMP_FORMATS:
        raise LabError(f"unknown dump format {fmt!r} (use one of {', '.join(DUMP_FORMATS)})")
    guest = attach(name)
    target = Path(path).expanduser().absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    if guest.libvirt_uri is not None and fmt != "raw":
        _dump_domain(guest, target, fmt)
        return target
    if fmt == "raw" and guest.ram_path is None:
        _dump_process_ram(guest, target)
        return target
    with guest.qmp(timeout=timeout) as q:
        if fmt == "raw":
            was_running = q.running()
            if was_running:
                q.stop()
            try:
                _copy_ram(guest.ram_path, target, guest.spec.phys_offset)
            except OSError as exc:
                raise LabError(f"cannot copy {guest.ram_path} to {target}: {exc}") from exc
            finally:
                if was_running:
                    q.cont()
        else:
            extra = {} if fmt == "elf" else {"format": fmt}
            try:
                q.command("dump-guest-memory", paging=False, protocol=f"file:{target}", **extra)
            except QmpError as exc:
                raise LabError(f"QEMU cannot write a {fmt} dump of {name!r}: {exc}") from exc
            result = q.command("query-dump")
            if result.get("status") != "completed":
                raise LabError(f"dump of {name!r} to {target} did not complete: {result}")
    return target


def _copy_ram(ram: Path, target: Path, phys_offset: int) -> None:
    """Copy a RAM file so that file offset = physical address (a sparse hole before RAM)."""
    if not phys_offset:
        shutil.copyfile(ram, target)
        return
    with ram.open("rb") as src, target.open("wb") as out:
        out.seek(phys_offset)
        shutil.copyfileobj(src, out, 16 * MIB)


def _dump_process_ram(guest: RunningGuest, target: Path) -> None:
    """A raw dump of a plain guest: its RAM read from QEMU's process while paused.

    File offset = physical address (RAM above 4 GiB lands past a sparse hole).
    """
    from vmishell.errors import VmiError
    from vmishell.sources.base import PhysicalSource
    from vmishell.sources.libvirt import open_libvirt
    from vmishell.sources.qemuproc import open_qmp

    chunk = 16 * MIB
    try:
        src: PhysicalSource
        if guest.libvirt_uri is not None:
            src = open_libvirt(guest.target.removeprefix("libvirt:"))
        else:
            src = open_qmp(guest.qmp_path, pid=guest.pid)
        with src, src.paused(), target.open("wb") as out:
            for r in src.ranges():
                for pos in range(r.start, r.end, chunk):
                    out.seek(pos)
                    out.write(src.read(pos, min(chunk, r.end - pos)))
            out.truncate(src.size)
    except (VmiError, OSError) as exc:
        raise LabError(f"raw dump of {guest.name!r} to {target} failed: {exc}") from exc


def _dump_domain(guest: RunningGuest, target: Path, fmt: str) -> None:
    """`virsh dump --memory-only --format FMT` through libvirt's API."""
    from vmishell.sources.libvirt import _message

    libvirt, conn = _libvirt_conn(guest.libvirt_uri or "")
    formats = {
        "elf": libvirt.VIR_DOMAIN_CORE_DUMP_FORMAT_RAW,  # memory-only "raw" is QEMU's ELF
        "kdump-zlib": libvirt.VIR_DOMAIN_CORE_DUMP_FORMAT_KDUMP_ZLIB,
        "kdump-lzo": libvirt.VIR_DOMAIN_CORE_DUMP_FORMAT_KDUMP_LZO,
        "kdump-snappy": libvirt.VIR_DOMAIN_CORE_DUMP_FORMAT_KDUMP_SNAPPY,
    }
    try:
        domain = conn.lookupByName(guest.name)
        domain.coreDumpWithFormat(str(target), formats[fmt], libvirt.VIR_DUMP_MEMORY_ONLY)
    except libvirt.libvirtError as exc:
        raise LabError(
            f"libvirt cannot write a {fmt} dump of {guest.name!r}: {_message(exc)}"
        ) from None
    finally:
        conn.close()


def _domain_state(record: dict[str, Any]) -> str:
    """libvirt's word for the state of an instance's domain ("running", "paused", ...)."""
    try:
        libvirt, conn = _libvirt_conn(record.get("libvirt_uri") or "")
    except LabError:
        return "unreachable"
    names = {
        libvirt.VIR_DOMAIN_RUNNING: "running",
        libvirt.VIR_DOMAIN_PAUSED: "paused",
        libvirt.VIR_DOMAIN_SHUTDOWN: "shutdown",
        libvirt.VIR_DOMAIN_SHUTOFF: "shutoff",
        libvirt.VIR_DOMAIN_CRASHED: "crashed",
    }
    try:
        return names.get(conn.lookupByName(record["name"]).state()[0], "unknown")
    except libvirt.libvirtError:
        return "unreachable"
    finally:
        conn.close()
