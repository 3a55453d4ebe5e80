"""Large read results built in place: one new bytes object, filled once, on huge pages.

Why: a 64 MiB `bytes` result costs more in the 16,384 page faults of its own
fresh allocation than in copying guest memory into it (measured here: 50-70 ms
for the faults and zeroing, 10 ms for the copy). The C API's way to build a
bytes object is to allocate it uninitialised and fill it before anyone else
sees it; doing that through ctypes, and asking the kernel for transparent
huge pages on the allocation first (`MADV_HUGEPAGE`, honoured when THP is
`madvise` or `always`), makes the faults 512 times fewer. The result is an
ordinary immutable `bytes`; nothing outside the caller ever sees it unfilled.

Where ctypes or the C API is not there (another Python implementation), the
caller falls back to joining the pieces.
"""

from __future__ import annotations

import mmap
from typing import Any

#: From this size on a result is built in place (smaller ones gain nothing:
#: they do not span a whole huge page).
IN_PLACE_MIN = 4 << 20
_HUGE = 2 << 20

_api: tuple[Any, Any, Any] | None = None
_unavailable = False


def _load() -> tuple[Any, Any, Any] | None:
    """ctypes' handles on PyBytes_FromStringAndSize, PyBytes_AsString and madvise (once)."""
    global _api, _unavailable
    if _api is not None or _unavailable:
        return _api
    try:
        import ctypes

        new = ctypes.pythonapi.PyBytes_FromStringAndSize
        new.restype = ctypes.py_object
        new.argtypes = [ctypes.c_void_p, ctypes.c_ssize_t]
        as_string = ctypes.pythonapi.PyBytes_AsString
        as_string.restype = ctypes.c_void_p
        as_string.argtypes = [ctypes.py_object]
        madvise = ctypes.CDLL(None, use_errno=True).madvise
        madvise.restype = ctypes.c_int
        madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        _api = (new, as_string, madvise)
    except (ImportError, AttributeError, OSError):
        _unavailable = True
    return _api


def fresh_bytes(size: int) -> tuple[bytes, memoryview] | None:
    """A new `bytes` of `size` unfilled bytes and a writable view onto it, or None.

    The caller must write every byte through the view and release it before
    the bytes object is handed to anyone; None means "build it another way".
    """
    api = _load() if size >= IN_PLACE_MIN else None
    if api is None:
        return None
    import ctypes

    new, as_string, madvise = api
    data: bytes = new(None, size)
    address = as_string(data)
    first = (address + _HUGE - 1) & ~(_HUGE - 1)
    last = (address + size) & ~(_HUGE - 1)
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if advice is not None and last > first:
        madvise(first, last - first, advice)  # a hint: failure only costs speed
    view = memoryview((ctypes.c_char * size).from_address(address)).cast("B")
    return data, view
