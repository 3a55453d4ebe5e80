#!/usr/bin/env python3
"""vmishell in a Xen dom0: processes(), foreign-mapping reads by batch size, LibVMI beside it.

Measured inside the Xen lab's dom0 (QEMU TCG, so absolute figures are those
of an emulated machine; the ratios are what carry over):

- `processes()` on a 64-bit PV DomU and on an HVM DomU: attach, the first
  call (mappings made), a second call (mappings kept), one call inside
  `paused()`;
- physical reads through vmishell's own binding with the mapping batch
  (`chunk`) at 1, 16, 64 and 512 frames: scattered 4 KiB reads from a fresh
  source (each costs a mapping) and again with the mappings kept, and one
  64 MiB read; the time per `xenforeignmemory_map` call and per frame mapped;
- the same reads on the same domain through LibVMI's Xen driver (the
  `libvmi` wheel, partial init), in the same run. LibVMI refuses PV domains
  (their frames are machine frames; see vmishell/sources/libvmi.py), so its
  column is for the HVM DomU.

    python benchmarks/bench_xen.py                # boots a Xen host with pv64 and hvm64, stops it
    python benchmarks/bench_xen.py --host xen     # a running host (DomUs pv64 and hvm64 on it)
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PAGE = 4096
SCATTERED = 1000
BIG = 64 << 20
CHUNKS = (1, 16, 64, 512)
PREFIX = "@@bench "


def _best(fn, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def bench_processes(name: str) -> dict[str, float]:
    from vmishell.session import Session

    t = time.perf_counter()
    s = Session.attach(f"xen:{name}")
    out = {"attach": time.perf_counter() - t}
    t = time.perf_counter()
    n = len(s.processes())
    out["processes first"] = time.perf_counter() - t
    out["processes again"] = _best(s.processes)
    with s.paused():
        out["processes paused"] = _best(s.processes)
    out["tasks"] = n
    s.close()
    return out


def _pages(source, count: int, seed: int = 1) -> list[int]:
    rng = random.Random(seed)
    pages = [p for r in source.ranges() for p in range(r.start, r.end, PAGE)]
    return rng.sample(pages, min(count, len(pages)))


def _big_start(source) -> int:
    r = max(source.ranges(), key=lambda r: r.size)
    return r.start + max(0, min(r.size - BIG, 16 << 20)) // PAGE * PAGE


def bench_reads(name: str, chunk: int) -> dict[str, float]:
    from vmishell.sources.xen import XenDomainSource

    src = XenDomainSource(name, chunk=chunk, max_chunks=max(16, (256 << 20) // (chunk * PAGE)))
    pages = _pages(src, SCATTERED)
    before = src.map_stats.maps, src.map_stats.frames
    t = time.perf_counter()
    for p in pages:
        src.read(p, PAGE)
    cold = time.perf_counter() - t
    maps = src.map_stats.maps - before[0]
    frames = src.map_stats.frames - before[1]
    t = time.perf_counter()
    for p in pages:
        src.read(p, PAGE)
    warm = time.perf_counter() - t
    start = _big_start(src)
    src.close()
    src = XenDomainSource(name, chunk=chunk, max_chunks=max(16, (256 << 20) // (chunk * PAGE)))
    t = time.perf_counter()
    data = src.read(start, BIG)
    big = time.perf_counter() - t
    assert len(data) == BIG
    src.close()
    return {
        "scattered cold MB/s": SCATTERED * PAGE / cold / 1e6,
        "scattered kept MB/s": SCATTERED * PAGE / warm / 1e6,
        "64 MiB MB/s": BIG / big / 1e6,
        "ms per map call": cold * 1e3 / max(1, maps),
        "us per frame mapped": cold * 1e6 / max(1, frames),
    }


def bench_libvmi(name: str) -> dict[str, float]:
    from vmishell.sources.libvmi import LibvmiSource
    from vmishell.sources.xen import XenDomainSource

    with XenDomainSource(name) as own:  # the same pages as vmishell's own reads
        pages = _pages(own, SCATTERED)
        start = _big_start(own)
    t = time.perf_counter()
    src = LibvmiSource(name, "xen")
    out = {"open s": time.perf_counter() - t}
    t = time.perf_counter()
    for p in pages:
        src.read(p, PAGE)
    out["scattered cold MB/s"] = SCATTERED * PAGE / (time.perf_counter() - t) / 1e6
    t = time.perf_counter()
    for p in pages:
        src.read(p, PAGE)
    out["scattered kept MB/s"] = SCATTERED * PAGE / (time.perf_counter() - t) / 1e6
    t = time.perf_counter()
    src.read(start, BIG)
    out["64 MiB MB/s"] = BIG / (time.perf_counter() - t) / 1e6
    src.close()
    return out


def in_dom0(pv: str, hvm: str) -> dict:
    import pandas  # noqa: F401 - imported before the clock runs (half a minute under TCG)

    results: dict = {"processes": {}, "reads": {}, "libvmi": {}}
    for name in (pv, hvm):
        results["processes"][name] = bench_processes(name)
        results["reads"][name] = {str(c): bench_reads(name, c) for c in CHUNKS}
    try:
        results["libvmi"][hvm] = bench_libvmi(hvm)
    except Exception as exc:  # shown in the table: LibVMI is a peer, not a dependency
        results["libvmi"][hvm] = {"error": f"{type(exc).__name__}: {exc}"}
    try:
        bench_libvmi(pv)
    except Exception as exc:
        results["libvmi"][pv] = {"error": f"{type(exc).__name__}: {exc}"}
    return results


def show(results: dict) -> None:
    print("processes() in dom0 (seconds)")
    for name, r in results["processes"].items():
        cells = "  ".join(f"{k} {v:.3f}" if k != "tasks" else f"{v} tasks" for k, v in r.items())
        print(f"  {name:<6} {cells}")
    print("physical reads through foreign mappings (own binding, batch = chunk frames)")
    for name, by_chunk in results["reads"].items():
        for chunk, r in by_chunk.items():
            cells = "  ".join(f"{k} {v:.1f}" for k, v in r.items())
            print(f"  {name:<6} chunk {chunk:>3}  {cells}")
    print("LibVMI (libvmi wheel, Xen driver, partial init), same pages")
    for name, r in results["libvmi"].items():
        if "error" in r:
            print(f"  {name:<6} {r['error']}")
            continue
        cells = "  ".join(f"{k} {v:.2f}" for k, v in r.items())
        print(f"  {name:<6} {cells}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", help="a running Xen lab host (default: boot one)")
    parser.add_argument("--pv", default="pv64")
    parser.add_argument("--hvm", default="hvm64")
    parser.add_argument("--in-dom0", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.in_dom0:
        print(PREFIX + json.dumps(in_dom0(args.pv, args.hvm)), flush=True)
        return 0
    from vmishell.lab.runner import down
    from vmishell.lab.xen import domu
    from vmishell.lab.xen.agent import shell_command
    from vmishell.lab.xen.host import attach_host, up_host

    host = attach_host(args.host) if args.host else up_host("bench-xen")
    try:
        if not args.host:
            domu.create(host, [domu.lab_domu(args.pv), domu.lab_domu(args.hvm)])
        here = str(Path(__file__).resolve())
        argv = ["vmishell-python", here, "--in-dom0", "--pv", args.pv, "--hvm", args.hvm]
        cmd = shell_command(argv)
        out = host.exec(cmd, timeout=3600)
        line = next((x for x in out.text.splitlines() if x.startswith(PREFIX)), None)
        if line is None:
            print(out.stderr.decode(errors="replace")[-3000:], file=sys.stderr)
            return 1
        show(json.loads(line[len(PREFIX) :]))
    finally:
        if not args.host:
            down(host.name)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
