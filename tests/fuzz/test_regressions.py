"""Every failure the fuzzers found, minimised to the change that triggered it.

Each test names the fuzzer and the case that found it, and would fail
again if the fix were undone. Pipeline cases are symbolic mutations of the
x86_64 lab dump (see harness.py), so they replay on any fresh dump.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support.pagetables import RW, US, P, PageTableBuilder
from vmishell.arch import PagingMode, Translator
from vmishell.errors import GuestDataError, ProfileError, SourceError
from vmishell.limits import Limits
from vmishell.sources import open_image
from vmishell.symbols.profile import load_profile

from .harness import CASE_CALLS, Harness, Mutation, work_meter
from .test_parsers import small_core

# -- the pipeline (test_pipeline_fuzz.py, scripts/fuzz-campaign) ----------------------------


@pytest.mark.lab
@pytest.mark.parametrize(
    "mutation",
    [
        # campaign seeds 178, 991 (before the fix: 20 s in the marker's mappings()).
        Mutation("task:vmi-marker.table.PML4", "fill-self"),
        # campaign seed 728.
        Mutation("task:vmi-marker.table.PDPT", "fill-self"),
        # campaign seed 716 (the kernel's own enumeration, through the direct map).
        Mutation("kernel.task.table.PDPT", "fill-self"),
    ],
    ids=str,
)
def test_self_referencing_page_tables_end_the_pipeline_within_its_time_bound(
    harness: Harness, mutation: Mutation
) -> None:
    """Session translators took the arch default cap (2**25 work units, ~20 s of
    enumeration); Limits.max_mapping_work (2**21) now bounds them to 1-3 s: about
    6 M calls, within the harness's CASE_CALLS (no failure), where 2**25 made ~100 M."""
    outcome = harness.run([mutation], memory="none")
    assert outcome.failure is None, outcome.failure
    assert any("alias" in e for e in outcome.vmi_errors.values())


@pytest.mark.parametrize("zero_copy", [True, False], ids=["zero-copy", "copying"])
def test_shared_tables_that_are_almost_empty_are_charged_for_the_entries_they_hold(
    zero_copy: bool,
) -> None:
    """Campaign seed 18230 (PML4 entries all at one table): 2.5 s where 1.3 s was the cap's
    worth. Minimised: every upper entry at one shared table, and the shared page table
    holding ONE present entry. Enumeration counted a table as 1 unit of work and a leaf
    entry as 1, but looks at all 512 entries of each table it visits, so 2**21 units took
    17 s (270 s at the arch default). A visited table now costs what it takes to look at."""
    b = PageTableBuilder(PagingMode.LEVEL4)
    pdpt, pd, pt = b.new_table(), b.new_table(), b.new_table()
    for table, child in ((b.dtb, pdpt), (pdpt, pd), (pd, pt)):
        for i in range(512):
            b.write_entry(table + 8 * i, child | P | RW | US)
    b.write_entry(pt, 0x50_0000 | P | RW | US)
    tr = Translator(
        b.source(zero_copy=zero_copy), b.dtb, b.mode, max_mapping_work=Limits().max_mapping_work
    )
    with work_meter(CASE_CALLS) as calls, pytest.raises(GuestDataError, match="alias"):
        for _ in tr.mappings():
            pass
    assert calls[0] < CASE_CALLS  # work, not seconds: the machine's load cannot decide
    # The batched array form (numpy) is held to the same bound.
    tr.flush()
    with work_meter(CASE_CALLS) as calls, pytest.raises(GuestDataError, match="alias"):
        tr.run_arrays()
    assert calls[0] < CASE_CALLS


# -- ELF cores (test_parsers.py) ------------------------------------------------------------


@pytest.mark.parametrize("length", [52, 60, 63])
def test_an_elf64_core_cut_inside_its_header_is_a_source_error(tmp_path: Path, length) -> None:
    """Found with a cut at 52 bytes: ELF64's header is 64, and struct.error escaped."""
    path = tmp_path / "core.elf"
    path.write_bytes(small_core()[:length])
    with pytest.raises(SourceError, match="cut short"):
        open_image(path)


# -- ISF profiles (test_parsers.py) -----------------------------------------------------------


def _isf(**changes) -> dict:
    isf = {
        "metadata": {"format": "6.2.0"},
        "base_types": {
            "int": {"size": 4, "signed": True, "kind": "int", "endian": "little"},
            "pointer": {"size": 8, "signed": False, "kind": "int", "endian": "little"},
        },
        "user_types": {
            "s": {
                "kind": "struct",
                "size": 8,
                "fields": {
                    "a": {
                        "offset": 0,
                        "type": {
                            "kind": "array",
                            "count": 2,
                            "subtype": {"kind": "base", "name": "int"},
                        },
                    }
                },
            }
        },
        "enums": {},
        "symbols": {"x": {"address": 16}},
    }
    for path, value in changes.items():
        *keys, last = path.split("/")
        node = isf
        for key in keys:
            node = node[key]
        node[last] = value
    return isf


def _load(tmp_path: Path, text: str):
    path = tmp_path / "p.json"
    path.write_text(text)
    return load_profile(path, cache_dir=tmp_path / "cache")


def test_the_regression_isf_loads_unchanged(tmp_path: Path) -> None:
    profile = _load(tmp_path, json.dumps(_isf()))
    assert (profile.size_of("s"), profile.symbol_address("x")) == (8, 16)


def test_json_nested_past_the_recursion_limit_is_a_profile_error(tmp_path: Path) -> None:
    """Found as metadata replaced by 5000 nested lists: RecursionError escaped json.loads."""
    text = json.dumps(_isf()).replace('"6.2.0"', "[" * 5000 + "]" * 5000)
    with pytest.raises(ProfileError, match="nests JSON too deeply"):
        _load(tmp_path, text)


@pytest.mark.parametrize(
    "where",
    [
        "user_types/s/fields/a/type/count",
        "user_types/s/fields/a/offset",
        "user_types/s/size",
        "symbols/x/address",
        "base_types/int/size",
    ],
)
def test_an_infinite_number_is_a_profile_error(tmp_path: Path, where: str) -> None:
    """Found as `"count": Infinity` (Python's json reads it): OverflowError escaped int()."""
    with pytest.raises(ProfileError):
        _load(tmp_path, json.dumps(_isf(**{where: float("inf")})))


def test_an_infinite_enum_constant_is_a_profile_error(tmp_path: Path) -> None:
    enum = {"size": 4, "base": "int", "constants": {"A": float("inf")}}
    with pytest.raises(ProfileError, match="enum e is malformed"):
        _load(tmp_path, json.dumps(_isf(**{"enums/e": enum})))


@pytest.mark.parametrize("table", ["symbols", "user_types"])
def test_a_name_with_a_lone_surrogate_is_a_profile_error(tmp_path: Path, table: str) -> None:
    """Found as a renamed key "\\ud800...": UnicodeEncodeError escaped when packing names."""
    body = {"address": 1} if table == "symbols" else _isf()["user_types"]["s"]
    with pytest.raises(ProfileError, match="not valid Unicode"):
        _load(tmp_path, json.dumps(_isf(**{f"{table}/\ud800x": body})))
