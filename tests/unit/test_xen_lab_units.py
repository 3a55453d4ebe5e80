"""The Xen lab's pure parts: package selection, dom0's image, DomU configs, the command port.

The command port is tested against a peer that speaks dom0's side of the
protocol (see dom0-init.sh) over a real unix socket: answers to earlier
requests are skipped by ID, a cut answer is detected by its sizes, and a
silent dom0 times out with the command named.
"""

from __future__ import annotations

import base64
import gzip
import socket
import threading
from pathlib import Path

import pytest

from vmishell.errors import LabError
from vmishell.lab.xen import dom0fs, domu, packages
from vmishell.lab.xen.agent import Agent, shell_command
from vmishell.lab.xen.host import pcpus_for, xen_command_line


def test_apt_depends_gives_the_first_alternative_and_drops_virtual_packages() -> None:
    text = (
        "xen-utils-common\n"
        "  |Depends: sysvinit-utils\n"
        "  Depends: <init-system>\n"
        "  Depends: libc6\n"
        "  Depends: <python3:any>\n"
        "libc6\n"
        "  PreDepends: libgcc-s1:amd64\n"
    )
    assert packages.parse_depends(text) == {
        "xen-utils-common": ["sysvinit-utils", "libc6"],
        "libc6": ["libgcc-s1"],
    }


@pytest.mark.parametrize(
    ("path", "wanted"),
    [
        ("usr/lib/xen-4.17/bin/xl", True),
        ("usr/lib/xen-4.17/bin/pygrub", False),  # Python: no Python in dom0's own root
        ("usr/lib/xen-4.17/boot/hvmloader", True),
        ("lib/x86_64-linux-gnu/libc.so.6", True),
        ("usr/lib/x86_64-linux-gnu/libxenctrl.so.4.17.0", True),
        ("usr/lib/x86_64-linux-gnu/gconv/UTF-16.so", False),
        ("usr/share/qemu/keymaps/en-us", True),
        ("usr/share/qemu/keymaps/de", False),
        ("usr/share/doc/xen-utils-4.17/changelog.gz", False),
    ],
)
def test_dom0_keeps_programs_libraries_and_firmware_only(path: str, wanted: bool) -> None:
    assert packages.wanted_file(path) is wanted


def test_package_paths_are_merged_into_usr() -> None:
    assert dom0fs.merged_path("lib/x86_64-linux-gnu/libc.so.6") == (
        "usr/lib/x86_64-linux-gnu/libc.so.6"
    )
    assert dom0fs.merged_path("lib64/ld-linux-x86-64.so.2") == "usr/lib64/ld-linux-x86-64.so.2"
    assert dom0fs.merged_path("usr/bin/xenstore-read") == "usr/bin/xenstore-read"


def test_modules_load_after_what_they_depend_on(monkeypatch) -> None:
    deps = {"9p": ["9pnet", "netfs", "fscache"], "9pnet": [], "netfs": [], "fscache": ["netfs"]}
    monkeypatch.setattr(dom0fs, "modinfo_depends", lambda ko: deps[ko.decode()])
    modules = {name: name.encode() for name in deps}
    assert dom0fs.load_order(modules, ["9p"]) == ["9pnet", "netfs", "fscache", "9p"]
    with pytest.raises(LabError, match=r"xen_privcmd is not in the kernel package"):
        dom0fs.load_order(modules, ["xen-privcmd"])
    deps["netfs"] = ["9p"]
    with pytest.raises(LabError, match="cycle"):
        dom0fs.load_order(modules, ["9p"])


def _cpio_names(archive: bytes) -> dict[str, bytes]:
    data = gzip.decompress(archive)
    out, pos = {}, 0
    while data[pos : pos + 6] == b"070701":
        fields = [int(data[pos + 6 + 8 * i : pos + 14 + 8 * i], 16) for i in range(13)]
        size, namesize = fields[6], fields[11]
        name = data[pos + 110 : pos + 110 + namesize - 1].decode()
        pos += 110 + namesize + (-(110 + namesize) % 4)
        out[name] = data[pos : pos + size]
        pos += size + (-size % 4)
        if name == "TRAILER!!!":
            break
    return out


def test_the_boot_archive_holds_init_and_the_hosts_settings_quoted() -> None:
    files = _cpio_names(dom0fs.boot_archive("#!/bin/sh\n", {"VMI_PYTHON": "/o'k/python"}))
    assert files["init"] == b"#!/bin/sh\n"
    assert files["vmi/dom0.conf"] == b"VMI_PYTHON='/o'\\''k/python'\n"
    with pytest.raises(LabError, match="invalid dom0 setting"):
        dom0fs.boot_archive("", {"bad name": "x"})


def test_dom0_init_is_rendered_with_every_placeholder_filled() -> None:
    text = dom0fs.render_init(["xen_privcmd", "9p"])
    assert "{{" not in text and "for m in xen_privcmd 9p; do" in text


def test_dom0s_own_directories_move_under_host_and_the_rest_keep_their_paths() -> None:
    assert domu.dom0_path("/tmp/me/vmlinuz") == "/host/tmp/me/vmlinuz"
    assert domu.dom0_path("/root/.cache/x") == "/root/.cache/x"
    assert domu.dom0_path("/work/k") == "/work/k"


def test_an_hvm_domu_boots_its_kernel_on_a_serial_file_with_native_tsc() -> None:
    spec = domu.DomuSpec("hvm64", "hvm", "/tmp/k", "/root/i", memory_mb=128)
    cfg = domu.xl_config(spec, "2")
    assert 'type = "hvm"' in cfg and 'kernel = "/host/tmp/k"' in cfg
    assert 'ramdisk = "/root/i"' in cfg and 'cpus = "2"' in cfg
    assert 'tsc_mode = "native"' in cfg and 'vga = "none"' in cfg
    assert 'serial = "file:/run/vmishell/console/hvm64-serial.log"' in cfg
    assert "console=ttyS0 panic=-1 rdinit=/init" in cfg


def test_a_pv_domu_uses_xens_console_and_no_tsc_workaround() -> None:
    cfg = domu.xl_config(domu.DomuSpec("pv64", "pv", "/root/k", None), "1")
    assert "console=hvc0" in cfg and "tsc_mode" not in cfg and "ramdisk" not in cfg
    assert 'on_reboot = "destroy"' in cfg


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"name": "a b"}, "invalid DomU name"),
        ({"type": "hvm32"}, "unknown DomU type"),
        ({"memory_mb": 8}, "32..4096 MiB"),
    ],
)
def test_bad_domu_specs_are_refused_before_anything_starts(kwargs, match) -> None:
    args = {"name": "d", "type": "pv", "kernel": "/k", "initrd": None, **kwargs}
    with pytest.raises(LabError, match=match):
        domu.DomuSpec(**args)


def test_xl_list_output_is_parsed() -> None:
    text = (
        "Name                                        ID   Mem VCPUs\tState\tTime(s)\n"
        "Domain-0                                     0   768     1     r-----      95.2\n"
        "pv64                                         2   256     1     -b----      39.9\n"
    )
    assert domu.parse_xl_list(text) == [
        ("Domain-0", 0, 768, 1, "r-----"),
        ("pv64", 2, 256, 1, "-b----"),
    ]


def test_dom0_pv_domus_and_hvm_containers_get_their_own_cpus() -> None:
    assert (pcpus_for("pv", 3), pcpus_for("pvh", 3), pcpus_for("hvm", 5)) == ("1", "2", "2-4")
    with pytest.raises(LabError, match="needs 3 CPUs"):
        pcpus_for("pv", 2)
    assert "dom0_vcpus_pin" in xen_command_line(768) and "smap=false smep=false" in (
        xen_command_line(768)
    )


# -- the command port ------------------------------------------------------------------


class FakeDom0:
    """dom0's end of the protocol on a unix socket, answering with `answer(id, script)`."""

    def __init__(self, path: Path, answer) -> None:
        self.server = socket.socket(socket.AF_UNIX)
        self.server.bind(str(path))
        self.server.listen(1)
        self.answer = answer
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.server.accept()
        with conn, conn.makefile("rb") as f:
            for line in f:
                tag, rid, *rest = line.decode().split()
                if tag == "@@run":
                    script = base64.b64decode(rest[1]).decode()
                    reply = self.answer(rid, script)
                    if reply is None:  # a dom0 that never answers
                        threading.Event().wait(5)
                        return
                    conn.sendall(reply.encode())
                    return


def _frame(rid: str, out: bytes, err: bytes, code: int, sizes: tuple[int, int] | None = None):
    sizes = sizes or (len(out), len(err))
    return (
        f"@@out {rid} {base64.b64encode(out).decode()}\n"
        f"@@err {rid} {base64.b64encode(err).decode()}\n"
        f"@@done {rid} {code} {sizes[0]} {sizes[1]}\n"
    )


def test_an_answer_comes_back_by_id_after_stale_ones(tmp_path: Path) -> None:
    def answer(rid: str, script: str) -> str:
        return _frame("0ld", b"stale", b"", 0) + _frame(rid, script.encode(), b"e", 7)

    FakeDom0(tmp_path / "a.sock", answer)
    r = Agent(tmp_path / "a.sock").run("echo 'hi there'", timeout=10)
    assert (r.returncode, r.stdout, r.stderr) == (7, b"echo 'hi there'", b"e")
    with pytest.raises(LabError, match="exit code 7"):
        r.check()


def test_an_answer_cut_short_is_an_error_not_a_short_output(tmp_path: Path) -> None:
    FakeDom0(tmp_path / "a.sock", lambda rid, _s: _frame(rid, b"abc", b"", 0, (4096, 0)))
    with pytest.raises(LabError, match=r"incomplete \(3/4096 bytes of stdout"):
        Agent(tmp_path / "a.sock").run("cat big", timeout=10)


def test_a_silent_dom0_times_out_naming_the_command(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr("vmishell.lab.xen.agent.ANSWER_MARGIN", 0.2)
    FakeDom0(tmp_path / "a.sock", lambda _rid, _s: None)
    with pytest.raises(LabError, match="did not answer in time: sleep 1000"):
        Agent(tmp_path / "a.sock").run("sleep 1000", timeout=0.1)


def test_no_dom0_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(LabError, match="cannot reach dom0's command port"):
        Agent(tmp_path / "none.sock").run("true", timeout=1)


def test_commands_are_quoted_word_by_word() -> None:
    assert shell_command(["sh", "-c", "echo a; exit 3"]) == "sh -c 'echo a; exit 3'"


def test_dom0_finds_the_checkout_python_and_home_wherever_they_are(monkeypatch, tmp_path) -> None:
    """A checkout, HOME or cache under /tmp (dom0's own tmpfs) is reached through /host."""
    import vmishell
    from vmishell.lab.xen import host

    monkeypatch.setattr(vmishell, "__file__", "/tmp/ci/vmishell/__init__.py")
    monkeypatch.setenv("HOME", "/tmp/cihome")
    monkeypatch.setenv("VMISHELL_PROFILE_PATH", "/tmp/p1:/srv/p2")
    values = host.host_settings()
    assert values["VMI_PYTHONPATH"] == "/host/tmp/ci"
    assert values["VMI_HOME"] == "/host/tmp/cihome"
    assert values["VMI_ENV_VMISHELL_PROFILE_PATH"] == "/host/tmp/p1:/srv/p2"
    assert values["VMI_PYTHON"].startswith("/")
