"""%dt spells anonymous types out inline, as pahole and drgn do, never as hashed names."""

from __future__ import annotations

from pathlib import Path

import pytest

from vmishell.frontends.types import inline_type, is_anonymous
from vmishell.symbols.decode import layout

PROFILE = Path(__file__).resolve().parents[2] / "profiles/linux-6.1.0-57-amd64-6.1.192-3.json.xz"


@pytest.fixture(scope="module")
def profile():
    from vmishell.symbols.profile import load_profile

    return load_profile(PROFILE)


def test_mm_struct_members_of_anonymous_types_read_as_c(profile) -> None:
    types = {r.name: inline_type(profile, r.type) for r in layout(profile, "mm_struct")}
    assert types["mm_users"] == "struct {int counter;}"  # atomic_t
    assert types["pgd"] == "struct {long unsigned int pgd;} *"  # pgd_t *
    assert not any(is_anonymous(t) for t in types.values())


def test_a_long_anonymous_type_is_cut_after_whole_members(profile) -> None:
    types = {r.name: inline_type(profile, r.type, width=40) for r in layout(profile, "mm_struct")}
    context = types["context"]  # mm_context_t: many members
    assert context.startswith("struct {long long unsigned int ctx_id;") and context.endswith("…}")
    assert len(context) < 40 + 40


def test_named_types_are_left_alone(profile) -> None:
    assert inline_type(profile, "struct list_head *") == "struct list_head *"
    assert inline_type(profile, "struct unnamed_0123456789abcdef") == "struct {…}"
