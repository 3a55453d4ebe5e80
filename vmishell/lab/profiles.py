"""Make sure a lab guest's kernel has a profile, building one when Debian moved on.

The project ships profiles for the kernels the lab booted when they were last
refreshed (`scripts/refresh-profiles`). Debian's archive keeps only the newest
kernel of each flavour, so the lab may boot a kernel no shipped profile
matches: then this module builds its profile from the guest's own kernel
package, of the very version the guest boots. The package's own config says
what it lacks: with BTF and CONFIG_KALLSYMS_ALL (amd64, trixie arm64-16k) the
package alone suffices; without KALLSYMS_ALL (bookworm arm64: kallsyms lists
functions only) the data symbols come from the -dbg package's System.map and
the types from the image's BTF; without BTF either (i386) the -dbg package
gives both. A stale shipped
profile is harmless (the finder matches profiles by the banner in memory) and
the user is told which profile a guest gets: shipped, or built from a package.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

from vmishell.errors import PackageError, ProfileError
from vmishell.lab.build import BuiltGuest
from vmishell.symbols import deb
from vmishell.symbols.builder import PROFILE_SUFFIX, build_profile
from vmishell.symbols.finder import candidate_profiles
from vmishell.symbols.profile import load_profile

Progress = Callable[[str], None]

#: Debian architectures whose kernel images carry BTF and CONFIG_KALLSYMS_ALL
#: (the rule when a package has no config to ask, as Debian 14's linux-binary-*).
PACKAGE_ALONE = frozenset({"amd64"})


def debug_needs(debian_arch: str, config: str | None) -> tuple[bool, bool]:
    """(System.map needed from -dbg, BTF needed from -dbg) for a kernel with `config`."""
    if config is None:
        alone = debian_arch in PACKAGE_ALONE
        return not alone, not alone

    def enabled(option: str) -> bool:
        return re.search(rf"^CONFIG_{option}=y$", config, re.M) is not None

    return not enabled("KALLSYMS_ALL"), not enabled("DEBUG_INFO_BTF")


def package_config(kernel_deb: Path) -> str | None:
    """The kernel's config shipped in its package (boot/config-*), or None."""
    found = deb.extract(
        kernel_deb, lambda n: n.startswith("boot/config-"), stop_when=bool, folder="boot/"
    )
    data = next(iter(found.values()), None)
    return None if data is None else data.decode("utf-8", "replace")


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
    try:
        config = package_config(kernel_deb)
    except PackageError as exc:
        raise ProfileError(f"cannot read the config in {kernel_deb}: {exc}") from exc
    need_map, need_btf = debug_needs(debian_arch, config)
    if not (need_map or need_btf):
        return build_profile(kernel_deb, out, progress=report)
    from vmishell.lab.dbgprofiles import debug_files

    dbg = debug_files(debian_arch, package, version, btf=need_btf, progress=say)
    return build_profile(
        kernel_deb,
        out,
        system_map=dbg.system_map if need_map else None,
        btf=dbg.btf if need_btf else None,
        progress=report,
    )


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
