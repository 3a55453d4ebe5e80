"""One raw dump of the x86_64 lab guest per test session, and a harness over it.

The dump comes from the session's shared x86_64 lab guest (booted by
`lab_guest`, so a machine without QEMU skips these tests, and CI fails).
The harness maps it copy-on-write and attaches once; every test that
mutates memory restores it, so the harness is shared too.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from .harness import Harness


@pytest.fixture(scope="session")
def x86_64_dump(lab_guest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    path = lab_guest("x86_64").dump(tmp_path_factory.mktemp("fuzz") / "x86_64.raw", "raw")
    yield path
    path.unlink(missing_ok=True)


@pytest.fixture(scope="session")
def harness(x86_64_dump: Path) -> Harness:
    return Harness(x86_64_dump)
