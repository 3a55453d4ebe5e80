"""Volatility3 sees exactly the session's profile, whatever else shares its banner.

A shipped profile and one carved from the same kernel carry the same banner;
Volatility's identifier cache returns either for that banner, and a link to
a deleted file (a carved profile in a removed temporary directory) makes its
stacker find "no kernel". Each profile file therefore gets a symbol
directory and identifier cache of its own.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

from vmishell.interop import volatility as vol

BANNER = b"Linux version 6.1.0-57-amd64 (test) #1 SMP\n\x00"


def _isf(path: Path, comment: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "metadata": {"format": "6.2.0", "producer": {"name": comment}},
        "base_types": {},
        "user_types": {},
        "enums": {},
        "symbols": {
            "linux_banner": {"address": 0, "constant_data": base64.b64encode(BANNER).decode()}
        },
    }
    path.write_text(json.dumps(doc))
    return path


def _location_of_banner(directory: Path) -> str | None:
    from volatility3.framework import constants
    from volatility3.framework.automagic import symbol_cache

    with vol._symbols_of(directory):
        cache = symbol_cache.SqliteCache(
            str(Path(constants.CACHE_PATH) / constants.IDENTIFIERS_FILENAME)
        )
        return cache.find_location(BANNER, "linux")


def test_each_profile_file_has_a_directory_showing_only_itself(tmp_path: Path) -> None:
    vol._setup()
    shipped = _isf(tmp_path / "profiles" / "linux-6.1.json", "shipped")
    carved = _isf(tmp_path / "carved" / "linux-6.1-btf.json", "carved")
    root = tmp_path / "cache"
    shipped_dir = vol.profile_symbols_dir(root, shipped)
    carved_dir = vol.profile_symbols_dir(root, carved)
    assert shipped_dir != carved_dir
    assert [p.name for p in (shipped_dir / "symbols" / "linux").iterdir()] == [shipped.name]
    assert [p.name for p in (carved_dir / "symbols" / "linux").iterdir()] == [carved.name]


def test_the_banner_resolves_to_the_sessions_file_even_beside_a_dangling_twin(
    tmp_path: Path,
) -> None:
    vol._setup()
    shipped = _isf(tmp_path / "profiles" / "linux-6.1.json", "shipped")
    carved = _isf(tmp_path / "carved" / "linux-6.1-btf.json", "carved")
    root = tmp_path / "cache"
    carved_dir = vol.profile_symbols_dir(root, carved)
    assert _location_of_banner(carved_dir) is not None
    carved.unlink()  # the carved profile's temporary directory is gone; its link dangles
    location = _location_of_banner(vol.profile_symbols_dir(root, shipped))
    assert location is not None and location.endswith(shipped.name)


def test_a_rebuilt_profile_file_gets_a_fresh_directory(tmp_path: Path) -> None:
    vol._setup()
    isf = _isf(tmp_path / "profiles" / "linux-6.1.json", "first build")
    first = vol.profile_symbols_dir(tmp_path / "cache", isf)
    _isf(isf, "second build, a longer producer name than before")
    assert vol.profile_symbols_dir(tmp_path / "cache", isf) != first


def test_a_run_leaves_volatilitys_search_path_as_it_found_it(tmp_path: Path) -> None:
    import volatility3.symbols
    from volatility3.framework import constants

    vol._setup()
    before = (list(volatility3.symbols.__path__), constants.CACHE_PATH)
    directory = vol.profile_symbols_dir(tmp_path, _isf(tmp_path / "p" / "l.json", "x"))
    with vol._symbols_of(directory):
        assert volatility3.symbols.__path__[0] == str(directory / "symbols")
    assert (list(volatility3.symbols.__path__), constants.CACHE_PATH) == before


def test_refreshing_volatilitys_cache_leaves_the_processs_url_opener_alone(tmp_path: Path) -> None:
    """Volatility installs an offline opener whenever it opens a file; a notebook's HTTP
    (JupyterLab's own API, say) must keep working after vmishell used Volatility."""
    import urllib.request

    vol._setup()
    mine = urllib.request.build_opener()
    urllib.request.install_opener(mine)
    try:
        directory = vol.profile_symbols_dir(tmp_path, _isf(tmp_path / "p" / "l.json", "x"))
        with vol._symbols_of(directory):
            pass
        assert urllib.request._opener is mine  # type: ignore[attr-defined]
    finally:
        urllib.request.install_opener(None)
