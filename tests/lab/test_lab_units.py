"""The lab's pure parts, without QEMU: truth parsing, initramfs, argv, registers.

Reading .deb files is tested in tests/unit/test_deb.py (vmishell.symbols.deb).
"""

from __future__ import annotations

import gzip
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from vmishell.errors import LabError, QmpError
from vmishell.lab import initramfs
from vmishell.lab.apt import PrivateApt, deb_filename, suite_source_line, system_mirror
from vmishell.lab.bootscript import render_init, template
from vmishell.lab.build import kernel_release
from vmishell.lab.guests import GENERATIONS, GUESTS, PLANNED_GUESTS, check_accel, get_guest
from vmishell.lab.instances import check_name
from vmishell.lab.qemucmd import LaunchFiles, kernel_cmdline, qemu_command
from vmishell.lab.truth import MapLine, parse_truth
from vmishell.lab.workload import layout
from vmishell.sources.qmp import parse_x86_registers
from vmishell.sources.registers_text import parse_aarch64_registers, parse_registers

DATA = Path(__file__).parent / "data"


# -- truth ------------------------------------------------------------------------------


def test_parse_truth_i386_log() -> None:
    truth = parse_truth((DATA / "serial-i386.log").read_text())
    assert truth.release == "6.1.0-50-686" and truth.machine == "i686"
    assert truth.marker_va == 0x0804A000 and truth.counter_va == 0x0804A040
    assert truth.marker_paddr == 0xFEDB000 and truth.counter_paddr == 0xFEDB040
    assert truth.pagemap[0x0804A000].present and truth.pagemap[0x0804A000].pfn == 0xFEDB
    assert not truth.pagemap[truth.pagemap_labels["vdso"]].present
    assert len(truth.maps) == 6 and truth.maps[0].path == "/bin/vmi-marker"
    assert truth.maps[2].path == ""
    assert len(truth.processes) == 49
    assert [t.comm for t in truth.threads_of(truth.marker_pid)] == ["vmi-marker", "vmi-thread"]
    assert truth.task(2).kernel_thread and not truth.task(1).kernel_thread
    assert truth.kernel_code is not None and truth.kernel_code[0] < truth.kernel_code[1]
    assert truth.symbols["_text"] == truth.symbols["_stext"]
    assert truth.to_json()["marker_paddr"] == 0xFEDB000


def test_parse_truth_survives_kernel_noise_and_crlf() -> None:
    text = (DATA / "serial-x86_64.log").read_text().replace("\r\n", "\n")
    lines = text.splitlines()
    noisy = [
        "[    3.141592] random: crng init done",
        *lines[:5],
        "[    4.000000] a kernel message @@vmi-lookalike without a space",
        *(("[ 5.0] clk: " + x if x.startswith("@@vmi map") else x) for x in lines[5:]),
    ]
    truth = parse_truth("\r\n".join(noisy))
    assert truth.release.endswith("-amd64") and len(truth.maps) == 6


def test_parse_truth_detects_lost_lines() -> None:
    text = (DATA / "serial-i386.log").read_text()
    damaged = re.sub(r"@@vmi task 2 .*\n", "", text, count=1)
    with pytest.raises(LabError, match="49 tasks lines but 48"):
        parse_truth(damaged)
    with pytest.raises(LabError, match="ready"):
        parse_truth(text.split("@@vmi ready")[0])


def test_map_line_parse() -> None:
    m = MapLine.parse("7fff534fe000-7fff53500000 r-xp 00000000 00:00 0    [vdso]")
    assert (m.start, m.end, m.perms, m.path) == (0x7FFF534FE000, 0x7FFF53500000, "r-xp", "[vdso]")
    assert 0x7FFF534FE000 in m and 0x7FFF53500000 not in m


# -- /init ----------------------------------------------------------------------------


def test_init_renders_and_is_valid_shell() -> None:
    for arch in ("x86_64", "i386"):
        script = render_init(layout(arch))
        assert "{{" not in script and f"{layout(arch).marker_va:#x}" in script
        sh = shutil.which("busybox") or shutil.which("dash") or shutil.which("sh")
        if sh:
            args = [sh, "sh", "-n"] if sh.endswith("busybox") else [sh, "-n"]
            subprocess.run(args, input=script, text=True, check=True)


BUILTINS = {
    "for",
    "do",
    "done",
    "while",
    "case",
    "esac",
    "[",
    "read",
    "set",
    "printf",
    "vmi",
    "break",
}
_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


def _drop_arithmetic(line: str) -> str:
    """Replace each $((...)) by 0, counting parentheses (expansions nest them)."""
    out, i = [], 0
    while (start := line.find("$((", i)) >= 0:
        out.append(line[i:start] + "0")
        depth, j = 0, start + 1
        while j < len(line):
            depth += {"(": 1, ")": -1}.get(line[j], 0)
            j += 1
            if depth == 0:
                break
        i = j
    return "".join(out) + line[i:]


def test_task_walk_spawns_no_process() -> None:
    """After the ground truth starts listing tasks, /init uses shell builtins only."""
    text = template()
    section = text.split("# --- every task", 1)[1].split("vmi ready", 1)[0]
    assert "$(" not in section.replace("$((", "") and "|" not in section.replace("||", "")
    for line in section.splitlines()[1:]:
        words = _drop_arithmetic(line).strip().split()
        if not words or words[0].startswith("#") or words[0] == "0":  # comment, continuation
            continue
        if words[0].endswith(")") or _ASSIGNMENT.match(words[0]):  # case label, assignment
            words = [w for w in words[1:] if not _ASSIGNMENT.match(w)] or [";;"]
        command = words[0].rstrip(";")
        assert command in BUILTINS | {""}, f"non-builtin in the task walk: {line.strip()!r}"


# -- initramfs ------------------------------------------------------------------------


def _read_newc(data: bytes) -> dict[str, tuple[int, bytes]]:
    out, pos = {}, 0
    while True:
        assert data[pos : pos + 6] == b"070701"
        fields = [int(data[pos + 6 + 8 * i : pos + 14 + 8 * i], 16) for i in range(13)]
        mode, size, namesize = fields[1], fields[6], fields[11]
        name_at = pos + 110
        name = data[name_at : name_at + namesize - 1].decode()
        pos = (name_at + namesize + 3) & ~3
        body = data[pos : pos + size]
        pos = (pos + size + 3) & ~3
        if name == "TRAILER!!!":
            return out
        out[name] = (mode, body)


def test_initramfs_layout_and_concatenation() -> None:
    base = initramfs.base_archive(busybox=b"BB", init="#!/bin/sh\n", workload=b"\x7fELF")
    files = _read_newc(gzip.decompress(base))
    assert files["init"] == (0o100755, b"#!/bin/sh\n")
    assert files["bin/busybox"][1] == b"BB" and files["bin/vmi-marker"][1] == b"\x7fELF"
    assert files["bin/sh"] == (0o120777, b"busybox")
    assert files["dev/console"][0] == 0o020600
    assert len(base) % 4 == 0
    assert base == initramfs.base_archive(busybox=b"BB", init="#!/bin/sh\n", workload=b"\x7fELF")
    extra = initramfs.scenario_archive(b"echo hi\n")
    both = gzip.decompress(base + extra)  # what the kernel sees: two archives in a row
    assert both.count(b"TRAILER!!!") == 2
    with pytest.raises(ValueError, match="duplicate"):
        cpio = initramfs.Cpio()
        cpio.add_dir("bin")
        cpio.add_dir("/bin")


def test_private_apt_options_leave_system_state_alone(tmp_path: Path) -> None:
    apt = PrivateApt("i386", tmp_path / "apt")
    opts = apt.options()
    assert "APT::Architecture=i386" in opts and "APT::Architectures=i386" in opts
    assert f"Dir::State::Lists={tmp_path / 'apt' / 'lists'}" in opts
    assert f"Dir::Cache={tmp_path / 'apt' / 'cache'}" in opts
    assert deb_filename("busybox-static", "1:1.35.0-4", "i386") == (
        "busybox-static_1%3a1.35.0-4_i386.deb"
    )


def test_private_apt_for_another_suite_reads_only_that_suite(tmp_path: Path) -> None:
    apt = PrivateApt("amd64", tmp_path / "apt", suite="trixie")
    opts = apt.options()
    assert f"Dir::Etc::SourceList={tmp_path / 'apt' / 'sources.list'}" in opts
    assert "Dir::Etc::SourceParts=/nonexistent" in opts
    assert "Dir::Etc::SourceList" not in " ".join(PrivateApt("amd64", tmp_path).options())
    line = suite_source_line("trixie", "http://mirror.example/debian")
    # Checked with the system's archive keyring, never trusted blindly.
    assert line == (
        "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] "
        "http://mirror.example/debian trixie main\n"
    )
    with pytest.raises(LabError, match="suite"):
        suite_source_line("sid main\ndeb http://evil", "http://mirror.example/debian")


def test_system_mirror_from_deb822_and_one_line_sources(tmp_path: Path) -> None:
    deb822 = tmp_path / "debian.sources"
    deb822.write_text(
        "Types: deb\nURIs: http://local.mirror/debian-security\nSuites: bookworm-security\n\n"
        "Types: deb\n# comment\nURIs: http://local.mirror/debian/\nSuites: bookworm\n"
    )
    assert system_mirror([deb822]) == "http://local.mirror/debian"
    one_line = tmp_path / "sources.list"
    one_line.write_text("deb [arch=amd64] http://other.mirror/debian bookworm main\n")
    assert system_mirror([one_line]) == "http://other.mirror/debian"
    assert system_mirror([tmp_path / "missing"]) == "http://deb.debian.org/debian"


def test_kernel_release_from_image_path() -> None:
    assert kernel_release("boot/vmlinuz-6.12.117+deb13-amd64") == "6.12.117+deb13-amd64"
    assert kernel_release("usr/lib/modules/7.2.13+deb14-amd64/vmlinuz") == "7.2.13+deb14-amd64"


# -- catalogue and QEMU argv -----------------------------------------------------------------


def test_generations_are_the_x86_64_guest_with_another_suites_kernel() -> None:
    base = GUESTS["x86_64"]
    for suite in GENERATIONS:
        spec = GUESTS[f"x86_64-{suite}"]
        assert spec.suite == suite and spec.image_name == spec.name
        assert (spec.arch, spec.machine, spec.cpu) == (base.arch, base.machine, base.cpu)
        assert spec.kernel_package == base.kernel_package
    assert base.suite == ""
    la57 = GUESTS["x86_64-sid-la57"]
    assert la57.image_name == "x86_64-sid" and "+la57" in (la57.cpu or "")


def test_catalogue() -> None:
    assert list(GUESTS)[:5] == ["x86_64", "x86_64-la57", "x86_64-pti", "i386-pae", "i386"]
    assert GUESTS["x86_64-pti"].image_name == "x86_64"
    assert GUESTS["x86_64-la57"].image_name == "x86_64" and "+la57" in GUESTS["x86_64-la57"].cpu
    assert GUESTS["i386"].kernel_package == "linux-image-686"
    for name in ("aarch64", "aarch64-16k"):
        arm = get_guest(name)
        assert (arm.machine, arm.console, arm.phys_offset) == ("virt", "ttyAMA0", 0x40000000)
    assert GUESTS["aarch64-16k"].suite == "trixie" and not PLANNED_GUESTS
    with pytest.raises(LabError, match="unknown lab guest"):
        get_guest("sparc")
    with pytest.raises(LabError, match="accelerator"):
        check_accel("hvf")
    with pytest.raises(LabError, match="invalid instance name"):
        check_name("../etc")


def test_qemu_command(tmp_path: Path) -> None:
    spec = GUESTS["x86_64-la57"]
    files = LaunchFiles(run_dir=tmp_path / "run,x", ram_path=Path("/dev/shm/vmishell-a.ram"))
    cmd = qemu_command(
        spec,
        qemu="/usr/bin/qemu-system-x86_64",
        files=files,
        kernel=tmp_path / "vmlinuz",
        initrd=tmp_path / "initrd",
        memory_mb=256,
        name="a",
    )
    joined = " ".join(cmd)
    assert "-machine q35,memory-backend=mem" in joined and "-accel tcg" in joined
    assert "mem-path=/dev/shm/vmishell-a.ram,share=on" in joined and "size=256M" in joined
    assert "-cpu qemu64,+la57" in joined and "-daemonize" in cmd and "-no-reboot" in cmd
    assert f"unix:{tmp_path}/run,,x/qmp.sock,server=on,wait=off" in cmd  # commas escaped
    assert "vmcoreinfo" in cmd
    append = cmd[cmd.index("-append") + 1]
    assert append == kernel_cmdline(spec) and "nokaslr" not in append
    assert append.startswith("console=ttyS0 ") and "rdinit=/init" in append


# -- registers ------------------------------------------------------------------------------


I386_REGISTERS = """
CPU#0
EAX=c4917b70 EBX=c4c444c0 ECX=c4c444c0 EDX=cfc4bdc0
ESI=00000000 EDI=00000000 EBP=c4c3bf28 ESP=c4c3bf28
EIP=c4917b83 EFL=00200202 [-------] CPL=0 II=0 A20=1 SMM=0 HLT=1
ES =007b 00000000 ffffffff 00cff300 DPL=3 DS   [-WA]
GDT=     ff401000 000000ff
CR0=80050033 CR2=bfa4bef0 CR3=01017000 CR4=00000690
DR6=ffff0ff0 DR7=00000400
EFER=0000000000000000
FCW=037f FSW=0000 [ST=0] FTW=00 MXCSR=00001f80
"""


def test_parse_registers() -> None:
    regs = parse_x86_registers((DATA / "info-registers-x86_64.txt").read_text())
    assert regs.arch == "x86_64" and regs.efer is not None and regs.efer & (1 << 10)
    assert regs.cr3 == 0x2B26000 or regs.cr3 > 0
    assert "R8" in regs.extra and "RIP" in regs.extra and "ES" not in regs.extra
    assert "XMM00" not in regs.extra and "FCW" not in regs.extra
    regs = parse_x86_registers(I386_REGISTERS)
    assert regs.arch == "i386" and regs.cr3 == 0x01017000 and regs.cr4 == 0x690
    assert regs.efer == 0 and regs.extra["EIP"] == 0xC4917B83 and regs.extra["CR2"] == 0xBFA4BEF0
    with pytest.raises(QmpError):
        parse_x86_registers("nothing here")


@pytest.mark.parametrize(
    ("arch", "options", "needs"),
    [
        ("amd64", "CONFIG_KALLSYMS_ALL=y\nCONFIG_DEBUG_INFO_BTF=y\n", (False, False)),
        ("arm64", "# CONFIG_KALLSYMS_ALL is not set\nCONFIG_DEBUG_INFO_BTF=y\n", (True, False)),
        ("arm64", "CONFIG_KALLSYMS_ALL=y\nCONFIG_DEBUG_INFO_BTF=y\n", (False, False)),
        ("i386", "# CONFIG_KALLSYMS_ALL is not set\n", (True, True)),
        ("amd64", None, (False, False)),  # Debian 14's linux-binary-*: no config shipped
        ("i386", None, (True, True)),
    ],
)
def test_a_profile_takes_from_dbg_only_what_the_kernels_config_lacks(
    arch: str, options: str | None, needs: tuple[bool, bool]
) -> None:
    """(System.map from -dbg, BTF from -dbg): bookworm arm64 needs only the System.map."""
    from vmishell.lab.profiles import debug_needs

    assert debug_needs(arch, options) == needs


def test_parse_aarch64_registers() -> None:
    """QEMU 7.2's aarch64 `info registers` (vector registers cut): PC, SP, PSTATE, no TTBR."""
    text = (DATA / "info-registers-aarch64.txt").read_text()
    regs = parse_registers(text)
    assert regs.arch == "aarch64" and (regs.cr0, regs.cr3, regs.cr4, regs.efer) == (None,) * 4
    assert regs.extra["PC"] == 0xFFFFA7968C0DA26C and regs.extra["SP"] == 0xFFFFA7968D0B3D50
    assert regs.extra["PSTATE"] == 0x404000C5 and regs.extra["EL"] == 1
    assert regs.extra["X0"] == 0xF84 and regs.extra["X30"] == 0x8BC5A7968C0DA284
    assert not any(name.startswith(("TTBR", "TCR", "Z", "P0")) for name in regs.extra)
    assert parse_registers(I386_REGISTERS).arch == "i386"
    with pytest.raises(QmpError, match="PSTATE"):
        parse_aarch64_registers(" PC=ffff000000001000 X00=0000000000000000")


def test_qmp_unreachable_socket(tmp_path: Path) -> None:
    from vmishell.sources.qmp import QmpClient

    with pytest.raises(QmpError, match=str(tmp_path / "none.sock")):
        QmpClient(tmp_path / "none.sock", timeout=2)


def test_lab_list_names_the_kernel_each_built_image_boots(tmp_path: Path) -> None:
    import json

    from vmishell.lab.build import MANIFEST_FORMAT, built_release

    assert built_release("x86_64-trixie", tmp_path) is None
    image = tmp_path / "images" / "x86_64-trixie"
    image.mkdir(parents=True)
    files = {key: image / key for key in ("vmlinuz", "initramfs", "kernel_deb", "busybox")}
    for path in files.values():
        path.write_bytes(b"x")
    manifest = {"format": MANIFEST_FORMAT, "kernel_release": "6.12.117+deb13-amd64"}
    manifest.update({key: str(path) for key, path in files.items()})
    (image / "manifest.json").write_text(json.dumps(manifest))
    assert built_release("x86_64-trixie", tmp_path) == "6.12.117+deb13-amd64"
