"""Everything guest-derived is shown safely: escaped in HTML, defanged in terminals.

These tests feed hostile strings (HTML tags, terminal escape sequences, bidi
overrides) straight into the renderers, with no guest needed; the lab test
`test_hostile_lab.py` does the same with a process that really has such a name.
"""

from __future__ import annotations

import pandas as pd
import pytest

from vmishell.arch.modes import LEVEL4_SPEC
from vmishell.arch.results import EntryFlags, Page, Translation, Walk, WalkStep
from vmishell.errors import PageFault
from vmishell.frontends.frames import GuestFrame, GuestSeries, frame_html, frame_text, guest_frame
from vmishell.frontends.memory import Memory, hex_html, hex_text, read_window
from vmishell.frontends.walkview import WALK_COLUMNS, WalkFrame

EVIL = ["<b>x</b>", "<script>alert(1)</script>", "a\x1b[2Jb", "\u202eevil", "&amp;"]


def hostile_frame() -> GuestFrame:
    df = pd.DataFrame(
        {
            "pid": [1, 2, 3, 4, 5],
            "comm": EVIL,
            "task": [0xFFFF888000001000 + i for i in range(5)],
            "dtb": [0x1000, None, 0x3000, 0x4000, 0x5000],
        }
    )
    return guest_frame(df, hex=["task", "dtb"])


def test_html_of_a_guest_frame_escapes_every_string() -> None:
    page = hostile_frame()._repr_html_()
    assert "<b>x</b>" not in page and "&lt;b&gt;x&lt;/b&gt;" in page
    assert "<script>" not in page
    assert "&amp;amp;" in page  # escaped once more, shown as the text "&amp;"
    assert "\x1b" not in page and "\u202e" not in page


def test_text_of_a_guest_frame_has_no_control_characters() -> None:
    text = repr(hostile_frame())
    assert "\x1b" not in text and "\u202e" not in text
    assert "\\x1b[2J" in text and "\\u202e" in text
    assert "<b>x</b>" in text  # plain text is not HTML: tags are just characters


def test_hex_columns_print_as_hex_but_stay_integers() -> None:
    df = hostile_frame()
    assert "0xffff888000001000" in repr(df) and "0xffff888000001000" in df._repr_html_()
    assert df["task"].iloc[0] == 0xFFFF888000001000


def test_derived_frames_and_columns_stay_safe() -> None:
    df = hostile_frame()
    for derived in (df[df.pid > 1], df.sort_values("comm"), df.head(2), df.reset_index()):
        assert isinstance(derived, GuestFrame)
        assert "\x1b" not in repr(derived)
        assert "<b>" not in derived._repr_html_()
    assert isinstance(df["comm"], GuestSeries)
    assert "\x1b" not in repr(df["comm"])


def test_hostile_column_names_and_index_labels_are_escaped_too() -> None:
    df = guest_frame(pd.DataFrame({"<i>c</i>": ["v"]}, index=["<u>\x1b[31m</u>"]))
    page = frame_html(df)
    assert "<i>" not in page and "<u>" not in page and "\x1b" not in page
    assert "\x1b" not in frame_text(df)


def test_memory_is_bytes_that_show_as_an_escaped_hex_dump() -> None:
    data = b"<b>&x</b>\x1b[2J\x00\xff" + bytes(10)
    m = Memory(data, 0x600000, pid=84)
    assert m == data and isinstance(m, bytes) and m[:3] == b"<b>"
    assert m.address == 0x600000 and m.end == 0x600000 + len(data)
    page = m._repr_html_()
    assert "<b>" not in page and "&lt;b&gt;&amp;x&lt;/b&gt;" in page
    assert "3c 62 3e" in page
    text = hex_text(bytes(m), m.address)
    assert "\x1b" not in text and text.startswith("00600000  3c 62 3e")


def test_unreadable_and_changed_bytes_are_marked() -> None:
    page = hex_html(b"abcd", 0x1000, readable=b"\x01\x00\x01\x01", changed={2})
    assert "??" in page and 'class="changed"' in page
    text = hex_text(b"abcd", 0x1000, readable=b"\x01\x00\x01\x01")
    assert "61 ?? 63 64" in text
    colored = hex_text(b"abcd", 0x1000, changed={0}, color=True)
    assert "\x1b[1;33m61\x1b[0m" in colored
    assert "\x1b" not in hex_text(b"abcd", 0x1000, changed={0}, color=False)


class Pages:
    """Reads succeed except on the listed pages."""

    def __init__(self, holes: set[int]) -> None:
        self.holes = holes

    def read(self, vaddr: int, size: int) -> bytes:
        if vaddr & ~0xFFF in self.holes:
            raise PageFault(vaddr, "PT")
        return bytes([0xAB]) * size


def test_read_window_spoils_only_the_unmapped_page() -> None:
    data, ok = read_window(Pages({0x2000}), 0x1F00, 0x300)
    assert ok[:0x100] == b"\x01" * 0x100 and ok[0x100:0x200] == bytes(0x100)
    assert data[0x100:0x200] == bytes(0x100) and data[:0x100] == b"\xab" * 0x100
    with pytest.raises(PageFault):
        read_window(Pages({0x2000}), 0x2000, 0x100)


def _walk(fault: bool) -> Walk:
    flags = EntryFlags.PRESENT | EntryFlags.WRITABLE | EntryFlags.USER
    steps = []
    table = 0x1000
    for level, index in (("PML4", 0), ("PDPT", 0), ("PD", 3), ("PT", 0)):
        present = not (fault and level == "PT")
        steps.append(
            WalkStep(
                level, table, index, table + 8 * index, (table + 0x1000) | 0x7 if present else 0,
                present, flags if present else EntryFlags(0), level == "PT", table + 0x1000,
                0x1000 if level == "PT" else None,
            )
        )  # fmt: skip
        table += 0x1000
    if fault:
        return Walk(0x600000, tuple(steps), None, PageFault(0x600000, "PT", 0, 0x4000))
    page = Page(
        0x600000, 0x5000, 0x1000, True, True, False, False, True, True, "PT", 0x5007, 0x4000
    )
    return Walk(0x600010, tuple(steps), Translation(0x600010, 0x5010, page), None)


def test_a_walk_frame_has_one_row_per_level_and_draws_itself() -> None:
    frame = WalkFrame.from_walk(_walk(fault=False), LEVEL4_SPEC)
    assert list(frame.columns) == WALK_COLUMNS
    assert list(frame["level"]) == ["PML4", "PDPT", "PD", "PT"]
    assert frame.ok and frame.paddr == 0x5010
    assert "PRESENT|WRITABLE|USER" in frame["flags"].iloc[0]
    page = frame._repr_html_()
    assert "4 levels" in page and "offset 0x10" in page and "0x5010" in page
    assert "bits 47–39" in page  # the PML4 index bits, from the mode
    assert "=> 0x600010 -> physical 0x5010" in repr(frame)
    assert type(frame[frame.index > 1]) is GuestFrame  # derived frames drop the walk


def test_a_faulting_walk_shows_where_it_stopped() -> None:
    frame = WalkFrame.from_walk(_walk(fault=True), LEVEL4_SPEC)
    assert not frame.ok and frame.paddr is None
    assert pd.isna(frame["next"].iloc[3])
    assert "page fault" in frame._repr_html_() and "not present" in frame._repr_html_()
    assert "page fault translating 0x600000 at PT" in repr(frame)


def test_widgets_show_hostile_names_as_text() -> None:
    from vmishell.frontends.widgets import ProcessTable

    table = ProcessTable(hostile_frame())
    assert "<b>x</b>" not in table.table.value and "&lt;b&gt;x&lt;/b&gt;" in table.table.value
    table.filter.value = "<b>"
    assert list(table.shown["pid"]) == [1]
    table.filter.value = ""
    table.sort_by.value = "pid"
    table.descending.value = True
    assert list(table.shown["pid"]) == [5, 4, 3, 2, 1]


def test_hex_viewer_reads_only_the_page_on_screen() -> None:
    from vmishell.frontends.widgets import HexViewer

    reads: list[tuple[int, int]] = []

    class Recorder:
        def read(self, vaddr: int, size: int) -> bytes:
            reads.append((vaddr, size))
            return b"<&>" * (size // 3) + b"x" * (size % 3)

    viewer = HexViewer(Recorder(), 0x10000, page=64)
    assert sum(size for _, size in reads) == 64
    assert "&lt;&amp;&gt;" in viewer.view.value and "<&>" not in viewer.view.value
    viewer.next_button.click()
    assert viewer.address == 0x10040 and reads[-1] == (0x10040, 64)
    viewer.prev_button.click()
    viewer.go("0x20000 + 0x10")
    assert viewer.address == 0x20010
    viewer.go("no_such_symbol")
    assert "no_such_symbol" in viewer.status.value and viewer.address == 0x20010
    assert viewer.reads == 4
