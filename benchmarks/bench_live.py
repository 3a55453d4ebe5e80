#!/usr/bin/env python3
"""What live truth costs: one process's translations and reads, image versus live guest.

On a live guest every top-level call sees the page tables as they are when it
starts (see `vmishell.session`), so a call can reuse no translation from the
call before. This script measures that cost and the three ways to keep the
hot-path speed of an image, all through the same `Process` API:

- `paused()`: the guest is stopped, so caches are kept across calls (true);
- batch calls, `translate_many` / `read_many`: one look serves many (true);
- `cached()`: the caller accepts stale answers for speed (explicit).

Every figure is printed next to the same work on a raw dump of the same
guest taken just before (an image, whose caches are never dropped), with the
ratio; the target is that the hot paths stay within 20 % (ratio >= 0.8).
The cost of the per-call lifecycle check (is the VM still there, was it
reset, did its RAM file shrink) is printed on its own.

    python benchmarks/bench_live.py            # boots x86_64 as "bench-live", stops it after
    python benchmarks/bench_live.py --lab NAME # a running lab instance
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vmishell.session import Process, Session

PAGES = 1000
READ = 4096


def rate(fn: Callable[[], int], repeat: int = 5) -> float:
    """Best of `repeat`: units of work per second."""
    best = 0.0
    for _ in range(repeat):
        t0 = time.perf_counter()
        n = fn()
        best = max(best, n / (time.perf_counter() - t0))
    return best


def pages_of(p: Process, rng: random.Random) -> list[int]:
    """Up to PAGES mapped 4 KiB pages of the process, shuffled."""
    pages: list[int] = []
    for m in p.mappings():
        pages.extend(range(m.vaddr, m.vaddr + m.size, 4096))
        if len(pages) >= 20 * PAGES:
            break
    rng.shuffle(pages)
    return pages[:PAGES]


def per_call(p: Process, pages: Sequence[int]) -> dict[str, Callable[[], int]]:
    def translate() -> int:
        for v in pages:
            p.translate(v)
        return len(pages)

    def read() -> int:
        for v in pages:
            p.read(v, READ)
        return len(pages) * READ

    def translate_many() -> int:
        return len(p.translate_many(pages))

    def read_many() -> int:
        return sum(map(len, p.read_many([(v, READ) for v in pages])))

    return {
        "translate() per call": translate,
        "4 KiB read() per call": read,
        "translate_many()": translate_many,
        "read_many() of 4 KiB": read_many,
    }


def measure(p: Process, pages: Sequence[int]) -> dict[str, float]:
    out = {}
    for name, fn in per_call(p, pages).items():
        fn()  # warm
        out[name] = rate(fn)
    return out


def fmt(name: str, value: float) -> str:
    if "read" in name:
        return f"{value / 1e9:8.2f} GB/s"
    return f"{value / 1e6:8.2f} M/s "


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--lab", metavar="NAME", help="a running lab instance (default: boot one)")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args(argv)
    from vmishell.lab import runner

    name = args.lab or "bench-live"
    started = None
    if args.lab is None:
        started = runner.up("x86_64", name, timeout=240)
    try:
        guest = runner.attach(name)
        truth = guest.truth()
        rng = random.Random(args.seed)
        with tempfile.TemporaryDirectory(prefix="vmishell-bench-") as tmp:
            dump = guest.dump(Path(tmp) / "guest.raw", "raw")
            image = Session.image(dump)
            live = Session.attach(f"lab:{name}")
            pid = truth.marker_pid
            pages = pages_of(image.process(pid), rng)
            print(f"{name}: pid {pid}, {len(pages)} pages; image {dump}")
            base = measure(image.process(pid), pages)
            rows: list[tuple[str, str, float]] = []
            p = live.process(pid)
            for name_, value in measure(p, pages).items():
                rows.append(("live, each call fresh", name_, value))
            with live.paused():
                for name_, value in measure(p, pages).items():
                    rows.append(("live, inside paused()", name_, value))
            with live.cached():
                for name_, value in measure(p, pages).items():
                    rows.append(("live, inside cached()", name_, value))

            checks = 20000
            t0 = time.perf_counter()
            for _ in range(checks):
                live._begin()
            begin_us = (time.perf_counter() - t0) / checks * 1e6
            t0 = time.perf_counter()
            for _ in range(checks):
                image._begin()
            image_us = (time.perf_counter() - t0) / checks * 1e6
            image.close()
            live.close()

        print()
        print(f"{'how':<24} {'metric':<24} {'live':>14} {'image':>14} {'ratio':>7}")
        for how, metric, value in rows:
            ratio = value / base[metric]
            hot = (
                ""
                if "per call" in metric and "fresh" in how
                else ("  ok" if ratio >= 0.8 else "  <0.8")
            )
            print(
                f"{how:<24} {metric:<24} {fmt(metric, value):>14} {fmt(metric, base[metric]):>14} "
                f"{ratio:7.2f}{hot}"
            )
        print()
        print(f"start of a top-level call (lifecycle check + fresh view): live {begin_us:.2f} us, "
              f"image {image_us:.2f} us")  # fmt: skip
    finally:
        if started is not None:
            runner.down(name)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
