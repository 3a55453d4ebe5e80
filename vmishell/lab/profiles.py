"""Make sure a lab guest's kernel has a profile, building one when Debian moved on.

The project ships profiles for the kernels the lab booted when they were last
refreshed (`scripts/refresh-profiles`). Debian's archive keeps only the newest
kernel of each flavour, so the lab may boot a kernel no shipped profile
matches: then this module builds its profile from the guest's own kernel
package, of the very version the guest boots: from the package alone where
the image carries BTF and full kallsyms (amd64), else with the System.map and
the BTF made from the -dbg package of the same version (i386). A stale shipped
profile is harmless (the finder matches profiles by the banner in memory) and
the user is told which profile a guest gets: shipped, or built from a package.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from vmishell.lab.build import BuiltGuest
from vmishell.symbols.builder import PROFILE_SUFFIX, build_profile
from vmishell.symbols.finder import candidate_profiles
from vmishell.symbols.profile import load_profile

Progress = Callable[[str], None]

#: Debian architectures whose kernel images carry BTF and CONFIG_KALLSYMS_ALL.
PACKAGE_ALONE = frozenset({"amd64"})


def profile_name(built: BuiltGuest) -> str:
    """The file name `vmishell profile build` gives this guest's kernel."""
    version = built.manifest["packages"]["kernel"]["version"].replace(":", "_")
    return f"linux-{built.kernel_release}-{version}{PROFILE_SUFFIX}"


def find_lab_profile(built: BuiltGuest) -> Path | None:
    name = profile_name(built)
    return next((p for p in candidate_profiles() if p.name == name), None)


def build_lab_profile(
    built: BuiltGuest, out: Path | None = None, progress: Progress | None = None
) -> Path:
    """Build the profile of the guest's kernel from its own package (and -dbg package).

    `out` is a file or folder (default: the built-profiles cache the finder searches).
    """
    kernel = built.manifest["packages"]["kernel"]
    return build_kernel_profile(
        built.guest.debian_arch, kernel["name"], kernel["version"], built.kernel_deb, out, progress
    )


def build_kernel_profile(
    debian_arch: str,
    package: str,
    version: str,
    kernel_deb: Path,
    out: Path | None = None,
    progress: Progress | None = None,
) -> Path:
    """The profile of Debian kernel `package` `version`, whose .deb is `kernel_deb`."""
    say = progress or (lambda _msg: None)
    report = _stages(say)
    if debian_arch in PACKAGE_ALONE:
        return build_profile(kernel_deb, out, progress=report)
    from vmishell.lab.dbgprofiles import debug_files

    dbg = debug_files(debian_arch, package, version, btf=True, progress=say)
    return build_profile(kernel_deb, out, system_map=dbg.system_map, btf=dbg.btf, progress=report)


def ensure_profile(built: BuiltGuest, progress: Progress | None = None) -> Path:
    """The profile of the guest's kernel: shipped, cached, or built now; says which."""
    say = progress or (lambda _msg: None)
    found = find_lab_profile(built)
    if found is None:
        say(f"{built.guest.image_name}: no profile for {built.kernel_release} yet, building one")
        found = build_lab_profile(built, progress=say)
    say(f"{built.guest.image_name}: profile: {load_profile(found).provenance}")
    return found


def _stages(say: Progress) -> Callable[[str, float], None]:
    """The builder's (stage, fraction) progress as one message per stage."""
    seen: set[str] = set()

    def report(stage: str, _fraction: float) -> None:
        if stage not in seen:
            seen.add(stage)
            say(f"  {stage}")

    return report
