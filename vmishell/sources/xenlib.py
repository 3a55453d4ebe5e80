"""A thin ctypes binding over Xen's own libraries, as Debian's Xen 4.17 packages ship them.

Only what a memory source needs: domain information (`xc_domain_getinfolist`,
whose `xc_domaininfo_t` is the fixed-layout `struct xen_domctl_getdomaininfo`
of domctl interface 0x15), vCPU state (`xc_vcpu_getcontext` for PV,
`xc_domain_hvm_getcontext_partial` for HVM and PVH), pause and unpause,
the size of the guest's frame space, foreign mappings
(`xenforeignmemory_map`) and domain names from xenstore. Struct layouts
follow Xen's public headers (xen/include/public); their sizes and offsets
are pinned by tests/unit/test_xen_binding.py against values compiled from
those headers.

Every failure becomes a SourceError that says what failed for which domain,
with the C library's errno; libxc's own messages on stderr are silenced
(its logger is given a level above every message).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno as errno_codes
import glob
import os
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from vmishell.errors import SourceError

PAGE_SIZE = 4096
DOMID_FIRST_RESERVED = 0x7FF0
#: XEN_DOMCTL_INTERFACE_VERSION of Xen 4.17: the layout of xc_domaininfo_t below.
DOMCTL_INTERFACE_VERSION = 0x15
PROT_READ, PROT_WRITE = 1, 2

# XEN_DOMINF_* flags.
DOMINF_DYING = 1 << 0
DOMINF_HVM = 1 << 1
DOMINF_SHUTDOWN = 1 << 2
DOMINF_PAUSED = 1 << 3
DOMINF_BLOCKED = 1 << 4
DOMINF_RUNNING = 1 << 5
DOMINF_HAP = 1 << 8
SHUTDOWN_SHIFT, SHUTDOWN_MASK = 16, 0xFF
#: SHUTDOWN_* reasons (public/sched.h).
SHUTDOWN_REASONS = {
    0: "poweroff",
    1: "reboot",
    2: "suspend",
    3: "crash",
    4: "watchdog",
    5: "soft_reset",
}
#: XEN_X86_EMU_PIC: an HVM guest has the legacy PIC emulated; a PVH guest has not.
EMU_PIC = 1 << 5
#: HVM_SAVE_CODE(CPU) and the size of `struct hvm_hw_cpu`.
HVM_SAVE_CODE_CPU = 2
HVM_HW_CPU_SIZE = 1032
#: `vcpu_guest_context_any_t`: the union of the x86_32 (2800) and x86_64 (5168) layouts.
VCPU_CONTEXT_SIZE = 5168
#: libxentoollog's XTL_NUM_LEVELS: a logger at this level prints nothing.
_XTL_SILENT = 10


class DomainInfo(ctypes.Structure):
    """`xc_domaininfo_t` (struct xen_domctl_getdomaininfo, domctl interface 0x15)."""

    _fields_ = [
        ("domain", ctypes.c_uint16),
        ("pad1", ctypes.c_uint16),
        ("flags", ctypes.c_uint32),
        ("tot_pages", ctypes.c_uint64),
        ("max_pages", ctypes.c_uint64),
        ("outstanding_pages", ctypes.c_uint64),
        ("shr_pages", ctypes.c_uint64),
        ("paged_pages", ctypes.c_uint64),
        ("shared_info_frame", ctypes.c_uint64),
        ("cpu_time", ctypes.c_uint64),
        ("nr_online_vcpus", ctypes.c_uint32),
        ("max_vcpu_id", ctypes.c_uint32),
        ("ssidref", ctypes.c_uint32),
        ("handle", ctypes.c_uint8 * 16),
        ("cpupool", ctypes.c_uint32),
        ("gpaddr_bits", ctypes.c_uint8),
        ("pad2", ctypes.c_uint8 * 7),
        ("emulation_flags", ctypes.c_uint32),
        ("misc_flags", ctypes.c_uint32),
    ]


@dataclass(frozen=True, slots=True)
class Domain:
    """What Xen says about one domain, decoded."""

    domid: int
    flags: int
    tot_pages: int
    max_pages: int
    shared_info_frame: int
    cpu_time: int
    vcpus: int
    max_vcpu_id: int
    uuid: str
    emulation_flags: int

    @classmethod
    def from_struct(cls, raw: DomainInfo) -> Domain:
        h = bytes(raw.handle).hex()
        return cls(
            domid=raw.domain,
            flags=raw.flags,
            tot_pages=raw.tot_pages,
            max_pages=raw.max_pages,
            shared_info_frame=raw.shared_info_frame,
            cpu_time=raw.cpu_time,
            vcpus=raw.nr_online_vcpus,
            max_vcpu_id=raw.max_vcpu_id,
            uuid=f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}",
            emulation_flags=raw.emulation_flags,
        )

    @property
    def hvm(self) -> bool:
        """An HVM container (HVM or PVH): one guest-physical frame space."""
        return bool(self.flags & DOMINF_HVM)

    @property
    def kind(self) -> str:
        """ "pv", "pvh" or "hvm", from the domain's flags and emulated devices."""
        if not self.hvm:
            return "pv"
        return "hvm" if self.emulation_flags & EMU_PIC else "pvh"

    @property
    def dying(self) -> bool:
        return bool(self.flags & DOMINF_DYING)

    @property
    def paused(self) -> bool:
        return bool(self.flags & DOMINF_PAUSED)

    @property
    def shutdown(self) -> str | None:
        """Why the guest shut down ("poweroff", "reboot", "crash", ...), or None while it runs."""
        if not self.flags & DOMINF_SHUTDOWN:
            return None
        code = (self.flags >> SHUTDOWN_SHIFT) & SHUTDOWN_MASK
        return SHUTDOWN_REASONS.get(code, f"reason {code}")


def _find_library(stem: str, soname_glob: str) -> str:
    for d in ("/usr/lib/x86_64-linux-gnu", "/lib/x86_64-linux-gnu", "/usr/lib64", "/usr/lib"):
        found = sorted(glob.glob(os.path.join(d, soname_glob)))
        if found:
            return found[0]
    name = ctypes.util.find_library(stem)
    if name is None:
        raise SourceError(
            f"Xen's {stem} library is not installed ({soname_glob}): run vmishell in dom0 "
            "with the Xen tools (Debian: xen-utils and its libraries)"
        )
    return name


def check_host() -> None:
    """Say plainly when this cannot be a privileged Xen dom0, before any library is tried."""
    if not (os.path.exists("/proc/xen/privcmd") or os.path.exists("/dev/xen/privcmd")):
        raise SourceError(
            "not a Xen dom0 (no /dev/xen/privcmd or /proc/xen/privcmd): run vmishell in dom0 "
            "to attach to a DomU"
        )
    if os.geteuid() != 0:
        raise SourceError("no permission: attaching to a Xen domain needs root in dom0")


class Xen:
    """Open handles on libxenctrl, libxenforeignmemory and xenstore (one per process is enough).

    Thread-safe: calls are serialised by a lock, as libxc handles are not
    meant to be shared between threads without one.
    """

    _shared: Xen | None = None
    _shared_lock = threading.Lock()

    def __init__(self) -> None:
        check_host()
        self._lock = threading.RLock()
        self._closed = False
        self.ctrl = self._load("xenctrl", "libxenctrl.so.4.*")
        self.fmem_lib = self._load("xenforeignmemory", "libxenforeignmemory.so.1*")
        self.store_lib = self._load("xenstore", "libxenstore.so.*")
        self._declare()
        logger = self._quiet_logger()
        self.xch = self.ctrl.xc_interface_open(logger, logger, 0)
        if not self.xch:
            raise SourceError(f"cannot open Xen's control interface: {_errno_text()}")
        self.fmem = self.fmem_lib.xenforeignmemory_open(logger, 0)
        if not self.fmem:
            self.ctrl.xc_interface_close(self.xch)
            raise SourceError(f"cannot open Xen's foreign-memory interface: {_errno_text()}")
        self.xs = self.store_lib.xs_open(0)  # may be NULL: names then cannot be looked up

    @classmethod
    def shared(cls) -> Xen:
        """The process's handles, opened on first use."""
        with cls._shared_lock:
            if cls._shared is None or cls._shared._closed:
                cls._shared = cls()
            return cls._shared

    # -- loading --------------------------------------------------------------------
    @staticmethod
    def _load(stem: str, pattern: str) -> ctypes.CDLL:
        path = _find_library(stem, pattern)
        try:
            return ctypes.CDLL(path, use_errno=True)
        except OSError as exc:
            raise SourceError(f"cannot load {path}: {exc}") from None

    def _declare(self) -> None:
        c, f, s = self.ctrl, self.fmem_lib, self.store_lib
        vp, u32, u16 = ctypes.c_void_p, ctypes.c_uint32, ctypes.c_uint16
        c.xc_interface_open.restype = vp
        c.xc_interface_open.argtypes = [vp, vp, ctypes.c_uint]
        c.xc_interface_close.argtypes = [vp]
        c.xc_domain_getinfolist.argtypes = [vp, u32, ctypes.c_uint, ctypes.POINTER(DomainInfo)]
        c.xc_vcpu_getcontext.argtypes = [vp, u32, u32, ctypes.c_void_p]
        c.xc_domain_hvm_getcontext_partial.argtypes = [vp, u32, u16, u16, vp, u32]
        c.xc_domain_pause.argtypes = [vp, u32]
        c.xc_domain_unpause.argtypes = [vp, u32]
        c.xc_domain_nr_gpfns.argtypes = [vp, u32, ctypes.POINTER(ctypes.c_ulong)]
        c.xc_domain_maximum_gpfn.argtypes = [vp, u32, ctypes.POINTER(ctypes.c_ulong)]
        c.xc_domain_get_guest_width.argtypes = [vp, u32, ctypes.POINTER(ctypes.c_uint)]
        f.xenforeignmemory_open.restype = vp
        f.xenforeignmemory_open.argtypes = [vp, ctypes.c_uint]
        f.xenforeignmemory_close.argtypes = [vp]
        f.xenforeignmemory_map.restype = vp
        f.xenforeignmemory_map.argtypes = [
            vp, u32, ctypes.c_int, ctypes.c_size_t,
            ctypes.POINTER(ctypes.c_ulong), ctypes.POINTER(ctypes.c_int),
        ]  # fmt: skip
        f.xenforeignmemory_unmap.argtypes = [vp, vp, ctypes.c_size_t]
        s.xs_open.restype = vp
        s.xs_open.argtypes = [ctypes.c_ulong]
        s.xs_close.argtypes = [vp]
        s.xs_read.restype = vp
        s.xs_read.argtypes = [vp, u32, ctypes.c_char_p, ctypes.POINTER(ctypes.c_uint)]
        s.xs_directory.restype = ctypes.POINTER(ctypes.c_char_p)
        s.xs_directory.argtypes = [vp, u32, ctypes.c_char_p, ctypes.POINTER(ctypes.c_uint)]

    def _quiet_logger(self) -> int | None:
        """A libxentoollog logger that prints nothing (NULL, and so stderr, otherwise)."""
        try:
            tl = self._load("xentoollog", "libxentoollog.so.1*")
            libc = ctypes.CDLL(None)
            stderr = ctypes.c_void_p.in_dll(libc, "stderr")
            tl.xtl_createlogger_stdiostream.restype = ctypes.c_void_p
            tl.xtl_createlogger_stdiostream.argtypes = [
                ctypes.c_void_p,
                ctypes.c_int,
                ctypes.c_uint,
            ]
            self._toollog = tl
            return tl.xtl_createlogger_stdiostream(stderr, _XTL_SILENT, 0) or None
        except (SourceError, ValueError, AttributeError, OSError):
            return None

    @property
    def libc(self) -> ctypes.CDLL:
        return ctypes.CDLL(None)

    # -- domains ------------------------------------------------------------------------
    def domain(self, domid: int) -> Domain | None:
        """The domain `domid`, or None when it does not exist (any more)."""
        raw = DomainInfo()
        with self._lock:
            n = self.ctrl.xc_domain_getinfolist(self.xch, domid, 1, ctypes.byref(raw))
        if n < 0:
            raise SourceError(f"cannot ask Xen about domain {domid}: {_errno_text()}")
        if n == 0 or raw.domain != domid:
            return None
        return Domain.from_struct(raw)

    def domains(self) -> list[Domain]:
        """Every domain, dom0 included, in id order."""
        out: list[Domain] = []
        first = 0
        batch = (DomainInfo * 64)()
        while first < DOMID_FIRST_RESERVED:
            with self._lock:
                n = self.ctrl.xc_domain_getinfolist(self.xch, first, 64, batch)
            if n < 0:
                raise SourceError(f"cannot list Xen's domains: {_errno_text()}")
            if n == 0:
                break
            out += [Domain.from_struct(batch[i]) for i in range(n)]
            first = batch[n - 1].domain + 1
        return out

    def name(self, domid: int) -> str | None:
        """The domain's name from xenstore (`/local/domain/ID/name`), or None."""
        value = self.xs_read(f"/local/domain/{domid}/name")
        return value.decode("utf-8", "replace") if value is not None else None

    def find(self, name: str) -> int:
        """The id of the running domain called `name` (SourceError when there is none)."""
        if self.xs is None or not self.xs:
            raise SourceError(f"cannot look up domain {name!r}: xenstore is not reachable")
        for dom in self.domains():
            if self.name(dom.domid) == name and not dom.dying:
                return dom.domid
        known = ", ".join(n for d in self.domains() if (n := self.name(d.domid)))
        raise SourceError(f"no such domain: {name!r} is not running (domains: {known or 'none'})")

    def xs_read(self, path: str) -> bytes | None:
        if not self.xs:
            return None
        size = ctypes.c_uint()
        with self._lock:
            ptr = self.store_lib.xs_read(self.xs, 0, path.encode(), ctypes.byref(size))
        if not ptr:
            return None
        try:
            return ctypes.string_at(ptr, size.value)
        finally:
            self.libc.free(ctypes.c_void_p(ptr))

    # -- vCPUs and control ----------------------------------------------------------------
    def vcpu_context(self, domid: int, vcpu: int) -> bytes:
        """The raw `vcpu_guest_context` of a vCPU (layout by the guest's width)."""
        buf = ctypes.create_string_buffer(VCPU_CONTEXT_SIZE)
        with self._lock:
            rc = self.ctrl.xc_vcpu_getcontext(self.xch, domid, vcpu, buf)
        if rc != 0:
            raise SourceError(f"cannot read vCPU {vcpu} of domain {domid}: {_errno_text()}")
        return buf.raw

    def hvm_cpu(self, domid: int, vcpu: int) -> bytes:
        """The raw `struct hvm_hw_cpu` of an HVM or PVH vCPU."""
        buf = ctypes.create_string_buffer(HVM_HW_CPU_SIZE)
        with self._lock:
            rc = self.ctrl.xc_domain_hvm_getcontext_partial(
                self.xch, domid, HVM_SAVE_CODE_CPU, vcpu, buf, HVM_HW_CPU_SIZE
            )
        if rc != 0:
            raise SourceError(f"cannot read vCPU {vcpu} of domain {domid}: {_errno_text()}")
        return buf.raw

    def pause(self, domid: int) -> None:
        with self._lock:
            if self.ctrl.xc_domain_pause(self.xch, domid) != 0:
                raise SourceError(f"cannot pause domain {domid}: {_errno_text()}")

    def unpause(self, domid: int) -> None:
        with self._lock:
            if self.ctrl.xc_domain_unpause(self.xch, domid) != 0:
                raise SourceError(f"cannot unpause domain {domid}: {_errno_text()}")

    def nr_gpfns(self, domid: int) -> int:
        """One past the highest frame number of the guest's own (pseudo-)physical space."""
        out = ctypes.c_ulong()
        with self._lock:
            rc = self.ctrl.xc_domain_nr_gpfns(self.xch, domid, ctypes.byref(out))
        if rc < 0:
            raise SourceError(f"cannot size the memory of domain {domid}: {_errno_text()}")
        return out.value

    def guest_width(self, domid: int) -> int:
        """4 for a 32-bit PV guest, else 8."""
        out = ctypes.c_uint()
        with self._lock:
            rc = self.ctrl.xc_domain_get_guest_width(self.xch, domid, ctypes.byref(out))
        if rc != 0:
            raise SourceError(f"cannot ask the address size of domain {domid}: {_errno_text()}")
        return out.value

    # -- foreign memory ---------------------------------------------------------------------
    def map(self, domid: int, frames: Sequence[int], *, write: bool = False) -> ForeignMapping:
        """Map `frames` of domain `domid` (gfns, or mfns for PV) into this process.

        Frames that cannot be mapped are reported per frame (`errors`), never
        touched; the whole call fails only when nothing could be set up.
        """
        n = len(frames)
        arr = (ctypes.c_ulong * n)(*frames)
        errs = (ctypes.c_int * n)()
        prot = PROT_READ | (PROT_WRITE if write else 0)
        with self._lock:
            addr = self.fmem_lib.xenforeignmemory_map(self.fmem, domid, prot, n, arr, errs)
        if not addr:
            raise SourceError(
                f"cannot map {n} frame(s) of domain {domid} from {frames[0]:#x}: {_errno_text()}"
            )
        return ForeignMapping(self, addr, n, tuple(errs))

    def unmap(self, addr: int, pages: int) -> None:
        with self._lock:
            self.fmem_lib.xenforeignmemory_unmap(self.fmem, ctypes.c_void_p(addr), pages)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self.xs:
                self.store_lib.xs_close(self.xs)
            self.fmem_lib.xenforeignmemory_close(self.fmem)
            self.ctrl.xc_interface_close(self.xch)


class ForeignMapping:
    """Frames of a domain mapped contiguously at `address`, with a per-frame error code."""

    __slots__ = ("_xen", "address", "errors", "pages")

    def __init__(self, xen: Xen, address: int, pages: int, errors: tuple[int, ...]) -> None:
        self._xen = xen
        self.address = address
        self.pages = pages
        self.errors = errors

    def ok(self, index: int) -> bool:
        return self.errors[index] == 0

    def read(self, offset: int, size: int) -> bytes:
        """Copy bytes out (the caller checked that every page they touch mapped)."""
        if offset < 0 or offset + size > self.pages * PAGE_SIZE or not self.address:
            raise SourceError(f"read of {size} bytes at {offset:#x} is outside a foreign mapping")
        return ctypes.string_at(self.address + offset, size)

    def write(self, offset: int, data: bytes) -> None:
        if offset < 0 or offset + len(data) > self.pages * PAGE_SIZE or not self.address:
            raise SourceError(f"write at {offset:#x} is outside a foreign mapping")
        ctypes.memmove(self.address + offset, data, len(data))

    def unmap(self) -> None:
        addr, self.address = self.address, 0
        if addr:
            self._xen.unmap(addr, self.pages)


def frame_error(code: int) -> str:
    """Why a frame could not be mapped, from xenforeignmemory_map's per-frame error."""
    code = -code if code < 0 else code
    why = {
        errno_codes.EINVAL: "not populated (a hole, or ballooned out)",
        errno_codes.ENOENT: "paged out or not present",
        errno_codes.EPERM: "not this domain's, or mapping refused",
        errno_codes.EFAULT: "not present",
    }.get(code)
    name = errno_codes.errorcode.get(code, str(code))
    return f"{why} ({name})" if why else name


def _errno_text() -> str:
    code = ctypes.get_errno()
    if code == errno_codes.EPERM or code == errno_codes.EACCES:
        return f"{os.strerror(code)} (run as root in dom0)"
    if code == errno_codes.ESRCH:
        return f"{os.strerror(code)} (the domain does not exist)"
    return os.strerror(code) if code else "unknown error"


def batched(items: Sequence[int], size: int) -> Iterator[Sequence[int]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]
