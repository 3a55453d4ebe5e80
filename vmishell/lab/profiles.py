"""Make sure a lab guest's kernel has a profile, building one when Debian moved on.

The project ships profiles for the kernels the lab boots today. When Debian
publishes a new kernel ABI the lab downloads the new kernel, and this module
builds its profile: from the kernel package alone where the image carries BTF
and full kallsyms (amd64), else from the `-dbg` package through pahole (i386).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from vmishell.lab.build import BuiltGuest
from vmishell.symbols.builder import PROFILE_SUFFIX, build_profile
from vmishell.symbols.finder import candidate_profiles

Progress = Callable[[str], None]


def profile_name(built: BuiltGuest) -> str:
    """The file name `vmishell profile build` gives this guest's kernel."""
    version = built.manifest["packages"]["kernel"]["version"].replace(":", "_")
    return f"linux-{built.kernel_release}-{version}{PROFILE_SUFFIX}"


def find_lab_profile(built: BuiltGuest) -> Path | None:
    name = profile_name(built)
    return next((p for p in candidate_profiles() if p.name == name), None)


def ensure_profile(built: BuiltGuest, progress: Progress | None = None) -> Path:
    """The profile of the guest's kernel: shipped, cached, or built now."""
    say = progress or (lambda _msg: None)
    found = find_lab_profile(built)
    if found is not None:
        return found
    spec = built.guest
    say(f"{spec.image_name}: no profile for {built.kernel_release} yet, building one")
    if spec.debian_arch == "i386":
        from vmishell.lab.dbgprofiles import main as build_dbg_profiles

        flavour = spec.kernel_package.removeprefix("linux-image-")
        if build_dbg_profiles(["--flavour", flavour]) != 0:
            from vmishell.errors import ProfileError

            raise ProfileError(f"building the profile of {built.kernel_release} failed")
        found = find_lab_profile(built)
        if found is None:
            from vmishell.errors import ProfileError

            raise ProfileError(
                f"built a profile for {flavour} but not for {built.kernel_release}: "
                "the lab image and the archive disagree; rebuild with `vmishell lab build --force`"
            )
        return found
    return build_profile(built.kernel_deb, progress=lambda stage, _frac: say(stage))
