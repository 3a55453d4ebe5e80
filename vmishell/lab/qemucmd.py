"""The QEMU command line of a lab guest, as a pure function of its inputs.

Kept apart from the process handling so that the exact command can be shown
to a user, logged in instance.json, and unit-tested without starting QEMU.
Choices that matter for introspection:

* guest RAM is a shared file in /dev/shm (`memory-backend-file,share=on`), so
  the host reads guest-physical memory live, file offset = physical address
  minus `phys_offset` (0x40000000 on arm64 `virt`, whose RAM starts at 1 GiB);
* QMP on a unix socket, for registers, pause/resume and ELF dumps, and a
  second QMP socket on which vmishell only listens for events (a guest reset,
  a shutdown), so a session knows at once that the kernel it found is gone;
* the serial console goes to a socket chardev with a logfile: the log is the
  ground truth channel, and nobody needs to be connected for it to be written;
* `-device vmcoreinfo` lets dumps carry the kernel's VMCOREINFO note;
* no KVM unless asked: TCG behaves the same on every machine.

A `plain` guest leaves RAM in QEMU's own anonymous memory, as a VM started by
someone else has it: vmishell then reads it through `qmp:` (QEMU's process).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from vmishell.lab.guests import GuestSpec

#: Kernel options every lab guest gets: a console we log, no reboot loop on
#: panic (QEMU runs with -no-reboot unless asked to reboot, so a panic ends
#: QEMU), our /init, and a quiet kernel so that printk does not interleave
#: with the truth lines.
BASE_KERNEL_ARGS = ("panic=-1", "rdinit=/init", "quiet", "loglevel=1")


@dataclass(frozen=True)
class LaunchFiles:
    """Where one instance's QEMU puts its sockets, log, pid and RAM."""

    run_dir: Path
    ram_path: Path

    @property
    def qmp(self) -> Path:
        return self.run_dir / "qmp.sock"

    @property
    def events(self) -> Path:
        """A QMP monitor only listened to (events), so the tools' own monitor stays free."""
        return self.run_dir / "events.sock"

    @property
    def serial_sock(self) -> Path:
        return self.run_dir / "serial.sock"

    @property
    def serial_log(self) -> Path:
        return self.run_dir / "serial.log"

    @property
    def pidfile(self) -> Path:
        return self.run_dir / "qemu.pid"

    @property
    def instance_json(self) -> Path:
        return self.run_dir / "instance.json"

    @property
    def initrd(self) -> Path:
        """A per-instance initrd (base image + user scenario), when one is needed."""
        return self.run_dir / "initrd.cpio.gz"


def _opt(value: object) -> str:
    """A value inside a QEMU -option list: commas are escaped by doubling them."""
    return str(value).replace(",", ",,")


def kernel_cmdline(spec: GuestSpec, extra: tuple[str, ...] = ()) -> str:
    """The guest kernel's command line (KASLR stays on: no nokaslr)."""
    return " ".join((f"console={spec.console}", *BASE_KERNEL_ARGS, *spec.kernel_args, *extra))


def qemu_command(
    spec: GuestSpec,
    *,
    qemu: str,
    files: LaunchFiles,
    kernel: Path,
    initrd: Path,
    memory_mb: int,
    accel: str = "tcg",
    name: str = "",
    extra_kernel_args: tuple[str, ...] = (),
    reboot: bool = False,
    plain: bool = False,
) -> list[str]:
    """argv for a daemonized QEMU running `spec` with the given files.

    With `reboot`, a guest reset (or reboot, or panic) boots the guest again in
    the same QEMU, as a real machine would; otherwise it ends QEMU. With
    `plain`, guest RAM is QEMU's default (private, anonymous): no RAM file.
    """
    cmd = [qemu, "-name", name or spec.name]
    if plain:
        cmd += ["-machine", spec.machine, "-accel", accel, "-m", f"{memory_mb}M"]
    else:
        cmd += [
            "-machine", f"{spec.machine},memory-backend=mem",
            "-accel", accel,
            "-m", f"{memory_mb}M",
            "-object",
            f"memory-backend-file,id=mem,size={memory_mb}M,mem-path={_opt(files.ram_path)},"
            "share=on",
        ]  # fmt: skip
    if spec.cpu:
        cmd += ["-cpu", spec.cpu]
    cmd += ["-display", "none", "-nodefaults"]
    if not reboot:
        cmd.append("-no-reboot")
    cmd += [
        "-daemonize",
        "-pidfile", str(files.pidfile),
        "-qmp", f"unix:{_opt(files.qmp)},server=on,wait=off",
        "-qmp", f"unix:{_opt(files.events)},server=on,wait=off",
        "-chardev",
        f"socket,id=ser0,path={_opt(files.serial_sock)},server=on,wait=off,"
        f"logfile={_opt(files.serial_log)}",
        "-serial", "chardev:ser0",
        "-device", "vmcoreinfo",
        "-kernel", str(kernel),
        "-initrd", str(initrd),
        "-append", kernel_cmdline(spec, extra_kernel_args),
    ]  # fmt: skip
    return cmd


def libvirt_domain_xml(
    spec: GuestSpec,
    *,
    name: str,
    emulator: str,
    files: LaunchFiles,
    kernel: Path,
    initrd: Path,
    memory_mb: int,
    accel: str = "tcg",
    extra_kernel_args: tuple[str, ...] = (),
) -> str:
    """A transient libvirt domain running `spec` the way `qemu_command` does, minus the RAM file.

    The kernel and initramfs boot directly, the serial console goes to the
    instance's serial log (the ground truth), VMCOREINFO is on, and any reset,
    reboot or crash ends the domain. QEMU runs as root without relabelling,
    so libvirt leaves the lab's cached images as they are.
    """
    from xml.sax.saxutils import escape, quoteattr

    model, *flags = (spec.cpu or "qemu64").split(",")
    features = "".join(
        f"<feature policy={quoteattr('require' if f[0] == '+' else 'disable')} "
        f"name={quoteattr(f[1:])}/>"
        for f in flags
        if f[:1] in "+-" and len(f) > 1
    )
    arch = {"i386": "i686"}.get(spec.arch, spec.arch)  # libvirt's names: x86_64, i686, aarch64
    domain_type = "kvm" if accel == "kvm" else "qemu"
    cmdline = kernel_cmdline(spec, extra_kernel_args)
    return f"""<domain type={quoteattr(domain_type)}>
  <name>{escape(name)}</name>
  <memory unit='MiB'>{int(memory_mb)}</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch={quoteattr(arch)} machine={quoteattr(spec.machine)}>hvm</type>
    <kernel>{escape(str(kernel))}</kernel>
    <initrd>{escape(str(initrd))}</initrd>
    <cmdline>{escape(cmdline)}</cmdline>
  </os>
  <features><acpi/><vmcoreinfo state='on'/></features>
  <cpu mode='custom' match='exact' check='none'>
    <model fallback='forbid'>{escape(model)}</model>{features}
  </cpu>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>{escape(emulator)}</emulator>
    <serial type='file'>
      <source path={quoteattr(str(files.serial_log))}/>
      <target port='0'/>
    </serial>
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
  </devices>
  <seclabel type='static' model='dac' relabel='no'><label>+0:+0</label></seclabel>
</domain>
"""
