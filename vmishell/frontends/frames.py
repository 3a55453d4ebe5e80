"""DataFrames of guest data that are safe to show: escaped HTML, sanitised text, hex addresses.

The magics return ordinary pandas data, but wrapped in `GuestFrame`, a
DataFrame subclass that only changes how it is *shown*: every string cell
goes through `safe_text` (no terminal escape sequences, no bidi overrides
reordering a notebook line), HTML is escaped (pandas escapes, and we keep
it that way), and the columns named in `attrs["vmishell.hex"]` print as
hex. Filtering, sorting and slicing keep the subclass (pandas'
`_constructor` protocol), so `df[df.uid == 0]` is as safe to show as `df`.
Values are untouched: `df.task` stays integers for arithmetic.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Iterable
from typing import Any

import pandas as pd

from vmishell.frontends.text import safe_text

HEX_KEY = "vmishell.hex"

Formatter = Callable[[Any], str]


def _is_missing(value: Any) -> bool:
    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):
        return False


def hex_cell(value: Any) -> str:
    """An address or raw value as hex; floats that hold integers too (pandas NaN-widened)."""
    if _is_missing(value):
        return ""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, numbers.Integral):
        return f"{int(value):#x}"
    if isinstance(value, float) and value.is_integer():
        return f"{int(value):#x}"
    return safe_text(str(value))


def text_cell(value: Any) -> str:
    """A text cell; a missing value (None, NaN: a kernel thread's cmdline) shows as empty."""
    if isinstance(value, str):
        return safe_text(value)
    if isinstance(value, bytes):
        return repr(value)
    if _is_missing(value):
        return ""
    return safe_text(str(value))


def _formatters(df: pd.DataFrame) -> dict[Any, Formatter]:
    hex_cols = set(df.attrs.get(HEX_KEY, ()))
    out: dict[Any, Formatter] = {}
    for col, dtype in df.dtypes.items():
        if col in hex_cols:
            out[col] = hex_cell
        elif not (pd.api.types.is_numeric_dtype(dtype) or pd.api.types.is_bool_dtype(dtype)):
            out[col] = text_cell
    return out


def _safe_columns(df: pd.DataFrame) -> pd.DataFrame:
    """A shallow view whose column labels and index are safe text (they may be guest data),
    and whose missing text values are empty."""
    view = pd.DataFrame(df, copy=False)
    for i, dtype in enumerate(df.dtypes):
        if pd.api.types.is_object_dtype(
            dtype
        ):  # None/NaN in a text column (a kernel thread's cmdline): empty
            col = view.iloc[:, i]
            if col.isna().any():
                view.isetitem(i, col.where(col.notna(), ""))
    view.columns = [safe_text(str(c)) for c in df.columns]
    if not isinstance(df.index, pd.RangeIndex):
        view.index = [safe_text(str(i)) for i in df.index]
    view.attrs = {HEX_KEY: [safe_text(str(c)) for c in df.attrs.get(HEX_KEY, ())]}
    return view


def frame_html(df: pd.DataFrame) -> str:
    """HTML for a guest DataFrame: escaped, hex columns, pandas' display limits."""
    view = _safe_columns(df)
    return view.to_html(
        formatters=_formatters(view),
        escape=True,
        na_rep="",
        max_rows=pd.get_option("display.max_rows"),
        max_cols=pd.get_option("display.max_columns"),
        show_dimensions=pd.get_option("display.show_dimensions") is True
        or len(df) > (pd.get_option("display.max_rows") or len(df)),
        classes="vmishell",
    )


def frame_text(df: pd.DataFrame) -> str:
    """Plain text for a terminal: hex columns, every character safe to print."""
    view = _safe_columns(df)
    text = view.to_string(
        formatters=_formatters(view),
        na_rep="",
        max_rows=pd.get_option("display.max_rows"),
        max_cols=pd.get_option("display.max_columns"),
        show_dimensions=len(df) > (pd.get_option("display.max_rows") or len(df)),
    )
    return safe_text(text)


class GuestSeries(pd.Series):
    """A column of a GuestFrame: shown through safe_text too."""

    @property
    def _constructor(self) -> type[GuestSeries]:
        return GuestSeries

    @property
    def _constructor_expanddim(self) -> type[GuestFrame]:
        return GuestFrame

    def __repr__(self) -> str:
        return safe_text(super().__repr__())

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        p.text(repr(self))


class GuestFrame(pd.DataFrame):
    """A DataFrame of guest data; see the module docstring for what changes (display only)."""

    @property
    def _constructor(self) -> type[GuestFrame]:
        return GuestFrame

    @property
    def _constructor_sliced(self) -> type[GuestSeries]:
        return GuestSeries

    def __repr__(self) -> str:
        return frame_text(self)

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        p.text(frame_text(self))

    def _repr_html_(self) -> str:
        return frame_html(self)


def guest_frame(
    data: pd.DataFrame | Iterable[Any], columns: list[str] | None = None, *, hex: Iterable[str] = ()
) -> GuestFrame:
    """Wrap (or build) a DataFrame as a GuestFrame with `hex` columns shown in hex."""
    df = GuestFrame(data, columns=columns) if columns is not None else GuestFrame(data)
    df.attrs[HEX_KEY] = [c for c in hex if c in df.columns]
    return df


__all__ = ["GuestFrame", "GuestSeries", "frame_html", "frame_text", "guest_frame", "hex_cell"]
