"""`vmishell lab ...`: build, boot, inspect and stop lab guests from a shell.

A thin layer over vmishell.lab.build and vmishell.lab.runner: it parses
arguments, prints results, and lets vmishell errors propagate to the main CLI,
which turns them into one-line messages and exit code 1.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

from vmishell.lab import runner
from vmishell.lab.build import build_guest, built_release
from vmishell.lab.guests import ACCELERATORS, DEFAULT_MEMORY_MB, GUESTS, PLANNED_GUESTS


def _progress(msg: str) -> None:
    sys.stderr.write(msg + "\n")  # one write: builds run in threads side by side
    sys.stderr.flush()


def _cmd_build(args: argparse.Namespace) -> int:
    names = list(GUESTS) if args.guest == "all" else [args.guest]
    if args.force:
        for name in names:
            built = build_guest(name, force=True, progress=_progress)
            from vmishell.lab.profiles import ensure_profile

            profile = ensure_profile(built, _progress)
            print(f"{name}: {built.kernel_release}  manifest {built.manifest_path}")
            print(f"{' ' * len(name)}  profile {profile}")
    from vmishell.lab.prebuild import build_all

    for line in build_all(names, dbg=args.dbg, xen=args.xen, jobs=args.jobs, progress=_progress):
        print(line)
    return 0


def _cmd_up(args: argparse.Namespace) -> int:
    if args.guest == "xen":
        from vmishell.lab.xen.cli import cmd_up

        return cmd_up(args)
    if args.count is not None:
        return _cmd_up_fleet(args)
    guest = runner.up(
        args.guest,
        args.name,
        memory_mb=args.memory or DEFAULT_MEMORY_MB,
        init_script=args.init,
        accel=args.accel,
        timeout=args.timeout,
        progress=_progress,
        reboot=args.reboot,
        plain=args.plain,
        vmcoreinfo=args.vmcoreinfo,
        libvirt=args.libvirt,
    )
    for note in guest.notes:
        print(f"note: {note}", file=sys.stderr)
    print(
        f"{guest.name}: {guest.spec.name} ready in {guest.boot_seconds} s  pid {guest.pid}\n"
        f"  ram    {guest.ram_path or 'in the QEMU process (plain)'} "
        f"({guest.ram_size >> 20} MiB)\n"
        f"  attach {guest.target}\n"
        f"  serial {guest.serial_log}"
    )
    return 0


def _cmd_up_fleet(args: argparse.Namespace) -> int:
    from vmishell.lab.fleet import comm_of, up_fleet

    guests = up_fleet(
        args.guest,
        args.name,
        args.count,
        memory_mb=args.memory or DEFAULT_MEMORY_MB,
        init_script=args.init,
        accel=args.accel,
        timeout=args.timeout,
        progress=_progress,
        plain=args.plain,
        vmcoreinfo=args.vmcoreinfo,
    )
    for k, guest in enumerate(guests, 1):
        print(
            f"{guest.name}: {guest.spec.name} ready in {guest.boot_seconds} s  pid {guest.pid}"
            f"  attach lab:{guest.name}  scenario: {k} x {comm_of(k)}"
        )
    return 0


def _cmd_down(args: argparse.Namespace) -> int:
    for line in runner.down(args.name):
        print(line)
    return 0


def _format_status(st: runner.GuestStatus) -> str:
    started = time.strftime("%H:%M:%S", time.localtime(st.started_at)) if st.started_at else "-"
    return (
        f"{st.name:<20} {st.guest:<12} {st.state:<11} pid {st.pid or '-':<8} "
        f"{st.memory_mb or '-'} MiB  started {started}  {st.kernel_release or ''}"
    )


def _cmd_status(args: argparse.Namespace) -> int:
    if args.name:
        st = runner.status(args.name)
        if args.json:
            print(json.dumps(asdict(st), indent=2))
        else:
            print(_format_status(st))
        return 0 if st.state not in ("stale", "unreachable") else 1
    return _cmd_list(args)


def _cmd_list(args: argparse.Namespace) -> int:
    statuses = runner.list_guests()
    releases = {name: built_release(name) for name in GUESTS}
    if getattr(args, "json", False):
        catalogue = {n: {**asdict(g), "kernel_release": releases[n]} for n, g in GUESTS.items()}
        print(json.dumps({"guests": catalogue, "instances": [asdict(s) for s in statuses]}))
        return 0
    print("guests:")
    for spec in GUESTS.values():
        kernel = releases[spec.name] or "(not built yet)"
        print(f"  {spec.name:<16} {spec.paging:<8} {kernel:<24} {spec.description}")
    for spec in PLANNED_GUESTS.values():
        print(f"  {spec.name:<16} {'planned':<8} {'':<24} {spec.description}")
    print("instances:" if statuses else "instances: none")
    for st in statuses:
        print("  " + _format_status(st))
    return 0


def _cmd_dump(args: argparse.Namespace) -> int:
    path = runner.dump(args.name, args.path, args.format)
    print(f"{path} ({path.stat().st_size} bytes, {args.format})")
    return 0


def _cmd_truth(args: argparse.Namespace) -> int:
    truth = runner.attach(args.name).truth()
    print(json.dumps(truth.to_json(), indent=2))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `lab` command family to the main `vmishell` parser."""
    lab = subparsers.add_parser("lab", help="build and run real Linux guests under QEMU")
    sub = lab.add_subparsers(dest="lab_command", metavar="ACTION", required=True)
    guest_names = [*GUESTS, "all"]

    p = sub.add_parser("build", help="download and build a guest image (cached)")
    p.add_argument("guest", choices=guest_names)
    p.add_argument("--force", action="store_true", help="refresh apt lists and rebuild")
    p.add_argument(
        "--dbg",
        action="store_true",
        help="also fetch the -dbg files of the host suite's kernels (what profile checks use)",
    )
    p.add_argument("--xen", action="store_true", help="also build the Xen host image")
    p.add_argument(
        "--jobs",
        type=int,
        default=4,
        metavar="N",
        help="Debian archives (architecture, suite) to build from at once (default 4)",
    )
    p.set_defaults(func=_cmd_build)

    p = sub.add_parser("up", help="boot a guest in the background and wait until ready")
    p.add_argument("guest", choices=[*GUESTS, "xen"], help="a lab guest, or xen: a Xen host")
    p.add_argument("--name", help="instance name (default: the guest's name)")
    p.add_argument(
        "--count",
        type=int,
        metavar="N",
        help="boot a fleet: N instances NAME-1..NAME-N, instance k running k processes "
        "named busybox-flK (a different scenario each)",
    )
    p.add_argument("--memory", type=int, metavar="MB", help=f"default {DEFAULT_MEMORY_MB}")
    p.add_argument(
        "--init",
        type=Path,
        metavar="SCRIPT",
        help="shell script run in the guest (background, before the ground truth is taken)",
    )
    p.add_argument(
        "--accel",
        choices=ACCELERATORS,
        default="tcg",
        help="tcg (default); kvm only on a host with real KVM (nested /dev/kvm is unusably slow)",
    )
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for boot")
    p.add_argument(
        "--reboot",
        action="store_true",
        help="a reset or reboot of the guest boots it again (default: it ends QEMU)",
    )
    p.add_argument(
        "--plain",
        action="store_true",
        help="no shared RAM file: RAM stays in QEMU's process, as in VMs started by others "
        "(attach with lab:NAME or qmp:SOCKET)",
    )
    p.add_argument(
        "--vmcoreinfo",
        action="store_true",
        help="load the kernel's qemu_fw_cfg module so that dumps carry the VMCOREINFO note",
    )
    p.add_argument(
        "--libvirt",
        nargs="?",
        const="",
        metavar="URI",
        help="run the guest as a transient libvirt domain (at URI, default libvirt's own); "
        "attach with lab:NAME or libvirt:NAME",
    )
    from vmishell.lab.xen import cli as xen_cli

    xen_cli.add_up_options(p)
    p.set_defaults(func=_cmd_up)

    p = sub.add_parser("down", help="stop an instance and remove its files")
    p.add_argument("name")
    p.set_defaults(func=_cmd_down)

    p = sub.add_parser("status", help="state of one instance (or all)")
    p.add_argument("name", nargs="?")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_status)

    p = sub.add_parser("list", help="the guest catalogue and the instances on this host")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_list)

    p = sub.add_parser("dump", help="write guest RAM to a file (raw or ELF core)")
    p.add_argument("name")
    p.add_argument("path", type=Path)
    p.add_argument("--format", choices=runner.DUMP_FORMATS, default="raw")
    p.set_defaults(func=_cmd_dump)

    p = sub.add_parser("truth", help="print the guest's ground truth as JSON")
    p.add_argument("name")
    p.set_defaults(func=_cmd_truth)

    xen_cli.register(sub)
