#!/usr/bin/env python3
"""Benchmark vmishell's address translation against Volatility3's Intel layers.

Both read the same raw physical-memory file (file offset = physical address):
vmishell through a memory-mapped source, Volatility3 through its FileLayer
under an Intel / IntelPAE / Intel32e layer built in the same process. For each
metric the script prints both speeds and the ratio.

    # a synthetic address space built in a temporary file (works anywhere)
    python benchmarks/bench_translate.py --synthetic [--mode level4] [--ram-mib 512]

    # a real dump (raw, offset = physical) with the CR3 it was taken with
    python benchmarks/bench_translate.py guest.raw --cr3 0x10a2e000 --mode level4 [--pti-kernel]

Metrics: warm translate() calls/s (a 1000-page working set, every cache
filled), cold translations/s (fresh translator, each page once), whole
address-space enumeration (pages/s: `mappings()` with a Mapping per run, and
`run_arrays()`, the numpy form, whose target is 10x warm translate() per
page), scattered 4 KiB reads (GB/s), one 64 MiB virtually contiguous read
(GB/s, cold and warm; also into a reused buffer and as a zero-copy view) next
to a plain `bytes` copy and a plain `os.pread` of 64 MiB out of the same file.

vmishell reads the file through its own mapped-file source (RawImageSource),
as `Session.image` does. With `--lab NAME` the guest's live RAM file is
measured too (QemuRamSource): rows marked cold start from nothing, as every
top-level call on a live guest does; warm rows are what `paused()` /
`cached()` keep.
"""

from __future__ import annotations

import argparse
import bisect
import gc
import itertools
import mmap
import os
import random
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.support.pagetables import PageTableBuilder
from vmishell.arch import AddressSpace, Mapping, PagingMode, Translator, kernel_dtb
from vmishell.sources.base import PhysicalSource
from vmishell.sources.files import QemuRamSource, RawImageSource

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
BIG_READ = 64 * MiB
VOL_CLASSES = {
    PagingMode.LEGACY: "Intel",
    PagingMode.PAE: "IntelPAE",
    PagingMode.LEVEL4: "Intel32e",
    PagingMode.LEVEL5: None,  # Volatility3 has no LA57 layer
}


# -- synthetic address space ------------------------------------------------------------------


def build_synthetic(path: Path, mode: PagingMode, ram_mib: int, seed: int) -> int:
    """Write a RAM image with one address space shaped like a kernel's; return its DTB.

    Regions: a direct map of RAM in large pages, a 96 MiB buffer of 4 KiB
    pages mapped contiguously, and two 72 MiB regions of 4 KiB pages on
    shuffled frames (vmalloc-like and user-like).
    """
    rng = random.Random(seed)
    ram = ram_mib * MiB
    data_start = 32 * MiB
    if ram < data_start + 128 * MiB:
        raise SystemExit("--ram-mib must be at least 160")
    b = PageTableBuilder(mode, ram_size=ram, table_start=MiB)
    long_mode = mode in (PagingMode.LEVEL4, PagingMode.LEVEL5)
    if long_mode:
        direct, contig, vmalloc, user = (
            0xFFFF_8880_0000_0000,
            0xFFFF_C900_0000_0000,
            0xFFFF_C901_0000_0000,
            0x7F00_0000_0000,
        )
        direct_size, contig_size, scattered_size = ram, 96 * MiB, 72 * MiB
    else:
        direct, contig, vmalloc, user = 0xC000_0000, 0xD000_0000, 0xF000_0000, 0x0800_0000
        direct_size, contig_size, scattered_size = min(ram, 256 * MiB), 96 * MiB, 72 * MiB
    large = 4 * MiB if mode is PagingMode.LEGACY else 2 * MiB
    b.map_range(direct, 0, direct_size - direct_size % large, large, nx=True, user=False)
    b.map_range(contig, data_start, contig_size, user=False, nx=True)
    frames = list(range(data_start, ram, 4 * KiB))
    for base, user_page in ((vmalloc, False), (user, True)):
        picks = rng.sample(frames, scattered_size // (4 * KiB))
        for i, frame in enumerate(picks):
            b.map(base + i * 4 * KiB, frame, user=user_page, nx=bool(i % 3))
    chunk = rng.randbytes(MiB)
    for off in range(data_start, ram, MiB):
        b.ram[off : off + MiB] = chunk
    path.write_bytes(b.ram)
    return b.dtb


# -- the two implementations --------------------------------------------------------------------


@dataclass
class Setup:
    path: Path
    dtb: int
    mode: PagingMode
    maxphyaddr: int
    source: PhysicalSource
    raw: mmap.mmap


def open_ours(path: Path, dtb: int, mode: PagingMode, maxphyaddr: int, live: bool = False) -> Setup:
    """vmishell's source for `path` (raw image or live RAM file), and a map for plain copies."""
    fd = os.open(path, os.O_RDONLY)
    try:
        raw = mmap.mmap(fd, os.fstat(fd).st_size, access=mmap.ACCESS_READ)
    finally:
        os.close(fd)
    source = QemuRamSource(path) if live else RawImageSource(path)
    return Setup(path, dtb, mode, maxphyaddr, source, raw)


def new_translator(s: Setup) -> Translator:
    return Translator(s.source, s.dtb, s.mode, maxphyaddr=s.maxphyaddr)


def new_translator_space(s: Setup) -> AddressSpace:
    """A fresh address space: nothing cached, as a first read of a process is."""
    return AddressSpace(new_translator(s))


def new_vol_layer(s: Setup, class_name: str | None) -> Any:
    """A fresh Volatility3 Intel layer over a FileLayer (fresh layer = cold caches)."""
    if class_name is None:
        raise ValueError("no Volatility3 layer class for this mode")
    from volatility3.framework import contexts
    from volatility3.framework.layers import intel, physical

    ctx = contexts.Context()
    ctx.config["bench.phys.location"] = s.path.resolve().as_uri()
    ctx.add_layer(physical.FileLayer(ctx, "bench.phys", "phys"))
    ctx.config["bench.virt.memory_layer"] = "phys"
    ctx.config["bench.virt.page_map_offset"] = s.dtb
    layer = getattr(intel, class_name)(ctx, "bench.virt", "virt")
    ctx.add_layer(layer)
    return layer


# -- measurements ---------------------------------------------------------------------------------


def timed(fn: Callable[[], object], repeat: int = 3) -> float:
    """Best wall time of `repeat` runs (GC off while timing, as timeit does)."""
    best = float("inf")
    for _ in range(repeat):
        gc.collect()
        gc.disable()
        try:
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
        finally:
            gc.enable()
    return best


def random_pages(maps: Sequence[Mapping], n: int, rng: random.Random) -> list[int]:
    """`n` random mapped page addresses, uniformly over mapped bytes."""
    ends, total = [], 0
    for m in maps:
        total += m.size
        ends.append(total)
    out = []
    for _ in range(n):
        x = rng.randrange(total)
        i = bisect.bisect_right(ends, x)
        m = maps[i]
        off = x - (ends[i] - m.size)
        out.append((m.vaddr + off) & ~0xFFF)
    return out


def both_read(asp: AddressSpace, vol: Any | None, page: int) -> bool:
    """Whether both implementations can read the 4 KiB page at `page`."""
    if not asp.is_readable(page, 4096):
        return False
    if vol is None:
        return True
    try:
        vol.read(page, 4096)
    except Exception:  # Volatility3's InvalidAddressException and kin
        return False
    return True


def big_regions(asp: AddressSpace, maps: Sequence[Mapping], size: int) -> dict[str, int]:
    """Where to read `size` bytes: physically contiguous frames, and scattered frames.

    Prefers regions of 4 KiB pages (the hard case); each must be readable.
    """
    tr = asp.translator

    def small_pages(va: int) -> bool:
        return tr.translate(va).page_size == 4 * KiB

    out: dict[str, int] = {}
    whole = [m for m in maps if m.size >= size and asp.is_readable(m.vaddr, size)]
    whole.sort(key=lambda m: not small_pages(m.vaddr))
    if whole:
        out["contiguous frames"] = whole[0].vaddr
    runs: list[tuple[int, int, int]] = []  # virtual runs: start, end, pieces
    for m in maps:
        if runs and runs[-1][1] == m.vaddr:
            runs[-1] = (runs[-1][0], m.end, runs[-1][2] + 1)
        else:
            runs.append((m.vaddr, m.end, 1))
    for lo, hi, pieces in sorted(runs, key=lambda r: not small_pages(r[0])):
        if hi - lo >= size and pieces > size // (64 * KiB) and asp.is_readable(lo, size):
            out["scattered frames"] = lo
            break
    return out


@dataclass
class Row:
    metric: str
    unit: str
    ours: float
    vol: float | None

    def render(self) -> str:
        vol = f"{self.vol:14.3f}" if self.vol is not None else f"{'-':>14}"
        ratio = f"{self.ours / self.vol:8.1f}x" if self.vol else f"{'-':>9}"
        return f"{self.metric:<38} {self.ours:14.3f} {vol} {ratio}  {self.unit}"


def run(s: Setup, vol_class: str | None, seed: int, quick: bool) -> list[Row]:
    rng = random.Random(seed)
    rows: list[Row] = []
    tr = new_translator(s)
    asp = AddressSpace(tr)
    t0 = time.perf_counter()
    maps = list(tr.mappings())
    t_enum = time.perf_counter() - t0
    pages = sum(m.size for m in maps) // (4 * KiB)
    print(f"address space: {len(maps)} runs, {pages * 4 * KiB / MiB:.0f} MiB mapped")
    if not maps:
        raise SystemExit("nothing is mapped: wrong CR3 or mode?")
    vol = new_vol_layer(s, vol_class) if vol_class else None

    # Warm translate: a 1000-page working set (fits both TLB and Volatility's lru_caches).
    def sample(n: int) -> list[int]:
        """Random pages both implementations can read (Volatility3 drops some tables)."""
        return [p for p in random_pages(maps, n, rng) if both_read(asp, vol, p)]

    hot = sample(1000)
    calls = [hot[i % len(hot)] + (i * 8) % 4096 for i in range(100_000 if quick else 300_000)]
    for a in hot:
        tr.translate(a)

    def ours_warm() -> None:
        translate = tr.translate
        for a in calls:
            translate(a)

    ours = len(calls) / timed(ours_warm)
    volv = None
    if vol is not None:
        for a in hot:
            vol.translate(a)

        def vol_warm() -> None:
            translate = vol.translate
            for a in calls:
                translate(a)

        volv = len(calls) / timed(vol_warm)
    rows.append(Row("warm translate()", "M calls/s", ours / 1e6, volv / 1e6 if volv else None))
    warm_translate_rate = ours

    # Cold translate: fresh caches, each page once.
    cold = list(dict.fromkeys(sample(5_000 if quick else 20_000)))

    def ours_cold() -> None:
        translate = new_translator(s).translate
        for a in cold:
            translate(a)

    ours = len(cold) / timed(ours_cold)
    volv = None
    if vol is not None:

        def vol_cold() -> None:
            translate = new_vol_layer(s, vol_class).translate
            for a in cold:
                translate(a)

        volv = len(cold) / timed(vol_cold)
    rows.append(Row("cold translate()", "M calls/s", ours / 1e6, volv / 1e6 if volv else None))
    cold_translate_rate = ours

    # Enumeration: whole address space.
    def ours_enum() -> None:
        for _ in new_translator(s).mappings():
            pass

    t_enum = min(t_enum, timed(ours_enum, 2))
    enum_rate = pages / t_enum
    volv = None
    if vol is not None:
        spec = s.mode.spec

        def vol_enum() -> None:
            layer = new_vol_layer(s, vol_class)
            if spec.canonical:
                half = 1 << (spec.address_bits - 1)
                for _ in layer.mapping(0, half, ignore_errors=True):
                    pass
                for _ in layer.mapping((1 << 64) - half, half, ignore_errors=True):
                    pass
            else:
                for _ in layer.mapping(0, 1 << 32, ignore_errors=True):
                    pass

        volv = pages / timed(vol_enum, 1)
    rows.append(Row("mappings(): whole space", "M pages/s", enum_rate / 1e6, _m(volv)))
    new_translator(s).run_arrays()  # numpy's import is not the walk's cost

    def ours_arrays() -> None:
        new_translator(s).run_arrays()

    arrays_rate = pages / timed(ours_arrays, 5)
    rows.append(Row("run_arrays(): whole space", "M pages/s", arrays_rate / 1e6, _m(volv)))
    runs_rate = pages / timed(lambda: new_translator(s).runs(), 3)
    rows.append(Row("runs() tuples: whole space", "M pages/s", runs_rate / 1e6, _m(volv)))
    print(
        f"  per page: mappings() {enum_rate / cold_translate_rate:.1f}x cold translate(); "
        f"run_arrays() {arrays_rate / warm_translate_rate:.1f}x warm translate() (target 10x), "
        f"runs() {runs_rate / warm_translate_rate:.1f}x"
    )

    # Scattered 4 KiB reads.
    scattered = sample(5_000 if quick else 20_000)
    for p in scattered:
        asp.read(p, 4096)

    def ours_reads() -> None:
        read = asp.read
        for p in scattered:
            read(p, 4096)

    ours = len(scattered) * 4096 / timed(ours_reads)
    volv = None
    if vol is not None:
        for p in scattered:
            vol.read(p, 4096)

        def vol_reads() -> None:
            read = vol.read
            for p in scattered:
                read(p, 4096)

        volv = len(scattered) * 4096 / timed(vol_reads)
    rows.append(Row("scattered 4 KiB reads (warm)", "GB/s", ours / 1e9, _g(volv)))

    # A whole process's mapped memory: every user-half run, each read in one call.
    user_top = (1 << (s.mode.spec.address_bits - 1)) if s.mode.spec.canonical else 0xC0000000
    user_runs = [m for m in maps if m.vaddr < user_top and both_read(asp, vol, m.vaddr)]
    user_bytes = sum(m.size for m in user_runs)
    if user_runs:

        def ours_whole() -> None:
            read = new_translator_space(s).read
            for m in user_runs:
                read(m.vaddr, m.size, pad=True)

        ours = user_bytes / timed(ours_whole)
        volv = None
        if vol is not None:

            def vol_whole() -> None:
                read = new_vol_layer(s, vol_class).read
                for m in user_runs:
                    read(m.vaddr, m.size, pad=True)

            volv = user_bytes / timed(vol_whole)
        print(f"  whole process: {len(user_runs)} user runs, {user_bytes / MiB:.1f} MiB")
        rows.append(Row("whole process's memory (cold)", "GB/s", ours / 1e9, _g(volv)))

    # 64 MiB virtually contiguous reads, and a plain copy of 64 MiB.
    view = memoryview(s.raw)
    copy = BIG_READ / timed(lambda: bytes(view[: min(BIG_READ, len(view))]))
    rows.append(Row("plain bytes copy of 64 MiB", "GB/s", copy / 1e9, None))
    fd = os.open(s.path, os.O_RDONLY)
    try:
        pread = BIG_READ / timed(lambda: os.pread(fd, BIG_READ, 0))
    finally:
        os.close(fd)
    rows.append(Row("plain os.pread of 64 MiB", "GB/s", pread / 1e9, None))
    regions = big_regions(asp, maps, BIG_READ + 4 * KiB)
    if not regions:
        print("  no 64 MiB virtually contiguous readable region: skipped")
    for label, start in regions.items():
        page = tr.translate(start).page_size
        print(f"  64 MiB read, {label}: at {start:#x} ({page // KiB} KiB pages)")
        big_cold, big_warm, vcold, vwarm = big_read_rates(s, asp, vol, vol_class, start)
        rows.append(Row(f"64 MiB read, {label} (cold)", "GB/s", big_cold / 1e9, _g(vcold)))
        rows.append(Row(f"64 MiB read, {label} (warm)", "GB/s", big_warm / 1e9, _g(vwarm)))
        into, zero = buffer_rates(asp, start)
        rows.append(Row(f"64 MiB read_into, {label} (warm)", "GB/s", into / 1e9, _g(vwarm)))
        if zero is not None:
            rows.append(Row(f"64 MiB view(), {label} (warm)", "GB/s", zero / 1e9, _g(vwarm)))
        print(
            f"    vs plain copy: cold {big_cold / copy:.0%}, "
            f"warm {big_warm / copy:.0%} of copy bandwidth (target 50%); "
            f"read_into a reused buffer {into / copy:.0%}"
        )
    view.release()
    return rows


def big_read_rates(
    s: Setup, asp: AddressSpace, vol: Any | None, vol_class: str | None, start: int
) -> tuple[float, float, float | None, float | None]:
    """Bytes/s of 64 MiB reads at `start`: ours cold and warm, Volatility3's cold and warm.

    The offset moves by a byte each time so that nothing can answer from a
    cache of whole reads (Volatility3 memoises read() results).
    """
    shift = itertools.count(1)

    def ours_cold() -> None:
        AddressSpace(new_translator(s)).read(start + next(shift), BIG_READ)

    def ours_warm() -> None:
        asp.read(start + next(shift), BIG_READ)

    asp.read(start, BIG_READ)
    cold = BIG_READ / timed(ours_cold)
    warm = BIG_READ / timed(ours_warm)
    if vol is None:
        return cold, warm, None, None

    def vol_cold() -> None:
        new_vol_layer(s, vol_class).read(start + next(shift), BIG_READ)

    def vol_warm() -> None:
        vol.read(start + next(shift), BIG_READ)

    vol.read(start, BIG_READ)
    return cold, warm, BIG_READ / timed(vol_cold, 2), BIG_READ / timed(vol_warm, 2)


def buffer_rates(asp: AddressSpace, start: int) -> tuple[float, float | None]:
    """Bytes/s of 64 MiB read_into one reused buffer, and of a zero-copy view (if one run)."""
    buf = bytearray(BIG_READ)
    asp.read_into(start, buf)
    shift = itertools.count(1)
    into = BIG_READ / timed(lambda: asp.read_into(start + next(shift) * 8, buf))
    runs = asp._runs(start, BIG_READ, False)
    if len(runs) != 1:
        return into, None

    def viewed() -> None:
        with asp.view(start, BIG_READ) as v:
            _ = v[-1]

    return into, BIG_READ / timed(viewed)


def _m(x: float | None) -> float | None:
    return x / 1e6 if x is not None else None


def _g(x: float | None) -> float | None:
    return x / 1e9 if x is not None else None


# -- command line ---------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("dump", nargs="?", type=Path, help="raw physical memory file")
    ap.add_argument("--cr3", type=lambda x: int(x, 0), help="CR3 / DTB of the address space")
    ap.add_argument("--mode", choices=[m.value for m in PagingMode], default="level4")
    ap.add_argument("--maxphyaddr", type=int, default=52)
    ap.add_argument("--pti-kernel", action="store_true", help="clear CR3 bit 12 (Linux PTI)")
    ap.add_argument("--synthetic", action="store_true", help="build a synthetic address space")
    ap.add_argument("--ram-mib", type=int, default=512, help="synthetic RAM size")
    ap.add_argument("--keep", type=Path, help="keep the synthetic image at this path")
    ap.add_argument(
        "--vol-class", help="Volatility3 layer class (default by mode; e.g. LinuxIntel32e)"
    )
    ap.add_argument("--no-vol", action="store_true", help="skip Volatility3")
    ap.add_argument("--quick", action="store_true", help="fewer iterations")
    ap.add_argument("--no-live", action="store_true", help="with --lab: skip the live RAM file")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument(
        "--lab",
        metavar="NAME",
        help="dump the running lab instance NAME and use its pid-1 address space",
    )
    args = ap.parse_args(argv)
    mode = PagingMode(args.mode)
    lab_dump: Path | None = None
    lab_ram: Path | None = None
    if args.lab:
        lab_dump, dtb_found, mode = dump_lab_guest(args.lab)
        args.dump, args.cr3, args.pti_kernel = lab_dump, dtb_found, False
        if not args.no_live:
            from vmishell.lab.runner import attach

            lab_ram = attach(args.lab).ram_path

    tmp: Path | None = None
    if args.synthetic:
        if args.keep:
            path = args.keep
        else:
            fd, name = tempfile.mkstemp(prefix="vmishell-bench-", suffix=".raw")
            os.close(fd)
            tmp = path = Path(name)
        t0 = time.perf_counter()
        dtb = build_synthetic(path, mode, args.ram_mib, args.seed)
        print(f"synthetic {mode.spec.name} image: {path} ({args.ram_mib} MiB, "
              f"built in {time.perf_counter() - t0:.1f} s), dtb={dtb:#x}")  # fmt: skip
    else:
        if args.dump is None or args.cr3 is None:
            ap.error("give a dump and --cr3, or --synthetic")
        path = args.dump
        dtb = kernel_dtb(args.cr3, mode, args.maxphyaddr) if args.pti_kernel else args.cr3

    vol_class = None if args.no_vol else (args.vol_class or VOL_CLASSES[mode])
    if vol_class is None and not args.no_vol:
        print(f"Volatility3 has no layer for {mode.spec.name}: vmishell only")
    try:
        load = os.getloadavg()
        print(
            f"load average before: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, CPUs {os.cpu_count()}"
        )
        s = open_ours(path, dtb, mode, args.maxphyaddr)
        rows = run(s, vol_class, args.seed, args.quick)
        show(f"raw image {path}", vol_class, rows)
        s.source.close()
        if lab_ram is not None:
            print(
                f"\nlive RAM file {lab_ram} (cold rows start fresh, warm rows = paused()/cached())"
            )
            live = open_ours(lab_ram, dtb, mode, args.maxphyaddr, live=True)
            show(f"live {lab_ram}", vol_class, run(live, vol_class, args.seed, args.quick))
            live.source.close()
        load = os.getloadavg()
        print(f"\nload average after: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    finally:
        if tmp is not None:
            tmp.unlink()
        if lab_dump is not None:
            lab_dump.unlink()
    return 0


def show(title: str, vol_class: str | None, rows: list[Row]) -> None:
    print(f"\n{title}")
    print(f"{'metric':<38} {'vmishell':>14} {vol_class or 'volatility3':>14} {'ratio':>9}")
    for row in rows:
        print(row.render())


def dump_lab_guest(name: str) -> tuple[Path, int, PagingMode]:
    """A raw dump of a running lab guest, with its init process's DTB and paging mode."""
    from vmishell.lab.runner import attach
    from vmishell.session import Session

    fd, tmpname = tempfile.mkstemp(prefix="vmishell-bench-", suffix=".raw")
    os.close(fd)
    path = attach(name).dump(tmpname, "raw")
    with Session.image(path) as session:
        init = session.process(1)
        print(f"lab guest {name}: dump {path}, pid 1 ({init.comm}) dtb={init.dtb:#x}, "
              f"{session.guest.location.mode.name}")  # fmt: skip
        return path, init.dtb, session.guest.location.mode


if __name__ == "__main__":
    raise SystemExit(main())
