"""`vmishell lab up xen`, `lab exec NAME -- CMD`, `lab xen create|list|console|truth|destroy`.

Thin: parse, call `host` and `domu`, print. vmishell errors go up to the
main CLI, which prints them as one line and exits 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from vmishell.lab.xen import domu as domus
from vmishell.lab.xen.agent import shell_command
from vmishell.lab.xen.host import (
    DEFAULT_CPUS,
    DEFAULT_DOM0_MB,
    DEFAULT_MEMORY_MB,
    DEFAULT_NAME,
    XenHost,
    attach_host,
    find_host,
    up_host,
)

#: DomUs `lab up xen` starts unless told otherwise (HVM adds minutes of firmware under TCG).
DEFAULT_DOMUS = ("pv64", "pvh64")


def _progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _host(name: str | None) -> XenHost:
    return attach_host(name) if name else find_host()


def add_up_options(parser: argparse.ArgumentParser) -> None:
    """Options of `lab up` that only a Xen host takes."""
    group = parser.add_argument_group("xen (lab up xen)")
    group.add_argument(
        "--domus",
        default=",".join(DEFAULT_DOMUS),
        metavar="LIST",
        help=f"lab DomUs to start: comma-separated of {', '.join(domus.LAB_DOMUS)}, "
        f"'all' or 'none' (default: {','.join(DEFAULT_DOMUS)})",
    )
    group.add_argument("--cpus", type=int, default=DEFAULT_CPUS, help="Xen's physical CPUs")
    group.add_argument("--dom0-memory", type=int, default=DEFAULT_DOM0_MB, metavar="MB")


def parse_domus(text: str) -> list[str]:
    if text == "none":
        return []
    if text == "all":
        return list(domus.LAB_DOMUS)
    return [n for n in text.split(",") if n]


def cmd_up(args: argparse.Namespace) -> int:
    names = parse_domus(args.domus)
    specs = [domus.lab_domu(n) for n in names]  # unknown names fail before anything boots
    host = up_host(
        args.name or DEFAULT_NAME,
        memory_mb=args.memory or DEFAULT_MEMORY_MB,
        dom0_mb=args.dom0_memory,
        cpus=args.cpus,
        timeout=args.timeout,
        progress=_progress,
    )
    print(
        f"{host.name}: Xen ready in {host.boot_seconds} s  pid {host.pid}\n"
        f"  exec    vmishell lab exec {host.name} -- COMMAND\n"
        f"  consoles {host.console_dir}\n"
        f"  serial  {host.serial_log}"
    )
    if specs:
        _progress(f"{host.name}: starting {', '.join(names)}")
        for d in domus.create(host, specs):
            print(f"  {d.name:<8} {d.spec.type:<4} id {d.domid}  ready after {d.ready_seconds} s")
    return 0


def cmd_exec(args: argparse.Namespace) -> int:
    argv = list(args.command)
    if "--" in argv:  # options given after NAME land in the command's remainder
        cut = argv.index("--")
        argparse_options, argv = argv[:cut], argv[cut + 1 :]
        _exec_options().parse_args(argparse_options, namespace=args)
    if not argv:
        print("vmishell lab exec: give a command after --", file=sys.stderr)
        return 2
    script = argv[0] if len(argv) == 1 and " " in argv[0] else shell_command(argv)
    stdin = sys.stdin.buffer.read() if args.stdin else b""
    result = attach_host(args.name).exec(script, stdin=stdin, timeout=args.timeout)
    sys.stdout.buffer.write(result.stdout)
    sys.stdout.flush()
    sys.stderr.buffer.write(result.stderr)
    return result.returncode


def cmd_create(args: argparse.Namespace) -> int:
    host = _host(args.host)
    spec = domus.DomuSpec(
        name=args.domu,
        type=args.type,
        kernel=str(Path(args.kernel).absolute()),
        initrd=str(Path(args.initrd).absolute()) if args.initrd else None,
        memory_mb=args.memory,
        args=tuple(args.arg or ()),
        lab_guest=args.lab_guest,
    )
    for path in (spec.kernel, spec.initrd):
        if path and not Path(path).is_file():
            print(f"no such file: {path}", file=sys.stderr)
            return 2
    (d,) = domus.create(host, [spec], ready_text=args.wait_for, timeout=args.timeout)
    ready = f"  ready after {d.ready_seconds} s" if d.ready_seconds is not None else ""
    print(f"{d.name}: {d.spec.type} domain id {d.domid} on {host.name}{ready}\n  console {d.log}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    host = _host(args.host)
    print(host.exec("xl list", timeout=120).check().text, end="")
    return 0


def cmd_console(args: argparse.Namespace) -> int:
    print(domus.get(_host(args.host), args.domu).console(), end="")
    return 0


def cmd_truth(args: argparse.Namespace) -> int:
    print(json.dumps(domus.get(_host(args.host), args.domu).truth().to_json(), indent=2))
    return 0


def cmd_destroy(args: argparse.Namespace) -> int:
    domus.destroy(_host(args.host), args.domu)
    return 0


def _add_exec_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--timeout", type=float, default=300.0, help="seconds (default 300)")
    p.add_argument("--stdin", action="store_true", help="pass this command's stdin along")


def _exec_options() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vmishell lab exec NAME", add_help=False)
    _add_exec_options(p)
    return p


def register(sub: argparse._SubParsersAction) -> None:
    """Add `lab exec` and the `lab xen` family to `vmishell lab`."""
    p = sub.add_parser("exec", help="run a command in a Xen lab host's dom0")
    p.add_argument("name", help="the Xen host instance (see `vmishell lab list`)")
    p.add_argument("command", nargs=argparse.REMAINDER, help="[OPTIONS] -- COMMAND [ARG...]")
    _add_exec_options(p)
    p.set_defaults(func=cmd_exec)

    xen = sub.add_parser("xen", help="DomUs of a Xen lab host")
    xsub = xen.add_subparsers(dest="xen_command", metavar="ACTION", required=True)
    p = xsub.add_parser("create", help="start a DomU from your own kernel and initramfs")
    p.add_argument("domu", metavar="NAME")
    p.add_argument("--kernel", required=True, type=Path)
    p.add_argument("--initrd", type=Path)
    p.add_argument("--type", choices=domus.DOMU_TYPES, default="pv")
    p.add_argument("--memory", type=int, default=domus.DEFAULT_MEMORY_MB, metavar="MB")
    p.add_argument("--arg", action="append", help="a kernel argument (repeat)")
    p.add_argument("--wait-for", metavar="TEXT", help="return once the console shows TEXT")
    p.add_argument(
        "--lab-guest",
        metavar="GUEST",
        help="the kernel runs the lab's /init (wait for its ground truth, as for lab guests)",
    )
    p.add_argument("--timeout", type=float, help="seconds to wait for --wait-for")
    p.add_argument("--host", help="the Xen host instance (default: the only one running)")
    p.set_defaults(func=cmd_create)
    for name, func, what in (
        ("list", cmd_list, "the host's domains (xl list)"),
        ("console", cmd_console, "a DomU's console log"),
        ("truth", cmd_truth, "a lab DomU's ground truth as JSON"),
        ("destroy", cmd_destroy, "destroy DomUs"),
    ):
        p = xsub.add_parser(name, help=what)
        if name in ("console", "truth"):
            p.add_argument("domu", metavar="NAME")
        elif name == "destroy":
            p.add_argument("domu", metavar="NAME", nargs="+")
        p.add_argument("--host", help="the Xen host instance (default: the only one running)")
        p.set_defaults(func=func)
