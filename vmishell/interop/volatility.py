"""Volatility3 on vmishell targets: any source as a data layer, plugins as DataFrames.

`VmishellLayer` is a Volatility3 `DataLayerInterface` over a vmishell
source (a live lab guest's RAM file, a LibVMI domain, a raw/ELF/LiME image):
it reads through `source.read`, knows the source's RAM ranges (holes are
invalid, scans skip them) and so lets Volatility's own automagic stack its
Intel and Linux layers on a *live* guest, which Volatility cannot open
itself. `run_plugin(session, "linux.pslist")` runs a plugin that way and
returns its TreeGrid as a pandas DataFrame.

Volatility finds a Linux ISF by the banner it sees in memory, through an
identifier cache built from its symbol directories. Two ISFs with the same
banner (a shipped profile and one carved from the same kernel), or a link
whose file is gone, would make that lookup pick either, so each profile file
gets a directory of its own, `<vmishell cache>/volatility3/by-profile/KEY/`,
holding only a link to it under `symbols/linux/` and its own identifier
cache; a run points Volatility at that directory alone. Volatility's other
caches (which it otherwise creates under ~/.cache/volatility3 on import) stay
under `<vmishell cache>/volatility3`.

Volatility's layers cache translations, so a run on a live guest sees the
guest as it was while the plugin ran; wrap the call in `session.paused()`
for a consistent view.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import os
import sys
import threading
import weakref
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from vmishell.errors import ProfileError, VmiError
from vmishell.sources.base import PhysicalSource

if TYPE_CHECKING:
    import pandas as pd

    from vmishell.session import Session

_SOURCES: weakref.WeakValueDictionary[int, PhysicalSource] = weakref.WeakValueDictionary()
_IDS = itertools.count(1)
_SETUP_LOCK = threading.Lock()
#: Volatility's symbol path and cache location are process-wide: one run at a time.
_SYMBOLS_LOCK = threading.Lock()
_SET_UP: Path | None = None
#: The DataLayerInterface subclass, made on first use (Volatility3 is imported lazily).
VmishellLayer: Any


class VolatilityError(VmiError):
    """A Volatility3 plugin could not be set up or failed while running."""


def cache_dir() -> Path:
    """vmishell's directory for Volatility3's caches and symbol links."""
    from vmishell.symbols.finder import default_cache_dir

    return default_cache_dir() / "volatility3"


def _setup() -> Path:
    """Import Volatility3 with its caches under vmishell's cache (once per process)."""
    global _SET_UP
    with _SETUP_LOCK:
        if _SET_UP is not None:
            return _SET_UP
        root = cache_dir()
        root.mkdir(parents=True, exist_ok=True)
        if "volatility3" not in sys.modules:
            # Its constants module creates $XDG_CACHE_HOME/volatility3 when imported.
            saved = os.environ.get("XDG_CACHE_HOME")
            os.environ["XDG_CACHE_HOME"] = str(root.parent)
            try:
                import volatility3.framework.constants
            finally:
                if saved is None:
                    os.environ.pop("XDG_CACHE_HOME", None)
                else:
                    os.environ["XDG_CACHE_HOME"] = saved
        import volatility3
        import volatility3.symbols
        from volatility3 import framework
        from volatility3.framework import constants

        constants.CACHE_PATH = str(root)
        constants.OFFLINE = True  # never fetch symbols from the network
        package = os.path.dirname(volatility3.__file__)
        # Each run adds its profile's own directory in front (see `_symbols_of`).
        volatility3.symbols.__path__[:] = [
            p for p in volatility3.symbols.__path__ if p.startswith(package)
        ]
        framework.require_interface_version(2, 0, 0)
        import volatility3.framework.automagic
        import volatility3.framework.layers

        framework.import_files(volatility3.framework.layers, True)
        framework.import_files(volatility3.framework.automagic, True)
        _SET_UP = root
        return root


def _layer_class() -> type:
    """The DataLayerInterface subclass, defined once Volatility3 is importable."""
    global VmishellLayer
    if "VmishellLayer" in globals():
        return VmishellLayer
    _setup()
    from volatility3.framework import exceptions, interfaces
    from volatility3.framework.configuration import requirements

    class _VmishellLayer(interfaces.layers.DataLayerInterface):
        """Guest-physical memory of a vmishell source, as a Volatility3 data layer.

        Its configuration holds only `source_id`, a key into this process's
        registry of sources (see `register_source`), so Volatility can build
        it again from a configuration within the same process.
        """

        _direct_metadata: ClassVar[dict[str, str]] = {"architecture": "Unknown", "os": "Unknown"}

        def __init__(self, context: Any, config_path: str, name: str, metadata: Any = None):
            super().__init__(context, config_path, name, metadata)
            sid = self.config["source_id"]
            source = _SOURCES.get(sid)
            if source is None:
                raise exceptions.LayerException(name, f"no vmishell source registered as {sid}")
            self._source = source
            self._ranges = [(r.start, r.end) for r in source.ranges()]
            self._max = max((end for _, end in self._ranges), default=1) - 1

        @classmethod
        def get_requirements(cls) -> list[Any]:
            return [
                requirements.IntRequirement(
                    name="source_id", description="vmishell source registry key", optional=False
                )
            ]

        @property
        def maximum_address(self) -> int:
            return self._max

        @property
        def minimum_address(self) -> int:
            return 0

        def is_valid(self, offset: int, length: int = 1) -> bool:
            return self._source.is_valid(offset, max(length, 1))

        def mapping(
            self, offset: int, length: int, ignore_errors: bool = False
        ) -> Iterable[tuple[int, int, int, int, str]]:
            """RAM runs inside [offset, offset+length), mapped onto themselves."""
            end = offset + length
            for start, stop in self._ranges:
                lo, hi = max(offset, start), min(end, stop)
                if lo < hi:
                    yield lo, hi - lo, lo, hi - lo, self.name
                elif not ignore_errors and start <= offset < stop:
                    break

        def read(self, offset: int, length: int, pad: bool = False) -> bytes:
            try:
                if pad:
                    return self._source.read_padded(offset, length)
                return self._source.read(offset, length)
            except VmiError as exc:
                bad = getattr(exc, "paddr", offset)
                raise exceptions.InvalidAddressException(self.name, bad, str(exc)) from None

        def write(self, offset: int, data: bytes) -> None:
            try:
                self._source.write(offset, data)
            except VmiError as exc:
                raise exceptions.InvalidAddressException(self.name, offset, str(exc)) from None

        def scan(
            self, context: Any, scanner: Any, progress_callback: Any = None, sections: Any = None
        ) -> Any:
            """Scan RAM only: a hole inside a chunk would otherwise drop the whole chunk."""
            if sections is None:
                sections = [(start, stop - start) for start, stop in self._ranges]
            return super().scan(context, scanner, progress_callback, sections)

    _VmishellLayer.__name__ = _VmishellLayer.__qualname__ = "VmishellLayer"
    _VmishellLayer.__module__ = __name__
    VmishellLayer = _VmishellLayer
    return _VmishellLayer


def register_source(source: PhysicalSource) -> int:
    """Make `source` reachable from a Volatility configuration; returns its key."""
    for sid, known in list(_SOURCES.items()):
        if known is source:
            return sid
    sid = next(_IDS)
    _SOURCES[sid] = source
    return sid


def add_source_layer(context: Any, source: PhysicalSource, name: str | None = None) -> str:
    """Add `source` to a Volatility3 context as a data layer; returns the layer's name."""
    cls = _layer_class()
    name = name or context.layers.free_layer_name("VmishellLayer")
    config_path = f"vmishell.{name}"
    context.config[f"{config_path}.source_id"] = register_source(source)
    context.add_layer(cls(context, config_path, name))
    return str(name)


def _profile_path(session: Session) -> Path:
    """The ISF file of the session's profile (Volatility reads ISF, not vmishell's cache)."""
    profile = session.profile
    explicit = getattr(profile, "path", None)
    if explicit:
        return Path(explicit)
    from vmishell.symbols.finder import candidate_profiles
    from vmishell.symbols.profile import profile_name

    for path in candidate_profiles():
        if profile_name(path) == profile.name:
            return path
    raise ProfileError(
        f"cannot find the ISF file of profile {profile.name} for Volatility3 "
        "(put it in a profile directory, e.g. $VMISHELL_PROFILE_PATH)"
    )


def profile_symbols_dir(root: Path, isf: Path) -> Path:
    """The directory that shows Volatility the ISF `isf` and nothing else.

    Keyed by the file's resolved path, size and mtime, so a rebuilt file gets
    a fresh identifier cache rather than the stale banner of its former self.
    """
    target = isf.resolve()
    stat = target.stat()
    key = hashlib.sha256(f"{target}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()).hexdigest()
    directory = root / "by-profile" / key[:20]
    linux = directory / "symbols" / "linux"
    link = linux / isf.name
    if not (link.is_symlink() and link.resolve() == target):
        linux.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            link.unlink()
        link.symlink_to(target)
    return directory


@contextlib.contextmanager
def _symbols_of(directory: Path) -> Iterator[None]:
    """Point Volatility's symbol search and identifier cache at `directory` for one run."""
    import volatility3.symbols
    from volatility3.framework import constants
    from volatility3.framework.automagic import symbol_cache

    saved_path = list(volatility3.symbols.__path__)
    saved_cache = constants.CACHE_PATH
    package = os.path.dirname(os.path.dirname(volatility3.symbols.__file__))
    volatility3.symbols.__path__[:] = [
        str(directory / "symbols"),
        *(p for p in saved_path if p.startswith(package)),
    ]
    constants.CACHE_PATH = str(directory)
    try:
        with _keeps_url_opener():
            symbol_cache.SqliteCache(
                os.path.join(constants.CACHE_PATH, constants.IDENTIFIERS_FILENAME)
            ).update()
        yield
    finally:
        volatility3.symbols.__path__[:] = saved_path
        constants.CACHE_PATH = saved_cache


def find_plugin(name: str) -> Any:
    """A Volatility3 plugin class by name: "linux.pslist" or "linux.pslist.PsList"."""
    _setup()
    import volatility3.plugins
    from volatility3 import framework

    framework.import_files(volatility3.plugins, True)
    plugins = framework.list_plugins()
    if name in plugins:
        return plugins[name]
    matches = [k for k in plugins if k.lower().startswith(name.lower() + ".")]
    if len(matches) == 1:
        return plugins[matches[0]]
    if matches:
        raise VolatilityError(f"{name} is ambiguous: {', '.join(sorted(matches))}")
    raise VolatilityError(f"no Volatility3 plugin named {name}")


def _parse_args(plugin: str, cls: Any, args: Sequence[str]) -> dict[str, Any]:
    """Plugin options from command-line style args (`--pid 1 2`, `--dump`)."""
    from volatility3.framework.configuration import requirements as reqs
    from volatility3.framework.interfaces.configuration import SimpleTypeRequirement

    kinds = (SimpleTypeRequirement, reqs.ListRequirement, reqs.ChoiceRequirement)
    options = {r.name: r for r in cls.get_requirements() if isinstance(r, kinds)}
    values: dict[str, Any] = {}
    items = list(args)
    i = 0
    while i < len(items):
        flag = items[i]
        key = flag.lstrip("-").replace("-", "_")
        req = options.get(key)
        if not flag.startswith("--") or req is None:
            known = ", ".join(f"--{k.replace('_', '-')}" for k in sorted(options)) or "none"
            raise VolatilityError(f"{plugin}: unknown option {flag!r} (options: {known})")
        i += 1
        if isinstance(req, reqs.BooleanRequirement):
            values[key] = True
            continue
        taken = []
        while i < len(items) and not items[i].startswith("--"):
            taken.append(items[i])
            i += 1
        if not taken:
            raise VolatilityError(f"{plugin}: option {flag} needs a value")
        try:
            if isinstance(req, reqs.ListRequirement):
                element = req.element_type
                values[key] = [int(v, 0) if element is int else element(v) for v in taken]
            elif isinstance(req, reqs.IntRequirement):
                values[key] = int(taken[0], 0)
            else:
                values[key] = taken[0]
        except ValueError as exc:
            raise VolatilityError(f"{plugin}: bad value for {flag}: {exc}") from None
    return values


def _cell(value: Any) -> Any:
    """A TreeGrid value as plain Python: absent values None, hex hints ints."""
    from volatility3.framework.interfaces.renderers import BaseAbsentValue

    if isinstance(value, BaseAbsentValue):
        return None
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, bytes):
        return bytes(value)
    if isinstance(value, str):
        return str(value)
    return value


def treegrid_frame(grid: Any) -> pd.DataFrame:
    """A Volatility3 TreeGrid as a DataFrame (a `_depth` column when rows nest)."""
    import pandas as pd

    columns = [c.name for c in grid.columns]
    rows: list[list[Any]] = []
    depths: list[int] = []

    def visit(node: Any, acc: Any) -> Any:
        rows.append([_cell(v) for v in node.values])
        depths.append(node.path_depth - 1)
        return acc

    grid.populate(visit, None)
    frame = pd.DataFrame(rows, columns=columns)
    if any(depths):
        frame.insert(0, "_depth", depths)
    return frame


def run_plugin(session: Session, plugin: str, args: Sequence[str] = ()) -> pd.DataFrame:
    """Run a Volatility3 plugin (e.g. "linux.pslist") on the session's target.

    The session's source is the bottom layer and the session's profile the
    symbol table; Volatility's automagic finds the kernel (banner, KASLR,
    page tables) on its own. `args` are the plugin's options as on
    Volatility's command line. Any failure is a VolatilityError naming the
    plugin. Volatility installs its own (offline) process-wide URL opener;
    the caller's is put back afterwards, so a notebook's HTTP keeps working.
    """
    with _keeps_url_opener():
        return _run_plugin(session, plugin, args)


@contextlib.contextmanager
def _keeps_url_opener() -> Iterator[None]:
    """Put back the process's urllib opener: Volatility's ResourceAccessor installs its own
    (offline) one process-wide whenever it opens a file, which breaks the caller's HTTP."""
    import urllib.request

    caller_opener = urllib.request._opener  # type: ignore[attr-defined]
    try:
        yield
    finally:
        urllib.request.install_opener(caller_opener)  # None restores the default


def _run_plugin(session: Session, plugin: str, args: Sequence[str]) -> pd.DataFrame:
    root = _setup()
    cls = find_plugin(plugin)
    options = _parse_args(plugin, cls, args)
    try:
        symbols = profile_symbols_dir(root, _profile_path(session))
    except OSError as exc:
        raise VolatilityError(f"{plugin}: cannot give Volatility3 the profile: {exc}") from exc
    with _SYMBOLS_LOCK, _symbols_of(symbols):
        return _construct_and_run(session, plugin, cls, options)


def _construct_and_run(
    session: Session, plugin: str, cls: Any, options: dict[str, Any]
) -> pd.DataFrame:
    from volatility3 import framework
    from volatility3.framework import automagic, contexts, interfaces, plugins
    from volatility3.framework.automagic import stacker
    from volatility3.framework.configuration import requirements as reqs

    try:
        ctx = contexts.Context()
        base = add_source_layer(ctx, session.source)
        stackers = [
            s
            for s in sorted(
                framework.class_subclasses(interfaces.automagic.StackerLayerInterface),
                key=lambda s: s.stack_order,
            )
            if s.__name__ in stacker.choose_os_stackers(cls)
        ]
        layers = stacker.LayerStacker.stack_layer(ctx, base, stackers)
        if len(layers) < 2:
            raise VolatilityError(
                f"{plugin}: Volatility3 found no kernel it knows in {session.source.description} "
                f"(profile {session.profile.name})"
            )
        config_path = f"plugins.{cls.__name__}"
        for key, value in options.items():
            ctx.config[f"{config_path}.{key}"] = value
        tree = reqs.MultiRequirement(name=cls.__name__)
        for req in cls.get_requirements():
            tree.add_requirement(req)
        found = stacker.LayerStacker.find_suitable_requirements(ctx, "plugins", tree, layers)
        if found is None:
            raise VolatilityError(f"{plugin} takes no memory layer that vmishell can give it")
        path, top = found
        # As Volatility's own stacker does: the layer's settings go under the requirement.
        ctx.config.merge(path, ctx.layers[top].build_configuration())
        magics = [
            m
            for m in automagic.choose_automagic(automagic.available(ctx), cls)
            if not isinstance(m, stacker.LayerStacker)
        ]
        constructed = plugins.construct_plugin(ctx, magics, cls, "plugins", None, _file_handler())
        return treegrid_frame(constructed.run())
    except VolatilityError:
        raise
    except VmiError as exc:
        raise VolatilityError(f"{plugin}: {exc}") from exc
    except Exception as exc:
        missing = getattr(exc, "unsatisfied", None)  # UnsatisfiedException says what in a dict
        what = f"unsatisfied {', '.join(missing)}" if missing else str(exc)
        raise VolatilityError(f"{plugin}: {type(exc).__name__}: {what}") from exc


def __getattr__(name: str) -> Any:
    if name == "VmishellLayer":
        return _layer_class()
    raise AttributeError(name)


def _file_handler() -> type:
    """A FileHandlerInterface that keeps a plugin's output files in memory and drops them."""
    if "_NoFiles" in globals():
        return globals()["_NoFiles"]
    _setup()
    import io

    from volatility3.framework import interfaces

    class NoFiles(interfaces.plugins.FileHandlerInterface, io.BytesIO):
        """Keeps a plugin's output files in memory and drops them (no dumps on disk)."""

        def __init__(self, filename: str) -> None:
            interfaces.plugins.FileHandlerInterface.__init__(self, filename)
            io.BytesIO.__init__(self)

        def close(self) -> None:
            io.BytesIO.close(self)

    globals()["_NoFiles"] = NoFiles
    return NoFiles


__all__ = [
    "VolatilityError",
    "add_source_layer",
    "cache_dir",
    "find_plugin",
    "register_source",
    "run_plugin",
    "treegrid_frame",
]
