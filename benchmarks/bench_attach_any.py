#!/usr/bin/env python3
"""Attach to any QEMU: guest RAM read from QEMU's process (`qmp:`) beside its RAM file.

One lab guest with a shared RAM file serves both paths, so the figures are of
the same guest at the same moment:

- the RAM-file source (memory-mapped; what `qmp:` picks when QEMU has one);
- the process source (`/proc/PID/mem`, layout from QMP; what `qmp:` uses for any
  QEMU without a RAM file, and `libvirt:` for domains) on the same guest, whose
  RAM pages are then file pages;
- a plain QEMU of the same kernel (no RAM file: anonymous pages, the usual case);
- optionally a libvirt domain of the same kernel (`--libvirt`), and drgn 0.3.0
  attached to the plain QEMU with `drgn --qemu` (`--vmlinux`). drgn needs the
  kernel's DWARF (the 633 MB vmlinux of Debian's 859 MB linux-image-*-dbg
  package) and the guest's VMCOREINFO, which QEMU only has when the guest runs
  with `-device vmcoreinfo` and loaded qemu_fw_cfg (hence `vmcoreinfo=True`
  here); without it drgn ignores the vmlinux and finds no kernel. vmishell
  needs neither.

Targets (issue #15): processes() through the process within 2x of the RAM file;
contiguous reads >= 1 GB/s; attach <= 0.5 s with a cached profile.

    python benchmarks/bench_attach_any.py                  # boots x86_64 as "bench-attach"
    python benchmarks/bench_attach_any.py --lab NAME       # a running lab instance
    python benchmarks/bench_attach_any.py --libvirt --vmlinux /path/to/vmlinux-dbg
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vmishell.lab import runner
from vmishell.session import Session
from vmishell.sources.qemuproc import QemuProcessSource, learn_layout
from vmishell.sources.qmp import QmpClient

MIB = 1 << 20


def timed(fn: Callable[[], object], repeat: int) -> float:
    """Median seconds of `repeat` calls."""
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def process_source(guest: runner.RunningGuest) -> QemuProcessSource:
    """The guest's RAM through QEMU's process, even though it also has a RAM file."""
    with QmpClient(guest.qmp_path) as q:
        layout = learn_layout(q, str(guest.qmp_path))
    return QemuProcessSource(guest.pid, layout, qmp_path=guest.qmp_path)


def read_rate(session: Session, chunk: int, total: int = 256 * MIB) -> float:
    """GB/s of physical reads of `chunk` bytes over the guest's first RAM range."""
    src = session.source
    r = max(src.ranges(), key=lambda r: r.size)
    span = min(total, r.size - r.size % chunk)

    def run() -> None:
        for pos in range(r.start, r.start + span, chunk):
            src.read(pos, chunk)

    return span / timed(run, 3) / 1e9


def kernel_read_rate(session: Session, chunk: int = MIB, total: int = 64 * MIB) -> float:
    """GB/s of virtual reads through the kernel's direct map (page tables walked)."""
    kernel = session.kernel
    base = session.symbol("page_offset_base")
    direct = int.from_bytes(kernel.read(base, 8), "little")

    def run() -> None:
        for off in range(16 * MIB, 16 * MIB + total, chunk):
            kernel.read(direct + off, chunk)

    return total / timed(run, 3) / 1e9


def measure(label: str, open_session: Callable[[], Session], repeat: int) -> dict[str, float]:
    t0 = time.perf_counter()
    s = open_session()
    first_attach = time.perf_counter() - t0
    s.close()
    attach = timed(lambda: open_session().close(), repeat)
    s = open_session()
    try:
        s.processes()  # pandas import and first walk outside the figure
        return {
            f"{label}: first attach (s)": first_attach,
            f"{label}: attach (s)": attach,
            f"{label}: processes() (s)": timed(s.processes, repeat),
            f"{label}: 1 MiB physical reads (GB/s)": read_rate(s, MIB),
            f"{label}: 16 MiB physical reads (GB/s)": read_rate(s, 16 * MIB),
            f"{label}: 1 MiB kernel virtual reads (GB/s)": kernel_read_rate(s),
        }
    finally:
        s.close()


_DRGN_SCRIPT = """
import time
from drgn.helpers.linux.pid import for_each_task
t = time.perf_counter()
tasks = [(task.pid.value_(), task.comm.string_()) for task in for_each_task(prog)]
print(len(tasks), time.perf_counter() - t)
"""


def bench_drgn(guest: runner.RunningGuest, vmlinux: Path, repeat: int) -> dict[str, float]:
    """drgn 0.3.0 attached to the same QEMU over its QMP socket, given the DWARF vmlinux."""
    if shutil.which("drgn") is None:
        print("drgn is not installed (pip install drgn)", file=sys.stderr)
        return {}
    script = Path(f"/tmp/bench-attach-drgn-{os.getpid()}.py")
    script.write_text(_DRGN_SCRIPT)
    walks, totals = [], []
    try:
        for _ in range(repeat):
            t0 = time.perf_counter()
            out = subprocess.run(
                ["drgn", "-q", "--qemu", str(guest.qmp_path), "-s", str(vmlinux), str(script)],
                capture_output=True, text=True, timeout=300, check=False,
            )  # fmt: skip
            totals.append(time.perf_counter() - t0)
            if out.returncode != 0:
                print(f"drgn failed: {out.stderr.strip()[-400:]}", file=sys.stderr)
                return {}
            walks.append(float(out.stdout.split()[-1]))
    finally:
        script.unlink(missing_ok=True)
    return {
        "drgn --qemu: end to end (s)": statistics.median(totals),
        "drgn --qemu: task walk (s)": statistics.median(walks),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lab", metavar="NAME", help="a running lab instance with a RAM file")
    ap.add_argument("--libvirt", action="store_true", help="also boot a libvirt domain")
    ap.add_argument("--vmlinux", type=Path, help="DWARF vmlinux, to run drgn --qemu beside")
    ap.add_argument("--no-plain", action="store_true", help="skip the plain QEMU guest")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()

    booted: list[runner.RunningGuest] = []
    try:
        if args.lab:
            guest = runner.attach(args.lab)
        else:
            guest = runner.up("x86_64", "bench-attach", vmcoreinfo=True)
            booted.append(guest)
        if guest.ram_path is None:
            print(f"{guest.name} has no RAM file: nothing to compare with", file=sys.stderr)
            return 2
        results = measure("RAM file", lambda: Session.lab(guest.name), args.repeat)
        results |= measure(
            "QEMU process (qmp:)", lambda: Session(process_source(guest)), args.repeat
        )
        results["qmp: as typed (picks the RAM file) attach (s)"] = timed(
            lambda: Session.attach(f"qmp:{guest.qmp_path}").close(), args.repeat
        )
        plain = None
        if not args.no_plain:
            plain = runner.up("x86_64", "bench-attach-plain", plain=True, vmcoreinfo=True)
            booted.append(plain)
            results |= measure(
                "qmp: plain QEMU", lambda: Session.attach(f"qmp:{plain.qmp_path}"), args.repeat
            )
        if args.libvirt:
            virt = runner.up("x86_64", "bench-attach-virt", libvirt="qemu:///system")
            booted.append(virt)
            results |= measure("libvirt:", lambda: Session.attach(virt.target), args.repeat)
        if args.vmlinux:
            results |= bench_drgn(plain or guest, args.vmlinux, args.repeat)
    finally:
        for g in booted:
            g.down()

    width = max(map(len, results))
    for name, value in results.items():
        print(f"{name:<{width}}  {value:8.3f}")
    ram = results["RAM file: processes() (s)"]
    proc = results["QEMU process (qmp:): processes() (s)"]
    print(f"\nprocesses(): QEMU process / RAM file = {proc / ram:.2f} (target <= 2)")
    for label in ("QEMU process (qmp:)", "qmp: plain QEMU", "libvirt:"):
        rates = [v for k, v in results.items() if k.startswith(label) and "physical" in k]
        if rates:
            print(f"contiguous reads, {label}: best {max(rates):.2f} GB/s (target >= 1)")
    att = results["QEMU process (qmp:): attach (s)"]
    print(f"attach through the process: {att:.3f} s (target <= 0.5)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
