"""The lab fails clearly and cleans up after itself.

Each failure must name its cause (a missing Debian package, a name in use, a
guest that does not boot, with the console tail) and leave no QEMU or file
behind, because a leaked QEMU silently eats one of the machine's two cores.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
from pathlib import Path

import pytest

from vmishell.errors import LabError, MissingToolError
from vmishell.lab import initramfs, instances, runner
from vmishell.lab.build import build_guest
from vmishell.lab.guests import GUESTS
from vmishell.lab.paths import ram_path

pytestmark = pytest.mark.lab

X86_64 = GUESTS["x86_64"]


def _unique(tag: str) -> str:
    return f"t-{os.getpid()}-{tag}"


def _qemu_pids(name: str) -> set[int]:
    """Pids of QEMU processes whose command line names the run directory of instance `name`.

    Only that instance's: other test sessions, helpers and users may start and
    stop lab guests meanwhile, which must not decide this test.
    """
    out = set()
    marker = str(instances.files_for(name).run_dir).encode() + b"/"
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if b"qemu-system" in cmdline and marker in cmdline:
            out.add(int(entry.name))
    return out


def _assert_gone(name: str) -> None:
    files = instances.files_for(name)
    assert not files.run_dir.exists(), f"{files.run_dir} left behind"
    assert not ram_path(name).exists(), f"{ram_path(name)} left behind"


def test_missing_qemu_binary_names_debian_package() -> None:
    spec = dataclasses.replace(X86_64, qemu_binary="qemu-system-vmishell-bogus")
    with pytest.raises(MissingToolError) as info:
        runner.up(spec, _unique("bogus"))
    assert info.value.package == "qemu-system-x86"
    assert "apt-get install qemu-system-x86" in str(info.value)
    _assert_gone(_unique("bogus"))


def test_missing_qemu_on_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(MissingToolError) as info:
        runner.up("i386", _unique("nopath"))
    assert (info.value.program, info.value.package) == ("qemu-system-i386", "qemu-system-x86")


def test_missing_apt_names_debian_package(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(MissingToolError) as info:
        build_guest("x86_64", cache_dir=tmp_path / "cache")
    assert info.value.package == "apt"


def test_name_in_use(x86_64_guest) -> None:
    before = _qemu_pids(x86_64_guest.name)
    assert before == {x86_64_guest.pid}
    with pytest.raises(LabError, match="in use by a running QEMU"):
        runner.up("x86_64", x86_64_guest.name)
    assert x86_64_guest.alive()
    assert _qemu_pids(x86_64_guest.name) == before


def test_stale_instance_is_cleaned_up_and_boot_succeeds(x86_64_guest) -> None:
    name = _unique("stale")
    files = instances.files_for(name)
    dead = subprocess.Popen(["true"])
    dead.wait()
    files.run_dir.mkdir(parents=True)
    (files.run_dir / "qmp.sock").write_text("")
    files.pidfile.write_text(f"{dead.pid}\n")
    instances.write_record(files, {"name": name, "guest": "x86_64", "pid": dead.pid})
    files.ram_path.write_bytes(b"\0" * 4096)
    try:
        guest = runner.up("x86_64", name)
        assert any("stale" in note for note in guest.notes), guest.notes
        assert guest.alive() and guest.pid != dead.pid
        assert guest.truth().marker_paddr is not None
        assert os.path.getsize(guest.ram_path) == guest.ram_size
    finally:
        if instances.leftovers(files):
            runner.down(name)
    _assert_gone(name)


def test_guest_without_init_fails_with_console_tail(x86_64_guest, tmp_path: Path) -> None:
    built = build_guest("x86_64")
    broken = tmp_path / "no-init.cpio.gz"
    cpio = initramfs.Cpio()
    cpio.add_dir("bin")
    broken.write_bytes(initramfs.compress(bytes(cpio)))
    image = dataclasses.replace(built, initramfs=broken)
    name = _unique("noinit")
    with pytest.raises(LabError) as info:
        runner.up("x86_64", name, built=image, timeout=120)
    message = str(info.value)
    assert "failed to boot" in message and "serial console" in message
    assert "Kernel panic" in message or "VFS" in message or "init" in message
    assert not _qemu_pids(name), "a QEMU was left running"
    _assert_gone(name)


def test_kernel_panic_from_cmdline_fails_cleanly(x86_64_guest) -> None:
    name = _unique("panic")
    with pytest.raises(LabError, match="failed to boot") as info:
        runner.up("x86_64", name, extra_kernel_args=("rdinit=/does-not-exist",), timeout=120)
    assert "the kernel panicked" in str(info.value) or "QEMU exited" in str(info.value)
    assert not _qemu_pids(name), "a QEMU was left running"
    _assert_gone(name)


def test_down_removes_only_that_instance(x86_64_guest) -> None:
    name = _unique("second")
    second = runner.up("x86_64", name)
    assert second.pid != x86_64_guest.pid
    assert {s.name for s in runner.list_guests()} >= {name, x86_64_guest.name}
    lines = runner.down(name)
    assert any("QEMU" in line for line in lines)
    _assert_gone(name)
    assert not instances.pid_alive(second.pid)
    assert x86_64_guest.alive()
    assert x86_64_guest.run_dir.is_dir() and x86_64_guest.ram_path.exists()
    assert runner.status(x86_64_guest.name).state == "running"
    with pytest.raises(LabError, match="no lab instance"):
        runner.down(name)


def test_init_scenario_runs_in_guest(x86_64_guest, tmp_path: Path) -> None:
    script = tmp_path / "scenario.sh"
    script.write_text("#!/bin/sh\necho '@@vmi note scenario-ran'\nexec sleep 1000000\n")
    name = _unique("scenario")
    try:
        guest = runner.up("x86_64", name, init_script=script)
        truth = guest.truth()
        log = guest.serial_log.read_text(errors="replace")
        assert "@@vmi note scenario-ran" in log
        record = json.loads((guest.run_dir / "instance.json").read_text())
        assert record["init_script"] == str(script)
        assert sum(t.comm == "sleep" for t in truth.processes) >= 2
    finally:
        if instances.leftovers(instances.files_for(name)):
            runner.down(name)
    _assert_gone(name)
