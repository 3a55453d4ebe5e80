"""Kernel image formats: bzImage payloads, arm64 Image, EFI zboot, ELF, Debian packages.

kimage peels the layers; containers, compression, lzo and deb each read one kind.
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import struct
import tarfile
from pathlib import Path

import lz4.block
import pytest
import zstandard

from vmishell.errors import KernelImageError, ProfileError
from vmishell.symbols.compression import decompress
from vmishell.symbols.kimage import deb_system_map, image_from_bytes, open_kernel
from vmishell.symbols.lzo import lzo1x_decompress, lzop_decompress

DATA = Path(__file__).resolve().parents[1] / "data"
BANNER = b"Linux version 6.1.0-test-amd64 (builder@example) (gcc 12) #1 SMP Debian 6.1.1-1 (2024)\n"


# -- synthetic kernels ------------------------------------------------------------------


def make_btf() -> bytes:
    """Smallest valid BTF: one `int`."""
    types = struct.pack("<III", 1, 1 << 24, 4) + struct.pack("<I", (1 << 24) | 32)
    strings = b"\0int\0"
    header = struct.pack("<HBBIIIII", 0xEB9F, 1, 0, 24, 0, len(types), len(types), len(strings))
    return header + types + strings


def make_elf(*, bits: int = 64, machine: int = 62, e_type: int = 2, btf: bool = True) -> bytes:
    """A tiny vmlinux: one PT_LOAD with the banner, optionally a .BTF section."""
    vaddr = 0xFFFFFFFF81000000 if bits == 64 else 0xC1000000
    body = b"\x90" * 256 + BANNER + b"\0" + bytes(range(256)) * 2
    btf_data = make_btf() if btf else b""
    names = b"\0.text\0.BTF\0.shstrtab\0"
    p = "<"
    if bits == 64:
        ehdr, phdr, shdr = p + "HHIQQQIHHHHHH", p + "IIQQQQQQ", p + "IIQQQQIIQQ"
    else:
        ehdr, phdr, shdr = p + "HHIIIIIHHHHHH", p + "IIIIIIII", p + "IIIIIIIIII"
    eh_size, ph_size, sh_size = (
        16 + struct.calcsize(ehdr),
        struct.calcsize(phdr),
        struct.calcsize(shdr),
    )
    text_off = 0x100
    btf_off = text_off + len(body)
    str_off = btf_off + len(btf_data)
    sh_off = (str_off + len(names) + 7) & ~7
    sections = [(0, 0, 0, 0, 0), (1, 1, vaddr, text_off, len(body))]
    if btf:
        sections.append((7, 1, 0, btf_off, len(btf_data)))
    sections.append((12, 3, 0, str_off, len(names)))
    ident = b"\x7fELF" + bytes([2 if bits == 64 else 1, 1, 1]) + bytes(9)
    out = bytearray(ident)
    out += struct.pack(ehdr, e_type, machine, 1, vaddr, eh_size, sh_off, 0, eh_size, ph_size, 1,
                       sh_size, len(sections), len(sections) - 1)  # fmt: skip
    if bits == 64:
        out += struct.pack(phdr, 1, 5, text_off, vaddr, vaddr, len(body), len(body), 0x1000)
    else:
        out += struct.pack(phdr, 1, text_off, vaddr, vaddr, len(body), len(body), 5, 0x1000)
    out += bytes(text_off - len(out)) + body + btf_data + names
    out += bytes(sh_off - len(out))
    for name, typ, addr, off, size in sections:
        if bits == 64:
            out += struct.pack(shdr, name, typ, 0, addr, off, size, 0, 0, 1, 0)
        else:
            out += struct.pack(shdr, name, typ, 0, addr, off, size, 0, 0, 1, 0)
    return bytes(out)


def make_bzimage(payload: bytes, *, version: int = 0x020F, length: int | None = None) -> bytes:
    setup_sects = 3
    setup = bytearray((setup_sects + 1) * 512)
    setup[0:2] = b"MZ"
    setup[0x1F1] = setup_sects
    setup[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", setup, 0x206, version)
    pm = b"\x90" * 0x40 + payload + b"\xcc" * 16
    struct.pack_into("<II", setup, 0x248, 0x40, len(payload) if length is None else length)
    return bytes(setup) + pm


def _size(data: bytes) -> bytes:
    """The kernel's size_append: the uncompressed size, 4 bytes little endian."""
    return struct.pack("<I", len(data))


def lz4_legacy(data: bytes, block: int = 1000) -> bytes:
    out = bytearray(b"\x02\x21\x4c\x18")
    for pos in range(0, len(data), block):
        c = lz4.block.compress(data[pos : pos + block], store_size=False)
        out += struct.pack("<I", len(c)) + c
    return bytes(out)


COMPRESSORS = {
    "gzip": lambda d: gzip.compress(d, mtime=0),
    "xz": lambda d: lzma.compress(d, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32) + _size(d),
    "lzma": lambda d: lzma.compress(d, format=lzma.FORMAT_ALONE) + _size(d),
    "bzip2": lambda d: bz2.compress(d) + _size(d),
    "lz4": lambda d: lz4_legacy(d) + _size(d),
    "zstd": lambda d: zstandard.ZstdCompressor(level=19).compress(d) + _size(d),
    "lzo": lambda d: (DATA / "fake-vmlinux.lzo").read_bytes() + _size(d),
}


# -- bzImage payloads ------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(COMPRESSORS))
def test_bzimage_every_compression(kind: str) -> None:
    elf = make_elf()
    image = image_from_bytes(make_bzimage(COMPRESSORS[kind](elf)), "vmlinuz")
    assert image.vmlinux == elf
    assert image.layers == ["bzImage", kind]
    assert (image.arch, image.pointer_size, image.endian, image.is_elf) == (
        "x86_64",
        8,
        "little",
        True,
    )
    assert image.btf == make_btf()
    assert image.banner == BANNER
    assert image.version == "6.1.0-test-amd64"


def test_i386_elf() -> None:
    image = image_from_bytes(make_bzimage(COMPRESSORS["xz"](make_elf(bits=32, machine=3))))
    assert (image.arch, image.pointer_size) == ("i386", 4)
    assert image.read_cstring(0xC1000000 + 256) == BANNER


def test_elf_vaddr_lookup() -> None:
    image = image_from_bytes(make_elf())
    assert image.read_cstring(0xFFFFFFFF81000000 + 256) == BANNER
    assert image.offset_of(0xFFFFFFFF80000000) is None


def test_unknown_payload_names_magic() -> None:
    with pytest.raises(
        KernelImageError, match=r"unknown bzImage payload compression \(magic bytes 00 11 22 33"
    ):
        image_from_bytes(make_bzimage(bytes.fromhex("0011223344556677") * 8), "vmlinuz")


def test_payload_past_end_of_file() -> None:
    data = make_bzimage(COMPRESSORS["xz"](make_elf()), length=1 << 20)
    with pytest.raises(KernelImageError, match="truncated bzImage"):
        image_from_bytes(data, "vmlinuz")


@pytest.mark.parametrize("kind", ["gzip", "xz", "lzma", "bzip2", "lz4", "zstd", "lzo"])
def test_truncated_stream(kind: str) -> None:
    payload = COMPRESSORS[kind](make_elf() * 4 if kind != "lzo" else make_elf())
    with pytest.raises(KernelImageError, match=f"truncated {kind} payload|truncated LZO"):
        image_from_bytes(make_bzimage(payload[: len(payload) * 2 // 3]), "vmlinuz")


def test_size_mismatch() -> None:
    elf = make_elf()
    payload = lzma.compress(elf, format=lzma.FORMAT_XZ) + struct.pack("<I", len(elf) + 1)
    with pytest.raises(KernelImageError, match="truncated or corrupt"):
        image_from_bytes(make_bzimage(payload))


def test_corrupt_gzip() -> None:
    payload = bytearray(COMPRESSORS["gzip"](make_elf()))
    payload[40:60] = b"\xff" * 20
    with pytest.raises(KernelImageError, match="corrupt gzip payload"):
        image_from_bytes(make_bzimage(bytes(payload)))


def test_old_boot_protocol_finds_payload_by_magic() -> None:
    image = image_from_bytes(make_bzimage(COMPRESSORS["gzip"](make_elf()), version=0x0204))
    assert image.banner == BANNER


# -- other containers ----------------------------------------------------------------------


def make_arm64_image(body: bytes, flags: int = 0xA) -> bytes:
    header = bytearray(64)
    struct.pack_into("<QQQ", header, 8, 0, 64 + len(body), flags)  # text_offset, size, flags
    header[0x38:0x3C] = b"ARM\x64"
    return bytes(header) + body


def test_arm64_image_raw_gzip_and_zboot() -> None:
    body = b"\0" * 100 + BANNER + b"\0" + b"junk" * 10 + make_btf() + b"\0" * 64
    raw = make_arm64_image(body)
    for data, layers in [
        (raw, ["Image"]),
        (gzip.compress(raw), ["gzip", "Image"]),
        (make_zboot(raw), ["zboot", "gzip", "Image"]),
    ]:
        image = image_from_bytes(data)
        assert image.layers == layers
        assert (image.arch, image.pointer_size, image.is_elf) == ("aarch64", 8, False)
        assert image.btf == make_btf()
        assert image.banner == BANNER
        assert image.read_cstring(0xFFFF800008000000 + 164, text_base=0xFFFF800008000000) == BANNER


@pytest.mark.parametrize(
    ("flags", "page_size"), [(0xA, 4096), (0xC, 16384), (0xE, 65536), (0x8, None)]
)
def test_an_arm64_image_says_its_page_size_in_its_header(flags: int, page_size: int | None) -> None:
    """Header flags bits 1-2: 1 = 4 KiB, 2 = 16 KiB, 3 = 64 KiB, 0 = unspecified."""
    image = image_from_bytes(make_arm64_image(b"\0" * 100 + BANNER + b"\0" * 64, flags))
    assert image.page_size == page_size
    target = image.target()
    assert target["arch"] == "aarch64" and target.get("page_size") == page_size
    assert "va_bits" not in target  # only a package's config says it


def make_zboot(image: bytes) -> bytes:
    payload = gzip.compress(image)
    header = bytearray(0x100)
    header[0:2] = b"MZ"
    header[4:8] = b"zimg"
    struct.pack_into("<II", header, 8, 0x100, len(payload))
    header[0x18:0x1C] = b"gzip"
    return bytes(header) + payload


def test_btf_search_rejects_bad_header() -> None:
    bad = bytearray(make_btf())
    struct.pack_into("<I", bad, 20, 1 << 20)  # str_len past the end
    image = image_from_bytes(make_arm64_image(b"\0" * 64 + bytes(bad) + BANNER + b"\0"))
    assert image.btf is None
    with pytest.raises(ProfileError, match="pahole --btf_encode_detached"):
        image.require_btf()


@pytest.mark.parametrize(
    ("data", "what"),
    [
        (b"", "an empty file"),
        (b"hello world\nsecond line\n", "a text file starting with 'hello world'"),
        (b"PK\x03\x04" + bytes(100), "a zip archive"),
        (gzip.compress(b"just text\n"), "a text file starting with 'just text' inside gzip"),
        (bytes.fromhex("deadbeef") + bytes(600), "unrecognised data (first bytes de ad be ef"),
        (make_elf(e_type=1), "an ELF a relocatable object"),
    ],
)
def test_not_a_kernel(data: bytes, what: str, tmp_path: Path) -> None:
    path = tmp_path / "thing"
    path.write_bytes(data)
    with pytest.raises(
        KernelImageError, match="not a kernel image: found " + what.replace("(", r"\(")
    ):
        open_kernel(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(KernelImageError, match="cannot read"):
        open_kernel(tmp_path / "nope")


# -- LZO ----------------------------------------------------------------------------------------


def lzo_plain() -> bytes:
    """What tests/data/lzo-vectors-*.lzo hold: text, zero runs, long literal runs, far matches."""
    x, noise = 12345, bytearray()
    for _ in range(1500):
        x = (x * 1103515245 + 12345) & 0x7FFFFFFF
        noise.append(x >> 16 & 0xFF)
    lines = b"".join(b"line %05d of the filler\n" % i for i in range(800))
    return (
        b"The quick brown fox jumps over the lazy dog. " * 30
        + bytes(700)
        + bytes(noise)
        + b"abc" * 200
        + lines
        + bytes(noise)  # 20 KB back: an M4 match
        + b"end\n"
    )


@pytest.mark.parametrize("level", ["1", "9"])
def test_lzop_vectors(level: str) -> None:
    out, rest, complete = lzop_decompress((DATA / f"lzo-vectors-{level}.lzo").read_bytes())
    assert complete and rest == b""
    assert out == lzo_plain()


def test_lzo_hand_made_opcodes() -> None:
    """The two short-match forms lzop rarely emits, built from the format's rules."""
    # First byte 17+2: two literals; then opcode 0 means a 2-byte match 1 back.
    assert lzo1x_decompress(b"\x13ab\x00\x00\x11\x00\x00") == b"abbb"
    # Literal run of 2100 (0, eight 0 bytes = 8*255, then 42: 3+15+2040+42), then opcode 4
    # after a literal run: a 3-byte match 0x801 + (4 >> 2) + (1 << 2) = 2054 back.
    lits = bytes((i * 7 + i // 256) & 0xFF for i in range(2100))
    stream = b"\x00" + b"\x00" * 8 + bytes([42]) + lits + b"\x04\x01" + b"\x11\x00\x00"
    assert lzo1x_decompress(stream) == lits + lits[2100 - 2054 : 2100 - 2054 + 3]


def test_lzo_block_corrupt_and_truncated() -> None:
    literal_only = bytes([17 + 5]) + b"hello" + b"\x11\x00\x00"  # 5 literals, end marker
    assert lzo1x_decompress(literal_only) == b"hello"
    with pytest.raises(KernelImageError, match="truncated LZO"):
        lzo1x_decompress(literal_only[:-2])
    with pytest.raises(KernelImageError, match="before the output"):
        lzo1x_decompress(bytes([17 + 1]) + b"a" + bytes([0x40 | (3 << 5), 0xFF]) + b"\x11\x00\x00")


def test_lzop_checksum_mismatch() -> None:
    data = bytearray((DATA / "lzo-vectors-1.lzo").read_bytes())
    data[-20] ^= 0x55
    with pytest.raises(KernelImageError):
        decompress("lzo", bytes(data))


# -- Debian packages ----------------------------------------------------------------------------


def _tar(files: dict[str, bytes], compression: str) -> bytes:
    """A tarball in dpkg-deb's order: every path sorted, folders before what they hold."""
    dirs = {"/".join(n.split("/")[:i]) + "/" for n in files for i in range(1, n.count("/") + 1)}
    entries = sorted([*dirs, *files])
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        root = tarfile.TarInfo("./")
        root.type = tarfile.DIRTYPE
        tar.addfile(root)
        for name in entries:
            info = tarfile.TarInfo("./" + name)
            if name.endswith("/"):
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(files[name])
                tar.addfile(info, io.BytesIO(files[name]))
    raw = buf.getvalue()
    return {
        "xz": lambda: lzma.compress(raw),
        "gz": lambda: gzip.compress(raw),
        "zst": lambda: zstandard.ZstdCompressor().compress(raw),
        "tar": lambda: raw,
    }[compression]()


def make_deb(
    files: dict[str, bytes],
    compression: str = "xz",
    first: str = "debian-binary",
    package: str = "linux-image-6.1.0-test-amd64",
    control: str | None = None,
) -> bytes:
    text = control or f"Package: {package}\nVersion: 6.1.1-1\nArchitecture: amd64\n"
    members = [
        (first, b"2.0\n"),
        ("control.tar.xz", _tar({"control": text.encode()}, "xz")),
        (f"data.tar.{compression}", _tar(files, compression)),
    ]
    out = bytearray(b"!<arch>\n")
    for name, data in members:
        out += f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(data):<10}`\n".encode()
        out += data + b"\n" * (len(data) & 1)
    return bytes(out)


STUB = b"ffffffffffffffff B The real System.map is in the linux-image-<version>-dbg package\n"


@pytest.mark.parametrize("compression", ["xz", "gz", "zst"])
def test_deb(compression: str, tmp_path: Path) -> None:
    vmlinuz = make_bzimage(COMPRESSORS["xz"](make_elf()))
    files = {
        "boot/vmlinuz-6.1.0-test-amd64": vmlinuz,
        "boot/System.map-6.1.0-test-amd64": STUB,
        "boot/config-6.1.0-test-amd64": b"CONFIG_KALLSYMS=y\nCONFIG_KALLSYMS_ALL=y\n",
        "lib/modules/6.1.0-test-amd64/kernel/x.ko": b"\0" * 1000,
    }
    path = tmp_path / "k.deb"
    path.write_bytes(make_deb(files, compression))
    stages: list[str] = []
    image = open_kernel(path, lambda stage, _f: stages.append(stage))
    assert image.layers == ["deb", "bzImage", "xz"]
    assert (image.package, image.package_version) == ("linux-image-6.1.0-test-amd64", "6.1.1-1")
    assert image.system_map is None  # the 83-byte stub is dropped
    assert image.config_option("KALLSYMS_ALL") == "y"
    assert image.config_option("CONFIG_MODULES") is None
    assert image.btf == make_btf()
    assert "reading package" in stages and "decompressing xz" in stages


def test_debian_14_binary_package_keeps_the_image_under_usr_lib_modules(tmp_path: Path) -> None:
    """Debian 14's linux-binary-<release>: usr/lib/modules/<release>/vmlinuz, no boot/."""
    files = {
        "usr/lib/modules/7.2.13+deb14-amd64/vmlinuz": make_bzimage(COMPRESSORS["xz"](make_elf())),
        "usr/share/doc/linux-binary-7.2.13+deb14-amd64/copyright": b"GPL-2\n",
    }
    path = tmp_path / "k.deb"
    path.write_bytes(make_deb(files, package="linux-binary-7.2.13+deb14-amd64"))
    image = open_kernel(path)
    assert image.layers == ["deb", "bzImage", "xz"]
    assert image.package == "linux-binary-7.2.13+deb14-amd64"
    assert image.btf == make_btf()


def test_deb_with_real_system_map(tmp_path: Path) -> None:
    smap = b"ffffffff81000000 T _text\nffffffff82000000 D init_task\n"
    files = {"boot/vmlinux-6.1": make_elf(), "boot/System.map-6.1": smap}
    path = tmp_path / "k.deb"
    path.write_bytes(make_deb(files))
    image = open_kernel(path)
    assert image.system_map == smap.decode()
    assert image.layers == ["deb"]


def test_system_map_from_dbg_package(tmp_path: Path) -> None:
    smap = b"ffffffff81000000 T _text\n"
    dbg = tmp_path / "dbg.deb"
    files = {
        "usr/lib/debug/.build-id/ab/cdef.debug": b"x",
        "usr/lib/debug/boot/System.map-6.1.0-test-amd64": smap,
        "usr/lib/debug/boot/vmlinux-6.1.0-test-amd64": b"\0" * 5000,
    }
    dbg.write_bytes(make_deb(files, package="linux-image-6.1.0-test-amd64-dbg"))
    assert deb_system_map(dbg) == (smap.decode(), "linux-image-6.1.0-test-amd64-dbg 6.1.1-1")
    with pytest.raises(KernelImageError, match=r"no boot/vmlinuz.*pass it with --system-map"):
        open_kernel(dbg)
    plain = tmp_path / "k.deb"
    plain.write_bytes(make_deb({"boot/System.map-6.1": STUB, "boot/vmlinuz-6.1": b"x"}))
    with pytest.raises(ProfileError, match=r"no real System\.map"):
        deb_system_map(plain)


def test_deb_without_kernel(tmp_path: Path) -> None:
    path = tmp_path / "k.deb"
    path.write_bytes(make_deb({"usr/share/doc/x/README": b"hi\n"}))
    with pytest.raises(KernelImageError, match="has no boot/vmlinuz"):
        open_kernel(path)


def test_ar_that_is_not_a_deb(tmp_path: Path) -> None:
    path = tmp_path / "lib.a"
    path.write_bytes(make_deb({"boot/vmlinuz-1": b"x"}, first="foo.o"))
    with pytest.raises(KernelImageError, match="ar archive that is not a Debian package"):
        open_kernel(path)


def test_truncated_deb(tmp_path: Path) -> None:
    data = make_deb({"boot/vmlinuz-1": make_bzimage(COMPRESSORS["xz"](make_elf()))})
    path = tmp_path / "k.deb"
    path.write_bytes(data[: len(data) - 300])
    with pytest.raises(KernelImageError, match="truncated package"):
        open_kernel(path)


# -- the real Debian amd64 package ----------------------------------------------------------------


@pytest.fixture(scope="module")
def kernel_deb() -> Path:
    """The x86_64 lab guest's kernel package, whichever version Debian serves (lab build)."""
    from test_kallsyms import lab_kernel_deb  # tests/unit is on sys.path (no __init__.py)

    return lab_kernel_deb("x86_64")


def test_real_deb(kernel_deb: Path) -> None:
    image = open_kernel(kernel_deb)
    assert image.layers == ["deb", "bzImage", "xz"]
    assert (image.arch, image.pointer_size, image.endian, image.is_elf) == (
        "x86_64",
        8,
        "little",
        True,
    )
    assert image.package and image.package.startswith("linux-image-")
    assert image.btf is not None and len(image.btf) > 1_000_000
    assert image.banner and image.banner.startswith(b"Linux version 6.")
    assert image.version and image.package.endswith(image.version)
    assert image.system_map is None  # Debian ships the stub
    assert image.config_option("KALLSYMS_ALL") == "y"
    assert len(image.vmlinux) > 30_000_000


def test_names_from_before_the_split_still_import_from_kimage() -> None:
    """kimage was one module; code written against it keeps working."""
    from vmishell.symbols import compression, containers, kimage, lzo

    assert kimage.decompress is compression.decompress
    assert kimage.lzop_decompress is lzo.lzop_decompress
    assert kimage.describe_bytes is containers.describe_bytes
    for name in kimage.__all__:
        assert getattr(kimage, name) is not None
