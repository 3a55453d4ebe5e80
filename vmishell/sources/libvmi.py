"""Guest-physical memory through LibVMI: live Xen domains, KVM guests, raw dumps.

vmishell uses LibVMI only as a memory and vCPU driver, in *partial* init
mode: no OS profile, no /etc/libvmi.conf. vmishell does its own page walks and
Linux work, so a guest LibVMI's OS layer cannot handle (the PyPI wheel bundles
an older LibVMI whose KASLR search fails on current kernels) still works.

Drivers, as the `libvmi` PyPI wheel (3.7.1) ships them:

- **Xen** (`xen:NAME`, `xen:ID`): compiled in; it loads libxenctrl and
  libxenstore at run time, so it needs dom0 and root. HVM and PVH guests are
  supported: their page tables and CR3 hold guest-physical frames, which is
  what vmishell walks. **PV guests are refused**: their page tables (and CR3)
  hold *machine* frames and LibVMI's physical reads take machine frames, so
  there is no guest-physical RAM to scan for the kernel, and vmishell's
  kernel location (physical = virtual - __START_KERNEL_map + phys_base) does
  not hold. Nothing of Xen runs on the machines vmishell is tested on; the
  error mapping below follows LibVMI's source and is unit-tested with fakes.
- **KVM** (`kvm:NAME`): not compiled into the wheel (it needs a KVMi-patched
  host). `kvm:NAME` gives a clear error there and works where a LibVMI with
  the KVM driver is installed in its place.
- **file** (`libvmi-file:PATH`): a raw dump (file offset = physical address).
  It has no vCPU state, so `registers()` raises RegistersUnavailable, as for
  any raw image.

LibVMI's own VA translation needs a page mode, which partial init never sets
for files; `translate()` therefore calls `vmi_nested_pagetable_lookup` (an
exported LibVMI function that takes the page mode explicitly) so that tests
can compare LibVMI's page walk with vmishell's for the same table. pid->dtb
needs LibVMI's OS layer and is not offered.
"""

from __future__ import annotations

import contextlib
import glob
import os
import sys
import tempfile
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from vmishell.errors import PhysicalReadError, RegistersUnavailable, SourceError, TranslationError
from vmishell.sources.base import PhysicalSource, PhysRange, Registers

INSTALL_HINT = "pip install 'vmishell[libvmi]'"
FOUR_GIB = 1 << 32
_EFER_LMA = 1 << 10
#: vmishell paging-mode names -> LibVMI page_mode_t names (LibVMI 0.15 has no 5-level mode).
_PAGE_MODES = {"legacy": "VMI_PM_LEGACY", "pae": "VMI_PM_PAE", "level4": "VMI_PM_IA32E"}
#: Registers read for display besides those translation needs (LibVMI reg_t names).
_EXTRA_REGS = ("RIP", "RSP", "RFLAGS", "CR2")
_MODES = ("xen", "kvm", "file")
#: Put in vmi_init's error slot first: LibVMI leaves it alone when the driver is not built in.
_NO_ERROR_SET = 99


class LibvmiUnavailable(SourceError):
    """The libvmi Python package (and its bundled library) cannot be imported."""


def _import_libvmi() -> tuple[Any, Any]:
    """(ffi, lib) of the libvmi wheel's cffi module, or a one-line error saying how to get it."""
    try:
        from _libvmi import ffi, lib  # type: ignore[import-not-found,unused-ignore]
    except ImportError as exc:
        raise LibvmiUnavailable(f"LibVMI is not installed ({exc}): {INSTALL_HINT}") from None
    return ffi, lib


def libvmi_available() -> bool:
    """Whether `LibvmiSource` can be used on this machine (the wheel imports)."""
    try:
        _import_libvmi()
    except LibvmiUnavailable:
        return False
    return True


class _Extras:
    """LibVMI functions the wheel's cffi declarations lack, bound from its shared library.

    Exported by the bundled libvmi.so (0.15) but not declared by the Python
    bindings; looked up lazily and each is optional.
    """

    _lock = threading.Lock()
    _instance: _Extras | None = None

    def __init__(self) -> None:
        import cffi
        import libvmi  # type: ignore[import-not-found,unused-ignore]

        self.ffi = cffi.FFI()
        self.ffi.cdef(
            "int vmi_nested_pagetable_lookup(void *vmi, uint64_t npt, int npm, uint64_t pt,"
            " int pm, uint64_t vaddr, uint64_t *paddr, uint64_t *naddr);\n"
            "int xen_is_pv(void *vmi);"
        )
        libs = glob.glob(
            os.path.join(os.path.dirname(libvmi.__file__), os.pardir, "libvmi.libs", "libvmi*.so*")
        )
        self.lib = self.ffi.dlopen(libs[0] if libs else "libvmi.so.0")

    @classmethod
    def get(cls) -> _Extras:
        with cls._lock:
            if cls._instance is None:
                cls._instance = cls()
            return cls._instance

    def has(self, name: str) -> bool:
        try:
            getattr(self.lib, name)
        except AttributeError:
            return False
        return True


_LIBC: Any = None


def _flush_c_streams() -> None:
    """fflush(NULL): push out what C stdio buffered (LibVMI prints through it)."""
    global _LIBC
    if _LIBC is None:
        import cffi

        ffi = cffi.FFI()
        ffi.cdef("int fflush(void *stream);")
        _LIBC = (ffi, ffi.dlopen(None))
    ffi, libc = _LIBC
    libc.fflush(ffi.NULL)


@contextmanager
def _c_output() -> Iterator[list[str]]:
    """Capture what LibVMI prints on fds 1 and 2 (its only way of saying why), as lines.

    LibVMI reports the reason for a failure with `errprint` (on stdout in the
    wheel's build) and returns a bare status code, so the reason is collected
    here and put into vmishell's error message instead of leaking onto the
    terminal or into a notebook's log.
    """
    lines: list[str] = []
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    _flush_c_streams()
    try:
        saved = [os.dup(1), os.dup(2)]
    except OSError:
        yield lines
        return
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 1)
        os.dup2(tmp.fileno(), 2)
        try:
            yield lines
        finally:
            _flush_c_streams()
            for fd, copy in zip((1, 2), saved, strict=True):
                os.dup2(copy, fd)
                os.close(copy)
            tmp.seek(0)
            text = tmp.read().decode("utf-8", "replace")
            lines.extend(ln.strip() for ln in text.splitlines() if ln.strip())


def _reason(lines: list[str]) -> str:
    """LibVMI's own last words, shortened to fit a one-line error."""
    msgs = [ln.removeprefix("VMI_ERROR:").strip() for ln in lines]
    return "; ".join(dict.fromkeys(m for m in msgs if m))[:300]


def _check_dump(path: Path) -> None:
    """Refuse what LibVMI's file driver would mishandle, before it sees it.

    LibVMI 0.15 frees its file state twice when fopen fails (a segfault), and
    reads any file as a raw dump, so a missing file, a directory, an empty
    file or an ELF/LiME image is caught here with a clear message.
    """
    try:
        st = path.stat()
        with path.open("rb") as f:
            magic = f.read(4)
    except FileNotFoundError:
        raise SourceError(f"no such memory dump: {path}") from None
    except PermissionError:
        raise SourceError(f"no permission to read {path} (try as root)") from None
    except OSError as exc:
        raise SourceError(f"cannot open {path}: {exc.strerror}") from None
    if not path.is_file():
        raise SourceError(f"{path} is not a regular file")
    if st.st_size == 0:
        raise SourceError(f"{path} is empty")
    kinds = {b"\x7fELF": "an ELF core", b"EMiL": "a LiME image"}
    if magic in kinds:
        raise SourceError(
            f"{path} is {kinds[magic]}: LibVMI's file driver reads raw dumps only "
            "(open it with Session.image instead)"
        )


def _check_xen_host() -> None:
    """Say plainly when this cannot be a Xen dom0 or lacks root, before LibVMI guesses."""
    if not (Path("/proc/xen").exists() or Path("/dev/xen").exists()):
        raise SourceError(
            "not a Xen host (no /proc/xen or /dev/xen): run vmishell in dom0 to attach to a DomU"
        )
    if os.geteuid() != 0:
        raise SourceError("no permission: attaching to a Xen domain needs root in dom0")


def xen_ram_ranges(memsize: int, max_paddr: int) -> list[PhysRange]:
    """RAM ranges of an HVM guest from LibVMI's two sizes (allocated RAM, highest address).

    LibVMI offers no memory map. When the highest address exceeds the RAM
    size the guest has RAM above 4 GiB (hvmloader moved what did not fit
    below the MMIO hole there): low RAM is what remains below the hole. Pages
    inside these ranges that Xen never populated (e.g. the VGA hole) still
    fail to read, as PhysicalReadError.
    """
    if max_paddr <= 0:
        return [PhysRange(0, memsize)] if memsize > 0 else []
    if max_paddr <= FOUR_GIB or max_paddr <= memsize:
        return [PhysRange(0, max_paddr)]
    high = max_paddr - FOUR_GIB
    low = max(0, min(memsize - high, FOUR_GIB))
    ranges = [PhysRange(0, low)] if low else []
    return [*ranges, PhysRange(FOUR_GIB, max_paddr)]


class LibvmiSource(PhysicalSource):
    """Physical memory and vCPU state of one target through LibVMI (partial init).

    `mode` is "xen" (target: domain name, or id as int / digits), "kvm"
    (domain name) or "file" (a raw dump path). Live targets bump `generation`
    on `refresh()` and drop LibVMI's own page caches with it.
    """

    def __init__(self, target: str | int | os.PathLike[str], mode: str = "xen") -> None:
        super().__init__()
        if mode not in _MODES:
            raise SourceError(f"unknown LibVMI mode {mode!r} (one of {', '.join(_MODES)})")
        self._ffi, self._lib = _import_libvmi()
        self.mode = mode
        self.live = mode != "file"
        self._lock = threading.RLock()
        self._vmi: Any = None
        if mode == "file":
            if isinstance(target, int):
                raise SourceError(f"LibVMI's file driver needs a path, not {target!r}")
            path = Path(os.fspath(target))
            _check_dump(path)
            self.target: str | int = str(path)
            self.description = f"LibVMI file {path}"
            # LibVMI maps the dump: watch its size as vmishell's own file sources do.
            self._dump_size = path.stat().st_size
        else:
            text = os.fspath(target) if not isinstance(target, int) else str(target)
            self.target = int(text) if text.isdigit() else text
            self.description = f"LibVMI {mode} domain {self.target}"
            if mode == "xen":
                _check_xen_host()
        self._vmi = self._init()
        self._alloc = self._ffi.new_allocator(should_clear_after_alloc=False)
        try:
            self._ranges = self._find_ranges()
            if mode == "xen":
                self._refuse_pv()
        except BaseException:
            self.close()
            raise

    # -- attaching -------------------------------------------------------------------
    @classmethod
    def xen(cls, domain: str | int) -> LibvmiSource:
        """A running Xen HVM/PVH domain, by name or id (needs dom0 and root)."""
        return cls(domain, "xen")

    @classmethod
    def kvm(cls, domain: str) -> LibvmiSource:
        """A KVM guest, by libvirt name (needs a LibVMI built with its KVM driver)."""
        return cls(domain, "kvm")

    @classmethod
    def file(cls, path: str | os.PathLike[str]) -> LibvmiSource:
        """A raw memory dump read through LibVMI's file driver."""
        return cls(path, "file")

    def _init(self) -> Any:
        ffi, lib = self._ffi, self._lib
        drv = {"xen": lib.VMI_XEN, "kvm": lib.VMI_KVM, "file": lib.VMI_FILE}[self.mode]
        if isinstance(self.target, int):
            domain = ffi.new("uint64_t *", self.target)
            flags = lib.VMI_INIT_DOMAINID
        else:
            domain = ffi.new("char[]", self.target.encode())
            flags = lib.VMI_INIT_DOMAINNAME
        handle = ffi.new("vmi_instance_t *")
        error = ffi.new("vmi_init_error_t *", _NO_ERROR_SET)
        with _c_output() as said:
            status = lib.vmi_init(handle, drv, domain, flags, ffi.NULL, error)
        if status != lib.VMI_SUCCESS:
            raise self._init_error(int(error[0]), _reason(said))
        return handle[0]

    def _init_error(self, code: int, said: str) -> SourceError:
        """One vmishell error for LibVMI's (status, vmi_init_error_t, stderr text)."""
        lib = self._lib
        why = f" (LibVMI: {said})" if said else ""
        what = self.description
        if code in (_NO_ERROR_SET, lib.VMI_INIT_ERROR_NONE) or "mode is not available" in said:
            return SourceError(
                f"this LibVMI build has no {self.mode.upper()} driver; install a LibVMI built "
                f"with it to attach to {what}"
            )
        if code == lib.VMI_INIT_ERROR_VM_NOT_FOUND:
            return SourceError(f"no such domain: {self.target!r} is not running{why}")
        if code == lib.VMI_INIT_ERROR_DRIVER:
            if self.mode == "xen":
                if "libxenctrl" in said or "libxenstore" in said or "xs_domain_open" in said:
                    return SourceError(
                        f"cannot reach Xen for {what}: its libraries or xenstore are unavailable "
                        f"(run in dom0 as root with the Xen tools installed){why}"
                    )
                if "domain info" in said or "max gpfn" in said or not said:
                    return SourceError(
                        f"{what} is shutting down or gone (Xen reports no memory for it){why}"
                    )
            if "root" in said or "ermission" in said:
                return SourceError(f"no permission to open {what}: run as root{why}")
            return SourceError(f"LibVMI's {self.mode} driver could not open {what}{why}")
        return SourceError(f"LibVMI could not open {what} (init error {code}){why}")

    def _find_ranges(self) -> list[PhysRange]:
        memsize = int(self._lib.vmi_get_memsize(self._vmi))
        max_paddr = int(self._lib.vmi_get_max_physical_address(self._vmi))
        if self.mode == "file":
            return [PhysRange(0, max_paddr or memsize)]
        if memsize == 0:
            raise SourceError(f"{self.description} is shutting down (it has no memory pages left)")
        return xen_ram_ranges(memsize, max_paddr)

    def _refuse_pv(self) -> None:
        extras = _Extras.get()
        if extras.has("xen_is_pv") and extras.lib.xen_is_pv(self._handle_for(extras)):
            raise SourceError(
                f"{self.description} is a Xen PV guest: its page tables hold machine frames, "
                "not guest-physical ones; vmishell supports HVM and PVH guests"
            )

    def _handle_for(self, extras: _Extras) -> Any:
        return extras.ffi.cast("void *", int(self._ffi.cast("uintptr_t", self._vmi)))

    # -- PhysicalSource ------------------------------------------------------------------
    def ranges(self) -> Sequence[PhysRange]:
        return self._ranges

    def _read(self, paddr: int, size: int) -> bytes:
        if self._vmi is None:
            raise SourceError(f"{self.description} is closed")
        buf = self._alloc("char[]", size)
        done = self._ffi.new("size_t *")
        with self._lock:
            status = self._lib.vmi_read_pa(self._vmi, paddr, size, buf, done)
        if status != self._lib.VMI_SUCCESS or done[0] != size:
            bad = paddr + int(done[0])
            raise PhysicalReadError(paddr, size, f"LibVMI could not read page {bad & ~0xFFF:#x}")
        return self._ffi.buffer(buf, size)[:]

    def registers(self) -> Registers:
        """vCPU 0's control registers (and a few for display), from LibVMI's driver."""
        if self.mode == "file":
            raise RegistersUnavailable(f"{self.description}: a raw dump carries no CPU registers")
        regs = {
            "cr0": self._vcpureg("CR0"),
            "cr3": self._vcpureg("CR3"),
            "cr4": self._vcpureg("CR4"),
            "efer": self._vcpureg("MSR_EFER"),
        }
        if regs["cr3"] is None:
            raise RegistersUnavailable(f"LibVMI could not read CR3 of {self.description}")
        extra = {k.lower(): v for k in _EXTRA_REGS if (v := self._vcpureg(k)) is not None}
        efer = regs["efer"]
        arch = "x86_64" if efer is not None and efer & _EFER_LMA else "i386"
        return Registers(arch, extra=extra, **regs)

    def _vcpureg(self, name: str, vcpu: int = 0) -> int | None:
        value = self._ffi.new("uint64_t *")
        with self._lock:
            status = self._lib.vmi_get_vcpureg(self._vmi, value, getattr(self._lib, name), vcpu)
        return int(value[0]) if status == self._lib.VMI_SUCCESS else None

    def refresh(self) -> None:
        """Declare cached views stale, LibVMI's page and translation caches included."""
        super().refresh()
        if self.live and self._vmi is not None:
            with self._lock:
                self._lib.vmi_pagecache_flush(self._vmi)
                self._lib.vmi_v2pcache_flush(self._vmi, 0)

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Pause the guest for a consistent view, then resume it.

        Xen counts pauses per domain, so pausing an already paused domain and
        resuming it leaves it paused, as the caller found it.
        """
        if not self.live:
            yield
            return
        with self._lock, _c_output() as said:
            ok = self._lib.vmi_pause_vm(self._vmi) == self._lib.VMI_SUCCESS
        if not ok:
            raise SourceError(
                f"cannot pause {self.description}: shutting down or gone? ({_reason(said)})"
            )
        self.refresh()
        try:
            yield
        finally:
            with self._lock, _c_output():
                self._lib.vmi_resume_vm(self._vmi)
            self.refresh()

    # -- LibVMI's own view, for comparison -----------------------------------------------
    def translate(self, vaddr: int, dtb: int, mode: str | Any) -> int:
        """LibVMI's own page walk of `vaddr` from the table at `dtb` (a vmishell PagingMode).

        This is for checking vmishell's walker against an independent one;
        vmishell itself never uses it.
        """
        name = getattr(mode, "value", mode)
        pm_name = _PAGE_MODES.get(str(name))
        if pm_name is None:
            raise TranslationError(f"LibVMI cannot walk {name} paging")
        extras = _Extras.get()
        if not extras.has("vmi_nested_pagetable_lookup"):
            raise TranslationError("this LibVMI lacks vmi_nested_pagetable_lookup")
        paddr = extras.ffi.new("uint64_t *")
        naddr = extras.ffi.new("uint64_t *")
        pm = getattr(self._lib, pm_name)
        with self._lock:
            status = extras.lib.vmi_nested_pagetable_lookup(
                self._handle_for(extras), 0, 0, dtb, pm, vaddr, paddr, naddr
            )
        if status != self._lib.VMI_SUCCESS:
            raise TranslationError(f"LibVMI found no mapping for {vaddr:#x} (table {dtb:#x})")
        return int(paddr[0])

    def _check_alive(self) -> None:
        if self.mode == "file":
            try:
                size = os.stat(self.target).st_size
            except OSError as exc:
                self._end(f"the dump is gone ({exc.strerror})")
            if size < self._dump_size:
                self._release()  # before LibVMI touches a page past the new end
                self._end(f"the dump shrank from {self._dump_size:#x} to {size:#x} bytes")

    def close(self) -> None:
        super().close()
        self._release()

    def _release(self) -> None:
        vmi, self._vmi = getattr(self, "_vmi", None), None
        if vmi is not None:
            with self._lock, _c_output(), contextlib.suppress(Exception):
                self._lib.vmi_destroy(vmi)
        self._ranges = []


__all__ = [
    "INSTALL_HINT",
    "LibvmiSource",
    "LibvmiUnavailable",
    "libvmi_available",
    "xen_ram_ranges",
]
