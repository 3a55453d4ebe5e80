"""The lab's build-ahead step: what it builds, in which order, and how it fails."""

from __future__ import annotations

import threading

import pytest

from vmishell.errors import LabError
from vmishell.lab import prebuild
from vmishell.lab.guests import GUESTS
from vmishell.lab.prebuild import Chain, Step, build_all, plan


def _steps(chains: list[Chain]) -> dict[str, list[str]]:
    return {chain.key: [step.what for step in chain.steps] for chain in chains}


def test_every_image_is_built_once_in_the_chain_of_its_apt_state() -> None:
    steps = _steps(plan(GUESTS))
    images = [what for whats in steps.values() for what in whats]
    assert sorted(images) == sorted({f"image {spec.image_name}" for spec in GUESTS.values()})
    assert steps["amd64"][0] == "image x86_64"  # la57 and pti boot the same image
    assert steps["i386"] == ["image i386-pae", "image i386"]
    for spec in GUESTS.values():
        if spec.suite:
            assert f"image {spec.image_name}" in steps[f"{spec.debian_arch}-{spec.suite}"]


def test_dbg_files_of_the_host_suite_come_last_and_the_xen_image_after_amd64s() -> None:
    steps = _steps(plan(["x86_64", "i386-pae", "i386", "x86_64-sid"], dbg=True, xen=True))
    assert steps["amd64"] == ["image x86_64", "Xen host image", "-dbg files of x86_64"]
    assert steps["i386"] == [
        "image i386-pae",
        "image i386",
        "-dbg files of i386-pae",
        "-dbg files of i386",
    ]
    assert steps["amd64-sid"] == ["image x86_64-sid"]  # no -dbg of other suites


def test_chains_run_side_by_side_and_every_failure_is_reported(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    both_started = threading.Barrier(2, timeout=10)
    ran: list[str] = []

    def waits(name: str) -> Step:
        def run() -> str:
            both_started.wait()  # deadlocks (BrokenBarrierError) if chains ran one by one
            ran.append(name)
            return name

        return Step(name, run)

    def fails(name: str) -> Step:
        def run() -> str:
            raise LabError("no route to the archive")

        return Step(name, run)

    chains = [
        Chain("a", [waits("a1"), fails("a2"), waits("a3-never")]),
        Chain("b", [waits("b1"), fails("b2")]),
    ]
    monkeypatch.setattr(prebuild, "plan", lambda *_a, **_k: chains)
    with pytest.raises(LabError) as err:
        build_all(["x86_64"], jobs=2)
    assert sorted(ran) == ["a1", "b1"]
    assert "a2: no route to the archive" in str(err.value)
    assert "b2: no route to the archive" in str(err.value)
