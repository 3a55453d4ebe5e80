"""A Xen lab host: QEMU (TCG, `-cpu max`) running Xen, dom0 and its command port.

`up_host` boots the cached image (see `image`) as a lab instance: the same
run directory, instance.json, pid file and QMP socket as any lab guest, so
`vmishell lab down|status|list` handle it. Beside them:

- `agent.sock`: dom0's command port (see `agent`);
- `share/`: a directory dom0 mounts read-write over 9p at /run/vmishell.
  xenconsoled writes the DomUs' console logs there (`share/console/`), so
  their ground truth reaches the host as plain files while they boot;
- the host's root, shared read-only over 9p and mounted at /host in dom0:
  dom0 runs the host's own Python on the code under test (the checkout this
  module was imported from), with the host's C library (see dom0-init.sh).

Xen's options are the ones LAB-FACTS records for TCG: `smap=false smep=false`
(the PV dom0 faults at once without), one dom0 vCPU, and a fixed dom0
memory so the rest of the machine's RAM is free for DomUs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import vmishell
from vmishell.errors import LabError, MissingToolError, NoSuchInstance
from vmishell.lab import instances
from vmishell.lab.qemucmd import LaunchFiles, _opt
from vmishell.lab.runner import _abort, _name_lock, _reclaim, _tail
from vmishell.lab.xen import dom0fs
from vmishell.lab.xen.agent import Agent, ExecResult
from vmishell.lab.xen.image import XenImage, build_xen_image

log = logging.getLogger(__name__)
Progress = Callable[[str], None]

#: What `lab list` shows as the instance's guest, and what instance.json records.
GUEST_NAME = "xen"
DEFAULT_NAME = "xen"
#: Machine RAM: dom0's share plus room for the lab's DomUs (256 MiB each) and Xen.
DEFAULT_MEMORY_MB = 2560
DEFAULT_DOM0_MB = 768
#: Physical CPUs of the Xen host, each given to one kind of domain (see `pcpus_for`):
#: under TCG, a PV vCPU that shares a CPU with PVH or HVM vCPUs sees its user
#: processes' thread pointer (FS base) corrupted now and then, so dom0 (PV),
#: the PV DomUs and the HVM-container DomUs (PVH, HVM) never share one.
DEFAULT_CPUS = 3
#: The physical CPU of dom0's only vCPU, and of every PV DomU's.
DOM0_PCPU = 0
PV_PCPU = 1
DEFAULT_TIMEOUT = 240.0
#: Where dom0 mounts the instance's `share/` directory.
DOM0_SHARE = "/run/vmishell"
QEMU = "qemu-system-x86_64"
#: TCG's `max` CPU has SVM with nested paging, which Xen needs for HVM and PVH guests.
CPU_MODEL = "max"
XEN_OPTIONS = (
    "console=com1", "com1=115200,8n1", "smap=false", "smep=false", "noreboot",
    "loglvl=all", "guest_loglvl=all", "dom0_vcpus_pin",
)  # fmt: skip
DOM0_KERNEL_ARGS = ("console=hvc0", "rdinit=/init", "panic=-1")


@dataclass
class XenHost:
    """A running Xen lab host and where to reach it."""

    name: str
    run_dir: Path
    serial_log: Path
    qmp_path: Path
    agent_path: Path
    share_dir: Path
    pid: int
    started_at: float = 0.0
    boot_seconds: float | None = None
    record: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def agent(self) -> Agent:
        return Agent(self.agent_path, self.run_dir / "agent.lock")

    def exec(self, script: str, *, stdin: bytes = b"", timeout: float = 300.0) -> ExecResult:
        """Run a shell script in dom0 (see `Agent.run`)."""
        if not self.alive():
            raise LabError(f"Xen host {self.name!r} is not running (QEMU pid {self.pid} is gone)")
        return self.agent.run(script, stdin=stdin, timeout=timeout)

    def python(self, code: str, *args: str, timeout: float = 300.0) -> ExecResult:
        """Run Python code in dom0 with the host's Python and the code under test."""
        from vmishell.lab.xen.agent import shell_command

        return self.exec(
            shell_command(["vmishell-python", "-", *args]), stdin=code.encode(), timeout=timeout
        )

    def report(self, domus: list[str], *options: str, timeout: float = 900.0) -> dict[str, Any]:
        """What vmishell in dom0 sees of these DomUs (see `vmishell.lab.xen.report`)."""
        from vmishell.lab.xen.agent import shell_command
        from vmishell.lab.xen.report import parse

        argv = ["vmishell-python", "-m", "vmishell.lab.xen.report", *domus, *options]
        cmd = shell_command(argv)
        result = self.exec(cmd, timeout=timeout)
        try:
            return parse(result.text)
        except ValueError:
            result.check()
            raise LabError(
                "dom0 printed no report:\n" + result.stderr.decode("utf-8", "replace")[-3000:]
            ) from None

    @property
    def cpus(self) -> int:
        return int(self.record.get("cpus", DEFAULT_CPUS))

    @property
    def console_dir(self) -> Path:
        """Where the DomUs' console logs appear on the host."""
        return self.share_dir / "console"

    def alive(self) -> bool:
        return instances.pid_alive(self.pid, self.run_dir)

    def down(self) -> list[str]:
        from vmishell.lab.runner import down

        return down(self.name)


def pcpus_for(kind: str, cpus: int) -> str:
    """The physical CPUs (an xl `cpus=` list) a DomU of `kind` may run on.

    dom0 has CPU 0 to itself; PV DomUs share CPU 1; PVH and HVM DomUs the
    rest. With fewer than three CPUs the kinds must share, which TCG does
    not survive reliably (see DEFAULT_CPUS): refused.
    """
    if cpus < 3:
        raise LabError(
            f"a Xen lab host needs 3 CPUs to keep dom0, PV and PVH/HVM DomUs apart, not {cpus}"
        )
    if kind == "pv":
        return str(PV_PCPU)
    return "2" if cpus == 3 else f"2-{cpus - 1}"


# -- the QEMU command line ---------------------------------------------------------


def xen_command_line(dom0_mb: int) -> str:
    return " ".join((*XEN_OPTIONS, f"dom0_mem={dom0_mb}M,max:{dom0_mb}M", "dom0_max_vcpus=1"))


def qemu_command(
    *,
    qemu: str,
    files: LaunchFiles,
    image: XenImage,
    initrd: Path,
    agent: Path,
    share: Path,
    memory_mb: int,
    dom0_mb: int,
    cpus: int,
    name: str,
) -> list[str]:
    """argv of a daemonized QEMU running the Xen host (a pure function of its inputs)."""
    dom0 = f"{image.dom0_kernel} {' '.join(DOM0_KERNEL_ARGS)}"
    if "," in dom0 or "," in str(initrd):
        raise LabError(f"QEMU splits multiboot modules at commas: {dom0!r}, {initrd}")
    return [
        qemu,
        "-name", name,
        "-machine", "pc",
        "-accel", "tcg",
        "-cpu", CPU_MODEL,
        "-smp", str(cpus),
        "-m", f"{memory_mb}M",
        "-display", "none", "-nodefaults", "-no-reboot",
        "-daemonize",
        "-pidfile", str(files.pidfile),
        "-qmp", f"unix:{_opt(files.qmp)},server=on,wait=off",
        "-chardev",
        f"socket,id=ser0,path={_opt(files.serial_sock)},server=on,wait=off,"
        f"logfile={_opt(files.serial_log)}",
        "-serial", "chardev:ser0",
        "-device", "virtio-serial-pci",
        "-chardev", f"socket,id=agent,path={_opt(agent)},server=on,wait=off",
        "-device", "virtserialport,chardev=agent,name=vmishell.agent",
        "-virtfs", "local,path=/,mount_tag=hostroot,security_model=none,readonly=on",
        "-virtfs", f"local,path={_opt(share)},mount_tag=vmishell-run,security_model=none",
        "-kernel", str(image.xen),
        "-append", xen_command_line(dom0_mb),
        "-initrd", f"{dom0},{initrd}",
    ]  # fmt: skip


def host_settings() -> dict[str, str]:
    """What dom0 needs to run this host's Python on this checkout (see dom0-init.sh)."""
    loader = os.path.realpath("/lib64/ld-linux-x86-64.so.2")
    libdirs: list[str] = []
    # The loader's --library-path overrides an interpreter's RUNPATH: put the
    # directory of the libpython this very process runs on first.
    for d in (*_libpython_dirs(), "/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu"):
        real = "/host" + os.path.realpath(d)
        if os.path.isdir(os.path.realpath(d)) and real not in libdirs:
            libdirs.append(real)
    values = {
        "VMI_PYTHON": dom0fs.dom0_path(os.path.realpath(sys.executable)),
        "VMI_PYTHONPATH": dom0fs.dom0_path(Path(vmishell.__file__).resolve().parents[1]),
        "VMI_LOADER": "/host" + loader if os.path.exists(loader) else "",
        "VMI_LIBRARY_PATH": ":".join(libdirs),
        "VMI_HOME": dom0fs.dom0_path(Path.home()),
    }
    for key in ("VMISHELL_CACHE", "VMISHELL_PROFILE_PATH", "XDG_CACHE_HOME"):
        if os.environ.get(key):
            paths = os.environ[key].split(os.pathsep)
            values[f"VMI_ENV_{key}"] = os.pathsep.join(dom0fs.dom0_path(p) for p in paths if p)
    return values


def _libpython_dirs() -> list[str]:
    """Directories of the libpython shared objects mapped into this process (if any)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return []
    dirs = []
    for line in maps.splitlines():
        path = line.split(None, 5)[-1] if line.count(" ") >= 5 else ""
        if "/libpython" in path and os.path.dirname(path) not in dirs:
            dirs.append(os.path.dirname(path))
    return dirs


def warm_profiles(progress: Progress | None = None) -> None:
    """Index and compile every profile on the host, for dom0's Python to find ready.

    dom0 sees the host's caches read-only and runs Python under TCG (tens of
    times slower): there, compiling one profile takes minutes. Cheap when the
    caches are warm already.
    """
    from vmishell.errors import VmiError
    from vmishell.symbols.finder import ProfileIndex, candidate_profiles
    from vmishell.symbols.profile import load_profile

    index = ProfileIndex()
    for path in candidate_profiles():
        if index.hints(path) is not None:
            try:
                load_profile(path)
            except VmiError as exc:  # a broken profile is skipped by dom0 as by the host
                if progress:
                    progress(f"profile {path.name}: {exc}")
    index.save()


# -- lifecycle ------------------------------------------------------------------------


def up_host(
    name: str = DEFAULT_NAME,
    *,
    memory_mb: int = DEFAULT_MEMORY_MB,
    dom0_mb: int = DEFAULT_DOM0_MB,
    cpus: int = DEFAULT_CPUS,
    timeout: float = DEFAULT_TIMEOUT,
    progress: Progress | None = None,
    cache_dir: Path | None = None,
) -> XenHost:
    """Boot a Xen host as lab instance `name` and wait until dom0 serves commands."""
    name = instances.check_name(name)
    pcpus_for("pv", cpus)  # refuses too few CPUs before anything starts
    if not 256 <= dom0_mb <= memory_mb - 256:
        raise LabError(f"dom0 needs 256 MiB..{memory_mb - 256} MiB, not {dom0_mb}")
    qemu = _which(QEMU)
    say = progress or (lambda msg: log.info("%s", msg))
    files = instances.files_for(name)
    with _name_lock(name):
        notes = _reclaim(name, files, say)
        image = build_xen_image(progress=progress, cache_dir=cache_dir)
        warm_profiles(say)
        files.run_dir.mkdir(parents=True, mode=0o700)
        share = files.run_dir / "share"
        (share / "console").mkdir(parents=True)
        agent = files.run_dir / "agent.sock"
        initrd = files.run_dir / "dom0-initrd.cpio.gz"
        init = dom0fs.render_init(image.modules)
        initrd.write_bytes(
            image.dom0_initramfs.read_bytes() + dom0fs.boot_archive(init, host_settings())
        )
        cmd = qemu_command(
            qemu=qemu,
            files=files,
            image=image,
            initrd=initrd,
            agent=agent,
            share=share,
            memory_mb=memory_mb,
            dom0_mb=dom0_mb,
            cpus=cpus,
            name=name,
        )
        record: dict[str, Any] = {
            "name": name,
            "guest": GUEST_NAME,
            "kind": "xen",
            "run_dir": str(files.run_dir),
            "ram_path": str(files.ram_path),
            "ram_size": memory_mb << 20,
            "memory_mb": memory_mb,
            "dom0_memory_mb": dom0_mb,
            "cpus": cpus,
            "qmp_path": str(files.qmp),
            "serial_log": str(files.serial_log),
            "agent_path": str(agent),
            "share_dir": str(share),
            "accel": "tcg",
            "command": cmd,
            "manifest": {
                "kernel_release": image.kernel_release,
                "xen": image.manifest["versions"].get("xen-hypervisor-4.17-amd64"),
                "image": image.manifest.get("image"),
            },
            "notes": notes,
            "pid": None,
        }
        instances.write_record(files, record)
        say(f"{name}: starting Xen under {QEMU} ({memory_mb} MiB, dom0 {dom0_mb} MiB, tcg)")
        started = time.time()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
        except subprocess.TimeoutExpired:
            _abort(files, instances.read_pid(files))
            raise LabError(f"{name}: QEMU did not daemonize within 60 s") from None
        pid = instances.read_pid(files)
        if proc.returncode != 0 or pid is None:
            _abort(files, pid)
            raise LabError(
                f"{name}: {QEMU} failed to start (exit code {proc.returncode}):\n"
                f"{(proc.stderr or proc.stdout).strip()}"
            )
        record.update(pid=pid, started_at=started)
        instances.write_record(files, record)
        host = _from_record(record, files)
        try:
            _wait_dom0(host, timeout)
            host.exec("xl info >/dev/null", timeout=60).check()
        except BaseException:
            _abort(files, pid)  # also on Ctrl-C: never leave a half-booted Xen behind
            raise
        record["boot_seconds"] = host.boot_seconds = round(time.time() - started, 2)
        instances.write_record(files, record)
        say(f"{name}: dom0 ready after {record['boot_seconds']} s (pid {pid})")
        return host


def _which(program: str) -> str:
    import shutil

    path = shutil.which(program)
    if path is None:
        raise MissingToolError(program, "qemu-system-x86")
    return path


#: Console lines that mean the host will never become ready.
_FATAL = (
    ("@@xen agent-port-missing", "dom0 found no vmishell.agent port"),
    ("Hardware Dom0 crashed", "dom0 crashed"),
    ("Kernel panic", "the dom0 kernel panicked"),
    ("Panic on CPU", "Xen panicked"),
)


def _wait_dom0(host: XenHost, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    reason = f"no `@@xen ready` line within {timeout:g} s"
    while time.monotonic() < deadline:
        try:
            text = host.serial_log.read_bytes().decode("utf-8", "replace")
        except OSError:
            text = ""
        if "@@xen ready" in text:
            return
        fatal = next((why for sign, why in _FATAL if sign in text), None)
        if fatal is not None:
            reason = fatal
            break
        if not host.alive():
            reason = "QEMU exited during boot"
            break
        time.sleep(0.2)
    raise LabError(
        f"Xen host {host.name!r} failed to boot: {reason}\n"
        f"--- last 20 lines of the serial console ---\n{_tail(host.serial_log)}"
    )


def _from_record(record: dict[str, Any], files: LaunchFiles) -> XenHost:
    return XenHost(
        name=record["name"],
        run_dir=files.run_dir,
        serial_log=Path(record["serial_log"]),
        qmp_path=Path(record["qmp_path"]),
        agent_path=Path(record["agent_path"]),
        share_dir=Path(record["share_dir"]),
        pid=int(record["pid"]),
        started_at=float(record.get("started_at", 0.0)),
        boot_seconds=record.get("boot_seconds"),
        record=record,
    )


def attach_host(name: str = DEFAULT_NAME) -> XenHost:
    """The running Xen host instance `name`."""
    files = instances.files_for(name)
    record = instances.read_record(files)
    if record is None or record.get("pid") is None:
        raise NoSuchInstance(f"no Xen lab host named {name!r} (start one: vmishell lab up xen)")
    if record.get("kind") != "xen":
        raise LabError(f"lab instance {name!r} is a {record.get('guest')} guest, not a Xen host")
    host = _from_record(record, files)
    if not host.alive():
        raise LabError(
            f"Xen host {name!r} is not running (QEMU pid {host.pid} is gone); "
            f"`vmishell lab down {name}` cleans up"
        )
    return host


def find_host() -> XenHost:
    """The only running Xen host, for commands that do not name one."""
    found = []
    for name in instances.known_names():
        with contextlib.suppress(LabError):
            found.append(attach_host(name))
    if len(found) == 1:
        return found[0]
    if not found:
        raise NoSuchInstance("no Xen lab host is running (start one: vmishell lab up xen)")
    names = ", ".join(h.name for h in found)
    raise LabError(f"several Xen hosts run ({names}): name one with --host")
