"""A hostile guest cannot crash, hang or exhaust vmishell: the whole pipeline, fuzzed.

Each example changes one to three structures of a real x86_64 lab dump (task
list links, mm, pgd and cred pointers, page-table entries and whole tables,
maple-tree nodes, VMA fields, dentries and names, comm bytes, random byte
flips in any of them), then attaches when the kernel's own tables changed,
lists the processes with their command lines, reads every process's memory
map, translates, reads and walks the marker's and the kernel's addresses,
enumerates mappings, and renders everything for a terminal. It asserts:

- only VmiError subclasses escape (anything else is a bug);
- every example makes at most EXAMPLE_CALLS function calls (its work,
  counted by the harness's work meter, so the bound does not depend on how
  busy the machine is); a watchdog of HANG_SECONDS of CPU time, and
  WALL_FACTOR times that of wall-clock time, stops an example that hangs;
- the Python heap's peak over the example stays under CASE_PEAK_BYTES
  (tracemalloc);
- terminal renderings hold no control, escape or bidi character.

tracemalloc makes each allocation 5-40x dearer, and mapping enumeration
allocates one object per run: so this test caps enumeration work lower than
the default (`Limits.max_mapping_work`); the default cap's own time bound is
tested without tracing in test_crafted.py and by the long campaign
(`scripts/fuzz-campaign`).
"""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmishell.limits import Limits

from .harness import (
    CASE_PEAK_BYTES,
    Harness,
    HypothesisChooser,
    choose_case,
    fuzz_settings,
)

pytestmark = pytest.mark.lab

#: The work bound of this test's examples: with mapping work capped at 2**16 (see
#: `traced_harness`) the 400 seeded examples made at most 216,675 calls each (December
#: 2026); ten times that leaves room for other dumps and still catches a blow-up that
#: CASE_CALLS (sized for the default caps) would let through.
EXAMPLE_CALLS = 2_000_000

#: The kernel image's 2 GiB (text, data, the fixmap): where init_task and the
#: banner live, so mutated kernel tables are enumerated where they matter.
KERNEL_IMAGE_SPAN = (0xFFFF_FFFF_8000_0000, 1 << 64)


@pytest.fixture(scope="module")
def traced_harness(x86_64_dump) -> Harness:
    """The dump with default limits except a mapping-work cap sized for tracemalloc."""
    return Harness(x86_64_dump, limits=replace(Limits(), max_mapping_work=1 << 16))


@fuzz_settings(400)
@given(data=st.data())
def test_a_mutated_guest_gets_only_vmishell_errors_in_bounded_time_and_memory(
    traced_harness: Harness, data: st.DataObject
) -> None:
    mutations = choose_case(traced_harness.targets, HypothesisChooser(data))
    outcome = traced_harness.run(
        mutations,
        copying=data.draw(st.booleans()),
        work=EXAMPLE_CALLS,
        memory="tracemalloc",
        kernel_span=KERNEL_IMAGE_SPAN,
    )
    shown = "; ".join(str(m) for m in mutations)
    # A failure: an exception that is not a VmiError, more than EXAMPLE_CALLS calls, a hang.
    assert outcome.failure is None, f"{shown}:\n{outcome.failure}"
    assert outcome.peak < CASE_PEAK_BYTES, f"{shown}: peak {outcome.peak} bytes"


def test_the_clean_dump_passes_the_pipeline_without_any_error(harness: Harness) -> None:
    """The baseline: every error the fuzz sees comes from a mutation."""
    outcome = harness.run([], memory="tracemalloc")
    assert outcome.failure is None
    assert outcome.vmi_errors == {}
    assert outcome.rows >= 40  # kernel threads, init, the marker and its thread, ...
