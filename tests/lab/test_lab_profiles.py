"""Every lab guest gets a right profile, whichever kernel Debian serves today.

Debian's archive keeps only the newest kernel of each flavour, so the kernel
the lab boots changes without notice and a shipped profile can go stale.
These tests state properties that hold for any kernel version: the profile a
guest gets agrees with the -dbg package of the guest's own kernel (System.map
addresses, DWARF layouts) and equals a fresh build from the guest's own
package; when no shipped profile matches, one is built and the user is told.
"""

from __future__ import annotations

import json
import lzma
from pathlib import Path
from typing import Any

import pytest

from vmishell.lab import profiles
from vmishell.lab.build import BuiltGuest, build_guest
from vmishell.lab.dbgprofiles import DebugFiles, check_profile, debug_files
from vmishell.lab.paths import cache_root
from vmishell.symbols import locations
from vmishell.symbols.profile import load_profile

pytestmark = pytest.mark.lab
GUESTS = ["x86_64", "i386-pae", "i386"]


def _dbg(built: BuiltGuest) -> DebugFiles:
    kernel = built.manifest["packages"]["kernel"]
    return debug_files(built.guest.debian_arch, kernel["name"], kernel["version"])


def _content(path: Path) -> dict[str, Any]:
    """What a profile says about its kernel (its metadata aside)."""
    isf = json.loads(lzma.decompress(path.read_bytes()))
    isf.pop("metadata")
    return isf


@pytest.mark.parametrize("guest", GUESTS)
def test_the_profile_a_lab_kernel_gets_equals_a_build_from_its_own_package(
    guest: str, tmp_path: Path
) -> None:
    built = build_guest(guest)
    messages: list[str] = []
    path = profiles.ensure_profile(built, messages.append)
    profile = load_profile(path, cache_dir=tmp_path / "cache")
    assert path.name == profiles.profile_name(built)
    assert check_profile(profile, _dbg(built)) == []
    (tmp_path / "fresh").mkdir()
    fresh = profiles.build_lab_profile(built, tmp_path / "fresh")
    assert _content(fresh) == _content(path)
    told = f"profile: {profile.provenance}"
    assert messages[-1].endswith(told)
    assert ("shipped profile" in told) == (profile.origin == "shipped")


@pytest.mark.parametrize("guest", GUESTS)
def test_a_kernel_no_shipped_profile_matches_gets_one_built_and_says_so(
    guest: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Debian moved on: the shipped folder holds only another kernel's profile."""
    built = build_guest(guest)
    stale = tmp_path / "shipped" / "linux-6.1.0-1-stale-6.1.1-1.json.xz"
    stale.parent.mkdir()
    stale.write_bytes(next(locations.shipped_dir().glob("*.json.xz")).read_bytes())
    monkeypatch.setenv("VMISHELL_CACHE", str(cache_root()))  # keep the lab's downloads
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("VMISHELL_PROFILE_PATH", raising=False)
    monkeypatch.setattr(locations, "shipped_dir", lambda: stale.parent)
    assert profiles.find_lab_profile(built) is None

    messages: list[str] = []
    path = profiles.ensure_profile(built, messages.append)
    assert path.parent == tmp_path / "xdg" / "vmishell" / "built-profiles"
    assert path.name == profiles.profile_name(built)
    assert "building one" in messages[0]
    package = built.manifest["packages"]["kernel"]
    assert messages[-1].endswith(
        f"profile: profile built from package {package['name']} {package['version']} ({path})"
    )
    profile = load_profile(path, cache_dir=tmp_path / "cache")
    assert profile.origin == "built"
    assert check_profile(profile, _dbg(built)) == []
    assert profiles.ensure_profile(built) == path  # found, not built again


@pytest.mark.parametrize("guest_name", GUESTS)
def test_attaching_to_a_lab_guest_picks_a_profile_that_agrees_with_its_kernel(
    lab_guest, guest_name: str, tmp_path: Path
) -> None:
    """The finder, from guest memory alone, picks a right profile and tells where it is from."""
    from vmishell.session import Session

    running = lab_guest(guest_name)
    with Session.lab(running.name) as session:
        profile = session.profile
    assert profile.path is not None and profile.origin in ("shipped", "built")
    assert profile.provenance.startswith(("shipped profile", "profile built from package"))
    assert check_profile(profile, _dbg(build_guest(guest_name))) == []
