"""The profiles the synthetic-kernel tests run on: the shipped 6.1 one and tiny variants."""

from __future__ import annotations

from functools import cache
from pathlib import Path

from tests.support.isf import Variant, tiny_isf
from tests.support.kernel import SyntheticKernel
from vmishell.symbols.profile import Profile, load_profile

#: The shipped profile of the lab's amd64 kernel: real 6.1 layouts, from its BTF.
REAL_61 = Path(__file__).resolve().parents[2] / "profiles/linux-6.1.0-57-amd64-6.1.192-3.json.xz"

#: Layout generations, each a tiny ISF (see tests.support.isf).
VARIANTS = {
    "6.7": Variant(),
    "3.14-6.6": Variant(threads="both"),
    "5.10": Variant(threads="both", vmas="list", state_field="state"),
    "i386-pae": Variant(pointer_size=4),
    "i386-legacy-2G": Variant(
        pointer_size=4, pae=False, page_offset=0x80000000, phys_startup=False
    ),
    "i386-5.10": Variant(pointer_size=4, threads="thread_group", vmas="list", state_field="state"),
}


@cache
def real_61() -> Profile:
    return load_profile(REAL_61)


@cache
def tiny(name: str) -> Profile:
    return Profile.from_isf(tiny_isf(VARIANTS[name]), f"tiny-{name}")


def profile(name: str) -> Profile:
    """A profile by name: "6.1" (the shipped one) or a key of VARIANTS."""
    return real_61() if name == "6.1" else tiny(name)


def kernel(name: str, **kwargs: object) -> SyntheticKernel:
    """A synthetic kernel of the named layout (its PAGE_OFFSET given where the profile lacks it)."""
    variant = VARIANTS.get(name)
    if variant is not None and variant.pointer_size == 4:
        kwargs.setdefault("page_offset", variant.page_offset)
    return SyntheticKernel(profile(name), **kwargs)  # type: ignore[arg-type]
