"""A child process per worker slot that attaches to targets, so a hanging one can be killed.

An attach can block where no Python-level deadline reaches it (opening a
FIFO, a QMP socket that never greets, a read from a stalled device) or spin
in a crafted structure. The worker therefore never attaches itself: it
sends the target to a long-lived child (`python -m vmishell.fleet.child`),
which keeps its imports and profile caches warm across targets, and waits
for the answer with a deadline. At the deadline the child is killed and the
next target gets a fresh one.

Protocol on the child's stdin/stdout: 8-byte big-endian length, then a
pickle (the request may hold a cloudpickled user function). The child's own
prints go to stderr so they cannot corrupt the stream.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import select
import struct
import subprocess
import sys
import threading
import time
from typing import Any, BinaryIO

from vmishell.errors import VmiError
from vmishell.fleet.bounds import Bounds
from vmishell.fleet.errors import OutputTooLarge, TargetTimeout, WorkerLost

_HEADER = struct.Struct(">Q")
#: Bytes of a request (a target, options, a snapshot to diff against) the child accepts.
MAX_REQUEST = 1 << 30


def _read_exact(stream: BinaryIO, n: int) -> bytes | None:
    data = stream.read(n)
    return data if data is not None and len(data) == n else None


def _error(exc: BaseException, bounds: Bounds) -> tuple[str, str, str]:
    kind = type(exc).__name__
    text = str(exc) if isinstance(exc, VmiError) else f"unexpected {kind}: {exc}"
    return ("error", kind, text[: bounds.max_cell])


def _answer(request: dict[str, Any]) -> tuple[Any, ...]:
    from vmishell.fleet.questions import ask

    bounds: Bounds = request["bounds"]
    if request["question"] == "ping":
        return ("ok", None, [], 0.0)
    started = time.perf_counter()
    try:
        options = pickle.loads(request["options"])
        answer, notes = ask(
            request["target"], request["question"], options, request["profile"], bounds
        )
        reply: tuple[Any, ...] = ("ok", answer, notes)
    except Exception as exc:  # the sandbox boundary: every failure becomes an error reply
        reply = _error(exc, bounds)
    return (*reply, time.perf_counter() - started)


def serve(inp: BinaryIO, out: BinaryIO) -> None:
    """Answer requests until stdin closes (the worker went away)."""
    import vmishell.session  # noqa: F401  (warm: the first target should not pay imports)

    while True:
        header = _read_exact(inp, _HEADER.size)
        if header is None:
            return
        (size,) = _HEADER.unpack(header)
        if size > MAX_REQUEST:
            return
        body = _read_exact(inp, size)
        if body is None:
            return
        request = pickle.loads(body)
        payload = pickle.dumps(_answer(request), protocol=5)
        bounds: Bounds = request["bounds"]
        if len(payload) > bounds.max_bytes:
            msg = f"answer of {len(payload)} bytes is over Bounds.max_bytes ({bounds.max_bytes})"
            payload = pickle.dumps(("error", "OutputTooLarge", msg, 0.0), protocol=5)
        try:
            out.write(_HEADER.pack(len(payload)) + payload)
            out.flush()
        except BrokenPipeError:  # the worker died meanwhile: nobody to answer
            return


class Sandbox:
    """The worker's handle on one child process (started on first use, restarted after a kill)."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen[bytes] | None = None

    def _start(self) -> subprocess.Popen[bytes]:
        if self.proc is None or self.proc.poll() is not None:
            # Dask's nanny gives workers MALLOC_TRIM_THRESHOLD_=65536 (to hand memory back
            # between tasks); inherited, it made each attach 1.3-2x slower here (measured).
            env = {k: v for k, v in os.environ.items() if k != "MALLOC_TRIM_THRESHOLD_"}
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "vmishell.fleet.child"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                close_fds=True,
                env=env,
            )
        return self.proc

    def kill(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            with contextlib.suppress(OSError):
                proc.kill()
            proc.wait()
            for stream in (proc.stdin, proc.stdout):
                with contextlib.suppress(OSError):
                    stream.close()  # type: ignore[union-attr]

    def _read(self, fd: int, n: int, deadline: float, what: str) -> bytes:
        chunks: list[bytes] = []
        left = n
        while left:
            wait = deadline - time.monotonic()
            if wait <= 0 or not select.select([fd], [], [], wait)[0]:
                self.kill()
                raise TargetTimeout(what)
            chunk = os.read(fd, min(left, 1 << 20))
            if not chunk:
                code = self.proc.wait() if self.proc is not None else None
                self.kill()
                raise WorkerLost(f"the sandbox process died (exit {code}) during {what}")
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)

    def request(self, request: dict[str, Any], timeout: float, what: str) -> tuple[Any, ...]:
        """Send one request and wait at most `timeout` seconds for its reply."""
        proc = self._start()
        assert proc.stdin is not None and proc.stdout is not None
        body = pickle.dumps(request, protocol=5)
        try:
            proc.stdin.write(_HEADER.pack(len(body)) + body)
            proc.stdin.flush()
        except (BrokenPipeError, OSError) as exc:
            self.kill()
            raise WorkerLost(f"the sandbox process went away before {what}: {exc}") from None
        deadline = time.monotonic() + timeout
        fd = proc.stdout.fileno()
        expired = f"{what}: no answer within {timeout:g} s; its process was killed"
        (size,) = _HEADER.unpack(self._read(fd, _HEADER.size, deadline, expired))
        bounds: Bounds = request["bounds"]
        if size > bounds.max_bytes:
            self.kill()
            raise OutputTooLarge(f"{what}: answer of {size} bytes over {bounds.max_bytes}")
        return pickle.loads(self._read(fd, size, deadline, expired))


class SandboxPool:
    """Idle sandboxes of this process, one per concurrently running task."""

    def __init__(self) -> None:
        self._idle: list[Sandbox] = []
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def take(self):  # -> Iterator[Sandbox]
        with self._lock:
            box = self._idle.pop() if self._idle else Sandbox()
        try:
            yield box
        finally:
            with self._lock:
                self._idle.append(box)

    def close(self) -> None:
        with self._lock:
            boxes, self._idle = self._idle, []
        for box in boxes:
            box.kill()


#: The sandboxes of this (worker) process.
POOL = SandboxPool()


def main() -> None:
    """The child's entry point (`vmishell.fleet.child`)."""
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # stray prints of the code we run go to stderr, not into the protocol
    sys.stdout = sys.stderr
    serve(sys.stdin.buffer, out)
