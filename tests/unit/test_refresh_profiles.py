"""scripts/refresh-profiles: what profiles/ holds is what its README says, checksums included."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from vmishell.lab.dbgprofiles import DebugFiles
from vmishell.lab.refresh import (
    BEGIN,
    END,
    LabKernel,
    Shipped,
    lab_kernels,
    prune,
    render_section,
    replace_section,
)
from vmishell.symbols.isf_build import write_isf
from vmishell.symbols.locations import shipped_dir
from vmishell.symbols.profile import load_profile

PROSE = "# Shipped kernel profiles\n\nHand-written text.\n\n## The files\n\n"


def _shipped(tmp_path: Path) -> Shipped:
    from test_isf_build import build_sample  # tests/unit is on sys.path (no __init__.py)

    profile = write_isf(build_sample(), tmp_path / "linux-6.1.0-99-686-6.1.999-1.json.xz")
    deb = tmp_path / "linux-image-6.1.0-99-686_6.1.999-1_i386.deb"
    deb.write_bytes(b"kernel package")
    folder = tmp_path / "dbg"
    folder.mkdir()
    (folder / "layouts.json").write_text(json.dumps({"pid": {"size": 8, "members": {}}}))
    record = {"dbg_deb": "linux-image-6.1.0-99-686-dbg_6.1.999-1_i386.deb",
              "dbg_size": 765_000_000, "dbg_sha256": "ab" * 32}  # fmt: skip
    return Shipped(
        kernel=LabKernel("i386", "linux-image-686", ("i386",)),
        meta_version="6.1.999-1",
        package="linux-image-6.1.0-99-686",
        version="6.1.999-1",
        profile=profile,
        json_size=12345,
        banner="Linux version 6.1.0-99-686 (x@y) #1 SMP Debian 6.1.999-1",
        kernel_deb=deb,
        dbg=DebugFiles("linux-image-6.1.0-99-686", "6.1.999-1", "i386", folder, record),
        symbols=81_000,
        members=700,
    )


def test_the_generated_part_names_each_file_and_package_with_its_checksum(tmp_path: Path) -> None:
    shipped = _shipped(tmp_path)
    section = render_section([shipped], "2026-12-04")
    assert section.startswith(BEGIN) and section.rstrip().endswith(END)
    assert "Refreshed on 2026-12-04" in section
    digest = hashlib.sha256(shipped.profile.read_bytes()).hexdigest()
    assert "| `linux-6.1.0-99-686-6.1.999-1.json.xz` |" in section and digest in section
    assert hashlib.sha256(b"kernel package").hexdigest() in section
    assert "linux-image-6.1.0-99-686-dbg_6.1.999-1_i386.deb` | 765 MB | `" + "ab" * 32 in section
    assert shipped.banner in section and "`i386`" in section


def test_only_the_generated_part_of_the_readme_is_rewritten(tmp_path: Path) -> None:
    first = replace_section(PROSE, render_section([_shipped(tmp_path)], "2026-12-01"))
    assert first.startswith(PROSE) and first.count(BEGIN) == 1
    again = replace_section(first + "\nAfter.\n", render_section([], "2026-12-04"))
    assert again.startswith(PROSE) and again.endswith("\nAfter.\n")
    assert "2026-12-01" not in again and "Refreshed on 2026-12-04" in again
    assert again.count(BEGIN) == again.count(END) == 1


def test_pruning_deletes_the_profiles_of_kernels_debian_no_longer_serves(tmp_path: Path) -> None:
    names = ["linux-6.1.0-50-686-6.1.176-1.json.xz", "linux-6.1.0-57-686-6.1.192-3.json.xz"]
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "README.md").write_text("kept")
    assert prune(tmp_path, {tmp_path / names[1]}) == [tmp_path / names[0]]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", names[1]]


def test_every_lab_guest_has_its_kernel_refreshed() -> None:
    from vmishell.lab.guests import GUESTS

    covered = [g for k in lab_kernels() for g in k.guests]
    assert sorted(covered) == sorted(GUESTS)
    assert {k.meta for k in lab_kernels()} >= {"linux-image-amd64", "linux-image-686"}


def test_profiles_holds_exactly_the_files_its_readme_lists_with_their_checksums() -> None:
    """The shipped folder and its README were refreshed together by the tool."""
    readme = (shipped_dir() / "README.md").read_text()
    generated = readme[readme.index(BEGIN) : readme.index(END)]
    assert re.search(r"Refreshed on \d{4}-\d{2}-\d{2}", generated)
    listed = dict(re.findall(r"^\| `(linux-\S+\.json\.xz)` \| [^|]+ \| `([0-9a-f]{64})` \|",
                             generated, re.M))  # fmt: skip
    files = {p.name: p for p in shipped_dir().glob("*.json.xz")}
    assert sorted(listed) == sorted(files)
    for name, digest in listed.items():
        assert hashlib.sha256(files[name].read_bytes()).hexdigest() == digest, name
    for path in files.values():
        made_from = load_profile(path).made_from
        assert made_from is not None and f"`{made_from.split()[0]}` {made_from.split()[1]}" in (
            generated
        )


def test_each_debian_suite_is_a_lab_kernel_of_its_own() -> None:
    from vmishell.lab.guests import GENERATIONS

    by_flavour = {k.flavour: k for k in lab_kernels()}
    for suite in GENERATIONS:
        kernel = by_flavour[f"amd64-{suite}"]
        assert kernel.suite == suite and f"x86_64-{suite}" in kernel.guests
    assert by_flavour["amd64"].suite == ""
    assert "x86_64-trixie" not in by_flavour["amd64"].guests


def test_the_dbg_package_of_a_debian_14_binary_package_is_the_image_ones() -> None:
    from vmishell.lab.dbgprofiles import dbg_package_of, kernel_release_of

    assert kernel_release_of("linux-binary-7.2.13+deb14-amd64") == "7.2.13+deb14-amd64"
    assert dbg_package_of("linux-binary-7.2.13+deb14-amd64") == (
        "linux-image-7.2.13+deb14-amd64-dbg"
    )
    assert dbg_package_of("linux-image-6.1.0-57-amd64") == "linux-image-6.1.0-57-amd64-dbg"


def test_debian_14_dbg_files_are_found_under_usr_lib_debug_lib_modules(tmp_path: Path) -> None:
    """Its usr/lib/debug/boot/ holds only symlinks: the files are under lib/modules/."""
    from tests.unit.test_kimage import make_deb
    from vmishell.lab.dbgprofiles import dbg_layouts
    from vmishell.symbols import deb

    release = "7.2.13+deb14-amd64"
    files = {
        f"usr/lib/debug/lib/modules/{release}/System.map": b"ffffffff81000000 T _text\n",
        f"usr/lib/debug/lib/modules/{release}/vmlinux": b"\x7fELF",
    }
    path = tmp_path / "dbg.deb"
    path.write_bytes(make_deb(files, package=f"linux-image-{release}-dbg"))
    found = []
    for folder, (smap, vmlinux) in dbg_layouts(release):
        wanted = {folder + smap: tmp_path / "map", folder + vmlinux: tmp_path / "vmlinux"}
        found.append(sorted(deb.extract_to(path, wanted, folder=folder)))
    assert found == [[], sorted(files)]
    assert (tmp_path / "map").read_bytes() == files[
        f"usr/lib/debug/lib/modules/{release}/System.map"
    ]
