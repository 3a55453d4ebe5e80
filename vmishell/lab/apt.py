"""Download Debian packages of any architecture with apt, leaving the system alone.

The lab needs i386 kernels on an amd64 host. Adding i386 to the system's dpkg
architectures has broken `apt-get update` on these machines, and installing a
kernel package would touch /boot. So every architecture gets a private apt
state (package lists and cache) inside the lab cache, selected with `-o`
options, and packages are fetched with `apt-get download`, which only writes
the .deb into the current directory. The system's sources.list and keys are
reused as they are, except for another Debian suite (bullseye, trixie, sid):
that one gets a private one-line source list on the system's own mirror,
checked with the system's archive keyring (which signs every current suite).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path

from vmishell.errors import LabError, MissingToolError

Progress = Callable[[str], None]

#: The mirror used for another suite when the system's sources name none.
DEFAULT_MIRROR = "http://deb.debian.org/debian"
ARCHIVE_KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
SYSTEM_SOURCES = (Path("/etc/apt/sources.list"), Path("/etc/apt/sources.list.d"))


def _require(program: str, package: str) -> str:
    path = shutil.which(program)
    if path is None:
        raise MissingToolError(program, package)
    return path


class PrivateApt:
    """apt-get/apt-cache bound to one Debian architecture and a private state dir.

    `suite` ("trixie", "sid", ...) reads that suite of the system's mirror
    instead of the system's own sources; None keeps the system's sources.
    """

    def __init__(
        self,
        debian_arch: str,
        state_dir: Path,
        progress: Progress | None = None,
        suite: str | None = None,
    ) -> None:
        self.debian_arch = debian_arch
        self.state_dir = state_dir
        self.suite = suite
        self._progress = progress or (lambda _msg: None)
        self._updated = False

    @property
    def what(self) -> str:
        """How messages name this state: "amd64" or "amd64, trixie"."""
        return f"{self.debian_arch}, {self.suite}" if self.suite else self.debian_arch

    # -- plumbing -------------------------------------------------------------------
    def options(self) -> list[str]:
        """The `-o` options that select the private architecture and state."""
        lists, cache = self.state_dir / "lists", self.state_dir / "cache"
        opts = [
            "-o", f"APT::Architecture={self.debian_arch}",
            "-o", f"APT::Architectures={self.debian_arch}",
            "-o", f"Dir::State::Lists={lists}",
            "-o", f"Dir::Cache={cache}",
        ]  # fmt: skip
        if self.suite:
            opts += [
                "-o", f"Dir::Etc::SourceList={self.state_dir / 'sources.list'}",
                "-o", "Dir::Etc::SourceParts=/nonexistent",
            ]  # fmt: skip
        return opts

    def _prepare(self) -> None:
        for sub in ("lists/partial", "cache/archives/partial"):
            (self.state_dir / sub).mkdir(parents=True, exist_ok=True)
        if self.suite:
            line = suite_source_line(self.suite, system_mirror())
            path = self.state_dir / "sources.list"
            if not path.is_file() or path.read_text() != line:
                path.write_text(line)

    def _run(
        self, tool: str, args: Sequence[str], cwd: Path | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        exe = _require(tool, "apt")
        self._prepare()
        env = dict(os.environ, LC_ALL="C", DEBIAN_FRONTEND="noninteractive")
        proc = subprocess.run(
            [exe, *self.options(), *args],
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        if check and proc.returncode != 0:
            raise LabError(
                f"`{tool} {' '.join(args)}` ({self.what}) failed "
                f"with exit code {proc.returncode}:\n{_tail(proc.stderr or proc.stdout)}"
            )
        return proc

    @property
    def has_lists(self) -> bool:
        """Whether the private package lists were ever downloaded."""
        lists = self.state_dir / "lists"
        return lists.is_dir() and any(lists.glob("*_Packages*"))

    # -- operations -----------------------------------------------------------------------
    def update(self) -> None:
        """Fetch the package lists into the private state.

        Partial failures are tolerated: a security mirror caught mid-sync fails
        its index with a size mismatch while the main archive is fine. What
        matters is whether the packages we want get a candidate afterwards,
        which the callers check.
        """
        self._progress(f"apt: updating {self.what} package lists")
        proc = self._run("apt-get", ["-q", "update"], check=False)
        self._updated = True
        if not self.has_lists:
            raise LabError(
                f"apt-get update for {self.what} fetched no package list "
                f"(is the Debian archive reachable?):\n{_tail(proc.stderr or proc.stdout)}"
            )

    def ensure_lists(self, refresh: bool = False) -> None:
        """Update if there are no lists yet, or when `refresh` asks for it (once per object)."""
        if (refresh or not self.has_lists) and not self._updated:
            self.update()

    def candidate(self, package: str) -> str | None:
        """The version apt would download for `package`, or None."""
        out = self._run("apt-cache", ["policy", package]).stdout
        m = re.search(r"^\s*Candidate:\s*(\S+)", out, re.M)
        if m is None or m.group(1) == "(none)":
            return None
        return m.group(1)

    def depends(self, package: str, prefix: str = "") -> list[str]:
        """Names `package` depends on (first alternative each), filtered by `prefix`."""
        proc = self._run("apt-cache", ["depends", package], check=False)
        names = []
        for line in proc.stdout.splitlines():
            m = re.match(r"\s*\|?Depends:\s*<?([^\s>]+)>?", line)
            if m and m.group(1).startswith(prefix):
                names.append(m.group(1))
        return names

    @property
    def updated(self) -> bool:
        """Whether this object already refreshed the lists (so a retry is pointless)."""
        return self._updated

    def resolve(self, package: str) -> str:
        """The candidate version of `package`, updating the lists once if there is none."""
        self.ensure_lists()
        version = self.candidate(package)
        if version is None and not self._updated:
            self.update()
            version = self.candidate(package)
        if version is None:
            raise LabError(
                f"apt has no candidate for {package} ({self.what}) even after "
                f"`apt-get update` in {self.state_dir}"
            )
        return version

    def download(self, package: str, version: str, dest: Path) -> Path:
        """The .deb of `package`=`version` in `dest`, downloaded unless already there."""
        dest.mkdir(parents=True, exist_ok=True)
        path = dest / deb_filename(package, version, self.debian_arch)
        if path.is_file() and path.stat().st_size > 0:
            return path
        self._progress(f"apt: downloading {package} {version} ({self.what})")
        self._run("apt-get", ["-q", "download", f"{package}={version}"], cwd=dest)
        if not path.is_file():
            # apt names files after the version; an "all" package or quoting differs.
            matches = sorted(dest.glob(f"{package}_*.deb"), key=lambda p: p.stat().st_mtime)
            if not matches:
                raise LabError(f"apt-get download {package} left no .deb in {dest}")
            path = matches[-1]
        return path


def lab_apt(
    root: Path, debian_arch: str, suite: str = "", progress: Progress | None = None
) -> PrivateApt:
    """The lab's private apt state for an architecture and suite ("": the host's sources).

    Its lock file is `<root>/locks/apt-<state_dir.name>.lock`: see `lock_name`.
    """
    name = f"{debian_arch}-{suite}" if suite else debian_arch
    return PrivateApt(debian_arch, root / "apt" / name, progress, suite=suite or None)


def lock_name(apt: PrivateApt) -> str:
    """The lock file name that serialises users of one private apt state."""
    return f"apt-{apt.state_dir.name}.lock"


def suite_source_line(suite: str, mirror: str) -> str:
    """The private source list of one suite: main only, signed by the archive keyring."""
    if not re.fullmatch(r"[a-z][a-z0-9-]*", suite):
        raise LabError(f"not a Debian suite name: {suite!r}")
    return f"deb [signed-by={ARCHIVE_KEYRING}] {mirror} {suite} main\n"


def system_mirror(sources: Sequence[Path] = SYSTEM_SOURCES) -> str:
    """The Debian mirror the system's own apt sources use (not its security mirror)."""
    for uri in _source_uris(sources):
        if uri.rstrip("/").endswith("/debian"):
            return uri.rstrip("/")
    return DEFAULT_MIRROR


def _source_uris(sources: Sequence[Path]) -> list[str]:
    """Every archive URI in one-line (.list) and deb822 (.sources) source files."""
    files: list[Path] = []
    for src in sources:
        if src.is_dir():
            files += sorted(p for p in src.iterdir() if p.suffix in (".list", ".sources"))
        elif src.is_file():
            files.append(src)
    uris = []
    for path in files:
        try:
            text = path.read_text(errors="replace")
        except OSError:
            continue
        for line in text.splitlines():
            line = line.split("#", 1)[0].strip()
            if line.startswith("URIs:"):
                uris += line.removeprefix("URIs:").split()
            elif line.startswith("deb "):
                words = re.sub(r"\[[^\]]*\]", " ", line).split()
                if len(words) >= 2:
                    uris.append(words[1])
    return uris


def deb_filename(package: str, version: str, debian_arch: str) -> str:
    """The file name apt-get download gives a package (epoch colon escaped)."""
    return f"{package}_{version.replace(':', '%3a')}_{debian_arch}.deb"


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])
