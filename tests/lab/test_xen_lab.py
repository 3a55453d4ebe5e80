"""vmishell in a Xen dom0 reads DomUs as the DomUs see themselves.

One Xen lab host boots per module, with the lab's x86_64 guest as a 64-bit
PV, a PVH and an HVM DomU, and the same kernel and initramfs started as a
user's own PV DomU through `vmishell lab xen create`. Inside dom0, vmishell
(this checkout, on the host's Python) attaches to each DomU with
`%attach xen:NAME` and answers `%ps`, `%maps`, `%peek`, `%translate` and
`%watch` (see vmishell.lab.xen.report); the host compares the answers with
the ground truth each DomU printed on its console.

PV guests' page tables hold machine frames: their walks end at the machine
frame that the guest's own p2m gives for the pseudo-physical frame its
/proc/PID/pagemap reports. HVM and PVH walks end at the reported frame.

Skipped on a machine without QEMU; failing under CI=true when Xen cannot boot.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from vmishell.errors import VmiError
from vmishell.lab.workload import MARKER, layout

pytestmark = pytest.mark.lab

LAB_DOMUS = ["pv64", "pvh64", "hvm64"]
USER_DOMU = "user64"
DOMUS = [*LAB_DOMUS, USER_DOMU]
KIND = {"pv64": "pv", "pvh64": "pvh", "hvm64": "hvm", USER_DOMU: "pv"}
LAYOUT = layout("x86_64")
REPO = Path(__file__).resolve().parents[2]


def _unavailable(reason: str) -> None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"Xen lab unavailable under CI: {reason}", pytrace=False)
    pytest.skip(f"Xen lab unavailable: {reason}")


def _cli(*args: str, stdin: bytes = b"", timeout: float = 900) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run(
        [sys.executable, "-m", "vmishell.cli", *args],
        input=stdin,
        capture_output=True,
        env=env,
        timeout=timeout,
        check=False,
    )


class Unavailable(Exception):
    """The Xen lab cannot run here (a skip on a developer's machine, a failure under CI)."""


def _instance() -> str:
    return f"t-{os.getpid()}-xen"


def boot(name: str, workdir: Path) -> dict:
    """Boot host `name` and its DomUs, collect dom0's report; what happened, as JSON data."""
    import shutil

    from vmishell.lab.xen import domu
    from vmishell.lab.xen.host import up_host

    if shutil.which("qemu-system-x86_64") is None:
        return {"unavailable": "qemu-system-x86_64 is not installed"}
    timings: dict[str, float | None] = {}
    started = time.monotonic()
    try:
        host = up_host(name)
    except VmiError as exc:
        return {"unavailable": str(exc)}
    timings["dom0"] = host.boot_seconds
    # The user's own kernel and initramfs, somewhere dom0 sees them only via /host.
    own = workdir / "own-domu"
    own.mkdir()
    lab = domu.lab_domu("pv64")
    for src in (lab.kernel, lab.initrd):
        shutil.copy(src, own / Path(str(src)).name)
    specs = [domu.lab_domu(n) for n in LAB_DOMUS]
    domus = domu.create(host, specs, wait=False)
    waiting = threading.Thread(target=domu.wait_ready, args=(host, domus), daemon=True)
    waiting.start()
    created = _cli(
        "lab", "xen", "create", USER_DOMU, "--host", name, "--type", "pv",
        "--kernel", str(own / "vmlinuz"), "--initrd", str(own / "initramfs.cpio.gz"),
        "--lab-guest", "x86_64",
    )  # fmt: skip
    report = host.report(DOMUS, "--wait", "600", "--bad-input", "--end", USER_DOMU)
    waiting.join(timeout=600)
    domu.wait_ready(host, domus)  # what the thread did not see, with its error if any
    for d in domus:
        timings[d.name] = domu.get(host, d.name).ready_seconds
    timings[USER_DOMU] = domu.get(host, USER_DOMU).ready_seconds
    timings["report"] = report["seconds"]
    timings["dom0 python startup"] = report["startup"]
    timings["total"] = round(time.monotonic() - started, 1)
    out = {k: created.__dict__[k].decode(errors="replace") for k in ("stdout", "stderr")}
    return {
        "report": report,
        "created": {"returncode": created.returncode, **out},
        "timings": timings,
    }


#: boot() in a child process: its environment is the session's at the start, whatever
#: the tests that run meanwhile set in this process's (HOME, XDG_CACHE_HOME, ...).
CHILD = """
import json, sys
from pathlib import Path
from vmishell.errors import VmiError
from tests.lab.test_xen_lab import boot
try:
    out = boot(sys.argv[1], Path(sys.argv[2]))
except VmiError as exc:
    out = {"error": str(exc)}
Path(sys.argv[2], "boot.json").write_text(json.dumps(out))
"""


def boot_in_background(workdir: Path, env: dict[str, str]) -> dict:
    """Boot the host in a child process (tests/conftest.py runs this in a thread from the
    session's start, while the tests that boot nothing run: the host needs one CPU for
    several minutes, mostly waiting for the HVM DomU)."""
    import json

    with (workdir / "boot.log").open("wb") as log:
        done = subprocess.run(
            [sys.executable, "-c", CHILD, _instance(), str(workdir)],
            cwd=REPO,
            env=dict(env, PYTHONPATH=str(REPO)),
            stdout=log,
            stderr=subprocess.STDOUT,
            check=False,
        )
    try:
        return json.loads((workdir / "boot.json").read_text())
    except (OSError, ValueError):
        tail = (workdir / "boot.log").read_text(errors="replace")[-3000:]
        return {"error": f"the boot process exited with {done.returncode}:\n{tail}"}


def stop_background() -> None:
    """Stop the host, booted or booting (idempotent)."""
    from vmishell.lab.runner import down

    with contextlib.suppress(VmiError):
        down(_instance())


@pytest.fixture(scope="module")
def xen(background_boot):
    """The booted host, its DomUs' ground truth and what vmishell in dom0 reported."""
    from vmishell.lab.xen import domu
    from vmishell.lab.xen.host import attach_host

    try:
        booted = background_boot(__name__).result()
        if "unavailable" in booted:
            _unavailable(booted["unavailable"])
        if "error" in booted:
            pytest.fail(f"Xen lab: {booted['error']}", pytrace=False)
        print(f"\nXen lab timings (s): {booted['timings']}")
        try:
            host = attach_host(_instance())
            truth = {n: domu.get(host, n).truth() for n in DOMUS}
        except VmiError as exc:
            pytest.fail(f"Xen lab: {exc}", pytrace=False)
        created = SimpleNamespace(
            returncode=booted["created"]["returncode"],
            stdout=booted["created"]["stdout"].encode(),
            stderr=booted["created"]["stderr"].encode(),
        )
        yield SimpleNamespace(
            host=host,
            report=booted["report"],
            created=created,
            truth=truth,
            timings=booted["timings"],
        )
    finally:
        stop_background()  # before the next module's guests boot


@pytest.fixture(params=DOMUS)
def seen(request: pytest.FixtureRequest, xen):
    """(what dom0 reported, the DomU's ground truth) for one DomU."""
    entry = xen.report["domus"][request.param]
    assert "error" not in entry, entry["error"]
    return entry, xen.truth[request.param]


def test_lab_xen_create_started_the_users_own_domu(xen) -> None:
    assert xen.created.returncode == 0, xen.created.stderr.decode()
    assert f"{USER_DOMU}: pv domain id" in xen.created.stdout.decode()


def test_the_domain_kind_is_xens_and_the_paging_mode_the_guests(seen) -> None:
    entry, truth = seen
    assert entry["kind"] == KIND[entry["name"]]
    assert entry["mode"] == "LEVEL4" and entry["registers"]["arch"] == truth.machine == "x86_64"


def test_processes_equal_the_guests_own_list(seen) -> None:
    entry, truth = seen
    ours = {p["pid"]: p for p in entry["processes"]}
    assert all(p["error"] is None for p in entry["processes"]), entry["processes"]
    for task in truth.processes:
        if task.comm.startswith("kworker/") and task.pid not in ours:
            continue  # idle kworkers come and go
        row = ours[task.pid]
        assert (row["tgid"], row["ppid"], row["uid"], row["kernel_thread"]) == (
            task.tgid,
            task.ppid,
            task.uid,
            task.kernel_thread,
        ), task
        assert task.comm.startswith(row["comm"]), task
    leader = ours[truth.marker_pid]
    assert leader["comm"] == "vmi-marker" and leader["cmdline"] == "/bin/vmi-marker"
    assert len([p for p in entry["processes"] if p["tgid"] == truth.marker_pid]) == 2


def test_the_marker_processs_maps_equal_proc_maps(seen) -> None:
    entry, truth = seen
    theirs = [[m.start, m.end, m.perms, m.offset, m.dev, m.inode, m.path] for m in truth.maps]
    assert entry["maps"] == theirs


def test_the_marker_reads_back_and_walks_to_the_guests_frame(seen) -> None:
    entry, truth = seen
    assert entry["marker"].encode("latin-1") == MARKER
    walk = entry["walk"]
    assert walk["levels"] == ["PML4", "PDPT", "PD", "PT"]
    pfn = truth.pagemap[LAYOUT.marker_va].pfn
    if entry["kind"] == "pv":
        # The guest's pfn is pseudo-physical; its page tables hold the machine frame.
        assert walk["paddr"] >> 12 == entry["machine_frames"][str(pfn)] != pfn
    else:
        assert walk["paddr"] >> 12 == pfn
    assert walk["entries"][-1] & 0xFFFFFFFFFF000 == walk["paddr"] & ~0xFFF


def test_every_page_the_guests_pagemap_reports_translates_to_its_frame(seen) -> None:
    entry, truth = seen
    for vaddr, pm in truth.pagemap.items():
        if not pm.present:
            continue
        frame = entry["translations"][f"{vaddr:#x}"] >> 12
        expected = entry["machine_frames"][str(pm.pfn)] if entry["kind"] == "pv" else pm.pfn
        assert frame == expected, hex(vaddr)


def test_watch_sees_the_counter_tick(seen) -> None:
    entry, _ = seen
    values = entry["watch"]["values"]
    assert entry["watch"]["samples"] == 4
    assert len(values) >= 2 and values == sorted(values) and values[-1] > values[0]


def test_only_the_hvm_guest_has_a_vga_hole_and_it_reads_as_one_error(xen) -> None:
    bad = xen.report["bad_input"]
    assert bad["vga_hole"].startswith("PhysicalReadError: cannot read 16 bytes at physical 0xa0000")
    assert bad["no_such_domain"].startswith(
        "SourceError: no such domain: 'no-such-domain' is not running"
    )


def test_a_domain_destroyed_while_attached_ends_the_session_with_one_clear_error(xen) -> None:
    ended = xen.report["ended"]
    assert ended["state"] == "ended"
    for what in ("processes", "process"):
        assert ended[what].startswith("TargetEnded: Xen PV domain user64"), ended[what]
        assert "destroyed" in ended[what]


def test_lab_exec_returns_output_stderr_and_exit_code(xen) -> None:
    r = _cli("lab", "exec", xen.host.name, "--", "sh", "-c", "echo out; echo err >&2; exit 3")
    assert (r.returncode, r.stdout, r.stderr) == (3, b"out\n", b"err\n")
    r = _cli("lab", "exec", xen.host.name, "--stdin", "--", "wc", "-c", stdin=b"x" * 100_000)
    assert r.returncode == 0 and r.stdout.split() == [b"100000"]


def test_dom0_runs_the_code_under_test(xen) -> None:
    from vmishell.lab.xen.dom0fs import dom0_path

    r = xen.host.python("import vmishell, sys; print(vmishell.__file__)")
    assert r.check().text.strip() == dom0_path(REPO / "vmishell" / "__init__.py")


def test_every_domu_printed_its_ground_truth_and_was_timed(xen) -> None:
    assert all(xen.timings[n] is not None for n in ["dom0", *DOMUS]), xen.timings
