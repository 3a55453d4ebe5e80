"""Build a kernel profile from the guest's own memory: BTF, kallsyms and the banner.

A kernel with CONFIG_DEBUG_INFO_BTF and CONFIG_KALLSYMS_ALL carries all a
profile needs in its read-only data, contiguous in physical memory: the BTF
blob, the compressed kallsyms tables and `linux_banner`. The carve starts at a
banner (cheap to find) and, within 48 MiB of it, decodes the kallsyms tables
at the first token-table digit runs, reading only a few MiB around each
(rodata follows the banner). kallsyms then places the rest: a banner in the
window taken as `linux_banner` must put a BTF header of exactly
`__stop_BTF - __start_BTF` bytes at `__start_BTF`, which fixes
virtual-to-physical for the image. kallsyms in memory holds run-time
(KASLR-moved) addresses; the slide comes from the kernel's VMCOREINFO page
(through `vmcoreinfo_data` on x86_64, else a bounded scan), else from the
default link address, and is taken off so the profile holds link-time
addresses like one built from the kernel package.

Everything read is guest data: windows, candidate counts and sizes are capped,
and a profile carved here is verified against the running kernel before a
session uses it (`vmishell.symbols.verify`).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from vmishell.errors import ProfileError, VmiError
from vmishell.limits import Limits
from vmishell.sources.base import PhysicalSource
from vmishell.symbols.carve_btf import BtfHeader, btf_candidates, check_blob, read_btf
from vmishell.symbols.carve_kallsyms import MAX_CANDIDATES as MAX_KALLSYMS_CANDIDATES
from vmishell.symbols.carve_kallsyms import carve_kallsyms
from vmishell.symbols.kallsyms import _DIGITS, Kallsyms

Progress = Callable[[str, float], None]

#: Memory read on each side of a banner: the image's rodata (kallsyms, BTF) lies within.
WINDOW = 48 << 20
#: Banners whose surroundings are searched before giving up.
MAX_WINDOWS = 4
#: Banners in a window tried as `linux_banner` (a 6.1 image holds two or three).
MAX_BANNERS = 16
#: "KERNELOFFSET=" occurrences looked at for the VMCOREINFO text.
MAX_VMCOREINFO_HITS = 16
#: Default link address of `_text` (CONFIG_PHYSICAL_START 16 MiB) when no VMCOREINFO says.
DEFAULT_TEXT = {8: 0xFFFFFFFF81000000, 4: 0xC1000000}
#: KASLR moves the kernel by multiples of this, by less than this many bytes.
KASLR_ALIGN = 0x200000
KASLR_MAX = 1 << 31
CARVED_SUFFIX = ".json.gz"

NO_BTF = (
    "the kernel in {where} has no BTF (built without CONFIG_DEBUG_INFO_BTF, like Debian's "
    "i386 kernels): no BTF header within {window} of its banner {banner!r}. vmishell "
    "needs the kernel's types: run `vmishell profile fetch TARGET` to find the kernel's "
    "package by its banner and build the profile from it (its -dbg package through "
    "pahole when it has no BTF)"
)


class MissingBtf(ProfileError):
    """The guest kernel carries no BTF, so no profile can be carved from its memory."""


@dataclass
class CarvedKernel:
    """What the carve found: enough to build an ISF, and where each piece was."""

    banner: bytes
    btf: bytes
    btf_sha256: str
    #: Link-time (un-slid) addresses, as a System.map or the package's kallsyms hold them.
    symbols: dict[str, int]
    slide: int
    slide_from: str
    pointer_size: int
    endian: str
    where: dict[str, int] = field(default_factory=dict)

    @property
    def release(self) -> str:
        m = re.match(rb"Linux version (\S+)", self.banner)
        return m.group(1).decode("ascii", "replace") if m else "unknown"

    def filename(self) -> str:
        """linux-<release>[-<Debian version>]-btf<sha256 prefix>.json.gz: banner plus BTF."""
        text = self.banner.decode("ascii", "replace")
        found = re.findall(r"\bDebian (\d\S*)", text)
        build = f"-{found[-1]}" if found else ""
        name = f"linux-{self.release}{build}-btf{self.btf_sha256[:12]}"
        return re.sub(r"[^A-Za-z0-9._+-]", "_", name) + CARVED_SUFFIX


def carve_kernel(
    source: PhysicalSource, limits: Limits | None = None, progress: Progress | None = None
) -> CarvedKernel:
    """Find BTF, kallsyms and the banner of the kernel in `source`."""
    limits = limits or Limits()
    report = progress or (lambda _stage, _fraction: None)
    report("finding the banner", 0.0)
    tried: list[tuple[int, int]] = []
    problems: list[str] = []
    for n, paddr in enumerate(source.find(b"Linux version ")):
        if n >= limits.max_banner_scan or len(tried) >= MAX_WINDOWS:
            break
        if any(lo <= paddr < hi for lo, hi in tried):
            continue
        lo, hi = _window(source, paddr)
        tried.append((lo, hi))
        report("reading kallsyms", 0.2)
        try:
            return _carve_window(source, paddr, lo, hi, report)
        except MissingBtf as exc:
            problems.append(str(exc))
        except ProfileError as exc:
            if not btf_candidates(source, lo, hi):
                problems.append(_no_btf(source, paddr))
            else:
                problems.append(f"near the banner at physical {paddr:#x}: {exc}")
    if not tried:
        raise ProfileError(f"no Linux banner in {source.description}: no kernel to carve from")
    if all(p.startswith("the kernel in") for p in problems):
        raise MissingBtf(problems[0])
    raise ProfileError("cannot carve a profile from guest memory: " + "; ".join(problems[:2]))


def _window(source: PhysicalSource, paddr: int) -> tuple[int, int]:
    r = source.range_of(paddr)
    if r is None:  # pragma: no cover - banners come from RAM
        raise ProfileError(f"banner at physical {paddr:#x} is outside RAM")
    return max(r.start, paddr - WINDOW), min(r.end, paddr + WINDOW)


def _no_btf(source: PhysicalSource, paddr: int) -> str:
    text = source.read(paddr, min(80, source.size - paddr)).split(b"\0")[0]
    return NO_BTF.format(
        where=source.description, window="48 MiB", banner=text.decode("ascii", "replace")
    )


def _carve_window(
    source: PhysicalSource, paddr: int, lo: int, hi: int, report: Progress
) -> CarvedKernel:
    """kallsyms first (rodata follows the banner), then the BTF and banner they place."""
    try:
        table, token_table = _kallsyms_near(source, paddr, hi)
    except ProfileError as after:
        try:
            table, token_table = _kallsyms_near(source, lo, paddr)
        except ProfileError:
            raise after from None
    syms = table.addresses
    report("reading BTF", 0.5)
    if "__start_BTF" not in syms and not btf_candidates(source, lo, hi):
        raise MissingBtf(_no_btf(source, paddr))
    header, blob, btf_from, phys = _choose_btf(source, lo, hi, syms)
    banner = _banner(source, syms, phys)
    if banner is None:
        raise ProfileError(
            "kallsyms has no linux_banner pointing at a banner (a kernel without "
            "CONFIG_KALLSYMS_ALL lists functions only): build the profile from the kernel "
            "package instead (`vmishell profile fetch`)"
        )
    ptr = 4 if syms.get("_text", syms.get("_stext", 0)) < 1 << 32 else 8
    slide, slide_from = kaslr_slide(source, table, banner, ptr, phys)
    top = 1 << (8 * ptr - 1)
    symbols = {n: (a - slide if a >= top else a) for n, a in syms.items()}
    where = {"token_table": token_table, "btf": header.paddr}
    return CarvedKernel(
        banner=banner, btf=blob, btf_sha256=hashlib.sha256(blob).hexdigest(),
        symbols=symbols, slide=slide, slide_from=f"{slide_from}; BTF {btf_from}",
        pointer_size=ptr, endian=header.endian, where=where,
    )  # fmt: skip


#: Memory read below and above a token table: (small, then large) for names and offsets.
SPANS = ((8 << 20, 2 << 20), (33 << 20, 8 << 20))


def _kallsyms_near(source: PhysicalSource, lo: int, hi: int) -> tuple[Kallsyms, int]:
    """The kallsyms tables at one of the first token-table digit runs in [lo, hi), and
    the physical address of their token table. Only a span around each run is read."""
    errors: list[str] = []
    for n, paddr in enumerate(source.find(_DIGITS, lo, hi)):
        if n >= MAX_KALLSYMS_CANDIDATES:
            errors.append(f"more than {MAX_KALLSYMS_CANDIDATES} candidates: the rest not tried")
            break
        for below, above in SPANS:
            start, end = max(lo, paddr - below), min(hi, paddr + above)
            try:
                table = _kallsyms(source.read(start, end - start), paddr - start)
                return table, start + table.layout.token_table
            except ProfileError as exc:
                problem = str(exc)
        errors.append(problem)
    detail = "; ".join(errors[:2]) if errors else "no kallsyms_token_table digit run"
    raise ProfileError(f"no kallsyms tables near the banner: {detail}")


def _kallsyms(window: bytes, at: int) -> Kallsyms:
    errors = []
    for ptr in (8, 4):
        try:
            table = carve_kallsyms(window, pointer_size=ptr, max_candidates=1, start=at)
        except ProfileError as exc:
            errors.append(str(exc))
            continue
        text = table.get("_text", table.get("_stext")) or 0
        if ptr == 4 or text >= 1 << 63:
            return table
        errors.append(f"64-bit decoding puts _text at {text:#x}, not in a kernel half")
    raise ProfileError(errors[0])


def _choose_btf(
    source: PhysicalSource, lo: int, hi: int, syms: dict[str, int]
) -> tuple[BtfHeader, bytes, str, Callable[[int], int | None]]:
    """The blob kallsyms places, and with it virtual-to-physical for the image.

    Each banner in [lo, hi) is a guess for `linux_banner`; the guess holds when
    a BTF header of exactly __stop_BTF - __start_BTF bytes sits at `__start_BTF`
    moved the same way. Without those symbols, the largest consistent blob in
    the window is taken, unanchored (and the banner cannot be placed).
    """
    start, stop = syms.get("__start_BTF"), syms.get("__stop_BTF")
    banner_at = syms.get("linux_banner")
    reasons: list[str] = []
    if start is not None and stop is not None and banner_at is not None:
        for n, hit in enumerate(source.find(b"Linux version ", lo, hi)):
            if n >= MAX_BANNERS:
                break
            shift = hit - banner_at
            paddr = start + shift
            try:
                header, blob = read_btf(source, paddr)
            except ProfileError as exc:
                reasons.append(str(exc))
                continue
            if header.size != stop - start:
                reasons.append(
                    f"BTF at __start_BTF (physical {paddr:#x}) holds {header.size:#x} bytes, "
                    f"not __stop_BTF - __start_BTF = {stop - start:#x}"
                )
                continue
            return (
                header, blob, f"at __start_BTF (physical {paddr:#x})",
                lambda vaddr, shift=shift: vaddr + shift,
            )  # fmt: skip
        raise ProfileError(
            "no banner in memory, taken as linux_banner, puts a BTF blob at __start_BTF: "
            + ("; ".join(reasons[-2:]) or "no banner matches linux_banner")
        )
    if start is not None:
        raise ProfileError("kallsyms lists __start_BTF but not __stop_BTF and linux_banner")
    for header in sorted(btf_candidates(source, lo, hi), key=lambda h: -h.size):
        try:
            blob = source.read(header.paddr, header.size)
            check_blob(header, blob)
        except VmiError as exc:
            reasons.append(str(exc))
            continue
        return header, blob, f"by header scan (physical {header.paddr:#x})", lambda _v: None
    raise ProfileError("no consistent BTF blob near the kallsyms tables: " + "; ".join(reasons[:2]))


def _is_banner(source: PhysicalSource, paddr: int) -> bool:
    try:
        return source.read(paddr, 14) == b"Linux version "
    except VmiError:
        return False


def _banner(
    source: PhysicalSource, syms: dict[str, int], phys: Callable[[int], int | None]
) -> bytes | None:
    address = syms.get("linux_banner")
    paddr = None if address is None else phys(address)
    if paddr is None:
        return None
    try:
        raw = source.read(paddr, 512)
    except VmiError:
        return None
    text = raw.split(b"\0", 1)[0]
    return text if text.startswith(b"Linux version ") else None


def kaslr_slide(
    source: PhysicalSource,
    table: Kallsyms,
    banner: bytes,
    ptr: int,
    phys: Callable[[int], int | None] = lambda _v: None,
) -> tuple[int, str]:
    """The virtual KASLR slide of the kernel whose kallsyms `table` shows run-time addresses."""
    stext = table.get("_stext")
    release = re.match(rb"Linux version (\S+)", banner)
    wanted = release.group(1).decode() if release else None
    info = _vmcoreinfo_at_pointer(source, table, phys, wanted, stext)
    if info is None:
        info = find_vmcoreinfo(source, wanted, stext)
    offset = None if info is None else _hex(info, "KERNELOFFSET")
    if offset is not None:
        return offset, "KASLR slide from the kernel's VMCOREINFO"
    text = table.get("_text", stext) or 0
    default = DEFAULT_TEXT[ptr]
    slide = text - default
    if 0 <= slide < KASLR_MAX and slide % KASLR_ALIGN == 0:
        return slide, f"KASLR slide assuming _text links at {default:#x} (no VMCOREINFO)"
    raise ProfileError(
        f"cannot tell the kernel's KASLR slide: no VMCOREINFO in memory and _text at {text:#x} "
        f"is not the default {default:#x} moved on a 2 MiB grid"
    )


def _vmcoreinfo_at_pointer(
    source: PhysicalSource,
    table: Kallsyms,
    phys: Callable[[int], int | None],
    release: str | None,
    stext: int | None,
) -> dict[str, str] | None:
    """x86_64: the page `vmcoreinfo_data` points at, through `page_offset_base`: no scan."""
    data_at, base_at = table.get("vmcoreinfo_data"), table.get("page_offset_base")
    if data_at is None or base_at is None:
        return None
    slots = phys(data_at), phys(base_at)
    if slots[0] is None or slots[1] is None:
        return None
    try:
        pointer = int.from_bytes(source.read(slots[0], 8), "little")
        page_offset = int.from_bytes(source.read(slots[1], 8), "little")
        paddr = pointer - page_offset
        if not 0 <= paddr < source.size or paddr % 4096:
            return None
        raw = source.read(paddr, 4096)
    except VmiError:
        return None
    return _checked_vmcoreinfo(raw.split(b"\0", 1)[0], release, stext)


def _checked_vmcoreinfo(
    raw: bytes, release: str | None, stext: int | None
) -> dict[str, str] | None:
    info = _vmcoreinfo_entries(raw.decode("ascii", "replace"))
    if release is not None and info.get("OSRELEASE") != release:
        return None
    if stext is not None and _hex(info, "SYMBOL(_stext)") not in (None, stext):
        return None
    return info if _hex(info, "KERNELOFFSET") is not None else None


def _vmcoreinfo_entries(text: str) -> dict[str, str]:
    entries: dict[str, str] = {}
    for line in text.splitlines()[:4096]:
        key, eq, value = line.partition("=")
        if eq and key and key not in entries:
            entries[key] = value.strip()
    return entries


def _hex(entries: dict[str, str], key: str) -> int | None:
    try:
        return int(entries[key], 16)
    except (KeyError, ValueError):
        return None


def find_vmcoreinfo(
    source: PhysicalSource, release: str | None, stext: int | None
) -> dict[str, str] | None:
    """The kernel's VMCOREINFO text in memory, checked against its release and `_stext`."""
    for n, hit in enumerate(source.find(b"KERNELOFFSET=")):
        if n >= MAX_VMCOREINFO_HITS:
            break
        page = hit & ~0xFFF
        try:
            raw = source.read(page, min(4096, source.size - page))
        except VmiError:
            continue
        begin = raw.rfind(b"OSRELEASE=", 0, hit - page)
        if begin < 0:
            continue
        info = _checked_vmcoreinfo(raw[begin:].split(b"\0", 1)[0], release, stext)
        if info is not None:
            return info
    return None


def carved_isf(carved: CarvedKernel, source_name: str, progress: Progress | None = None) -> dict:
    """The ISF of a carved kernel, built like one from its package."""
    from vmishell.symbols.isf_build import build_isf

    producer = {
        "kernel": f"guest memory of {source_name}",
        "types_from": "BTF in guest memory",
        "symbols_from": "kallsyms in guest memory",
        "btf_sha256": carved.btf_sha256,
        "kaslr": carved.slide_from,
    }
    return build_isf(
        carved.btf,
        carved.symbols,
        banner=carved.banner,
        pointer_size=carved.pointer_size,
        endian=carved.endian,
        producer=producer,
        progress=progress,
    )
