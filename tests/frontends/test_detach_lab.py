"""%detach releases the target: nothing of its memory file stays mapped in the kernel's process,
even while IPython's output history still holds its frames, bytes and Process objects."""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = pytest.mark.lab


def mapped(path: Path) -> bool:
    return str(path) in Path("/proc/self/maps").read_text()


def test_detach_unmaps_the_file_while_out_still_holds_results(
    ip, cell, x86_64_guest, tmp_path: Path
) -> None:
    truth = x86_64_guest.truth()
    dump = x86_64_guest.dump(tmp_path / "copy.raw", "raw")
    assert cell(f"%attach {dump} --name unmapme").success
    assert mapped(dump)
    ps = cell("%ps")
    peek = cell(f"%peek {truth.marker_va:#x} 16 -p {truth.marker_pid}")
    held = cell(f"maps = %maps -p {truth.marker_pid}")
    assert ps.success and peek.success and held.success
    magics = ip.magics_manager.registry["VmiMagics"]
    session = magics.attached.get("unmapme").session
    ip.user_ns["held_process"] = session.process(truth.marker_pid)
    assert cell("%detach unmapme").success
    assert ip.user_ns["Out"], "the output history holds the results"
    assert not mapped(dump), f"{dump} is still mapped after %detach"
    r = cell(f"held_process.read({truth.marker_va:#x}, 16)")
    assert not r.success and "SessionClosed" in r.output and "is closed" in r.output
    assert len(r.lines) == 1, r.lines  # one line: the vmishell error, no traceback
    del ip.user_ns["held_process"]
