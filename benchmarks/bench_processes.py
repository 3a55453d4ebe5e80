#!/usr/bin/env python3
"""Benchmark listing a Linux guest's processes: vmishell beside Volatility3 (and drgn).

Everything runs in one go on the same lab guest: a live x86_64 lab guest is
booted (or the one named with --guest is used), a raw dump of it is taken,
and then

  * vmishell: attach with a cached profile (time, peak RSS of a fresh process),
    `processes()` on the attached live guest, the same on the dump, and a cold
    `vmishell ps` command line;
  * Volatility3: `vol linux.pslist` on the dump with the same profile, end to end;
  * drgn, if installed and a DWARF vmlinux is given with --vmlinux.

and prints each figure with the ratio to vmishell's.

    python benchmarks/bench_processes.py [--guest NAME] [--repeat 5]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from vmishell.lab import runner  # noqa: E402
from vmishell.session import Session  # noqa: E402

_CHILD_ATTACH = """
import json, resource, sys, time
t0, c0 = time.perf_counter(), time.process_time()
from vmishell.session import Session
ti, ci = time.perf_counter(), time.process_time()
s = Session.attach(sys.argv[1])
t1, c1 = time.perf_counter(), time.process_time()
attach_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
s.processes(threads=True)
t2 = time.perf_counter()
print(json.dumps({"attach": t1 - t0, "attach_cpu": c1 - c0, "import_cpu": ci - c0,
                  "first_ps": t2 - t1, "rss_mb": attach_rss,
                  "rss_with_pandas_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def timed(fn, repeat: int) -> list[float]:
    out = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def cpu_timed(fn, repeat: int) -> list[float]:
    """CPU seconds of each call: steadier than wall time on a shared, loaded machine."""
    out = []
    for _ in range(repeat):
        c = time.process_time()
        fn()
        out.append(time.process_time() - c)
    return out


def run_child(args: list[str], env: dict[str, str] | None = None) -> tuple[float, float, str]:
    """Wall time and peak RSS (MiB) of a command, with its stdout."""
    t = time.perf_counter()
    proc = subprocess.run(
        ["/usr/bin/time", "-f", "%M", *args], capture_output=True, text=True, env=env, check=False
    )
    wall = time.perf_counter() - t
    if proc.returncode:
        raise RuntimeError(f"{args[0]} failed: {proc.stderr[-2000:]}")
    rss_kb = int(proc.stderr.strip().splitlines()[-1])
    return wall, rss_kb / 1024, proc.stdout


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--guest", help="a running lab instance to use (default: boot one)")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--vmlinux", help="DWARF vmlinux for drgn (optional)")
    ap.add_argument(
        "--sleepers", type=int, default=300, help="extra processes in a booted guest (default 300)"
    )
    args = ap.parse_args()
    load = os.getloadavg()
    print(f"load average: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, CPUs {os.cpu_count()}")

    booted = None
    if args.guest:
        guest = runner.attach(args.guest)
    else:
        script = Path(tempfile.mkstemp(prefix="vmishell-bench-", suffix=".sh")[1])
        script.write_text(f"for i in $(seq {args.sleepers}); do sleep 1000000 & done\n")
        booted = guest = runner.up("x86_64", name=f"bench-{os.getpid()}", init_script=script)
        script.unlink()
    work = Path(tempfile.mkdtemp(prefix="vmishell-bench-"))
    try:
        dump = guest.dump(work / "guest.raw", "raw")
        results: dict[str, float] = {}

        # vmishell, live guest
        with Session.lab(guest.name) as s:
            profile_path = next(p for p in _profiles() if p.name.startswith(s.profile.name))
            n_tasks = len(s.tasks())
            results["vmishell processes() live"] = statistics.median(
                timed(lambda s=s: s.processes(threads=True), args.repeat)
            )
            results["vmishell processes() live, CPU time"] = statistics.median(
                cpu_timed(lambda s=s: s.processes(threads=True), args.repeat)
            )
            results["vmishell task walk live"] = statistics.median(
                timed(lambda s=s: s.tasks(), args.repeat)
            )
        with Session.image(dump) as s:
            results["vmishell processes() dump"] = statistics.median(
                timed(lambda s=s: s.processes(threads=True), args.repeat)
            )
        attach = []
        for _ in range(args.repeat):
            _, _, out = run_child([sys.executable, "-c", _CHILD_ATTACH, f"lab:{guest.name}"])
            attach.append(json.loads(out))
        results["vmishell attach (cached profile)"] = statistics.median(a["attach"] for a in attach)
        results["vmishell attach CPU time (import + attach)"] = statistics.median(
            a["attach_cpu"] for a in attach
        )
        results["vmishell attach CPU time: import alone"] = statistics.median(
            a["import_cpu"] for a in attach
        )
        results["vmishell attach peak RSS MiB"] = statistics.median(a["rss_mb"] for a in attach)
        results["vmishell attach + processes() DataFrame RSS MiB"] = statistics.median(
            a["rss_with_pandas_mb"] for a in attach
        )
        cli = [
            run_child([sys.executable, "-m", "vmishell.cli", "ps", guest.name])
            for _ in range(args.repeat)
        ]
        results["vmishell cold `vmishell ps` (s)"] = statistics.median(c[0] for c in cli)
        results["vmishell cold `vmishell ps` RSS MiB"] = statistics.median(c[1] for c in cli)

        # Volatility3 on the same dump with the same profile
        symbols = work / "symbols" / "linux"
        symbols.mkdir(parents=True)
        shutil.copy(profile_path, symbols / profile_path.name)
        env = dict(os.environ, XDG_CACHE_HOME=str(work / "cache"))
        (work / "cache").mkdir()
        vol = shutil.which("vol")
        if vol:
            runs = [
                run_child(
                    [vol, "-q", "-s", str(work / "symbols"), "--cache-path", str(work / "cache"),
                     "-f", str(dump), "linux.pslist"],
                    env,
                )
                for _ in range(min(args.repeat, 3))
            ]  # fmt: skip
            results["Volatility3 linux.pslist end to end (s)"] = statistics.median(
                r[0] for r in runs
            )
            results["Volatility3 linux.pslist RSS MiB"] = statistics.median(r[1] for r in runs)
        if args.vmlinux and shutil.which("drgn"):
            results.update(bench_drgn(guest, Path(args.vmlinux), work, args.repeat))
        print(f"guest {guest.name}: {n_tasks} tasks, profile {profile_path.name}\n")
        width = max(map(len, results))
        for k, v in results.items():
            unit = "" if "MiB" in k or "(s)" in k else " s"
            print(f"{k:<{width}}  {v:10.4f}{unit}")
        if vol:
            print()
            vs = results["Volatility3 linux.pslist end to end (s)"]
            print(
                f"end to end: Volatility3 / vmishell cold CLI = "
                f"{vs / results['vmishell cold `vmishell ps` (s)']:.1f}x"
            )
            vol_rss = results["Volatility3 linux.pslist RSS MiB"]
            ours_rss = results["vmishell cold `vmishell ps` RSS MiB"]
            print(f"memory: Volatility3 / vmishell cold CLI = {vol_rss / ours_rss:.1f}x")
        print(
            "reference (LAB-FACTS): drgn task walk 5-15 ms, drgn end to end 0.41 s / 252 MB;"
            " LibVMI 1.2-1.8 s / 542 MB"
        )
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if booted is not None:
            booted.down()


_DRGN_SCRIPT = """
import time
from drgn.helpers.linux.pid import for_each_task
t = time.perf_counter()
tasks = [(task.pid.value_(), task.comm.string_()) for task in for_each_task(prog)]
print(time.perf_counter() - t)
"""


def bench_drgn(guest, vmlinux: Path, work: Path, repeat: int) -> dict[str, float]:
    """drgn on an ELF dump of the same guest, given the kernel's DWARF and VMCOREINFO.

    A QEMU ELF dump carries no VMCOREINFO unless the guest loaded qemu_fw_cfg,
    so the text is cut out of guest RAM, where the kernel keeps it.
    """
    from vmishell.sources import open_image

    elf = guest.dump(work / "guest.elf", "elf")
    with open_image(elf) as src:
        for paddr in src.find(b"OSRELEASE="):
            text = src.read(paddr, 4096).split(b"\0")[0]
            if b"KERNELOFFSET=" in text:
                (work / "vmcoreinfo").write_bytes(text)
                break
        else:
            return {}
    (work / "drgn_ps.py").write_text(_DRGN_SCRIPT)
    runs = [
        run_child(["drgn", "-q", "-c", str(elf), "--vmcoreinfo", str(work / "vmcoreinfo"),
                   "-s", str(vmlinux), str(work / "drgn_ps.py")])
        for _ in range(repeat)
    ]  # fmt: skip
    return {
        "drgn task walk (ELF dump)": statistics.median(float(r[2].split()[-1]) for r in runs),
        "drgn end to end (s)": statistics.median(r[0] for r in runs),
        "drgn RSS MiB": statistics.median(r[1] for r in runs),
    }


def _profiles() -> list[Path]:
    from vmishell.symbols.finder import candidate_profiles

    return list(candidate_profiles())


if __name__ == "__main__":
    sys.exit(main())
