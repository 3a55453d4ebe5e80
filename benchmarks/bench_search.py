#!/usr/bin/env python3
"""Search and watch speed on the x86_64 lab guest, beside Volatility3 on the same dump.

- plain byte search over all user memory of all processes (`Session.search`), in GB/s of
  mapped memory (every process's mapped bytes, shared frames counted per process; the
  scan itself reads each frame once) and of bytes actually scanned;
- the same search on a raw dump of the guest, and `s.physical.search` over all of RAM;
- a small YARA rule set: vmishell's `search(kind="yara")` against Volatility3's
  `linux.vmayarascan` (end to end, same dump, same rules, same ISF);
- a watch of 8 fields (`Session.watch(..., every=0)`) on the live guest, samples/s.

Targets (issue #16): >= 1 GB/s of mapped memory; YARA >= 10x Volatility3; >= 1,000
samples/s for 8 fields. The machine is shared: say how loaded it was (load average is
printed).

    python benchmarks/bench_search.py                 # boots x86_64 as "bench-search-PID"
    python benchmarks/bench_search.py --lab NAME      # a running lab instance
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vmishell.lab import runner
from vmishell.lab.workload import MARKER, layout
from vmishell.search import META_KEY
from vmishell.search.regions import collect, user_processes
from vmishell.session import Session

RULES = """
rule Marker { strings: $m = "VMISHELL-MARKER" condition: $m }
rule ElfHeader { strings: $e = { 7f 45 4c 46 02 01 01 } condition: $e }
rule Shell { strings: $s = "/bin/sh" condition: $s }
"""


#: Three shells holding 40 MB strings each: user memory worth measuring GB/s over.
FILL = """for i in 1 2 3; do
	sh -c 'x=$(head -c 40000000 /dev/zero | tr "\\0" a); sleep 2147483647' &
done
"""


def median_time(fn, repeat: int) -> tuple[float, object]:
    """Median wall seconds of `repeat` calls (and the last value)."""
    times, value = [], None
    for _ in range(repeat):
        t = time.perf_counter()
        value = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), value


def cpu_time(fn) -> float:
    """CPU seconds of this process for one call: less sensitive to a loaded machine."""
    t = time.process_time()
    fn()
    return time.process_time() - t


def mapped_bytes(s: Session) -> int:
    regions = collect(s, user_processes(s, None))
    return sum(r.size for r in regions.runs)


def bench_session(s: Session, label: str, repeat: int, out: dict[str, str]) -> None:
    mapped = mapped_bytes(s)
    seconds, hits = median_time(lambda: s.search(MARKER, progress=False), repeat)
    scanned = hits.attrs[META_KEY]["scanned_bytes"]
    out[f"{label}: user memory mapped / scanned"] = (
        f"{mapped / 1e6:.1f} MB / {scanned / 1e6:.1f} MB"
    )
    out[f"{label}: byte search"] = (
        f"{seconds * 1000:.1f} ms = {mapped / seconds / 1e9:.2f} GB/s mapped, "
        f"{scanned / seconds / 1e9:.2f} GB/s scanned ({len(hits)} hits)"
    )
    cpu = cpu_time(lambda: s.search(MARKER, progress=False))
    out[f"{label}: byte search, CPU time"] = (
        f"{cpu * 1000:.1f} ms = {mapped / cpu / 1e9:.2f} GB/s mapped per CPU second"
    )
    seconds, hits = median_time(lambda: s.search(RULES, kind="yara", progress=False), repeat)
    out[f"{label}: YARA search (3 rules)"] = f"{seconds:.3f} s ({len(hits)} hits)"
    out[f"{label}: _yara_seconds"] = str(seconds)
    ram = sum(r.size for r in s.source.ranges())
    seconds, hits = median_time(lambda: s.physical.search(MARKER, progress=False), repeat)
    out[f"{label}: physical search of RAM + reverse map"] = (
        f"{seconds:.3f} s = {ram / seconds / 1e9:.2f} GB/s ({len(hits)} rows)"
    )


def bench_watch(s: Session, pid: int, out: dict[str, str]) -> None:
    lay = layout("x86_64")
    fields = [
        "task_struct.cred->uid",
        "task_struct.cred->euid",
        "task_struct.cred->gid",
        "task_struct.comm",
        "task_struct.pid",
        "task_struct.mm->map_count",
        f"{lay.counter_va:#x}",
        f"{lay.marker_va:#x}",
    ]
    w = s.watch(*fields, pid=pid, every=0, count=3000)
    t = time.perf_counter()
    w.run()
    rate = w.samples / (time.perf_counter() - t)
    out["watch of 8 fields, live"] = f"{rate:.0f} samples/s ({len(w.history)} changes seen)"


def bench_volatility(dump: Path, profile: Path, work: Path, out: dict[str, str]) -> float | None:
    vol = shutil.which("vol")
    if not vol:
        out["Volatility3 linux.vmayarascan"] = "vol not installed"
        return None
    symbols = work / "symbols" / "linux"
    symbols.mkdir(parents=True, exist_ok=True)
    shutil.copy(profile, symbols / profile.name)
    rules = work / "rules.yar"
    rules.write_text(RULES)
    (work / "cache").mkdir(exist_ok=True)
    env = dict(os.environ, XDG_CACHE_HOME=str(work / "cache"))
    cmd = [vol, "-q", "-s", str(work / "symbols"), "--cache-path", str(work / "cache"),
           "-f", str(dump), "linux.vmayarascan", "--yara-file", str(rules)]  # fmt: skip
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    seconds = time.perf_counter() - t
    if proc.returncode:
        out["Volatility3 linux.vmayarascan"] = f"failed: {proc.stderr.strip()[-300:]}"
        return None
    rows = max(0, len([ln for ln in proc.stdout.splitlines() if ln.strip()]) - 1)
    out["Volatility3 linux.vmayarascan (end to end)"] = f"{seconds:.2f} s ({rows} rows)"
    return seconds


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--lab", help="a running lab instance (default: boot one)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--no-volatility", action="store_true")
    args = ap.parse_args()
    booted = None
    guest = runner.attach(args.lab) if args.lab else None
    if guest is None:
        script = Path(tempfile.mkstemp(prefix="vmishell-bench-", suffix=".sh")[1])
        script.write_text(FILL)
        name = f"bench-search-{os.getpid()}"
        booted = guest = runner.up("x86_64", name, init_script=script, timeout=240)
        script.unlink()
        time.sleep(15)  # let the shells fill their strings
    work = Path(tempfile.mkdtemp(prefix="vmishell-bench-search-"))
    out: dict[str, str] = {"load average": " ".join(f"{x:.2f}" for x in os.getloadavg())}
    try:
        truth = guest.truth()
        with Session.lab(guest.name) as s:
            bench_session(s, "live", args.repeat, out)
            bench_watch(s, truth.marker_pid, out)
            from vmishell.symbols.finder import candidate_profiles

            profile = next(p for p in candidate_profiles() if p.name.startswith(s.profile.name))
        dump = guest.dump(work / "guest.raw", "raw")
        t = time.perf_counter()
        with Session.image(dump) as s:
            out["dump: attach"] = f"{time.perf_counter() - t:.3f} s"
            t = time.perf_counter()
            s.search(RULES, kind="yara", progress=False)
            ours = time.perf_counter() - t + float(out["dump: attach"].split()[0])
            out["dump: attach + YARA search (like vol end to end)"] = f"{ours:.3f} s"
            bench_session(s, "dump", args.repeat, out)
        if not args.no_volatility:
            theirs = bench_volatility(dump, profile, work, out)
            if theirs:
                out["YARA: Volatility3 / vmishell (end to end)"] = f"{theirs / ours:.1f}x"
        out["load average after"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if booted is not None:
            runner.down(booted.name)
    width = max(len(k) for k in out if not k.endswith("_seconds"))
    for key, value in out.items():
        if "_yara_seconds" not in key:
            print(f"{key:<{width}}  {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
