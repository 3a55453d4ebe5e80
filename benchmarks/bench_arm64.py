#!/usr/bin/env python3
"""Benchmark vmishell's AArch64 walker against its x86 walker, the same way.

Both address spaces are synthetic and shaped alike (bench_translate.py's
layout): a direct map of RAM in blocks (large pages on x86), a 96 MiB
buffer of pages mapped contiguously, and two 72 MiB regions of pages on
shuffled frames (kernel vmalloc-like and user-like, the user one in TTBR0).
Each RAM image is written to a temporary file and mapped, as images are:
x86 through RawImageSource (offset = physical), arm64 at 0x40000000 as on
QEMU's `virt` machine. Metrics are bench_translate.py's: warm translate()
(a 1000-page working set, 300k calls), cold translate() (fresh translator,
each page once), scattered 4 KiB reads (warm), mappings() and runs() over
the whole space (4 KiB pages per second, whatever the granule).

    python benchmarks/bench_arm64.py [--ram-mib 512] [--granules 4096,16384] [--quick]

With `--lab-dump FILE --tcr X --ttbr1 Y [--ttbr0 Z]` a raw arm64 dump (RAM
from 0x40000000) is measured too.
"""

from __future__ import annotations

import argparse
import mmap
import os
import random
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_translate import random_pages, timed

from tests.support.arm64tables import AF, AP_EL0, PXN, UXN, VIRT_RAM, Arm64TableBuilder
from vmishell.arch import AddressSpace, PagingMode, Translator
from vmishell.arch.aarch64 import Arm64Translator
from vmishell.sources.files import RawImageSource
from vmishell.sources.memory import BufferSource

KiB, MiB = 1 << 10, 1 << 20
LINEAR = 0xFFFF_0000_0000_0000  # arm64 Linux's linear map (48-bit VA)
VMALLOC = 0xFFFF_8000_1000_0000
USER = 0x0000_7F00_0000_0000


def build_arm64(path: Path, granule: int, ram_mib: int, seed: int) -> Arm64TableBuilder:
    rng = random.Random(seed)
    ram = ram_mib * MiB
    data = 32 * MiB
    b = Arm64TableBuilder(granule, 48, ram_size=ram)
    block = 1 << (2 * granule.bit_length() - 5)  # level-2 block: 2 MiB or 32 MiB
    kernel = AF | PXN | UXN
    for off in range(0, ram - ram % block, block):
        b.map(LINEAR + off, VIRT_RAM + off, block, attrs=kernel)
    for off in range(0, 96 * MiB, granule):
        b.map(VMALLOC + off, VIRT_RAM + data + off, attrs=kernel)
    frames = list(range(VIRT_RAM + data, VIRT_RAM + ram, granule))
    for base, attrs in ((VMALLOC + 128 * MiB, kernel), (USER, AF | AP_EL0)):
        picks = rng.sample(frames, 72 * MiB // granule)
        for i, frame in enumerate(picks):
            b.map(base + i * granule, frame, attrs=attrs | (UXN if i % 3 else 0))
    chunk = rng.randbytes(MiB)
    for off in range(data, ram, MiB):
        b.ram[off : off + MiB] = chunk
    path.write_bytes(b.ram)
    return b


def open_mapped(path: Path, base: int) -> BufferSource:
    fd = os.open(path, os.O_RDONLY)
    try:
        m = mmap.mmap(fd, os.fstat(fd).st_size, access=mmap.ACCESS_READ)
    finally:
        os.close(fd)
    return BufferSource([(base, memoryview(m))], description=f"{path.name} at {base:#x}")


def measure(new: Callable[[], Translator | Arm64Translator], quick: bool) -> dict[str, float]:
    rng = random.Random(1)
    tr = new()
    maps = list(tr.mappings())
    pages = sum(m.size for m in maps) // (4 * KiB)
    hot = random_pages(maps, 1000, rng)
    calls = [hot[i % len(hot)] + (i * 8) % 4096 for i in range(100_000 if quick else 300_000)]
    for a in hot:
        tr.translate(a)

    def warm() -> None:
        translate = tr.translate
        for a in calls:
            translate(a)

    out = {"warm translate() M/s": len(calls) / timed(warm) / 1e6}
    cold = list(dict.fromkeys(random_pages(maps, 5_000 if quick else 20_000, rng)))

    def cold_run() -> None:
        translate = new().translate
        for a in cold:
            translate(a)

    out["cold translate() M/s"] = len(cold) / timed(cold_run) / 1e6
    asp = AddressSpace(tr)
    scattered = random_pages(maps, 5_000 if quick else 20_000, rng)
    for p in scattered:
        asp.read(p, 4096)

    def reads() -> None:
        read = asp.read
        for p in scattered:
            read(p, 4096)

    out["scattered 4 KiB reads GB/s"] = len(scattered) * 4096 / timed(reads) / 1e9
    out["mappings() M pages/s"] = pages / timed(lambda: list(new().mappings()), 2) / 1e6
    out["runs() M pages/s"] = pages / timed(lambda: new().runs(), 2) / 1e6
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ram-mib", type=int, default=512)
    ap.add_argument("--granules", default="4096,16384")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--lab-dump", type=Path)
    ap.add_argument("--tcr", type=lambda x: int(x, 0))
    ap.add_argument("--ttbr0", type=lambda x: int(x, 0))
    ap.add_argument("--ttbr1", type=lambda x: int(x, 0))
    args = ap.parse_args()
    from bench_translate import build_synthetic  # the x86 figures' own layout

    columns: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        x86 = Path(tmp) / "x86.raw"
        dtb = build_synthetic(x86, PagingMode.LEVEL4, args.ram_mib, args.seed)
        src = RawImageSource(x86)
        columns["x86 4-level"] = measure(
            lambda: Translator(src, dtb, PagingMode.LEVEL4), args.quick
        )
        src.close()
        x86.unlink()
        for granule in (int(g) for g in args.granules.split(",")):
            path = Path(tmp) / f"arm64-{granule}.raw"
            b = build_arm64(path, granule, args.ram_mib, args.seed)
            asrc = open_mapped(path, VIRT_RAM)
            ttbrs = (b.ttbr(0), b.ttbr(1))

            def new(
                g: int = granule, s: BufferSource = asrc, t: tuple[int, int] = ttbrs
            ) -> Arm64Translator:
                return Arm64Translator(s, ttbr0=t[0], ttbr1=t[1], granule=g)

            columns[f"arm64 {granule // KiB}K"] = measure(new, args.quick)
            del b
            path.unlink()
        if args.lab_dump is not None:
            dsrc = open_mapped(args.lab_dump, VIRT_RAM)
            columns["arm64 lab dump"] = measure(
                lambda: Arm64Translator.from_tcr(dsrc, args.tcr, args.ttbr0, args.ttbr1),
                args.quick,
            )
    load = os.getloadavg()[0]
    names = list(columns)
    print(f"load average {load:.1f} on {os.cpu_count()} CPUs; ratios are arm64 / x86")
    print(f"{'metric':<30}" + "".join(f"{n:>16}" for n in names))
    for metric in columns[names[0]]:
        base = columns[names[0]][metric]
        cells = [
            f"{columns[n][metric]:10.3f}"
            + (f" {columns[n][metric] / base:4.1f}x" if i else "      ")
            for i, n in enumerate(names)
        ]
        print(f"{metric:<30}" + "".join(f"{c:>16}" for c in cells))


if __name__ == "__main__":
    main()
