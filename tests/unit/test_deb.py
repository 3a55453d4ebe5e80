"""One .deb reader for the whole project: kernel packages, -dbg packages, busybox."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
from test_kimage import make_deb  # tests/unit is on sys.path (no __init__.py)

from vmishell.errors import PackageError
from vmishell.symbols import deb

CONTROL = "Package: linux-image-6.1.0-9-amd64\nVersion: 6.1.1-1\nDescription: a\n more\n"
FILES = {
    "boot/config-6.1.0-9-amd64": b"CONFIG_X=y\n",
    "boot/vmlinuz-6.1.0-9-amd64": b"KERNEL",
    "lib/modules/6.1.0-9-amd64/x.ko": bytes(range(256)) * 4000,
}


def _package(tmp_path: Path, compression: str = "xz", files: dict[str, bytes] = FILES) -> Path:
    path = tmp_path / "k.deb"
    path.write_bytes(make_deb(files, compression, control=CONTROL))
    return path


@pytest.mark.parametrize("compression", ["xz", "gz", "zst", "tar"])
def test_a_package_gives_the_files_asked_for_and_its_control_fields(
    tmp_path: Path, compression: str
) -> None:
    pkg = _package(tmp_path, compression)
    found = deb.extract(pkg, lambda n: n.startswith("boot/vmlinuz-"), stop_when=bool)
    assert found == {"boot/vmlinuz-6.1.0-9-amd64": b"KERNEL"}
    fields = deb.control_fields(pkg)
    assert fields["Package"] == "linux-image-6.1.0-9-amd64" and fields["Version"] == "6.1.1-1"
    assert fields["Description"] == "a\nmore"


def test_files_are_found_by_kind_the_first_match_each(tmp_path: Path) -> None:
    patterns = {"kernel": re.compile(r"^boot/vmlinuz-"), "config": re.compile(r"^boot/config-")}
    assert deb.find_files(_package(tmp_path), patterns, "boot/") == {
        "kernel": b"KERNEL",
        "config": b"CONFIG_X=y\n",
    }


def test_a_scan_told_the_folder_stops_before_the_rest_of_the_package(tmp_path: Path) -> None:
    """Damage after boot/ is never read when the wanted files are all in boot/."""
    whole = make_deb(FILES, "tar", control=CONTROL)
    cut = len(whole) - 300_000  # inside lib/modules/.../x.ko
    data_at = whole.index(b"data.tar")
    header = whole[data_at : data_at + 60]
    size = int(header[48:58])
    damaged = bytearray(whole[:cut])
    damaged[data_at + 48 : data_at + 58] = f"{size - (len(whole) - cut):<10}".encode()
    pkg = tmp_path / "k.deb"
    pkg.write_bytes(bytes(damaged))
    assert deb.extract(pkg, lambda n: n.startswith("boot/"), folder="boot/") == {
        n: b for n, b in FILES.items() if n.startswith("boot/")
    }
    with pytest.raises(PackageError, match="corrupt or truncated package data"):
        deb.extract(pkg, lambda n: n.startswith("boot/"))


def test_large_files_stream_to_disk(tmp_path: Path) -> None:
    pkg = _package(tmp_path)
    name = "lib/modules/6.1.0-9-amd64/x.ko"
    dest = tmp_path / "out" / "x.ko"
    assert deb.extract_to(pkg, {name: dest}) == {name: dest}
    assert dest.read_bytes() == FILES[name]
    assert not list(dest.parent.glob(".*.part"))


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"not an archive", "is not a Debian package"),
        (make_deb(FILES, first="foo.o"), "ar archive that is not a Debian package"),
        (make_deb(FILES)[:-300], "truncated package: member data.tar.xz ends past the file"),
        (b"!<arch>\ndebian-binary   0           0     0     100644  4         `\n2.0\n",
         "has no control.tar"),
    ],
)  # fmt: skip
def test_what_is_not_a_readable_package_is_named(tmp_path: Path, data: bytes, message: str) -> None:
    path = tmp_path / "bad.deb"
    path.write_bytes(data)
    with pytest.raises(PackageError, match=message):
        deb.control_fields(path)


def test_the_lab_reads_packages_with_the_same_reader() -> None:
    assert importlib.util.find_spec("vmishell.lab.deb") is None
    import vmishell.lab.build

    assert vmishell.lab.build.deb is deb
