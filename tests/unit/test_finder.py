"""Choosing a profile from guest memory, and saying what to do when none fits."""

from __future__ import annotations

from pathlib import Path

import pytest

from vmishell.errors import ProfileError
from vmishell.sources import BufferSource
from vmishell.symbols.finder import ProfileIndex, banners_in, candidate_profiles, find_profile

UNKNOWN = b"Linux version 9.9.9-99-made-up (builder@example) (gcc 99) #1 SMP\n"


@pytest.fixture(autouse=True)
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))


def test_memory_without_a_known_kernel_names_the_banner_it_found_and_how_to_build_one() -> None:
    ram = bytearray(4 << 20)
    ram[0x123456 : 0x123456 + len(UNKNOWN)] = UNKNOWN
    with pytest.raises(ProfileError) as info:
        find_profile(BufferSource([(0, ram)]))
    message = str(info.value)
    assert "9.9.9-99-made-up" in message
    assert "vmishell profile build" in message


def test_memory_with_no_linux_at_all_says_so() -> None:
    with pytest.raises(ProfileError, match="no Linux banner at all"):
        find_profile(BufferSource([(0, bytes(1 << 20))]))


def test_banners_are_reported_with_their_physical_address() -> None:
    ram = bytearray(1 << 20)
    ram[0x8000 : 0x8000 + len(UNKNOWN)] = UNKNOWN
    assert banners_in(BufferSource([(0, ram)])) == [(0x8000, UNKNOWN[:-1].decode())]


def test_the_shipped_profiles_are_indexed_once_and_then_read_from_the_index(
    tmp_path: Path,
) -> None:
    shipped = list(candidate_profiles())
    assert len(shipped) >= 3
    index = ProfileIndex(tmp_path / "index.json")
    hints = [index.hints(p) for p in shipped]
    index.save()
    again = ProfileIndex(tmp_path / "index.json")
    assert [again.hints(p) for p in shipped] == hints
    assert not again._dirty
    assert all(h is not None and h.banner.startswith(b"Linux version ") for h in hints)


def test_the_symbols_layer_imports_nothing_from_the_layers_above_it() -> None:
    """Profiles sit below the OS layer: os.linux may use symbols, never the reverse."""
    import ast

    import vmishell.symbols

    allowed = ("vmishell.symbols", "vmishell.sources", "vmishell.errors", "vmishell.limits")
    upward = []
    for path in sorted(Path(vmishell.symbols.__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            for name in names:
                if name.startswith("vmishell.") and not name.startswith(allowed):
                    upward.append(f"{path.name}:{node.lineno} imports {name}")
    assert upward == []
