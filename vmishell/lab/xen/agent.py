"""The host end of the command channel into a Xen lab host's dom0.

QEMU exposes a virtio-serial port named `vmishell.agent` as a unix socket on
the host; dom0's /init serves it (see dom0-init.sh). A request is a shell
script, optional stdin and a time limit; the answer is its stdout, stderr
and exit code, all base64 in `@@KIND ID DATA` lines so that binary output
and stray console bytes cannot be confused with the framing. One request
runs at a time: a file lock beside the socket serialises callers across
processes, and answers to earlier requests (whose caller gave up) are
skipped by their ID.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import os
import shlex
import socket
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from vmishell.errors import LabError

#: Raw bytes of stdin per `@@in` line (its base64 is a third longer).
STDIN_CHUNK = 48 * 1024
#: Seconds allowed beyond a command's own limit for dom0 to send its answer.
ANSWER_MARGIN = 60.0
#: Bytes of one answer line the host accepts (a broken dom0 cannot grow it without end).
MAX_LINE = 1 << 20


@dataclass(frozen=True)
class ExecResult:
    """What a command run in dom0 did."""

    command: str
    returncode: int
    stdout: bytes
    stderr: bytes
    seconds: float

    @property
    def text(self) -> str:
        return self.stdout.decode("utf-8", "replace")

    def check(self) -> ExecResult:
        """Self, or a LabError with the command's stderr when it failed."""
        if self.returncode != 0:
            err = self.stderr.decode("utf-8", "replace").strip() or self.text.strip()
            raise LabError(
                f"dom0 command failed with exit code {self.returncode}: {self.command}\n"
                + "\n".join(err.splitlines()[-20:])
            )
        return self


def shell_command(argv: Sequence[str]) -> str:
    """One shell command line running `argv` as given (each word quoted)."""
    return " ".join(shlex.quote(a) for a in argv)


class Agent:
    """Runs commands in dom0 through the instance's agent socket."""

    def __init__(self, socket_path: Path, lock_path: Path | None = None) -> None:
        self.socket_path = Path(socket_path)
        self.lock_path = lock_path or self.socket_path.with_suffix(".lock")

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with self.lock_path.open("a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def run(self, script: str, *, stdin: bytes = b"", timeout: float = 300.0) -> ExecResult:
        """Run `script` with /bin/sh in dom0 and wait for it (at most `timeout` s).

        dom0 kills the command when its time is up (exit code 124, as
        `timeout` reports); the host gives up `ANSWER_MARGIN` s later.
        """
        rid = uuid.uuid4().hex[:12]
        seconds = max(1, int(timeout + 0.999))
        lines = [
            f"@@in {rid} {base64.b64encode(stdin[i : i + STDIN_CHUNK]).decode()}\n"
            for i in range(0, len(stdin), STDIN_CHUNK)
        ]
        lines.append(f"@@run {rid} {seconds} {base64.b64encode(script.encode()).decode()}\n")
        started = time.monotonic()
        deadline = started + seconds + ANSWER_MARGIN
        with self._locked(), self._connect(deadline) as sock:
            sock.sendall("".join(lines).encode())
            code, out, err = self._answer(sock, rid, deadline, script)
        return ExecResult(script, code, out, err, round(time.monotonic() - started, 3))

    @contextlib.contextmanager
    def _connect(self, deadline: float) -> Iterator[socket.socket]:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(max(0.1, deadline - time.monotonic()))
            try:
                sock.connect(os.fspath(self.socket_path))
            except OSError as exc:
                raise LabError(
                    f"cannot reach dom0's command port {self.socket_path}: {exc.strerror or exc}"
                ) from None
            yield sock
        finally:
            sock.close()

    def _answer(
        self, sock: socket.socket, rid: str, deadline: float, script: str
    ) -> tuple[int, bytes, bytes]:
        out: list[str] = []
        err: list[str] = []
        for line in _lines(sock, deadline, script):
            kind, _, rest = line.partition(" ")
            got, _, data = rest.partition(" ")
            if got != rid:
                continue  # the answer to an earlier request whose caller gave up
            if kind == "@@out":
                out.append(data.strip())
            elif kind == "@@err":
                err.append(data.strip())
            elif kind == "@@done":
                try:
                    code, *sizes = (int(v) for v in data.split())
                except ValueError:
                    raise LabError(f"dom0 sent a malformed exit code {data!r}") from None
                stdout, stderr = _decode(out), _decode(err)
                if sizes and sizes != [len(stdout), len(stderr)]:
                    raise LabError(
                        f"dom0's answer arrived incomplete ({len(stdout)}/{sizes[0]} bytes of "
                        f"stdout, {len(stderr)}/{sizes[-1]} of stderr): {script[:200]}"
                    )
                return code, stdout, stderr
        raise LabError(f"dom0's command port closed before answering: {script[:200]}")


def _decode(chunks: list[str]) -> bytes:
    try:
        return base64.b64decode("".join(chunks), validate=False)
    except ValueError as exc:
        raise LabError(f"dom0 sent malformed output: {exc}") from None


def _lines(sock: socket.socket, deadline: float, script: str) -> Iterator[str]:
    buf = b""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise LabError(f"dom0 did not answer in time: {script[:200]}")
        sock.settimeout(left)
        try:
            data = sock.recv(1 << 16)
        except TimeoutError:
            raise LabError(f"dom0 did not answer in time: {script[:200]}") from None
        except OSError as exc:
            raise LabError(f"dom0's command port failed: {exc}") from None
        if not data:
            return
        buf += data
        *complete, buf = buf.split(b"\n")
        if len(buf) > MAX_LINE:
            raise LabError("dom0 sent an answer line without end")
        for raw in complete:
            yield raw.decode("ascii", "replace").replace("\r", "")
