"""Attach with nothing prepared: the profile is carved from the guest's own memory.

No profile folder, no shipped profile, an empty cache: `Session.lab(name)`
must carve BTF, kallsyms and the banner from RAM, verify the result against
the running kernel and then list processes, maps and the marker exactly as
the guest's own ground truth says. The carved ISF must equal the one built
from the same kernel's .deb, field for field and symbol for symbol.
"""

from __future__ import annotations

import json
import lzma
from pathlib import Path
from typing import Any

import pytest

from vmishell.lab import profiles
from vmishell.lab.build import build_guest
from vmishell.lab.paths import cache_root
from vmishell.lab.workload import MARKER, layout
from vmishell.session import Session
from vmishell.symbols import locations
from vmishell.symbols.carve import carve_kernel, carved_isf
from vmishell.symbols.carve_cache import wait_for_cache
from vmishell.symbols.profile import load_profile

pytestmark = pytest.mark.lab

#: aarch64-16k: trixie's 16 KiB-page arm64 kernel (BTF and KALLSYMS_ALL), 52-bit VA.
GUESTS = ["x86_64", "x86_64-la57", "aarch64-16k"]


def nothing_prepared(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No profile anywhere the finder looks; the lab keeps its own downloads and runs.

    Call it after booting the guest: booting leaves the lab's profile in the cache.
    """
    monkeypatch.setenv("VMISHELL_CACHE", str(cache_root()))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("VMISHELL_PROFILE_PATH", raising=False)
    empty = tmp_path / "shipped"
    empty.mkdir()
    monkeypatch.setattr(locations, "shipped_dir", lambda: empty)
    return tmp_path / "xdg" / "vmishell" / "carved-profiles"


@pytest.mark.parametrize("guest_name", GUESTS)
def test_attach_with_nothing_prepared_carves_verifies_and_equals_the_truth(
    lab_guest, guest_name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    guest = lab_guest(guest_name)
    carved_dir = nothing_prepared(tmp_path, monkeypatch)
    truth = guest.truth()
    with Session.lab(guest.name) as s:
        assert s.profile.origin == "carved"
        assert s.profile_note.startswith("profile: profile linux-")
        assert "carved from guest memory" in s.profile_note
        df = s.processes(threads=True)
        assert df.error.isna().all(), df[df.error.notna()]
        ours = {row.pid: row for row in df.itertuples()}
        for task in truth.processes:
            if task.comm.startswith("kworker/") and task.pid not in ours:
                continue  # idle kworkers come and go
            row = ours[task.pid]
            assert (row.tgid, row.ppid, row.uid, row.kernel_thread) == (
                task.tgid, task.ppid, task.uid, task.kernel_thread,
            ), task  # fmt: skip
        marker = s.process(truth.marker_pid)
        maps = [(v.start, v.end, v.perms, v.offset, v.device, v.inode, v.path)
                for v in marker.vmas()]  # fmt: skip
        assert maps == [
            (m.start, m.end, m.perms, m.offset, m.dev, m.inode, m.path) for m in truth.maps
        ]
        lay = layout(guest.spec.arch)
        assert marker.translate(lay.marker_va).paddr == truth.marker_paddr
        assert marker.read(lay.marker_va, len(MARKER)) == MARKER
        assert s.symbol("_text") == truth.symbols["_text"]
    wait_for_cache()
    cached = list(carved_dir.glob("linux-*-btf*.json.gz"))
    assert len(cached) == 1
    with Session.lab(guest.name) as again:  # found on disk this time: no carve
        assert again.profile.path == cached[0]
        assert again.profile.origin == "carved"


def _sections(isf: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in isf.items() if k != "metadata"}


@pytest.mark.parametrize("guest_name", ["x86_64", "aarch64-16k"])
def test_the_carved_isf_equals_the_one_built_from_the_kernels_deb(
    lab_guest, guest_name: str, tmp_path: Path
) -> None:
    guest = lab_guest(guest_name)
    built = build_guest(guest_name)
    (tmp_path / "deb").mkdir()
    from_deb = profiles.build_lab_profile(built, tmp_path / "deb")
    deb_isf = json.loads(lzma.decompress(from_deb.read_bytes()))
    with Session.lab(guest.name, profile=from_deb) as s:
        carved = carve_kernel(s.source)
        isf = carved_isf(carved, s.source.description)
    ours, theirs = _sections(isf), _sections(deb_isf)
    assert ours.keys() == theirs.keys()
    for section in ours:
        only = set(ours[section]) ^ set(theirs[section])
        assert not only, (section, sorted(only)[:10])
        differ = [k for k in ours[section] if ours[section][k] != theirs[section][k]]
        assert not differ, (section, differ[:10])
    assert load_profile(from_deb).banner == carved.banner


def test_an_i386_guest_without_btf_is_told_what_is_missing(
    lab_guest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vmishell.symbols.carve import MissingBtf

    guest = lab_guest("i386-pae")
    nothing_prepared(tmp_path, monkeypatch)
    with pytest.raises(MissingBtf) as err:
        Session.lab(guest.name)
    message = str(err.value)
    assert "no BTF" in message and "vmishell profile fetch" in message


def test_an_arm64_kernel_without_kallsyms_all_is_told_to_use_its_package(
    lab_guest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Debian 12's arm64 kernel has BTF, but its kallsyms lists functions only."""
    from vmishell.errors import ProfileError

    guest = lab_guest("aarch64")
    nothing_prepared(tmp_path, monkeypatch)
    with pytest.raises(ProfileError) as err:
        Session.lab(guest.name)
    message = str(err.value)
    assert "CONFIG_KALLSYMS_ALL" in message and "vmishell profile fetch" in message


def test_profile_fetch_builds_the_i386_profile_from_the_banners_package_and_attach_works(
    lab_guest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vmishell.lab.fetch import fetch_profile

    guest = lab_guest("i386-pae")
    nothing_prepared(tmp_path, monkeypatch)
    path, checks = fetch_profile(f"lab:{guest.name}", say=lambda _m: None)
    assert path.parent == tmp_path / "xdg" / "vmishell" / "built-profiles"
    assert any(c.startswith("task list closes") for c in checks)
    assert any("translates its stack" in c for c in checks)
    truth = guest.truth()
    with Session.lab(guest.name) as s:  # the finder now has it
        assert s.profile.path == path
        assert truth.marker_pid in set(s.processes().pid)


def test_volatility3_runs_pslist_with_the_carved_profile(
    lab_guest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vmishell.interop.volatility import run_plugin

    guest = lab_guest("x86_64")
    dump = guest.dump(tmp_path / "x86_64.raw", "raw")
    nothing_prepared(tmp_path, monkeypatch)
    with Session.image(dump) as s:
        assert s.profile.origin == "carved"
        wait_for_cache()  # Volatility3 reads the ISF file
        vol = run_plugin(s, "linux.pslist")
        ours = s.processes(threads=False)
    dump.unlink()
    mine = ours[ours.pid != 0].sort_values("pid")
    theirs = vol.sort_values("PID")
    assert list(theirs.PID) == list(mine.pid)
    assert list(theirs.PPID) == list(mine.ppid)
    assert list(theirs.COMM) == [c[:15] for c in mine.comm]
