"""The memory carve's kallsyms search equals the package builder's on every layout."""

from __future__ import annotations

import pytest
from test_kallsyms import build_tables, embed, make_symbols

from vmishell.errors import ProfileError
from vmishell.symbols.carve_kallsyms import carve_kallsyms
from vmishell.symbols.kallsyms import find_kallsyms


@pytest.mark.parametrize(
    ("ptr", "layout", "mode", "markers_width", "seqs"),
    [
        (8, "6.1", "percpu", 8, False),  # x86_64 up to 6.1 upstream
        (8, "6.1", "percpu", 4, True),  # Debian's 6.1.1xx: u32 markers, seqs_of_names
        (8, "6.1", "relative", 8, False),  # arm64
        (8, "6.1", "relative", 8, True),  # 6.2/6.3
        (4, "6.1", "relative", 4, False),  # i386
        (8, "6.1", "absolute", 8, False),  # without KALLSYMS_BASE_RELATIVE
        (8, "6.4", "relative", 4, True),  # offsets after token_index
        (8, "6.4", "percpu", 4, True),
        (4, "6.4", "relative", 4, True),
    ],
)
def test_carving_decodes_every_layout_like_the_package_reader(
    ptr: int, layout: str, mode: str, markers_width: int, seqs: bool
) -> None:
    syms = make_symbols(ptr, count=900, percpu=mode == "percpu")
    data = embed(build_tables(syms, ptr=ptr, layout=layout, mode=mode,
                              markers_width=markers_width, seqs=seqs))  # fmt: skip
    carved = carve_kallsyms(data, pointer_size=ptr)
    reference = find_kallsyms(data, pointer_size=ptr)
    assert carved.symbols == reference.symbols
    assert carved.layout == reference.layout
    assert [tuple(s) for s in carved.symbols] == [tuple(s) for s in syms]


def test_a_table_too_small_for_a_kernel_is_refused() -> None:
    syms = make_symbols(8, count=40)
    data = embed(build_tables(syms, ptr=8, layout="6.1", mode="relative"))
    assert len(find_kallsyms(data)) < 256
    with pytest.raises(ProfileError, match=r"only \d+ symbols"):
        carve_kallsyms(data)


def test_candidates_beyond_the_cap_are_not_tried_and_the_error_says_so() -> None:
    decoy = b"".join(bytes([c, 0]) for c in b"0123456789") + b"y\0" * 300
    with pytest.raises(ProfileError, match="and more, not tried"):
        carve_kallsyms(decoy * 20, max_candidates=3)
