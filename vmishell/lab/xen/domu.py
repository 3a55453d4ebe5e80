"""DomUs of a Xen lab host: xl configurations, creation, consoles and ground truth.

A DomU boots a kernel and initramfs that dom0 reads from the host's root
(shared read-only over 9p, the same paths as on the host, see `dom0_path`):
the lab's own guests by default, so each DomU runs the lab workload and
prints the same ground truth as a QEMU lab guest, or a user's own pair
(`vmishell lab xen create`).

Its console log is written by xenconsoled (PV, PVH) or by the device model's
serial port (HVM) into the instance's share, so it is a file on the host
(`share/console/`) that grows while the DomU boots, as a lab guest's
serial.log does. Configurations and `xl create` logs are kept beside it in
`share/domus/`.

Types, as LAB-FACTS records them for TCG: PV (`console=hvc0`), PVH and HVM
with `tsc_mode="native"` (TCG's SVM misreports RDTSCP exits and such guests
reboot in a loop otherwise), HVM with Debian's qemu-system-xen as device
model, no display and the kernel booted directly.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from vmishell.errors import LabError
from vmishell.lab.qemucmd import BASE_KERNEL_ARGS
from vmishell.lab.truth import GroundTruth, is_ready, read_truth
from vmishell.lab.xen.dom0fs import dom0_path
from vmishell.lab.xen.host import DOM0_SHARE, XenHost, pcpus_for

DOMU_TYPES = ("pv", "pvh", "hvm")
DEFAULT_MEMORY_MB = 256
#: Seconds a DomU may take to print `@@vmi ready` (HVM firmware alone takes ~2 min under TCG).
READY_TIMEOUT = {"pv": 180.0, "pvh": 180.0, "hvm": 600.0}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,47}$")

#: The lab's DomUs: name -> (lab guest whose kernel and initramfs it boots, type).
#: Debian's 686-pae kernel has no Xen PV support (Linux removed 32-bit PV guests
#: in 5.9), so the 32-bit PAE guest runs as PVH and HVM. Under QEMU TCG (this lab's
#: host) neither gets past its first intercepted instruction: the PVH kernel's cpuid
#: and the HVM kernel's EFER access never retire, with or without NRIP. They are
#: kept for Xen hosts on hardware; the tests use the 64-bit DomUs.
LAB_DOMUS: dict[str, tuple[str, str]] = {
    "pv64": ("x86_64", "pv"),
    "pvh64": ("x86_64", "pvh"),
    "hvm64": ("x86_64", "hvm"),
    "pvh32": ("i386-pae", "pvh"),
    "hvm32": ("i386-pae", "hvm"),
}


@dataclass(frozen=True)
class DomuSpec:
    """What a DomU boots and how."""

    name: str
    type: str
    kernel: str
    initrd: str | None
    memory_mb: int = DEFAULT_MEMORY_MB
    vcpus: int = 1
    args: tuple[str, ...] = ()
    #: The lab guest it boots (its ground truth format), or None for a user's own kernel.
    lab_guest: str | None = None
    reboot: bool = False

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise LabError(
                f"invalid DomU name {self.name!r}: letters, digits, '.', '_' or '-' "
                "(at most 48, starting with a letter or digit)"
            )
        if self.type not in DOMU_TYPES:
            raise LabError(f"unknown DomU type {self.type!r} (one of {', '.join(DOMU_TYPES)})")
        if not 32 <= self.memory_mb <= 4096:
            raise LabError(f"DomU memory must be 32..4096 MiB, not {self.memory_mb}")

    @property
    def console(self) -> str:
        """The kernel's console device: Xen's PV console, or HVM's emulated serial port."""
        return "ttyS0" if self.type == "hvm" else "hvc0"

    @property
    def log_name(self) -> str:
        """The console log's file name in `share/console/`."""
        return f"{self.name}-serial.log" if self.type == "hvm" else f"guest-{self.name}.log"


def _xl_string(value: str) -> str:
    if any(c in value for c in '"\\\n'):
        raise LabError(f"cannot put {value!r} into an xl configuration")
    return f'"{value}"'


def xl_config(spec: DomuSpec, cpus: str) -> str:
    """The xl configuration file of `spec` (paths as dom0 sees them), on physical `cpus`."""
    args = " ".join((f"console={spec.console}", *BASE_KERNEL_ARGS, *spec.args))
    lines = [
        f"name = {_xl_string(spec.name)}",
        f"type = {_xl_string(spec.type)}",
        f"memory = {spec.memory_mb}",
        f"vcpus = {spec.vcpus}",
        f"cpus = {_xl_string(cpus)}",
        f"kernel = {_xl_string(dom0_path(spec.kernel))}",
    ]
    if spec.initrd:
        lines.append(f"ramdisk = {_xl_string(dom0_path(spec.initrd))}")
    lines += [
        f"extra = {_xl_string(args)}",
        'on_poweroff = "destroy"',
        f'on_reboot = "{"restart" if spec.reboot else "destroy"}"',
        'on_crash = "destroy"',
    ]
    if spec.type in ("pvh", "hvm"):
        lines.append('tsc_mode = "native"')
    if spec.type == "hvm":
        log = f"{DOM0_SHARE}/console/{spec.log_name}"
        lines += [
            f"serial = {_xl_string('file:' + log)}",
            "vnc = 0",
            "sdl = 0",
            "nographic = 1",
            'vga = "none"',
        ]
    return "\n".join(lines) + "\n"


def lab_domu(name: str, *, memory_mb: int = DEFAULT_MEMORY_MB, reboot: bool = False) -> DomuSpec:
    """The spec of one of the lab's DomUs (see LAB_DOMUS), building its image if needed."""
    from vmishell.lab.build import build_guest
    from vmishell.lab.profiles import ensure_profile

    try:
        guest, kind = LAB_DOMUS[name]
    except KeyError:
        raise LabError(f"unknown lab DomU {name!r} (known: {', '.join(LAB_DOMUS)})") from None
    built = build_guest(guest)
    ensure_profile(built)  # on the host: dom0 finds it, compiled, through the shared root
    return DomuSpec(
        name=name,
        type=kind,
        kernel=str(built.vmlinuz),
        initrd=str(built.initramfs),
        memory_mb=memory_mb,
        lab_guest=guest,
        reboot=reboot,
    )


@dataclass
class Domu:
    """A DomU started by the lab, and where its console log lies on the host."""

    host: str
    spec: DomuSpec
    log: Path
    created_at: float
    domid: int | None = None
    ready_seconds: float | None = None

    @property
    def name(self) -> str:
        return self.spec.name

    def truth(self) -> GroundTruth:
        """The ground truth the DomU printed (lab guests, or kernels running the lab's /init)."""
        return read_truth(self.log)

    def console(self) -> str:
        try:
            return self.log.read_bytes().decode("utf-8", "replace").replace("\r", "")
        except OSError:
            return ""


def _domus_dir(host: XenHost) -> Path:
    d = host.share_dir / "domus"
    d.mkdir(exist_ok=True)
    return d


def _save(host: XenHost, domu: Domu) -> None:
    record = {
        "host": domu.host,
        "spec": asdict(domu.spec),
        "log": str(domu.log),
        "created_at": domu.created_at,
        "domid": domu.domid,
        "ready_seconds": domu.ready_seconds,
    }
    (_domus_dir(host) / f"{domu.name}.json").write_text(json.dumps(record, indent=2) + "\n")


def get(host: XenHost, name: str) -> Domu:
    """A DomU the lab created on `host`, by name."""
    try:
        record = json.loads((_domus_dir(host) / f"{name}.json").read_text())
    except (OSError, ValueError):
        raise LabError(f"the lab started no DomU named {name!r} on {host.name}") from None
    spec = record["spec"]
    spec["args"] = tuple(spec.get("args", ()))
    return Domu(
        host=record["host"],
        spec=DomuSpec(**spec),
        log=Path(record["log"]),
        created_at=record["created_at"],
        domid=record.get("domid"),
        ready_seconds=record.get("ready_seconds"),
    )


def create(
    host: XenHost,
    specs: Sequence[DomuSpec],
    *,
    wait: bool = True,
    ready_text: str | None = None,
    timeout: float | None = None,
) -> list[Domu]:
    """Start DomUs side by side; with `wait`, return once each printed its ready line.

    The ready line is the lab's `@@vmi ready` for lab guests, `ready_text`
    for a user's kernel (None: return as soon as the domain runs).
    """
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise LabError(f"DomU names repeat: {names}")
    running = domids(host)
    clash = [n for n in names if n in running]
    if clash:
        raise LabError(f"domains named {', '.join(clash)} already run on {host.name}")
    d = _domus_dir(host)
    started = time.time()
    domus = []
    for spec in specs:
        log = host.console_dir / spec.log_name
        log.unlink(missing_ok=True)
        (d / f"{spec.name}.cfg").write_text(xl_config(spec, pcpus_for(spec.type, host.cpus)))
        domus.append(Domu(host.name, spec, log, started))
    script = "\n".join(
        f"(xl create {DOM0_SHARE}/domus/{n}.cfg >{DOM0_SHARE}/domus/{n}.create.log 2>&1; "
        f"echo $? >{DOM0_SHARE}/domus/{n}.rc) &"
        for n in names
    )
    host.exec(script + "\nwait", timeout=300).check()
    failed = []
    for domu in domus:
        rc = (d / f"{domu.name}.rc").read_text().strip()
        if rc != "0":
            out = (d / f"{domu.name}.create.log").read_text(errors="replace").strip()
            failed.append(f"{domu.name}: xl create failed ({rc}):\n{out[-2000:]}")
    ids = domids(host)
    for domu in domus:
        domu.domid = ids.get(domu.name)
        _save(host, domu)
    if failed:
        raise LabError("\n".join(failed))
    if wait:
        wait_ready(host, domus, ready_text=ready_text, timeout=timeout)
    return domus


def wait_ready(
    host: XenHost,
    domus: Sequence[Domu],
    *,
    ready_text: str | None = None,
    timeout: float | None = None,
) -> None:
    """Wait until each DomU printed its ready line (see `create`), noting how long it took."""
    for domu in domus:
        text = ready_text if domu.spec.lab_guest is None else "@@vmi ready"
        if text is not None and domu.ready_seconds is None:
            limit = timeout if timeout is not None else READY_TIMEOUT[domu.spec.type]
            _wait_ready(host, domu, text, domu.created_at + limit)
            _save(host, domu)


def _wait_ready(host: XenHost, domu: Domu, text: str, deadline: float) -> None:
    next_check = time.time() + 5
    while time.time() < deadline:
        console = domu.console()
        done = is_ready(console) if text == "@@vmi ready" else text in console
        if done:
            domu.ready_seconds = round(time.time() - domu.created_at, 2)
            return
        if time.time() >= next_check:
            next_check = time.time() + 5
            try:
                running = domids(host)
            except LabError:  # dom0 too busy to answer now: the console still tells
                continue
            if domu.name not in running:
                raise LabError(
                    f"DomU {domu.name} ({domu.spec.type}) ended while booting\n"
                    f"--- last lines of its console ---\n{_tail(console)}"
                )
        time.sleep(0.5)
    raise LabError(
        f"DomU {domu.name} ({domu.spec.type}) did not print {text!r} in time\n"
        f"--- last lines of its console ---\n{_tail(domu.console())}"
    )


def _tail(text: str, lines: int = 20) -> str:
    tail = text.rstrip("\n").splitlines()[-lines:]
    return "\n".join(tail) if tail else "(console log is empty)"


def domids(host: XenHost) -> dict[str, int]:
    """{name: domid} of every domain but dom0, from `xl list`."""
    out = host.exec("xl list", timeout=60).check().text
    return {name: domid for name, domid, *_ in parse_xl_list(out) if domid != 0}


def parse_xl_list(text: str) -> list[tuple[str, int, int, int, str]]:
    """(name, id, memory MiB, vcpus, state) of each line of `xl list` output."""
    rows = []
    for line in text.splitlines()[1:]:
        parts = line.split()
        if len(parts) >= 5 and parts[1].isdigit():
            rows.append((parts[0], int(parts[1]), int(parts[2]), int(parts[3]), parts[4]))
    return rows


def destroy(host: XenHost, names: Iterable[str]) -> None:
    """Destroy DomUs (those already gone are skipped)."""
    present = domids(host)
    gone = [n for n in names if n in present]
    if gone:
        script = "\n".join(f"xl destroy {n} &" for n in gone) + "\nwait"
        host.exec(script, timeout=120).check()
