"""Build everything the lab boots or checks against, ahead of use, in parallel.

CI's install step runs this (`vmishell lab build all --dbg --xen`) so that
the test session boots and checks guests instead of downloading and
unpacking them: every guest image and its profile, optionally the -dbg files
that profile checks compare with and the Xen host image. Work that shares a
private apt state (one Debian architecture and suite) runs in one thread,
in order; the states run side by side, since downloads wait on the network
and unpacking on one core. The apt and image locks still serialise whatever
two states share (busybox comes from the host's suite, for instance).
Anything not built here is still built on first use.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from vmishell.errors import LabError, VmiError
from vmishell.lab.guests import GUESTS, GuestSpec, get_guest

Progress = Callable[[str], None]


@dataclass
class Step:
    """One thing to build; `run` returns a line saying what it made."""

    what: str
    run: Callable[[], str]


@dataclass
class Chain:
    """Steps that share one private apt state, run in order in one thread."""

    key: str
    steps: list[Step] = field(default_factory=list)


def _image_step(spec: GuestSpec, say: Progress) -> Step:
    def run() -> str:
        from vmishell.lab.build import build_guest
        from vmishell.lab.profiles import ensure_profile

        built = build_guest(spec, progress=say)
        profile = ensure_profile(built, say)
        return f"{spec.image_name}: {built.kernel_release}, profile {profile.name}"

    return Step(f"image {spec.image_name}", run)


def _dbg_step(spec: GuestSpec, say: Progress) -> Step:
    def run() -> str:
        from vmishell.lab.build import build_guest
        from vmishell.lab.dbgprofiles import debug_files
        from vmishell.lab.profiles import PACKAGE_ALONE

        built = build_guest(spec)
        kernel = built.manifest["packages"]["kernel"]
        btf = spec.debian_arch not in PACKAGE_ALONE  # what ensure_profile asks for
        dbg = debug_files(
            spec.debian_arch, kernel["name"], kernel["version"], btf=btf, progress=say
        )
        return f"{spec.image_name}: -dbg files in {dbg.folder}"

    return Step(f"-dbg files of {spec.image_name}", run)


def _xen_step(say: Progress) -> Step:
    def run() -> str:
        from vmishell.lab.xen.image import build_xen_image

        image = build_xen_image(progress=say)
        return f"xen: {image.image_dir} (dom0 {image.kernel_release})"

    return Step("Xen host image", run)


def plan(
    guests: Iterable[str], *, dbg: bool = False, xen: bool = False, progress: Progress | None = None
) -> list[Chain]:
    """The build steps of `guests` (and -dbg files, Xen image), one chain per apt state.

    -dbg files are fetched for the guests of the host's suite (the ones the
    profile checks compare with), after every image of their chain: they are
    the largest downloads. The Xen image follows the amd64 images it reuses.
    """
    say = progress or _noop
    chains: dict[str, Chain] = {}
    images: set[str] = set()
    last: list[tuple[str, Step]] = []
    for spec in (get_guest(name) for name in guests):
        key = f"{spec.debian_arch}-{spec.suite}" if spec.suite else spec.debian_arch
        chain = chains.setdefault(key, Chain(key))
        if spec.image_name in images:
            continue
        images.add(spec.image_name)
        chain.steps.append(_image_step(spec, say))
        if dbg and not spec.suite:
            last.append((key, _dbg_step(spec, say)))
    if xen:
        chains.setdefault("amd64", Chain("amd64")).steps.append(_xen_step(say))
    for key, step in last:
        chains[key].steps.append(step)
    return list(chains.values())


def _noop(_msg: str) -> None:
    pass


def build_all(
    guests: Iterable[str] | None = None,
    *,
    dbg: bool = False,
    xen: bool = False,
    jobs: int = 4,
    progress: Progress | None = None,
) -> list[str]:
    """Build every step of `plan` (default: all guests); the lines saying what was made.

    Every chain runs to its end or its first failure; then the failures, if
    any, are raised together as one LabError naming each failed step.
    """
    say = progress or _noop
    chains = plan(GUESTS if guests is None else guests, dbg=dbg, xen=xen, progress=say)

    def run_chain(chain: Chain) -> tuple[list[str], list[str]]:
        done: list[str] = []
        for step in chain.steps:
            started = time.monotonic()
            say(f"{step.what}: started")
            try:
                line = step.run()
            except VmiError as exc:
                return done, [f"{step.what}: {exc}"]
            done.append(f"{line}  ({time.monotonic() - started:.0f} s)")
        return done, []

    with ThreadPoolExecutor(max_workers=max(1, jobs), thread_name_prefix="lab-build") as pool:
        results = list(pool.map(run_chain, chains))
    made = [line for done, _ in results for line in done]
    failed = [line for _, errors in results for line in errors]
    if failed:
        raise LabError("lab build failed:\n  " + "\n  ".join(failed))
    return made
