"""IPython magics over the Session API: %attach, %ps, %peek, %translate, %maps, %dt, %search,
%watch, %diff, %vol.

Each magic is argument declarations (`@magic_arguments`, so `%peek?` shows
its help), one call into the plain API, and a returned value: `x = %ps`
binds the DataFrame, a bare `%ps` shows it through IPython's display. The
returned objects know how to show themselves safely (see `frames`,
`memory`, `walkview`). Attached sessions live on the `VmiMagics` instance.

Errors: vmishell's own errors render as one line (`VmiError._render_traceback_`)
and `%tb` prints the whole traceback (the extension wraps IPython's `%tb`,
which would otherwise ask the error for its one line again). Anything else
that escapes a magic is wrapped here, at the front-end boundary, into a
one-line `FrontendError` chained to the original.
"""

from __future__ import annotations

import argparse
import functools
import struct
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring

from vmishell.errors import TranslationError, VmiError
from vmishell.frontends.expr import as_address, evaluate_all
from vmishell.frontends.frames import GuestFrame, guest_frame
from vmishell.frontends.memory import Memory, hex_text, read_window
from vmishell.frontends.targets import Target, Targets
from vmishell.frontends.text import safe_text
from vmishell.frontends.types import inline_type
from vmishell.frontends.walkview import WalkFrame
from vmishell.frontends.watch import VIEWS

if TYPE_CHECKING:
    from IPython.core.interactiveshell import InteractiveShell

    from vmishell.frontends.watch import Sample, Watcher
    from vmishell.session import Process, Session


class FrontendError(VmiError):
    """A magic failed for a reason that is not one of vmishell's own errors."""


#: `--as` views of memory as numbers: struct format and element size.
TYPED_VIEWS: dict[str, tuple[str, int]] = {
    "u8": ("<B", 1), "u16": ("<H", 2), "u32": ("<I", 4), "u64": ("<Q", 8),
    "i8": ("<b", 1), "i16": ("<h", 2), "i32": ("<i", 4), "i64": ("<q", 8),
    "f32": ("<f", 4), "f64": ("<d", 8),
}  # fmt: skip
DEFAULT_PEEK = 64
DEFAULT_COUNT = 16
DEFAULT_STRING = 256
MAX_TYPED = 1 << 20
MAX_PAGE_ROWS = 200_000
SYMBOL_NEAR = 0x10000  # show pointers as symbol+off only this close to a symbol
STRUCT_TAGS = ("struct", "union", "enum", "class")
#: Volatility columns shown in hex (offsets and addresses).
_HEXISH = ("OFFSET", "ADDRESS", "START", "END", "BASE")

F = TypeVar("F", bound=Callable[..., Any])


def _int(text: str) -> int:
    return int(text, 0)


def boundary(func: F) -> F:
    """Let vmishell errors and usage errors through; wrap anything else in one line."""

    @functools.wraps(func)
    def wrapper(self: VmiMagics, line: str = "") -> Any:
        try:
            return func(self, line)
        except (VmiError, UsageError, KeyboardInterrupt):
            raise
        except Exception as exc:
            raise FrontendError(
                f"%{func.__name__} failed: {type(exc).__name__}: {exc} (%tb shows where)"
            ) from exc

    return wrapper  # type: ignore[return-value]


def target_option(func: F) -> F:
    return argument(
        "-t", "--target", metavar="NAME", help="an attached target other than the current one"
    )(func)


def pid_option(func: F) -> F:
    decorate = argument("-p", "--pid", type=_int, default=0, help="process id (0: the kernel)")
    return decorate(func)


@magics_class
class VmiMagics(Magics):
    """vmishell's magics; holds the attached targets of this shell."""

    def __init__(self, shell: InteractiveShell | None = None) -> None:
        super().__init__(shell)
        #: The attached sessions of this shell (one of them current).
        self.attached = Targets()
        #: The tab-completion matcher `load` registered (removed again by `unload`).
        self.matcher: Callable[..., Any] | None = None

    # -- helpers --------------------------------------------------------------------
    def _target(self, args: argparse.Namespace) -> Target:
        return self.attached.get(getattr(args, "target", None))

    def _process(self, target: Target, pid: int) -> Process:
        return target.session.process(pid)

    @staticmethod
    def _resolver(session: Session) -> Callable[[str], int]:
        return session.symbol

    def _values(self, words: list[str], session: Session, limit: int) -> list[int]:
        text = " ".join(words)
        values = evaluate_all(text, self._resolver(session), limit=limit)
        if not values:
            raise UsageError("an address is required")
        bits = 8 * session.profile.pointer_size
        values[0] = as_address(values[0], text, bits)
        return values

    def _in_notebook(self) -> bool:
        return getattr(self.shell, "kernel", None) is not None

    def symbolizer(self, session: Session) -> Callable[[int], str | None]:
        """Run-time address -> "symbol+0x10" when close to a kernel symbol (KASLR undone)."""
        shift = session.guest.location.virtual_shift
        profile = session.profile

        def symbolize(address: int) -> str | None:
            hit = profile.symbol_at(address - shift)
            if hit is None or hit[1] > SYMBOL_NEAR:
                return None
            name, off = hit
            return f"{name}+{off:#x}" if off else name

        return symbolize

    # -- targets ----------------------------------------------------------------------
    @magic_arguments()
    @argument(
        "target",
        help="a running lab guest's name or lab:NAME, qemu:RAMFILE[,QMPSOCKET], xen:NAME, "
        "or a memory image path",
    )
    @argument("--name", help="the name to use it by (default: the guest's or file's name)")
    @argument("--profile", help="an ISF profile file instead of finding one by banner")
    @argument("--writable", action="store_true", help="open a live guest's memory for writing")
    @line_magic
    @boundary
    def attach(self, line: str = "") -> Target:
        """Attach to a live guest or a memory image and make it the current target."""
        args = parse_argstring(self.attach, line)
        return self.attached.attach(
            args.target, name=args.name, profile=args.profile, writable=args.writable
        )

    @magic_arguments()
    @argument("name", nargs="?", help="the target to detach (default: the current one)")
    @line_magic
    @boundary
    def detach(self, line: str = "") -> Target:
        """Detach a target: stop its watches and close it."""
        args = parse_argstring(self.detach, line)
        return self.attached.detach(args.name)

    @magic_arguments()
    @line_magic
    @boundary
    def targets(self, line: str = "") -> GuestFrame:
        """The attached targets; the current one is marked with *."""
        parse_argstring(self.targets, line)
        return self.attached.frame()

    @magic_arguments()
    @argument("name", help="an attached target's name")
    @line_magic
    @boundary
    def use(self, line: str = "") -> Target:
        """Make another attached target the current one."""
        args = parse_argstring(self.use, line)
        return self.attached.use(args.name)

    # -- processes ----------------------------------------------------------------------
    @magic_arguments()
    @argument(
        "--threads",
        action="store_true",
        help="one row per thread, like ps -eL (default: one row per process, like ps)",
    )
    @argument("--user", action="store_true", help="user processes only")
    @argument("--kernel", action="store_true", help="kernel threads only")
    @argument("-n", "--comm", metavar="TEXT", help="only names (comm) containing TEXT")
    @argument("--pid", type=_int, help="only this pid")
    @argument("--table", action="store_true", help="an interactive table widget (Jupyter)")
    @argument(
        "--all-columns",
        action="store_true",
        help="keep columns that are empty on every row (such as error when nothing failed)",
    )
    @target_option
    @line_magic
    @boundary
    def ps(self, line: str = "") -> Any:
        """The guest's processes as a DataFrame (pid, ppid, comm, state, uid, dtb, cmdline, …).

        One row per process, like `ps` and `Session.processes()`; `--threads`
        gives one row per thread, like `ps -eL`. Missing values (the cmdline
        of a kernel thread) show as empty; columns empty on every row are left
        out unless --all-columns.
        """
        args = parse_argstring(self.ps, line)
        if args.user and args.kernel:
            raise UsageError("--user and --kernel exclude each other")
        df = self._target(args).session.processes(threads=args.threads)
        if args.user:
            df = df[~df["kernel_thread"].astype(bool)]
        if args.kernel:
            df = df[df["kernel_thread"].astype(bool)]
        if args.comm:
            df = df[df["comm"].astype(str).str.contains(args.comm, regex=False)]
        if args.pid is not None:
            same = df["pid"] == args.pid
            if args.threads:  # with threads, --pid also keeps the process's other threads
                same |= df["tgid"] == args.pid
            df = df[same]
        df = df.reset_index(drop=True)
        if not args.all_columns:
            df = df.drop(columns=empty_columns(df))
        frame = guest_frame(df, hex=["dtb", "task"])
        if args.table:
            from vmishell.frontends.widgets import ProcessTable

            return ProcessTable(frame)
        return frame

    @magic_arguments()
    @pid_option
    @argument("--pages", action="store_true", help="page-table runs instead of VMAs")
    @target_option
    @line_magic
    @boundary
    def maps(self, line: str = "") -> GuestFrame:
        """A process's memory map like /proc/PID/maps; for the kernel, its page-table runs."""
        args = parse_argstring(self.maps, line)
        process = self._process(self._target(args), args.pid)
        if args.pid != 0 and not args.pages:
            return guest_frame(process.maps(), hex=["start", "end", "offset"])
        import pandas as pd

        rows = []
        for m in process.mappings():
            rows.append((m.vaddr, m.end, m.paddr, m.size, m.writable, m.user, m.nx))
            if len(rows) >= MAX_PAGE_ROWS:
                break
        cols = ["start", "end", "paddr", "size", "writable", "user", "nx"]
        return guest_frame(pd.DataFrame(rows, columns=cols), hex=["start", "end", "paddr"])

    # -- memory -----------------------------------------------------------------------------
    @magic_arguments()
    @argument(
        "words",
        nargs="+",
        metavar="EXPR",
        help="ADDR [LEN]: an address (number, kernel symbol or expression such as "
        "init_task+0x10 or '0x600000 + 4*8') and a length: bytes, or values with --as "
        "(default 64 bytes / 16 values / 256 for str)",
    )
    @pid_option
    @argument(
        "--as",
        dest="view",
        metavar="TYPE",
        help="u8|u16|u32|u64|i8|i16|i32|i64|f32|f64 (a DataFrame), str (a C string) "
        "or a struct name (decoded, like %%dt)",
    )
    @argument("--pad", action="store_true", help="read unmapped pages as zeros")
    @argument("--browse", action="store_true", help="a hex viewer widget that pages lazily")
    @target_option
    @line_magic
    @boundary
    def peek(self, line: str = "") -> Any:
        """Read guest virtual memory: a hex view that is also `bytes`, or a typed view."""
        args = parse_argstring(self.peek, line)
        target = self._target(args)
        session = target.session
        values = self._values(args.words, session, limit=2)
        address = values[0]
        count = values[1] if len(values) > 1 else None
        if count is not None and count <= 0:
            raise UsageError(f"length must be positive, not {count}")
        process = self._process(target, args.pid)
        if args.browse:
            from vmishell.frontends.widgets import HexViewer

            def resolve(text: str) -> int:
                return self._values([text], session, limit=1)[0]

            return HexViewer(
                process, address, page=count or 256, resolve=resolve, refresh=session.refresh
            )
        view = args.view
        if view is None:
            try:
                data = process.read(address, count or DEFAULT_PEEK, pad=args.pad)
            except TranslationError as exc:
                if pid_given(line):
                    raise
                raise FrontendError(kernel_read_hint(exc, address, process)) from exc
            return Memory(data, address, args.pid)
        if view in TYPED_VIEWS:
            return self._typed(process, address, count or DEFAULT_COUNT, view, args.pad)
        if view == "str":
            return self._string(process, address, count or DEFAULT_STRING)
        from vmishell.symbols.decode import decode

        return decode(
            session.profile, process, view, address, 1, symbolize=self.symbolizer(session)
        )

    @staticmethod
    def _typed(process: Process, address: int, count: int, view: str, pad: bool) -> GuestFrame:
        import pandas as pd

        fmt, size = TYPED_VIEWS[view]
        if count > MAX_TYPED:
            raise UsageError(f"at most {MAX_TYPED} values at once")
        data = process.read(address, count * size, pad=pad)
        values = [v for (v,) in struct.iter_unpack(fmt, data)]
        df = pd.DataFrame({"address": [address + i * size for i in range(count)], "value": values})
        return guest_frame(df, hex=["address"])

    @staticmethod
    def _string(process: Process, address: int, limit: int) -> str:
        data, readable = read_window(process, address, limit)
        end = readable.find(0)
        text = data if end < 0 else data[:end]
        nul = text.find(b"\0")
        if nul >= 0:
            text = text[:nul]
        return text.decode("utf-8", "backslashreplace")

    @magic_arguments()
    @argument("words", nargs="+", metavar="EXPR", help="ADDR: address, symbol or expression")
    @pid_option
    @target_option
    @line_magic
    @boundary
    def translate(self, line: str = "") -> WalkFrame:
        """The page walk of a virtual address, level by level (a DataFrame and a diagram)."""
        args = parse_argstring(self.translate, line)
        target = self._target(args)
        address = self._values(args.words, target.session, limit=1)[0]
        process = self._process(target, args.pid)
        walk = process.walk(address)
        return WalkFrame.from_walk(walk, walk_spec(process.translator, address))

    # -- types -------------------------------------------------------------------------------
    @magic_arguments()
    @argument(
        "words",
        nargs="+",
        metavar="WORD",
        help="TYPE [ADDR]: a struct/union/enum/base type, then optionally an address "
        "(expression) to decode an instance there",
    )
    @pid_option
    @argument(
        "--depth",
        type=_int,
        default=None,
        help="nested structs to expand (layout default 0, instance default 1)",
    )
    @target_option
    @line_magic
    @boundary
    def dt(self, line: str = "") -> Any:
        """A type's layout (offset, name, type, size, bits) or, given ADDR, a decoded instance."""
        args = parse_argstring(self.dt, line)
        words = list(args.words)
        type_name = words.pop(0)
        if type_name in STRUCT_TAGS and words:
            type_name = f"{type_name} {words.pop(0)}"
        target = self._target(args)
        session = target.session
        from vmishell.symbols.decode import decode, layout

        if not words:
            import pandas as pd

            profile = session.profile
            rows = layout(profile, type_name, args.depth or 0)
            df = pd.DataFrame(
                [
                    (
                        r.offset,
                        r.name,
                        inline_type(profile, r.type),
                        r.size,
                        r.bit_position,
                        r.bit_length,
                    )
                    for r in rows
                ],
                columns=["offset", "name", "type", "size", "bit_position", "bit_length"],
            )
            return guest_frame(df, hex=["offset"])
        address = self._values(words, session, limit=1)[0]
        process = self._process(target, args.pid)
        depth = 1 if args.depth is None else args.depth
        return decode(
            session.profile, process, type_name, address, depth, symbolize=self.symbolizer(session)
        )

    # -- hunting ------------------------------------------------------------------------------
    @magic_arguments()
    @argument(
        "pattern",
        help="text (default), hex bytes with ?? wildcards (--hex), a regex (--regex) or YARA "
        "rules (--yara: rule text or a .yar file); quote it when it has spaces",
    )
    @argument("--bytes", dest="kind", action="store_const", const="bytes", help="\\xNN escapes")
    @argument("--hex", dest="kind", action="store_const", const="hex", help="'de ad ?? ef'")
    @argument("--regex", dest="kind", action="store_const", const="regex", help="a bytes regex")
    @argument("--yara", dest="kind", action="store_const", const="yara", help="YARA rules")
    @argument("--encoding", default="utf-8", help="encoding of a text pattern (utf-8)")
    @argument("-p", "--pid", type=_int, action="append", dest="pids", help="only this pid")
    @argument("--kernel", action="store_true", help="the kernel's mappings too")
    @argument("--physical", action="store_true", help="all of RAM, mapped or not")
    @argument("--max-hits", type=_int, default=None, help="stop after this many hits")
    @argument("--context", type=_int, default=16, help="bytes of context each side (16)")
    @target_option
    @line_magic
    @boundary
    def search(self, line: str = "") -> GuestFrame:
        """Find a pattern in every process's memory: one row per hit and mapping.

        Ctrl-C stops a long scan and keeps the hits so far; `Session.search`
        is the same search for scripts. IPython expands `{expr}` in a magic's
        line: write a regex quantifier as `{{3}}`.
        """
        import shlex

        from vmishell.search.cli import run_search

        try:
            words = shlex.split(line)  # patterns are quoted like in a shell: 'de ad ?? ef'
        except ValueError as exc:
            raise UsageError(f"%search: {exc}") from None
        args = self.search.parser.parse_args(words)
        return run_search(self._target(args).session, args)

    @magic_arguments()
    @argument(
        "before",
        nargs="?",
        help="a Snapshot variable or a saved snapshot file (omit to only take one)",
    )
    @argument("--save", metavar="FILE", help="save the snapshot taken now to FILE")
    @argument("--hashes", action="store_true", help="hash executable file pages too")
    @target_option
    @line_magic
    @boundary
    def diff(self, line: str = "") -> Any:
        """What changed since a snapshot: processes, uids, mappings, code pages (a DataFrame).

        `snap = %diff` (no argument) takes and returns a snapshot; `%diff snap`
        compares it with the guest now; `--save FILE` keeps the new one.
        """
        args = parse_argstring(self.diff, line)
        session = self._target(args).session
        before = None
        if args.before:
            before = (self.shell.user_ns if self.shell else {}).get(args.before, args.before)
        hashes = args.hashes or bool(getattr(before, "hashes", None))
        now = session.snapshot(hashes=hashes)
        if args.save:
            now.save(args.save)
        if before is None:
            return now
        return session.diff(before, now)

    # -- monitoring ---------------------------------------------------------------------------
    @magic_arguments()
    @argument(
        "words",
        nargs="*",
        metavar="ADDR [LEN] | FIELD ...",
        help="an address or expression and a length in bytes (8), or one or more fields "
        "and symbols: task_struct.cred->uid (with -p), jiffies, init_task.comm",
    )
    @pid_option
    @argument("--every", type=float, default=1.0, help="seconds between reads (default 1)")
    @argument("--count", type=_int, default=None, help="stop after this many reads")
    @argument(
        "--as",
        dest="view",
        metavar="TYPE",
        help="u8..u64|i8..i64|f32|f64|bytes|str, or a type: how values are compared and shown "
        "(default: the field's type; u8..u64 for ranges of 1-8 bytes, else bytes)",
    )
    @argument("--list", action="store_true", help="the watches of every target")
    @argument("--stop-all", action="store_true", help="stop every running watch")
    @target_option
    @line_magic
    @boundary
    def watch(self, line: str = "") -> Any:
        """Watch guest memory change: a live widget in Jupyter, streamed lines in a terminal.

        Returns the Watcher: `.history` is a DataFrame of every change with its
        time, `.stop()` ends it. Detaching the target stops it too. Watching
        the same address (or fields) of the same process again replaces the
        old watch; `--list` shows the watches, `--stop-all` stops them.
        """
        from vmishell.frontends.watch import Watcher

        args = parse_argstring(self.watch, line)
        if args.list:
            return self.attached.watchers_frame()
        if args.stop_all:
            stopped = self.attached.stop_all_watchers()
            print(f"stopped {stopped} watch{'es' if stopped != 1 else ''}")
            return None
        if not args.words:
            raise UsageError("%watch needs an address or a field (or --list, --stop-all)")
        target = self._target(args)
        session = target.session
        if args.every <= 0:
            raise UsageError("--every must be positive")
        if _field_words(args.words, session):
            return self._watch_fields(target, args)
        values = self._values(args.words, session, limit=2)
        address = values[0]
        length = values[1] if len(values) > 1 else 8
        view = args.view
        if view is not None and view not in VIEWS:
            length = session.profile.size_of(view) if len(values) == 1 else length
            view = "bytes"
        if view in TYPED_VIEWS and len(values) == 1:
            length = TYPED_VIEWS[view][1]
        if not 0 < length <= 64 * 1024:
            raise UsageError(f"watch length must be 1..65536 bytes, not {length}")
        process = self._process(target, args.pid)
        read_window(process, address, length)  # a bad address fails here, in one line
        watcher = Watcher(process, address, length, every=args.every, count=args.count, view=view)
        self.attached.add_watcher(target, watcher)
        if self._in_notebook():
            from IPython.display import display

            from vmishell.frontends.widgets import WatchView

            display(WatchView(watcher))
            return watcher.start()
        self._stream(watcher)
        return watcher

    def _watch_fields(self, target: Target, args: argparse.Namespace) -> Any:
        """Fields and symbols: a FieldWatch (values decoded by type, pointers followed)."""
        from IPython.display import display

        session = target.session
        w = session.watch(
            *args.words, pid=args.pid, view=args.view, every=args.every, count=args.count
        )
        self.attached.add_watcher(target, w)  # type: ignore[arg-type]
        if self._in_notebook():
            from vmishell.monitor.view import FieldWatchView

            display(FieldWatchView(w))
            return w.start()

        def emit(text: str) -> None:
            display({"text/plain": safe_text(text)}, raw=True)

        def on_sample(fw: Any, sample: Any) -> None:
            if sample.index == 0:
                emit(f"watching {fw.target} (pid {fw.pid}) every {fw.every:g} s; Ctrl-C stops")
                for name, value in fw.current.items():
                    emit(f"{_clock(sample.time)}  {name} = {value!r}")
            if sample.error:
                emit(f"{_clock(sample.time)}  read failed: {sample.error}")
            for c in sample.changes:
                emit(f"{_clock(c.time)}  {c.target}  {c.old!r} -> {c.new!r}")

        w.on_sample(on_sample)
        try:
            w.run()
        except KeyboardInterrupt:
            w.stop("interrupted")
        return w

    def _stream(self, watcher: Watcher) -> None:
        """Terminal mode: one line per change, until --count reads or Ctrl-C."""
        from IPython.display import display

        color = sys.stdout.isatty()

        def emit(text: str, highlight: str = "") -> None:
            """One line: guest-derived text made safe first, then our own colour added."""
            line = safe_text(text)
            if highlight:
                shown = safe_text(highlight)
                line += f"\x1b[1;33m{shown}\x1b[0m" if color else shown
            display({"text/plain": line}, raw=True)

        def on_sample(w: Watcher, sample: Sample) -> None:
            if sample.index == 0:
                emit(
                    f"watching {w.length} bytes at {w.address:#x} (pid {w.pid}) every "
                    f"{w.every:g} s; Ctrl-C stops\n" + hex_text(sample.data, w.address)
                )
            if sample.error:
                emit(f"{_clock(sample.time)}  read failed: {sample.error}")
            for c in sample.changes:
                small = c.size <= 8 and c.view != "bytes"
                ints = f"  ({c.row()[-2]!r} -> {c.row()[-1]!r})" if small else ""
                emit(
                    f"{_clock(c.time)}  {c.address:#x} +{c.offset:#x}  {c.old.hex(' ')} -> ",
                    c.new.hex(" ") + ints,
                )

        watcher.on_sample(on_sample)
        try:
            watcher.run()
        except KeyboardInterrupt:
            watcher.stop("interrupted")

    # -- volatility ---------------------------------------------------------------------------
    @magic_arguments()
    @target_option
    @argument("plugin", help="a Volatility3 plugin, e.g. linux.pslist.PsList or linux.pslist")
    @argument("args", nargs=argparse.REMAINDER, help="the plugin's own arguments")
    @line_magic
    @boundary
    def vol(self, line: str = "") -> GuestFrame:
        """Run a Volatility3 plugin against the current target; its rows as a DataFrame."""
        args = parse_argstring(self.vol, line)
        target = self._target(args)
        try:
            from vmishell.interop.volatility import run_plugin
        except ImportError as exc:
            missing = getattr(exc, "name", None) or str(exc)
            raise FrontendError(
                f"%vol is unavailable: cannot import {missing} "
                "(vmishell.interop.volatility and Volatility3 must be installed)"
            ) from exc
        df = run_plugin(target.session, args.plugin, list(args.args))
        hex_cols = [c for c in df.columns if any(k in str(c).upper() for k in _HEXISH)]
        return guest_frame(df, hex=hex_cols)


def empty_columns(df: Any) -> list[Any]:
    """Columns with no value on any row (all None/NaN or empty text); none of an empty frame."""
    if not len(df):
        return []
    out = []
    for col in df.columns:
        values = df[col]
        if values.dtype == object:
            values = values.where(values.astype(str) != "")  # "" counts as missing
        if values.isna().all():
            out.append(col)
    return out


#: x86-64 (4- and 5-level): user addresses are the canonical lower half; i386: below 3 GiB.
I386_USER_END = 0xC0000000


def walk_spec(translator: Any, address: int) -> Any:
    """What labels a walk diagram's levels: the x86 mode's spec, or on AArch64 the half
    (TTBR0 or TTBR1) whose tables translate `address`."""
    half_of = getattr(getattr(translator, "geometry", None), "half_of", None)
    if not hasattr(translator, "mode") and callable(half_of):
        return half_of(address)
    mode = getattr(translator, "mode", None)
    return getattr(mode, "spec", None)


def is_user_address(process: Any, address: int) -> bool | None:
    """Whether `address` lies in the user half of the address space (None: unknown mode)."""
    if hasattr(getattr(process, "translator", None), "halves"):
        return not address >> 55 & 1  # AArch64: bit 55 picks TTBR0 (user) or TTBR1
    try:
        spec = process.translator.mode.spec
    except AttributeError:
        return None
    if spec.canonical:
        return address < 1 << (spec.address_bits - 1)
    return address < I386_USER_END


def kernel_read_hint(exc: VmiError, address: int, process: Any) -> str:
    """A failed read without -p: say it was the kernel's address space, and what to do."""
    text = f"{exc} (read in pid 0, the kernel's address space"
    if is_user_address(process, address) is not False:
        text += f"; {address:#x} is a user address: give -p PID, %ps lists the pids"
    return text + ")"


def pid_given(line: str) -> bool:
    """Whether a magic's line names a pid with -p/--pid (its default 0 is the kernel)."""
    import shlex

    try:
        words = shlex.split(line)
    except ValueError:
        words = line.split()
    return any(
        w in ("-p", "--pid") or w.startswith("--pid=") or (w.startswith("-p") and w[2:3].isdigit())
        for w in words
    )


def _field_words(words: list[str], session: Session) -> bool:
    """Whether %watch's words name fields or typed symbols rather than ADDR [LEN]."""
    import re

    profile = session.profile
    for word in words:
        m = re.match(r"^([A-Za-z_]\w*)(\.|->)", word)
        if m is None:
            continue
        if profile.has_symbol(m[1]) or profile.has_type(m[1]):
            return True
    return len(words) > 2


def _clock(when: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(when)) + f".{int(when * 1000) % 1000:03d}"


# -- the extension ------------------------------------------------------------------------


def _tb_magic(ip: InteractiveShell, original: Callable[..., Any] | None) -> Callable[..., Any]:
    """%tb that prints a vmishell error's full traceback (IPython's asks it for one line)."""

    def tb(line: str = "") -> None:
        try:
            etype, value, tb_ = ip._get_exc_info()
        except ValueError:
            etype = value = tb_ = None
        if not isinstance(value, VmiError):
            if original is not None:
                return original(line)
            return None
        itb = ip.InteractiveTB
        mode = itb.mode
        try:
            if line.strip():
                itb.set_mode(mode=line.strip().capitalize())
            stb = itb.structured_traceback(etype, value, tb_)
        finally:
            itb.set_mode(mode=mode)
        ip._showtraceback(etype, value, stb)
        return None

    tb.__doc__ = (getattr(original, "__doc__", None) or "Print the last traceback.") + (
        "\n\nvmishell: its errors show as one line; here they are printed in full."
    )
    tb._vmishell_original = original  # type: ignore[attr-defined]
    return tb


def load(ip: InteractiveShell) -> VmiMagics:
    """Register the magics, the completer and %tb on `ip` (what %load_ext vmishell does)."""
    from vmishell.frontends.completion import MagicCompleter, make_matcher

    manager = ip.magics_manager
    assert manager is not None
    magics = VmiMagics(ip)
    ip.register_magics(magics)
    from vmishell.fleet.magic import load as load_fleet

    load_fleet(ip)  # %fleet: its own Magics (it holds a Dask client, not attached targets)
    options = {
        name: sorted(o for a in func.parser._actions for o in a.option_strings)
        for name, func in magics.magics["line"].items()
        if hasattr(func, "parser")
    }
    magics.matcher = make_matcher(MagicCompleter(magics.attached, options=options))
    ip.Completer.custom_matchers.append(magics.matcher)
    original = _resolved_line_magic(manager, "tb")
    if not hasattr(original, "_vmishell_original"):
        manager.register_function(_tb_magic(ip, original), "line", "tb")
    return magics


def _resolved_line_magic(manager: Any, name: str) -> Callable[..., Any] | None:
    """The real implementation of a line magic, loading it first if IPython made it lazy.

    IPython 9 registers its own magics as placeholders that import their
    class on first use; wrapping a placeholder would make it resolve to the
    wrapper itself.
    """
    load_lazy = getattr(manager, "load_lazy", None)
    if load_lazy is not None:
        load_lazy(name, "line")
    return manager.magics["line"].get(name)


def unload(ip: InteractiveShell) -> None:
    """Undo `load`: detach every target (stopping watches), remove magics and hooks."""
    manager = ip.magics_manager
    assert manager is not None
    fleet = manager.registry.pop("FleetMagics", None)
    if fleet is not None:
        fleet.close()
        manager.magics["line"].pop("fleet", None)
    magics = manager.registry.pop(VmiMagics.__name__, None)
    if isinstance(magics, VmiMagics):
        magics.attached.detach_all()
        for kind, table in magics.magics.items():
            for name in table:
                manager.magics[kind].pop(name, None)
        if magics.matcher in ip.Completer.custom_matchers:
            ip.Completer.custom_matchers.remove(magics.matcher)
    tb = manager.magics["line"].get("tb")
    if tb is not None and hasattr(tb, "_vmishell_original"):
        original = tb._vmishell_original
        if original is not None:
            manager.magics["line"]["tb"] = original
        else:
            manager.magics["line"].pop("tb", None)
        if "tb" in vars(manager.user_magics):
            delattr(manager.user_magics, "tb")


__all__ = ["FrontendError", "VmiMagics", "load", "unload"]
