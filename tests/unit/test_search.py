"""Search on synthetic kernels: hits at the addresses the page tables imply, shared frames
scanned once but reported for every process, matches across page seams, bounds named."""

from __future__ import annotations

import re

import pytest

from tests.support.kernel import SyntheticKernel
from tests.support.profiles import kernel
from vmishell.errors import VmiError
from vmishell.limits import Limits
from vmishell.search import META_KEY, PatternError
from vmishell.session import Session

PAGE = 0x1000
BASE = 0x600000


def _frames(k: SyntheticKernel, count: int) -> list[int]:
    """`count` frames that are not physically adjacent (a free frame between each two)."""
    frames = []
    for _ in range(count):
        frames.append(k.page())
        k.page()
    return frames


def _process(k: SyntheticKernel, pid: int, comm: str, frames: list[int], *, path: str = ""):
    """A process mapping `frames` in order at BASE, one VMA over them."""
    mm = k.mm(argv=(comm,))
    for i, frame in enumerate(frames):
        mm.space.map(BASE + i * PAGE, frame)
    file = k.file(path) if path else None
    k.set_vmas(mm, [k.vma(mm, BASE, BASE + len(frames) * PAGE, file=file)])
    k.task(pid, comm, mm=mm)
    return mm


@pytest.fixture
def k() -> SyntheticKernel:
    return kernel("6.7")


def _session(k: SyntheticKernel, limits: Limits | None = None) -> Session:
    return Session(k.source(), k.profile, limits=limits)


def test_a_hit_is_at_the_virtual_address_its_frame_is_mapped_at(k) -> None:
    frames = _frames(k, 3)
    _process(k, 100, "marker", frames)
    k.write(frames[2] + 0x123, b"needle-1234")
    hits = _session(k).search(b"needle-1234")
    assert list(zip(hits.pid, hits.vaddr, hits.paddr, strict=True)) == [
        (100, BASE + 2 * PAGE + 0x123, frames[2] + 0x123)
    ]
    row = hits.iloc[0]
    assert (row.start, row.end, row.perms) == (BASE, BASE + 3 * PAGE, "rw-p")
    assert row.match == b"needle-1234"
    assert "[needle-1234]" in row.context


def test_a_shared_frame_is_scanned_once_and_reported_for_every_process(k) -> None:
    shared = _frames(k, 1)[0]
    _process(k, 100, "one", [shared, *_frames(k, 1)])
    _process(k, 101, "two", [*_frames(k, 1), shared])
    k.write(shared + 8, b"SHAREDMARK")
    hits = _session(k).search(b"SHAREDMARK", kernel=False)
    assert sorted(zip(hits.pid, hits.vaddr, strict=True)) == [
        (100, BASE + 8),
        (101, BASE + PAGE + 8),
    ]
    # 3 distinct frames (4 mapped pages); the seam windows add a few bytes.
    scanned = hits.attrs[META_KEY]["scanned_bytes"]
    assert 3 * PAGE <= scanned < 3 * PAGE + 256


def test_a_match_across_two_pages_in_distant_frames_is_found(k) -> None:
    frames = _frames(k, 3)
    _process(k, 100, "span", frames)
    k.write(frames[0] + PAGE - 4, b"ACRO")
    k.write(frames[1], b"SSPAGES")
    hits = _session(k).search("ACROSSPAGES")
    assert list(hits.vaddr) == [BASE + PAGE - 4]
    assert list(hits.match) == [b"ACROSSPAGES"]


def test_a_match_across_three_runs_is_reported_once(k) -> None:
    frames = _frames(k, 3)
    _process(k, 100, "three", frames)
    k.write(frames[0] + PAGE - 2, b"AB")
    k.write(frames[1], b"C" * PAGE)
    k.write(frames[2], b"DE")
    hits = _session(k).search(re.compile(rb"ABC+DE"), overlap=PAGE + 8)
    assert list(hits.vaddr) == [BASE + PAGE - 2]


def test_bytes_that_only_follow_each_other_physically_are_no_hit(k) -> None:
    """Frames f and f+1 hold the two halves, but the process maps them far apart."""
    first, second = k.page(), k.page()
    _process(k, 100, "apart", [second, *_frames(k, 1), first])
    k.write(first + PAGE - 3, b"HAL")
    k.write(second, b"VES")
    assert _session(k).search(b"HALVES").empty


def test_hex_with_wildcards_regex_text_encodings(k) -> None:
    frames = _frames(k, 1)
    _process(k, 100, "kinds", frames)
    k.write(frames[0] + 0x10, bytes.fromhex("deadbeef") + b"\0" + "wide".encode("utf-16-le"))
    s = _session(k)
    assert list(s.search("de ad ?? ef", kind="hex").vaddr) == [BASE + 0x10]
    assert list(s.search("de a? be", kind="hex").vaddr) == [BASE + 0x10]
    assert list(s.search(rb"\xde\xad.\xef", kind="regex").vaddr) == [BASE + 0x10]
    assert list(s.search("wide", encoding="utf-16-le").vaddr) == [BASE + 0x15]
    assert list(s.search("wide", encoding="utf-16").vaddr) == [BASE + 0x15]
    with pytest.raises(PatternError, match="hex pattern"):
        s.search("de ad g0", kind="hex")


def test_yara_rules_report_rule_and_string(k) -> None:
    pytest.importorskip("yara_x")
    frames = _frames(k, 2)
    _process(k, 100, "yara", frames)
    k.write(frames[1] + 0x40, b"evil-indicator")
    rules = 'rule Evil { strings: $a = "evil-indicator" condition: $a }'
    hits = _session(k).search(rules, kind="yara")
    assert list(zip(hits.vaddr, hits.rule, strict=True)) == [(BASE + PAGE + 0x40, "Evil:$a")]


def test_invalid_yara_rules_give_the_compilers_message_in_one_line(k) -> None:
    pytest.importorskip("yara_x")
    _process(k, 100, "bad", _frames(k, 1))
    with pytest.raises(PatternError) as err:
        _session(k).search("rule { nope", kind="yara")
    assert "\n" not in str(err.value)
    assert "syntax error" in str(err.value)


def test_hits_are_bounded_and_the_bound_is_named(k) -> None:
    frames = _frames(k, 1)
    _process(k, 100, "many", frames)
    k.write(frames[0], b"x" * PAGE)
    with pytest.warns(RuntimeWarning, match="max_hits"):
        hits = _session(k).search(b"x", max_hits=10)
    assert len(hits) == 10
    assert "max_hits" in hits.attrs[META_KEY]["stopped"]
    with pytest.raises(PatternError, match=r"Limits.max_hits"):
        _session(k, Limits(max_hits=5)).search(b"x", max_hits=6)
    with pytest.raises(PatternError, match=r"Limits.max_context"):
        _session(k).search(b"x", context=1 << 20)


def test_scanned_bytes_are_bounded(k) -> None:
    frames = _frames(k, 4)
    _process(k, 100, "big", frames)
    k.write(frames[3], b"LATE")
    with pytest.warns(RuntimeWarning, match="max_scan_bytes"):
        hits = _session(k, Limits(max_scan_bytes=2 * PAGE)).search(b"LATE")
    assert "Limits.max_scan_bytes" in hits.attrs[META_KEY]["stopped"]


def test_ctrl_c_keeps_the_hits_found_so_far(k, monkeypatch) -> None:
    frames = _frames(k, 3)
    _process(k, 100, "stop", frames)
    for f in frames:
        k.write(f, b"HIT")
    from vmishell.search import engine

    original = engine._row
    calls = []

    def interrupt_after_two(*args, **kwargs):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(engine, "_row", interrupt_after_two)
    with pytest.warns(RuntimeWarning, match="Ctrl-C"):
        hits = _session(k).search(b"HIT")
    assert len(hits) == 2


def test_unknown_pid_is_an_error_naming_it(k) -> None:
    _process(k, 100, "one", _frames(k, 1))
    with pytest.raises(VmiError, match="4242"):
        _session(k).search(b"x", pids=[4242])


def test_physical_search_maps_hits_back_or_reports_them_unmapped(k) -> None:
    frames = _frames(k, 1)
    _process(k, 100, "mapped", frames)
    k.write(frames[0] + 0x20, b"PHYSMARK")
    loose = k.page()
    k.write(loose + 0x30, b"PHYSMARK")
    hits = _session(k).physical.search(b"PHYSMARK")
    user = hits[hits.pid == 100]
    assert list(user.vaddr) == [BASE + 0x20]
    at_loose = hits[hits.paddr == loose + 0x30]
    # The synthetic kernel's direct map covers all RAM: the loose frame is the kernel's.
    assert list(at_loose.pid) == [0]
    assert list(at_loose.vaddr) == [k.va_of(loose + 0x30)]
    assert set(hits.paddr) == {frames[0] + 0x20, loose + 0x30}


def test_kernel_memory_is_searched_only_when_asked(k) -> None:
    _process(k, 100, "user", _frames(k, 1))
    va = k.cstring("kernel-only-secret")
    s = _session(k)
    assert s.search("kernel-only-secret").empty
    hits = s.search("kernel-only-secret", kernel=True)
    assert list(zip(hits.pid, hits.comm, strict=True)) == [(0, "kernel")]
    assert va in set(hits.vaddr)


def test_a_progress_bar_changes_nothing_but_the_display(k, capsys) -> None:
    pytest.importorskip("tqdm")
    frames = _frames(k, 2)
    _process(k, 100, "bar", frames)
    k.write(frames[1], b"progress-marker")
    s = _session(k)
    quiet = s.search(b"progress-marker", progress=False)
    shown = s.search(b"progress-marker", progress=True)
    assert list(shown.vaddr) == list(quiet.vaddr) == [BASE + PAGE]
    assert "search" in capsys.readouterr().err
