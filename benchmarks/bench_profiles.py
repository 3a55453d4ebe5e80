#!/usr/bin/env python3
"""Benchmark building and loading kernel profiles.

Build: `vmishell profile build` on a Debian kernel package (types from BTF,
symbols from kallsyms), wall time and peak memory of the whole command, beside
dwarf2json's figures on the same kernel's debug package as measured here
(74 s, 4.0 GB; dwarf2json is not packaged on PyPI or Debian, so it cannot run
in the same job). Load: the built ISF loaded cold (parse + compact cache) and
cached by vmishell, and loaded by Volatility3 (which re-parses it every run),
in the same run.

    python benchmarks/bench_profiles.py [KERNEL.deb]   # default: the lab's x86_64 kernel
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DWARF2JSON_SECONDS = 74.0
DWARF2JSON_PEAK_MB = 4.0 * 1024

_LOAD = """
import json, resource, sys, time
from pathlib import Path
t = time.perf_counter()
from vmishell.symbols.profile import load_profile
p = load_profile(Path(sys.argv[1]), cache_dir=Path(sys.argv[2]))
p.offset_of("task_struct", "comm"); p.symbol_address("init_task")
print(json.dumps({"s": time.perf_counter() - t,
                  "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""

_VOL_LOAD = """
import json, resource, sys, time
t = time.perf_counter()
from volatility3.framework import contexts
from volatility3.framework.symbols import intermed
ctx = contexts.Context()
table = intermed.IntermediateSymbolTable(ctx, "bench", "bench", isf_url=sys.argv[1])
ctx.symbol_space.append(table)
ctx.symbol_space.get_type("bench!task_struct").vol.members["comm"]
print(json.dumps({"s": time.perf_counter() - t,
                  "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def timed_command(args: list[str]) -> tuple[float, float]:
    t = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-f", "%M", *args], capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{args} failed:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t, int(proc.stderr.strip().splitlines()[-1]) / 1024


def child(code: str, *argv: str) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, "-c", code, *argv], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    if len(sys.argv) > 1:
        deb = Path(sys.argv[1])
    else:
        from vmishell.lab.build import build_guest

        deb = build_guest("x86_64").kernel_deb
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "profile.json.xz"
        wall, peak = timed_command(
            [
                sys.executable,
                "-m",
                "vmishell.cli",
                "profile",
                "build",
                str(deb),
                "-o",
                str(out),
                "-q",
            ]
        )
        cache = Path(tmp) / "cache"
        cold = child(_LOAD, str(out), str(cache))
        cached = min((child(_LOAD, str(out), str(cache)) for _ in range(3)), key=lambda r: r["s"])
        vol = child(_VOL_LOAD, out.as_uri())
        size = out.stat().st_size
    print(f"kernel package: {deb.name}")
    print(f"profile build : {wall:6.1f} s, peak {peak:7.0f} MiB  (ISF {size / 1e6:.1f} MB xz)")
    print(
        f"dwarf2json    : {DWARF2JSON_SECONDS:6.1f} s, "
        f"peak {DWARF2JSON_PEAK_MB:7.0f} MiB  (reference)"
    )
    print(
        f"  ratio       : {DWARF2JSON_SECONDS / wall:6.1f}x faster, "
        f"{DWARF2JSON_PEAK_MB / peak:.1f}x less memory  (target: 10x, 4x)"
    )
    print(f"load, cold    : {cold['s']:.3f} s ({cold['rss']:.0f} MiB)")
    print(f"load, cached  : {cached['s']:.3f} s ({cached['rss']:.0f} MiB)  (target < 0.1 s)")
    print(f"Volatility3   : {vol['s']:.3f} s ({vol['rss']:.0f} MiB) to load the same ISF")
    print(f"  ratio       : {vol['s'] / cached['s']:.1f}x faster than Volatility3 per load")
    return 0


if __name__ == "__main__":
    sys.exit(main())
