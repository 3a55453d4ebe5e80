"""`build_profile` and the `vmishell profile` commands, on synthetic and real kernels."""

from __future__ import annotations

import json
import lzma
import struct
from pathlib import Path

import pytest
from test_kallsyms import LabKernel, build_tables, lab_kernel  # tests/unit is on sys.path
from test_kimage import make_btf, make_deb

from vmishell.cli import main
from vmishell.errors import ProfileError
from vmishell.symbols.builder import build_profile, profile_filename
from vmishell.symbols.kimage import image_from_bytes
from vmishell.symbols.profile import Profile, load_profile
from vmishell.symbols.sysmap import Symbol

TEXT = 0xFFFF800008000000
WEAK = (
    b"Linux version 6.1.0-test-arm64 (x@y) (gcc (Debian 12.2.0-14) 12.2.0) # SMP Debian 6.1.1-1\n"
)
REAL = WEAK.replace(b"# SMP", b"#1 SMP")
REAL_AT = 0x400


def make_kernel(*, data_symbols: bool = True, btf: bool = True) -> bytes:
    """An arm64 Image: header, the weak banner, the real banner at REAL_AT, BTF, kallsyms."""
    image = bytearray(64)
    struct.pack_into("<QQQ", image, 8, 0, 0, 0xA)
    image[0x38:0x3C] = b"ARM\x64"
    image += WEAK + b"\0"
    image += bytes(REAL_AT - len(image)) + REAL + b"\0" + bytes(64)
    if btf:
        image += make_btf() + bytes(64)
    syms = [Symbol("_text", "T", TEXT), Symbol("_stext", "T", TEXT + 0x10000)]
    syms += [
        Symbol(f"func_{i}_{i * 7 % 10}", "Tt"[i % 2], TEXT + 0x10100 + 64 * i) for i in range(400)
    ]
    if data_symbols:
        syms += [
            Symbol("linux_banner", "D", TEXT + REAL_AT),
            Symbol("init_task", "D", TEXT + 0x200000),
            Symbol("init_mm", "D", TEXT + 0x201000),
        ]
    syms.sort(key=lambda s: s.address)
    image += bytes(-len(image) % 16)  # .rodata is aligned, so are the tables' file offsets
    image += build_tables(syms, ptr=8, mode="relative")
    return bytes(image)


@pytest.fixture
def kernel(tmp_path: Path) -> Path:
    path = tmp_path / "Image"
    path.write_bytes(make_kernel())
    return path


def test_build_from_kallsyms(kernel: Path, tmp_path: Path) -> None:
    stages: list[str] = []
    out = build_profile(kernel, tmp_path, progress=lambda s, _f: stages.append(s))
    assert out.name == "linux-6.1.0-test-arm64-6.1.1-1.json.xz"
    profile = load_profile(out, cache_dir=tmp_path / "cache")
    assert (
        profile.banner is not None and profile.banner.rstrip(b"\0") == REAL
    )  # the symbol's banner, not the weak copy
    assert profile.symbol_address("init_task") == TEXT + 0x200000
    assert profile.pointer_size == 8
    assert "reading kallsyms" in stages


def test_system_map_wins_and_is_checked(kernel: Path, tmp_path: Path) -> None:
    smap = tmp_path / "System.map"
    lines = [f"{TEXT:016x} T _text", f"{TEXT + REAL_AT:016x} D linux_banner",
             f"{TEXT + 0x300000:016x} D init_task"]  # fmt: skip
    smap.write_text("\n".join(lines) + "\n")
    out = build_profile(kernel, tmp_path / "p.json.xz", system_map=smap)
    assert out == tmp_path / "p.json.xz"
    assert (
        load_profile(out, cache_dir=tmp_path / "c").symbol_address("init_task") == TEXT + 0x300000
    )
    smap.write_text(f"{TEXT:016x} T _text\n{TEXT + 0x20:016x} D linux_banner\n")
    with pytest.raises(ProfileError, match="does not match"):
        build_profile(kernel, tmp_path, system_map=smap)


def test_system_map_from_dbg_deb(kernel: Path, tmp_path: Path) -> None:
    lines = [f"{TEXT:016x} T _text", f"{TEXT + REAL_AT:016x} D linux_banner",
             f"{TEXT + 0x10:016x} D init_task"]  # fmt: skip
    smap = "\n".join(lines) + "\n"
    dbg = tmp_path / "dbg.deb"
    dbg.write_bytes(make_deb({"usr/lib/debug/boot/System.map-6.1": smap.encode()}))
    out = build_profile(kernel, tmp_path, system_map=dbg)
    assert load_profile(out, cache_dir=tmp_path / "c").symbol_address("init_task") == TEXT + 0x10


def test_stub_system_map_rejected(kernel: Path, tmp_path: Path) -> None:
    smap = tmp_path / "System.map"
    smap.write_text(
        "ffffffffffffffff B The real System.map is in the linux-image-<version>-dbg package\n"
    )
    with pytest.raises(ProfileError, match="placeholder"):
        build_profile(kernel, tmp_path, system_map=smap)


def test_kallsyms_without_data_symbols(tmp_path: Path) -> None:
    path = tmp_path / "Image"
    path.write_bytes(make_kernel(data_symbols=False))
    with pytest.raises(ProfileError, match=r"lacks init_task.*KALLSYMS_ALL.*--system-map.*-dbg"):
        build_profile(path, tmp_path)


def test_btf_missing_then_detached(tmp_path: Path) -> None:
    path = tmp_path / "Image"
    path.write_bytes(make_kernel(btf=False))
    with pytest.raises(ProfileError, match="pahole --btf_encode_detached"):
        build_profile(path, tmp_path)
    btf = tmp_path / "vmlinux.btf"
    btf.write_bytes(make_btf())
    assert build_profile(path, tmp_path, btf=btf).is_file()
    btf.write_text("not btf\n")
    with pytest.raises(ProfileError, match="is not a BTF file: found a text file"):
        build_profile(path, tmp_path, btf=btf)


def test_profile_filename() -> None:
    image = image_from_bytes(make_kernel())
    assert profile_filename(image, REAL) == "linux-6.1.0-test-arm64-6.1.1-1.json.xz"
    name = profile_filename(image, b"Linux version 6.9.0 (me@host) #3 SMP\n")
    assert name.startswith("linux-6.9.0-") and len(name) == len("linux-6.9.0-") + 12 + 8


# -- command line ----------------------------------------------------------------------


def test_cli_build_and_show(kernel: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert main(["profile", "build", str(kernel), "-o", str(tmp_path)]) == 0
    out = capsys.readouterr().out.strip()
    path = Path(out.split()[0])
    assert path.name == "linux-6.1.0-test-arm64-6.1.1-1.json.xz" and path.is_file()
    assert main(["profile", "show", str(path)]) == 0
    shown = capsys.readouterr().out
    assert "#1 SMP" in shown and "pointer size 8 (64-bit, little)" in shown
    assert "symbols      405" in shown


def test_cli_default_output_is_the_finder_cache(kernel: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert main(["profile", "build", "-q", str(kernel)]) == 0
    assert list((tmp_path / "xdg" / "vmishell" / "built-profiles").glob("linux-*.json.xz"))


def test_cli_errors_are_one_line(tmp_path: Path, capsys) -> None:
    (tmp_path / "notes.txt").write_text("hello\n")
    assert main(["profile", "build", str(tmp_path / "notes.txt"), "-o", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("vmishell: ") and "not a kernel image" in err[-1]


def test_progress_without_tqdm(monkeypatch, capsys) -> None:
    import builtins

    from vmishell.symbols.cli import ProgressDisplay

    real_import = builtins.__import__

    def no_tqdm(name: str, *args, **kwargs):
        if name == "tqdm":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tqdm)
    with ProgressDisplay() as show:
        show("decompressing xz", 0.0)
        show("decompressing xz", 0.5)
        show("reading kallsyms", 1.0)
    assert capsys.readouterr().err.splitlines() == ["decompressing xz ...", "reading kallsyms ..."]


# -- Debian's amd64 package, held against its -dbg package ----------------------------


@pytest.fixture(scope="module")
def amd64_kernel() -> LabKernel:
    """The x86_64 lab guest's kernel package and its -dbg files (the lab's build step)."""
    return lab_kernel("x86_64")


@pytest.fixture(scope="module")
def amd64_profile(amd64_kernel: LabKernel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The profile `vmishell profile build` makes from that package alone."""
    return build_profile(amd64_kernel.deb, tmp_path_factory.mktemp("amd64-profile"))


def test_a_profile_built_from_debians_amd64_package_agrees_with_its_dbg_package(
    amd64_kernel: LabKernel, amd64_profile: Path, tmp_path: Path
) -> None:
    """Whatever version Debian serves: symbols as System.map says, layouts as DWARF says."""
    from vmishell.lab.dbgprofiles import check_profile

    profile = load_profile(amd64_profile, cache_dir=tmp_path / "cache")
    assert profile.banner and b"#1 SMP" in profile.banner
    assert profile.producer["types_from"] == "BTF in the kernel image"
    assert profile.producer["symbols_from"] == "kallsyms"
    assert check_profile(profile, amd64_kernel.dbg) == []
    assert len(amd64_kernel.dbg.layouts()["task_struct"]["members"]) > 200


def test_the_dbg_check_finds_a_wrong_offset_and_a_wrong_address(
    amd64_kernel: LabKernel, amd64_profile: Path
) -> None:
    """The check above can fail: one member moved and one symbol moved are both reported."""
    from vmishell.lab.dbgprofiles import check_profile

    isf = json.loads(lzma.decompress(amd64_profile.read_bytes()))
    isf["user_types"]["task_struct"]["fields"]["comm"]["offset"] += 8
    isf["symbols"]["init_task"]["address"] += 64
    problems = check_profile(Profile.from_isf(isf, "tampered"), amd64_kernel.dbg)
    assert any(p.startswith("task_struct.comm at bit") for p in problems), problems
    assert any("init_task at" in p for p in problems), problems
