"""vmishell never writes guest memory unless a session was opened writable.

Read-only is enforced twice: `write()` refuses with SourceError, and the file
behind a source is opened O_RDONLY and mapped PROT_READ (mmap.ACCESS_READ),
so even a bug writing through a zero-copy view would fail with TypeError
instead of changing the guest. The unit tests check both on small files. The
lab tests run every public read path (Session and Process, the magics, the
command line) on real images of the x86_64 lab guest and on a live guest's
RAM file, and check from the outside that nothing was written (the file's
SHA-256 and mtime) and that the process mapped and held the file read-only
(/proc/self/maps, /proc/self/fdinfo).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import shutil
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmishell.cli import main as cli_main
from vmishell.errors import PageFault, SourceError, VmiError
from vmishell.session import Session
from vmishell.sources import BufferSource, open_image
from vmishell.sources.files import QemuRamSource, RawImageSource
from vmishell.sources.lime import write_lime

PAGE = 4096


# -- what the process holds, seen from the outside ----------------------------------------


def sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def mapping_perms(path: Path) -> list[str]:
    """The permissions (`r--s`, `rw-s`, ...) of every mapping of `path` in this process."""
    target = str(path.resolve())
    perms = []
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].rstrip("\n") == target:
                perms.append(fields[1])
    return perms


def open_modes(path: Path) -> list[int]:
    """The access mode (os.O_RDONLY, O_WRONLY, O_RDWR) of every descriptor open on `path`."""
    target = str(path.resolve())
    modes = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/self/fd/{fd}") != target:
                continue
            with open(f"/proc/self/fdinfo/{fd}") as f:
                flags = next(int(line.split()[1], 8) for line in f if line.startswith("flags:"))
            modes.append(flags & os.O_ACCMODE)
    return modes


def assert_held_read_only(path: Path) -> None:
    """`path` is mapped by this process, and every mapping and descriptor of it is read-only."""
    perms = mapping_perms(path)
    assert perms, f"{path} is not mapped"
    assert all(p.startswith("r-") for p in perms), f"{path} mapped {perms}"
    assert all(m == os.O_RDONLY for m in open_modes(path)), f"{path} open for writing"


# -- unit: sources over small files --------------------------------------------------------


@pytest.fixture
def ram_file(tmp_path: Path) -> Path:
    path = tmp_path / "ram"
    path.write_bytes(bytes(range(256)) * 64)  # 16 KiB
    return path


def _elf_core(tmp_path: Path) -> Path:
    ram = b"\x11" * PAGE
    header = struct.pack(
        "<4sBBBBB7sHHIQQQIHHHHHH",
        b"\x7fELF", 2, 1, 1, 0, 0, b"", 4, 62, 1, 0, 64, 0, 0, 64, 56, 1, 0, 0, 0,
    )  # fmt: skip
    phdr = struct.pack("<IIQQQQQQ", 1, 7, 120, 0, 0, len(ram), len(ram), 0x1000)
    path = tmp_path / "core.elf"
    path.write_bytes(header + phdr + ram)
    return path


def _assert_read_only(source, path: Path) -> None:
    before = sha256(path)
    assert source.writable is False
    with pytest.raises(SourceError, match="read-only"):
        source.write(0, b"\xff")
    view = source.segments()[0].view
    assert view.readonly
    with pytest.raises(TypeError):
        view[0] = 0xFF
    with pytest.raises(TypeError, match="readonly"):
        source._mmap.write_byte(0)
    assert_held_read_only(path)
    assert sha256(path) == before


def test_a_raw_image_is_mapped_read_only(ram_file: Path) -> None:
    with RawImageSource(ram_file) as source:
        _assert_read_only(source, ram_file)


def test_open_image_maps_raw_and_elf_images_read_only(ram_file: Path, tmp_path: Path) -> None:
    for path in (ram_file, _elf_core(tmp_path)):
        with open_image(path) as source:
            _assert_read_only(source, path)


def test_a_live_ram_file_is_read_only_unless_opened_writable(ram_file: Path) -> None:
    with QemuRamSource(ram_file) as source:
        assert source.live
        _assert_read_only(source, ram_file)


def test_a_live_ram_file_opened_writable_writes_through_to_the_guest(ram_file: Path) -> None:
    with QemuRamSource(ram_file, writable=True) as source:
        assert source.writable
        source.write(PAGE, b"written")
    assert ram_file.read_bytes()[PAGE : PAGE + 7] == b"written"


def test_the_outside_checks_see_a_writable_mapping_and_a_changed_byte(ram_file: Path) -> None:
    """The checks the lab tests rely on can fail: here the file is opened writable."""
    before = sha256(ram_file)
    with QemuRamSource(ram_file, writable=True) as source:
        assert any("w" in p for p in mapping_perms(ram_file))
        assert os.O_RDWR in open_modes(ram_file)
        with pytest.raises(AssertionError, match="mapped"):
            assert_held_read_only(ram_file)
        source.write(0, b"\x01")
    assert sha256(ram_file) != before


def test_a_buffer_source_is_read_only_by_default_even_over_a_bytearray() -> None:
    buf = bytearray(PAGE)
    source = BufferSource([(0, buf)])
    with pytest.raises(SourceError, match="read-only"):
        source.write(0, b"x")
    assert BufferSource([(0, bytes(PAGE))], writable=True).writable is False  # bytes cannot be
    writable = BufferSource([(0, buf)], writable=True)
    writable.write(0, b"x")
    assert buf[0] == ord("x")


# -- lab: every read path on real guest memory ---------------------------------------------

#: The kernel image's 2 GiB, where a kernel mapping enumeration is cheap and meaningful.
KERNEL_IMAGE = 0xFFFF_FFFF_8000_0000


def read_everything(s: Session) -> int:
    """Every public read path of the plain API, over every user process; the rows seen."""
    rows = s.process_rows(threads=True)
    s.processes()
    s.processes(threads=True)
    banner = s.symbol("linux_banner")
    kernel = s.kernel
    assert kernel.read(banner, 14) == b"Linux version "
    kernel.translate(banner)
    kernel.walk(banner)
    for _ in zip(range(4096), kernel.mappings(KERNEL_IMAGE), strict=False):
        pass
    for row in rows:
        if row.kernel_thread or row.error:
            continue
        p = s.process(row.pid)
        vmas = p.vmas()
        p.maps()
        p.cmdline()
        for _ in p.mappings():
            pass
        for v in vmas:
            p.read(v.start, 256, pad=True)
            p.walk(v.start)
            with contextlib.suppress(PageFault):
                p.translate(v.start)
    return len(rows)


def run_the_magics(target: str, pid: int, address: int) -> None:
    """The IPython front end on `target`: attach, every reading magic, detach."""
    from IPython.core.interactiveshell import InteractiveShell

    ip = InteractiveShell.instance()
    ip.run_line_magic("load_ext", "vmishell")  # a no-op when already loaded
    magics = ip.magics_manager.registry["VmiMagics"]
    name = f"read-only-{os.getpid()}"
    magics.attached.attach(target, name=name)
    try:
        for line in (
            "ps --threads",
            f"maps -p {pid}",
            f"maps -p {pid} --pages",
            f"peek {address:#x} 64 -p {pid}",
            f"peek {address:#x} 4 -p {pid} --as u64",
            f"translate {address:#x} -p {pid}",
            "peek linux_banner 64",
            "dt task_struct init_task",
        ):
            value = ip.run_line_magic(line.split()[0], f"{' '.join(line.split()[1:])} -t {name}")
            assert value is not None, line
    finally:
        magics.attached.detach(name)


def run_the_command_line(target: str, pid: int, address: int) -> None:
    for argv in (
        ["ps", target, "--threads"],
        ["ps", target, "--json"],
        ["maps", target, "-p", str(pid), "--csv"],
        ["peek", target, hex(address), "64", "-p", str(pid)],
        ["translate", target, hex(address), "-p", str(pid), "--json"],
    ):
        with contextlib.redirect_stdout(io.StringIO()):
            assert cli_main(argv) == 0, argv


@pytest.fixture(scope="module")
def images(x86_64_guest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    """Raw, ELF and LiME images of the x86_64 lab guest."""
    folder = tmp_path_factory.mktemp("images")
    raw = x86_64_guest.dump(folder / "x86_64.raw", "raw")
    elf = x86_64_guest.dump(folder / "x86_64.elf", "elf")
    with RawImageSource(raw) as source:
        lime = write_lime(source, folder / "x86_64.lime")
    yield {"raw": raw, "elf": elf, "lime": lime}
    shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.lab
@pytest.mark.parametrize("kind", ["raw", "elf", "lime"])
def test_reading_an_image_every_way_writes_nothing_and_holds_it_read_only(
    images: dict[str, Path], x86_64_guest, kind: str
) -> None:
    path = images[kind]
    truth = x86_64_guest.truth()
    digest, mtime = sha256(path), path.stat().st_mtime_ns
    with Session.attach(path) as s:
        assert_held_read_only(path)
        assert read_everything(s) > 40
        with pytest.raises(SourceError, match="read-only"):
            s.source.write(0, b"\0")
        run_the_magics(str(path), truth.marker_pid, truth.marker_va)
        assert_held_read_only(path)
    run_the_command_line(str(path), truth.marker_pid, truth.marker_va)
    assert (sha256(path), path.stat().st_mtime_ns) == (digest, mtime)


@pytest.mark.lab
def test_reading_a_paused_live_guest_every_way_leaves_its_ram_unchanged(x86_64_guest) -> None:
    """Paused, the guest changes nothing: any difference in its RAM would be vmishell's."""
    truth = x86_64_guest.truth()
    ram = Path(x86_64_guest.ram_path)
    target = f"qemu:{ram},{x86_64_guest.qmp_path}"
    with Session.attach(target) as s, s.paused():
        assert_held_read_only(ram)
        digest = sha256(ram)
        assert read_everything(s) > 40
        run_the_magics(target, truth.marker_pid, truth.marker_va)
        run_the_command_line(target, truth.marker_pid, truth.marker_va)
        assert_held_read_only(ram)
        assert sha256(ram) == digest


@pytest.mark.lab
def test_every_way_of_opening_a_live_guest_is_read_only_unless_asked(x86_64_guest) -> None:
    ram, qmp = x86_64_guest.ram_path, x86_64_guest.qmp_path
    for open_session in (
        lambda: Session.attach(f"qemu:{ram},{qmp}"),
        lambda: Session.attach(f"lab:{x86_64_guest.name}"),
        lambda: Session.attach(x86_64_guest.name),
        lambda: Session.qemu(ram, qmp),
        lambda: Session.lab(x86_64_guest.name),
    ):
        with open_session() as s:
            assert not s.source.writable
            with pytest.raises(VmiError, match="read-only"):
                s.source.write(0, b"\0")
            assert_held_read_only(Path(ram))
