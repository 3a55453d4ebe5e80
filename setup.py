"""Packaging beyond what pyproject.toml can say: the shipped profiles as package data.

The repository keeps its ISF profiles in the top-level `profiles/` folder
(documented, and where `scripts/make-i386-profiles` writes). A wheel has no
top-level folders of its own, so the folder is mapped into the package as
`vmishell/profiles/`, where the profile finder of an installed copy looks.
"""

from __future__ import annotations

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["vmishell", "vmishell.*"]), "vmishell.profiles"],
    package_dir={"vmishell.profiles": "profiles"},
    package_data={
        "vmishell": ["py.typed", "lab/*.sh", "lab/xen/*.sh"],
        "vmishell.profiles": ["*.json", "*.json.xz", "*.json.gz", "README.md"],
    },
)
