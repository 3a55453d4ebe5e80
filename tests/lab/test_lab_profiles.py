"""Every lab guest has a profile, and the lab builds one when Debian's kernel moves on."""

from __future__ import annotations

from pathlib import Path

import pytest

from vmishell.lab import profiles
from vmishell.lab.build import build_guest
from vmishell.symbols.profile import load_profile

pytestmark = pytest.mark.lab
SHIPPED = Path(__file__).resolve().parents[2] / "profiles"


@pytest.mark.parametrize("guest", ["x86_64", "i386-pae", "i386"])
def test_the_project_ships_a_profile_for_each_lab_kernel(guest: str) -> None:
    built = build_guest(guest)
    path = profiles.find_lab_profile(built)
    assert path is not None, f"no profile named {profiles.profile_name(built)}"
    assert path.parent.name == "profiles"
    banner = load_profile(path).banner
    assert banner is not None and built.kernel_release.encode() in banner


def test_a_kernel_without_a_profile_gets_one_built_from_its_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    built = build_guest("x86_64")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(
        profiles, "candidate_profiles", lambda: sorted((tmp_path / "vmishell").rglob("*.json.xz"))
    )
    assert profiles.find_lab_profile(built) is None
    messages: list[str] = []
    path = profiles.ensure_profile(built, messages.append)
    assert path.is_relative_to(tmp_path)
    assert path.name == profiles.profile_name(built)
    assert messages and "building" in messages[0]
    built_now = load_profile(path, cache_dir=tmp_path / "cache")
    shipped = load_profile(SHIPPED / path.name, cache_dir=tmp_path / "cache")
    for struct, field in [
        ("task_struct", "comm"),
        ("mm_struct", "pgd"),
        ("vm_area_struct", "vm_end"),
    ]:
        assert built_now.offset_of(struct, field) == shipped.offset_of(struct, field)
    assert built_now.symbol_address("init_task") == shipped.symbol_address("init_task")
    assert profiles.ensure_profile(built) == path  # found, not rebuilt
