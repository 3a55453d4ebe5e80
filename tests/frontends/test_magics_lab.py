"""Every magic, driven through a real IPython shell against a live lab guest.

The answers are checked against what the guest said about itself at boot
(its marker process, the marker's pagemap frame, its maps), and every magic
is given bad input to show that the error is one line and the shell goes on.
"""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import pandas as pd
import pytest

from vmishell.frontends.frames import GuestFrame
from vmishell.frontends.memory import Memory
from vmishell.frontends.walkview import WalkFrame
from vmishell.lab.workload import MARKER, THREAD_NAME, layout
from vmishell.symbols.values import Pointer, Struct

pytestmark = pytest.mark.lab

LAYOUT = layout("x86_64")


@pytest.fixture(scope="module")
def guest(ip, x86_64_guest):
    """The x86_64 lab guest attached (by its plain instance name) as the current target."""
    truth = x86_64_guest.truth()
    ip.run_line_magic("attach", x86_64_guest.name)
    yield SimpleNamespace(name=x86_64_guest.name, truth=truth, pid=truth.marker_pid)
    magics = ip.magics_manager.registry["VmiMagics"]
    magics.attached.detach_all()


def ensure_attached(ip, guest) -> None:
    magics = ip.magics_manager.registry["VmiMagics"]
    if guest.name not in magics.attached.names():
        ip.run_line_magic("attach", guest.name)
    magics.attached.use(guest.name)


@pytest.fixture
def g(ip, guest):
    ensure_attached(ip, guest)
    return guest


def formats(ip, value) -> dict:
    data, _meta = ip.display_formatter.format(value)
    return data


# -- attaching ----------------------------------------------------------------------------


def test_attach_says_whether_the_target_is_live_and_writable(cell, g) -> None:
    r = cell(f"%attach lab:{g.name} --name rw --writable")
    assert r.success, r.output
    assert "rw: lab:" in r.output and "live" in r.output and "writable" in r.output
    assert r.value.session.source.writable
    r = cell("%targets")
    assert isinstance(r.value, GuestFrame)
    rows = r.value.set_index("name")
    assert rows.loc["rw", "current"] == "*" and bool(rows.loc["rw", "writable"])
    assert not bool(rows.loc[g.name, "writable"]) and bool(rows.loc[g.name, "live"])
    r = cell(f"%use {g.name}")
    assert r.success and "read-only" in r.output
    r = cell("%detach rw")
    assert r.success and "detached rw" in r.output
    assert list(cell("%targets").value["name"]) == [g.name]


# -- processes ----------------------------------------------------------------------------


def test_ps_returns_the_guests_processes_filtered(ip, cell, g) -> None:
    r = cell("df = %ps")
    assert r.success and r.output == ""  # assigned: nothing shown
    df = cell("df").value
    assert isinstance(df, GuestFrame)
    marker = df[df.comm == "vmi-marker"]
    assert list(marker.pid) == [g.pid]
    assert THREAD_NAME not in set(df.comm)  # one row per process by default
    threads = cell("%ps --threads --pid " + str(g.pid)).value
    assert set(threads.comm) == {"vmi-marker", THREAD_NAME}
    user = cell("%ps --user").value
    kernel = cell("%ps --kernel").value
    assert not user.kernel_thread.any() and kernel.kernel_thread.all()
    assert len(user) + len(kernel) == len(df)
    assert "kthreadd" in set(kernel.comm) and "vmi-marker" in set(user.comm)
    named = cell("%ps -n marker").value
    assert list(named.comm) == ["vmi-marker"]
    assert cell("%ps --pid 999999").value.empty
    html = formats(ip, df)
    assert "text/html" in html and "vmi-marker" in html["text/html"]
    assert hex(int(marker.task.iloc[0])) in html["text/html"]  # addresses in hex


def test_ps_table_is_a_widget(cell, g) -> None:
    from vmishell.frontends.widgets import ProcessTable

    r = cell("%ps --table")
    assert r.success and isinstance(r.value, ProcessTable)
    assert "vmi-marker" in r.value.table.value


# -- memory --------------------------------------------------------------------------------


def test_peek_reads_the_marker_as_bytes_that_show_as_hex(ip, cell, g) -> None:
    r = cell(f"x = %peek {LAYOUT.marker_va:#x} {len(MARKER)} -p {g.pid}")
    assert r.success and r.output == ""
    x = ip.user_ns["x"]
    assert isinstance(x, Memory) and x == MARKER and x.address == LAYOUT.marker_va
    shown = cell("x")
    assert "VMISHELL-MARKER-" in shown.output and "00600000  56 4d 49" in shown.output
    assert "VMISHELL-MARKER-" in formats(ip, x)["text/html"]


def test_peek_takes_expressions_symbols_and_typed_views(ip, cell, g) -> None:
    r = cell(f"%peek {LAYOUT.marker_va:#x} + 4*4 12 -p {g.pid}")
    assert r.value == MARKER[16:28]
    assert cell("%peek linux_banner 14").value == b"Linux version "
    assert len(cell("%peek init_task+0x10 8").value) == 8
    counter = cell(f"%peek {LAYOUT.counter_va:#x} 2 -p {g.pid} --as u64").value
    assert isinstance(counter, pd.DataFrame)
    assert list(counter.address) == [LAYOUT.counter_va, LAYOUT.counter_va + 8]
    assert counter.value.iloc[0] > 0 and counter.value.iloc[1] == 0
    words = cell(f"%peek {LAYOUT.marker_va:#x} 4 -p {g.pid} --as u32").value
    assert int(words.value.iloc[0]).to_bytes(4, "little") == MARKER[:4]
    assert cell(f"%peek {LAYOUT.marker_va:#x} -p {g.pid} --as str").value == MARKER.decode()
    task = int(cell(f"%ps --pid {g.pid}").value.task.iloc[0])
    decoded = cell(f"%peek {task:#x} --as task_struct").value
    assert isinstance(decoded, Struct) and decoded.comm == "vmi-marker"


def test_peek_browse_pages_lazily(cell, g) -> None:
    from vmishell.frontends.widgets import HexViewer

    viewer = cell(f"%peek {LAYOUT.marker_va:#x} 64 -p {g.pid} --browse").value
    assert isinstance(viewer, HexViewer) and viewer.reads == 1
    assert "VMISHELL-MARKER-" in viewer.view.value
    viewer.go("init_task")
    assert viewer.reads == 2 and viewer.address > 0xFFFF000000000000


def test_translate_walks_four_levels_to_the_guests_own_frame(ip, cell, g) -> None:
    r = cell(f"%translate {LAYOUT.marker_va:#x} -p {g.pid}")
    assert r.success and isinstance(r.value, WalkFrame)
    walk = r.value
    assert list(walk.level) == ["PML4", "PDPT", "PD", "PT"]
    frame = g.truth.pagemap[LAYOUT.marker_va].pfn
    assert walk.paddr == frame << 12
    assert "=> 0x600000 -> physical" in r.output
    html = formats(ip, walk)["text/html"]
    assert "4 levels" in html and "IA-32e 4-level" in html


def test_maps_lists_the_marker_mappings_and_the_kernels_page_runs(cell, g) -> None:
    maps = cell(f"%maps -p {g.pid}").value
    mine = maps[maps.path == "/bin/vmi-marker"]
    assert list(mine.start) == [m.start for m in g.truth.maps if m.path == "/bin/vmi-marker"]
    assert LAYOUT.data_va in set(mine.start)
    runs = cell("%maps").value
    assert {"start", "end", "paddr", "size", "writable", "user", "nx"} <= set(runs.columns)
    assert (runs.start >= 1 << 47).any()  # kernel half
    pages = cell(f"%maps -p {g.pid} --pages").value
    assert ((pages.start <= LAYOUT.marker_va) & (LAYOUT.marker_va < pages.end)).any()


def test_dt_shows_layouts_and_decodes_the_marker_task(ip, cell, g) -> None:
    lay = cell("%dt task_struct").value
    assert {"offset", "name", "type", "size", "bit_position", "bit_length"} <= set(lay.columns)
    comm = lay[lay.name == "comm"].iloc[0]
    assert comm.type == "char [16]" and comm["size"] == 16
    assert cell("%dt struct list_head").value.name.tolist() == ["next", "prev"]
    task = int(cell(f"%ps --pid {g.pid}").value.task.iloc[0])
    r = cell(f"t = %dt task_struct {task:#x}")
    assert r.success and r.output == ""
    t = ip.user_ns["t"]
    assert t.comm == "vmi-marker" and t.pid == g.pid and t.tgid == g.pid
    assert isinstance(t.mm, Pointer) and t.mm.target_name == "mm_struct"
    assert isinstance(t.real_parent, Pointer)
    mm = cell("%dt mm_struct {t.mm}").value  # follow a pointer through IPython's {…}
    assert isinstance(mm, Struct) and mm.address == t.mm.address
    assert mm.map_count == len(g.truth.maps)
    parent = cell("%dt task_struct {t.real_parent} --depth 0").value
    assert parent.pid == 1
    deep = cell(f"%dt task_struct {task:#x} --depth 2").value
    assert deep.se.expanded and not t.se.expanded
    html = formats(ip, t)["text/html"]
    assert "vmi-marker" in html and "task_struct" in html
    assert "comm" in cell("t").output


def test_watch_streams_counter_changes_in_a_terminal(ip, cell, g) -> None:
    r = cell(f"w = %watch {LAYOUT.counter_va:#x} 8 -p {g.pid} --every 0.5 --count 7")
    assert r.success, r.output
    w = ip.user_ns["w"]
    assert not w.running and w.samples == 7
    history = w.history
    assert len(history) >= 2
    assert (history.new_int.diff().dropna() > 0).all()  # the counter only goes up
    assert "watching 8 bytes at 0x600040" in r.output
    changes = [line for line in r.lines if " -> " in line]
    assert len(changes) == len(history)
    assert "\x1b" not in r.output  # not a TTY: no colour


def test_detaching_stops_a_running_watch(ip, cell, g) -> None:
    from vmishell.frontends.watch import Watcher

    magics = ip.magics_manager.registry["VmiMagics"]
    target = magics.attached.attach(f"lab:{g.name}", name="watched")
    w = Watcher(target.session.process(g.pid), LAYOUT.counter_va, 8, every=0.1)
    magics.attached.add_watcher(target, w)
    w.start()
    assert cell("%targets").value.set_index("name").loc["watched", "watches"] == 1
    assert cell("%detach watched").success
    assert not w.running and w.stopped_because == "target watched detached"


def test_vol_runs_a_volatility_plugin(cell, g) -> None:
    r = cell("%vol linux.pslist")
    assert r.success, r.output
    df = r.value
    assert isinstance(df, GuestFrame)
    pid_col = next(c for c in df.columns if str(c).upper() == "PID")
    assert g.pid in set(df[pid_col])


# -- errors ---------------------------------------------------------------------------------

BAD_INPUT = [
    ("%peek 0x600000 -p 999999", "no process with pid 999999"),
    ("%peek 0xdead0000 -p {pid}", "page fault translating 0xdead0000"),
    ("%peek nosuch_symbol_xyz", "no symbol 'nosuch_symbol_xyz'"),
    ("%peek init_task +", "bad expression"),
    ("%peek 0x600000 -p {pid} --as nosuch_type", "no type 'nosuch_type'"),
    ("%peek 0x600000 -p notanumber", "invalid"),
    ("%peek", "required"),
    ("%peek 0x600000 0 -p {pid}", "length must be positive"),
    ("%translate (1", "expected ')'"),
    ("%translate 0x600000 -p 999999", "no process with pid"),
    ("%maps -p 999999", "no process with pid"),
    ("%dt nosuch_type", "no type 'nosuch_type'"),
    ("%dt task_struct 0xdead0000", "cannot read"),
    ("%dt task_struct 1 << 70", "not a 64-bit address"),
    ("%watch 0xdead0000 8 -p {pid} --count 1", "page fault"),
    ("%watch 0x600040 8 -p {pid} --every 0", "--every must be positive"),
    ("%ps --user --kernel", "exclude each other"),
    ("%ps -t nosuch", "no target named 'nosuch'"),
    ("%use nosuch", "no target named 'nosuch'"),
    ("%detach nosuch", "no target named 'nosuch'"),
    ("%attach no-such-guest-xyz", "neither a file nor a lab instance"),
    ("%attach {name}", "already attached"),
    ("%vol linux.no_such_plugin", ""),
]


@pytest.mark.parametrize(("line", "message"), BAD_INPUT, ids=[b[0] for b in BAD_INPUT])
def test_bad_input_is_one_clear_line_and_the_shell_goes_on(cell, g, line, message) -> None:
    r = cell(line.format(pid=g.pid, name=g.name))
    assert not r.success
    assert len(r.lines) == 1, r.output
    assert message in r.output
    assert "Traceback" not in r.output
    after = cell("1 + 1")
    assert after.success and after.value == 2


def test_a_translate_of_an_unmapped_address_is_an_answer_not_an_error(cell, g) -> None:
    r = cell(f"%translate 0xdead0000 -p {g.pid}")
    assert r.success and not r.value.ok
    assert "not present" in r.output


def test_magics_without_a_target_say_how_to_attach(ip, cell, guest) -> None:
    magics = ip.magics_manager.registry["VmiMagics"]
    magics.attached.detach_all()
    try:
        for line in ("%ps", "%peek 0x1000", "%translate 0x1000", "%maps", "%dt task_struct 0",
                     "%watch 0x1000", "%vol linux.pslist", "%detach"):  # fmt: skip
            r = cell(line)
            assert not r.success and r.lines == [
                "NoTargetError: no target attached: use %attach TARGET first"
            ], (line, r.output)
        assert cell("%targets").value.empty
        assert cell("%dt list_head").lines[0].startswith("NoTargetError")
    finally:
        ensure_attached(ip, guest)


def test_tb_prints_the_whole_traceback_of_a_one_line_error(cell, g) -> None:
    assert len(cell("%peek nosuch_symbol_xyz").lines) == 1
    r = cell("%tb")
    assert "Traceback" in r.output and "symbol_address" in r.output
    assert "SymbolNotFound: no symbol 'nosuch_symbol_xyz'" in r.output
    assert len(r.lines) > 5
    assert "ZeroDivisionError" in cell("1/0").output and "ZeroDivisionError" in cell("%tb").output


# -- the IPython integration ------------------------------------------------------------------


def completions(ip, line: str) -> list[str]:
    from IPython.core.completer import provisionalcompleter

    with provisionalcompleter():
        return [c.text for c in ip.Completer.completions(line, len(line))]


def test_tab_completes_guests_targets_pids_symbols_and_types(ip, g) -> None:
    assert g.name in completions(ip, f"%attach {g.name[:-2]}")
    assert f"lab:{g.name}" in completions(ip, f"%attach lab:{g.name[:-2]}")
    assert completions(ip, f"%use {g.name[:3]}") == [g.name]
    assert str(g.pid) in completions(ip, "%peek 0x600000 -p ")
    assert str(g.pid) in completions(ip, f"x = %watch 0x600040 --pid {str(g.pid)[0]}")
    assert "init_task" in completions(ip, "%peek init_ta")
    assert "linux_banner" in completions(ip, "%peek init_task+linux_ban")
    assert "task_struct" in completions(ip, "%dt task_str")
    assert {"u64", "u32"} <= set(completions(ip, "%peek 0 --as u"))
    assert "--threads" in completions(ip, "%ps --thr")


def test_every_magic_has_argument_help(ip, cell) -> None:
    for name in ("attach", "detach", "targets", "use", "ps", "peek", "translate", "maps", "dt",
                 "watch", "vol"):  # fmt: skip
        doc = ip.find_line_magic(name).__doc__
        assert doc and f"%{name}" in doc, name
    r = cell("%peek?")
    assert r.success


def test_unload_detaches_and_removes_everything_then_reload_works(ip, cell, guest) -> None:
    magics = ip.magics_manager.registry["VmiMagics"]
    ensure_attached(ip, guest)
    target = magics.attached.current
    matchers = len(ip.Completer.custom_matchers)
    assert cell("%unload_ext vmishell").success
    assert "VmiMagics" not in ip.magics_manager.registry
    assert ip.find_line_magic("peek") is None
    assert len(ip.Completer.custom_matchers) == matchers - 1
    assert not hasattr(ip.find_line_magic("tb"), "_vmishell_original")
    assert not target.attached  # its session was closed
    assert not cell("%ps").success
    assert cell("%load_ext vmishell").success
    assert ip.find_line_magic("peek") is not None
    ensure_attached(ip, guest)
    assert cell("%ps -n vmi-marker").value.pid.tolist() == [guest.pid]


def test_import_vmishell_does_not_import_ipython_or_the_magics() -> None:
    code = (
        "import sys, vmishell; "
        "print(any(m.startswith(('IPython', 'vmishell.frontends')) for m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
