#!/usr/bin/env python3
"""Benchmark arm64 translation on a real guest's dump: vmishell beside drgn, same dump, same run.

Volatility3 has no AArch64 Linux layer to compare with (its drafts are not
released), so the peer is drgn (`pip install drgn`, not a vmishell
dependency), which walks arm64 kernel page tables itself. The dump is a QEMU
ELF core of an arm64 lab guest started with `-device vmcoreinfo` and the
`qemu_fw_cfg` module, so the core carries the VMCOREINFO note drgn needs; no
debug info is given to either tool. Both read the same kernel virtual
addresses (pages of the kernel's own mappings, found by vmishell's walk and
drawn at random):

- warm translate: vmishell's `translate()` over a 1000-page working set;
  drgn has no translate call, so its figure is `read(addr, 8)`, its cheapest
  access that translates;
- scattered 4 KiB reads over the same working set, warm.

    python benchmarks/bench_arm64_drgn.py [--guest aarch64-16k] [--elf CORE]
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vmishell.lab import runner
from vmishell.session import Session

PAGES = 1000
TRANSLATIONS = 200_000
READS = 50_000


def best(fn: Callable[[], object], repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def dump(guest: str, where: Path) -> Path:
    name = f"bench-drgn-{os.getpid()}"
    running = runner.up(guest, name, timeout=300, vmcoreinfo=True)
    try:
        return running.dump(where / f"{guest}.elf", "elf")
    finally:
        runner.down(name)


def kernel_pages(session: Session, rng: random.Random) -> list[int]:
    """PAGES random 4 KiB-aligned kernel virtual addresses that translate into RAM
    (not the devices the kernel also maps: GIC, UART, PCIe windows)."""
    kernel = session.kernel
    source = session.source
    starts: list[int] = []
    for m in kernel.mappings():
        if not source.is_valid(m.paddr, m.size):
            continue
        starts.extend(range(m.vaddr, m.vaddr + min(m.size, 64 << 20), 4096))
        if len(starts) > 50 * PAGES:
            break
    return rng.sample(starts, PAGES)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--guest", default="aarch64-16k")
    ap.add_argument("--elf", type=Path, help="an ELF core with a VMCOREINFO note")
    args = ap.parse_args()
    try:
        import drgn
    except ImportError:
        print("drgn is not installed (pip install drgn): nothing to compare with")
        return 1
    rng = random.Random(7)
    with tempfile.TemporaryDirectory(prefix="bench-drgn-") as tmp:
        core = args.elf or dump(args.guest, Path(tmp))
        print(f"dump: {core} ({core.stat().st_size >> 20} MiB), drgn {drgn.__version__}")
        with Session.image(core) as s:
            pages = kernel_pages(s, rng)
            kernel = s.kernel
            kernel.translate(pages[0])
            order = [
                pages[rng.randrange(PAGES)] + 8 * rng.randrange(512) for _ in range(TRANSLATIONS)
            ]
            reads = [pages[rng.randrange(PAGES)] for _ in range(READS)]

            prog = drgn.Program()
            prog.set_core_dump(str(core))
            for a in pages[:50]:  # the same bytes through both
                assert prog.read(a, 64) == kernel.read(a, 64), hex(a)

            def ours_translate() -> None:
                t = kernel.translate
                for a in order:
                    t(a)

            def ours_read() -> None:
                r = kernel.read
                for a in reads:
                    r(a, 4096)

            def drgn_translate() -> None:
                r = prog.read
                for a in order:
                    r(a, 8)

            def drgn_read() -> None:
                r = prog.read
                for a in reads:
                    r(a, 4096)

            ours_translate(), drgn_translate()  # warm both
            rows = [
                ("warm translate (M/s)", TRANSLATIONS / best(ours_translate) / 1e6,
                 TRANSLATIONS / best(drgn_translate) / 1e6),
                ("scattered 4 KiB reads (GB/s)", READS * 4096 / best(ours_read) / 1e9,
                 READS * 4096 / best(drgn_read) / 1e9),
            ]  # fmt: skip
    print(f"{'metric':<30} {'vmishell':>9} {'drgn':>9} {'ratio':>7}")
    for label, ours, theirs in rows:
        print(f"{label:<30} {ours:9.2f} {theirs:9.2f} {ours / theirs:6.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
