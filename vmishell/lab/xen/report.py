"""What vmishell sees of lab DomUs from inside dom0, as JSON: `python -m vmishell.lab.xen.report`.

Runs in a Xen lab host's dom0 (`XenHost.report(...)` sends it there) and
drives vmishell the way a user in dom0 does: an IPython shell with the
extension loaded, `%attach xen:NAME`, `%ps`, `%maps`, `%peek`, `%translate`
and `%watch` on the DomU's marker process. It only gathers; the host
compares the answers with the ground truth each DomU printed on its console
(tests/lab/test_xen_lab.py). Each DomU's failure is kept in its own entry.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from vmishell.lab.truth import read_truth
from vmishell.lab.workload import MARKER, layout

#: Where dom0 sees the instance's share (host.DOM0_SHARE).
CONSOLES = Path("/run/vmishell/console")
PREFIX = "@@report "


def console_log(name: str) -> Path:
    """The DomU's console log in dom0: xenconsoled's (PV, PVH) or the serial file's (HVM)."""
    for path in (CONSOLES / f"guest-{name}.log", CONSOLES / f"{name}-serial.log"):
        if path.is_file() and path.stat().st_size:
            return path
    return CONSOLES / f"guest-{name}.log"


def _timed(out: dict[str, float], what: str, started: float) -> float:
    now = time.monotonic()
    out[what] = round(now - started, 3)
    return now


def _magic(ip: Any, name: str, line: str) -> Any:
    """A magic's value; a magic that failed printed its one-line error and returned None."""
    value = ip.run_line_magic(name, line)
    if value is None:
        raise RuntimeError(f"%{name} {line} failed (its error is on stderr)")
    return value


def inspect(ip: Any, name: str, *, watch: int = 4) -> dict[str, Any]:
    """One DomU, through the magics; the marker process is the one its console names."""
    truth = read_truth(console_log(name))
    lay = layout("x86_64" if truth.machine == "x86_64" else "i386")
    pid = truth.marker_pid
    seconds: dict[str, float] = {}
    t = time.monotonic()
    target = _magic(ip, "attach", f"xen:{name} --name {name}")
    t = _timed(seconds, "attach", t)
    session = target.session
    source = session.source
    out: dict[str, Any] = {
        "name": name,
        "domid": source.domid,
        "kind": source.kind,
        "description": source.description,
        "mode": session.guest.location.mode.name,
        "kaslr": session.guest.location.virtual_shift,
        "registers": {"arch": source.registers().arch, "cr3": source.registers().cr3},
        "seconds": seconds,
    }
    ps = _magic(ip, "ps", "--threads --all-columns")  # every column, empty or not
    t = _timed(seconds, "ps", t)
    out["processes"] = [
        {
            "pid": int(r.pid),
            "tgid": int(r.tgid),
            "ppid": int(r.ppid),
            "uid": int(r.uid),
            "comm": str(r.comm),
            "kernel_thread": bool(r.kernel_thread),
            "cmdline": None if r.cmdline is None else str(r.cmdline),
            "error": None if r.error is None else str(r.error),
        }
        for r in ps.itertuples()
    ]
    maps = _magic(ip, "maps", f"-p {pid}")
    t = _timed(seconds, "maps", t)
    out["maps"] = [
        [int(r.start), int(r.end), str(r.perms), int(r.offset), str(r.device), int(r.inode), r.path]
        for r in maps.itertuples()
    ]
    peek = _magic(ip, "peek", f"{lay.marker_va:#x} {len(MARKER)} -p {pid}")
    t = _timed(seconds, "peek", t)
    out["marker"] = bytes(peek).decode("latin-1")
    walk = _magic(ip, "translate", f"{lay.marker_va:#x} -p {pid}")
    t = _timed(seconds, "translate", t)
    out["walk"] = {
        "levels": [str(level) for level in walk.level],
        "entries": [int(e) for e in walk.entry],
        "paddr": walk.paddr,
    }
    proc = session.process(pid)
    out["translations"] = {
        f"{va:#x}": proc.translate(va).paddr for va, e in truth.pagemap.items() if e.present
    }
    if source.pv:
        # What the guest's own pagemap says (pseudo-physical) in the walk's space.
        out["machine_frames"] = {
            str(e.pfn): source.machine_frame(e.pfn) for e in truth.pagemap.values() if e.present
        }
    t = time.monotonic()
    watcher = _magic(
        ip, "watch", f"{lay.counter_va:#x} {lay.counter_size} -p {pid} --every 1 --count {watch}"
    )
    _timed(seconds, "watch", t)
    history = watcher.history
    out["watch"] = {"samples": watcher.samples, "values": [int(v) for v in history.new_int]}
    stats = source.map_stats
    out["mapping"] = {"maps": stats.maps, "frames": stats.frames, "hits": stats.hits}
    ip.run_line_magic("detach", name)
    return out


def wait_ready(name: str, seconds: float) -> None:
    """Wait (in dom0) until the DomU's console shows its ground truth complete."""
    from vmishell.lab.truth import is_ready

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if is_ready(console_log(name).read_text(errors="replace")):
                return
        except OSError:
            pass
        time.sleep(1)


def bad_input(hvm: str | None) -> dict[str, str]:
    """The one-line errors of a domain that does not exist and of an HVM guest's VGA hole."""
    from vmishell.errors import VmiError
    from vmishell.session import Session
    from vmishell.sources.xen import XenDomainSource

    out: dict[str, str] = {}
    try:
        Session.attach("xen:no-such-domain")
    except VmiError as exc:
        out["no_such_domain"] = f"{type(exc).__name__}: {exc}"
    if hvm is not None:
        with XenDomainSource(hvm) as source:
            try:
                source.read(0xA0000, 16)
            except VmiError as exc:
                out["vga_hole"] = f"{type(exc).__name__}: {exc}"
    return out


def destroyed_while_attached(ip: Any, name: str) -> dict[str, Any]:
    """Attach, destroy the domain with xl, and see what the next calls say."""
    import subprocess

    target = _magic(ip, "attach", f"xen:{name} --name {name}-end")
    session = target.session
    subprocess.run(["xl", "destroy", name], check=True, capture_output=True)
    out: dict[str, Any] = {}
    for what, call in (("processes", session.processes), ("process", lambda: session.process(1))):
        try:
            call()
            out[what] = "no error"
        except Exception as exc:  # the one error a user sees, whatever it is
            out[what] = f"{type(exc).__name__}: {exc}"
    out["state"] = session.state
    return out


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m vmishell.lab.xen.report")
    parser.add_argument("domus", nargs="*")
    parser.add_argument("--wait", type=float, default=0.0, help="seconds to wait for each")
    parser.add_argument("--bad-input", action="store_true", help="also report error paths")
    parser.add_argument("--end", metavar="DOMU", help="destroy this DomU while attached, last")
    args = parser.parse_args(argv)
    started = time.monotonic()
    from IPython.core.interactiveshell import InteractiveShell

    ip = InteractiveShell.instance()
    ip.run_line_magic("colors", "nocolor")
    ip.run_line_magic("load_ext", "vmishell")
    report: dict[str, Any] = {"startup": round(time.monotonic() - started, 3), "domus": {}}
    for name in args.domus:
        if args.wait:
            wait_ready(name, args.wait)
        try:
            report["domus"][name] = inspect(ip, name)
        except Exception as exc:  # reported per DomU, for the host to show
            report["domus"][name] = {"name": name, "error": f"{type(exc).__name__}: {exc}"}
    if args.bad_input:
        hvm = next((n for n, d in report["domus"].items() if d.get("kind") == "hvm"), None)
        report["bad_input"] = bad_input(hvm)
    if args.end:
        report["ended"] = destroyed_while_attached(ip, args.end)
    report["seconds"] = round(time.monotonic() - started, 3)
    print(PREFIX + json.dumps(report), flush=True)
    return 0


def parse(stdout: str) -> dict[str, Any]:
    """The report out of the dom0 command's stdout (IPython may have printed before it)."""
    for line in reversed(stdout.splitlines()):
        if line.startswith(PREFIX):
            return json.loads(line[len(PREFIX) :])
    raise ValueError("no report in the output")


if __name__ == "__main__":
    raise SystemExit(main())
