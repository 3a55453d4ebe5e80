"""Cheap signs of a QEMU process's life: its pid, and QMP events on a socket of its own.

A live source asks these at the start of every top-level call, so each
answer must cost well under a microsecond on average: the checks that need
a system call run at most every `POLL_INTERVAL` seconds, and between them a
call only reads the time.

- `ProcessWatch` notices that the VM process ended: through a pidfd (immune
  to pid reuse, and it sees a zombie left by a non-reaping init as ended),
  falling back to /proc/PID/stat.
- `QmpEvents` keeps one connection to a QMP monitor reserved for events
  (the lab starts QEMU with a second `-qmp` socket for this) and counts
  RESET and SHUTDOWN events, and STOP/RESUME for the run state. It never
  sends a command after the handshake, so it cannot disturb the guest or
  the monitor that tools use.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import socket
import struct
import time
from pathlib import Path

from vmishell.errors import QmpError

#: Seconds between two system-call checks of the VM's life.
POLL_INTERVAL = 0.01
#: Bytes of event text buffered before a line must have ended (a hostile peer cannot grow it).
MAX_EVENT_LINE = 1 << 16


class ProcessWatch:
    """Whether one process (QEMU) still runs."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._pidfd: int | None = None
        with contextlib.suppress(OSError, AttributeError):
            self._pidfd = os.pidfd_open(pid)
        self._start_time = _start_time(pid)
        if self._pidfd is None and self._start_time is None:
            raise QmpError(f"process {pid} does not exist")

    def alive(self) -> bool:
        if self._pidfd is not None:
            try:
                readable, _, _ = select.select([self._pidfd], [], [], 0)
            except (OSError, ValueError):
                return False
            return not readable
        # No pidfd: a process of the same start time, not a zombie.
        return self._start_time is not None and _start_time(self.pid) == self._start_time

    def close(self) -> None:
        fd, self._pidfd = self._pidfd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)


def _start_time(pid: int) -> int | None:
    """The process's start time in clock ticks, or None if it is gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[-1].split()
    if len(fields) < 20 or fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def peer_pid(socket_path: str | os.PathLike[str]) -> int | None:
    """The pid of the process serving a unix socket (SO_PEERCRED), or None.

    Used once at attach to learn which QEMU serves a QMP socket. The
    connection is closed at once, before QEMU's greeting is even read.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(2.0)
        sock.connect(os.fspath(socket_path))
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, _, _ = struct.unpack("3i", creds)
        return pid if pid > 0 else None
    except OSError:
        return None
    finally:
        sock.close()


class QmpEvents:
    """A QMP connection that only listens: resets, shutdowns and the run state."""

    def __init__(self, path: str | os.PathLike[str], *, timeout: float = 5.0) -> None:
        self.path = os.fspath(path)
        self.resets = 0
        self.shutdowns = 0
        self.running: bool | None = None
        self.closed_by_peer = False
        self.last_event: str | None = None
        self._buffer = b""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(self.path)
            greeting = self._readline(sock)
            if b"QMP" not in greeting:
                raise QmpError(f"{self.path} is not a QMP socket (greeting {greeting[:80]!r})")
            sock.sendall(b'{"execute": "qmp_capabilities"}\n')
            while True:
                reply = _parse(self._readline(sock))
                if "return" in reply:
                    break
                if "error" in reply:
                    raise QmpError(f"QMP {self.path}: {reply['error']}")
                self._event(reply)
        except OSError as exc:
            sock.close()
            raise QmpError(f"cannot listen for QMP events on {self.path}: {exc}") from exc
        except BaseException:
            sock.close()
            raise
        sock.setblocking(False)
        self._sock: socket.socket | None = sock
        self._lines()

    def _readline(self, sock: socket.socket) -> bytes:
        """One line of the handshake (blocking, with the socket's timeout)."""
        while b"\n" not in self._buffer:
            data = sock.recv(65536)
            if not data:
                raise QmpError(f"QMP {self.path} closed during the handshake")
            self._buffer += data
            if len(self._buffer) > MAX_EVENT_LINE:
                raise QmpError(f"{self.path} is not a QMP socket (no line end)")
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line

    def poll(self) -> None:
        """Take in whatever events arrived (never blocks)."""
        sock = self._sock
        if sock is None:
            return
        while True:
            try:
                data = sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                data = b""
            if not data:
                self.closed_by_peer = True
                self.close()
                break
            self._buffer += data
            if len(self._buffer) > 4 * MAX_EVENT_LINE and b"\n" not in self._buffer:
                self._buffer = b""  # not QMP: drop rather than grow
        self._lines()

    def _lines(self) -> None:
        while b"\n" in self._buffer:
            line, self._buffer = self._buffer.split(b"\n", 1)
            if line.strip():
                self._event(_parse(line))

    def _event(self, message: dict) -> None:
        name = message.get("event")
        if not isinstance(name, str):
            return
        self.last_event = name
        if name == "RESET":
            self.resets += 1
        elif name == "SHUTDOWN":
            self.shutdowns += 1
        elif name == "STOP":
            self.running = False
        elif name == "RESUME":
            self.running = True

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()


def _parse(line: bytes) -> dict:
    try:
        value = json.loads(line)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def qmp_command(
    path: str | os.PathLike[str],
    name: str,
    arguments: dict | None = None,
    *,
    timeout: float = 30.0,
) -> object:
    """Run one QMP command on a fresh connection and return its result.

    A plain blocking socket: no event loop to start, so a session attaches in
    milliseconds (the asyncio client in `vmishell.sources.qmp` costs a tenth of
    a second to import). Events arriving meanwhile are skipped.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    buffer = b""

    def line() -> dict:
        nonlocal buffer
        while b"\n" not in buffer:
            data = sock.recv(65536)
            if not data:
                raise QmpError(f"QMP {path}: connection closed during {name}")
            buffer += data
            if len(buffer) > 64 * MAX_EVENT_LINE:
                raise QmpError(f"QMP {path}: reply to {name} too long")
        raw, buffer = buffer.split(b"\n", 1)
        return _parse(raw)

    def execute(command: str, args: dict | None) -> object:
        message: dict = {"execute": command}
        if args:
            message["arguments"] = args
        sock.sendall(json.dumps(message).encode() + b"\n")
        while True:
            reply = line()
            if "return" in reply:
                return reply["return"]
            if "error" in reply:
                err = reply["error"]
                desc = err.get("desc", err) if isinstance(err, dict) else err
                raise QmpError(f"QMP {command} on {path}: {desc}")

    try:
        sock.settimeout(timeout)
        sock.connect(os.fspath(path))
        if "QMP" not in line():
            raise QmpError(f"{path} is not a QMP socket")
        execute("qmp_capabilities", None)
        return execute(name, arguments)
    except TimeoutError:
        raise QmpError(
            f"QMP {path} does not answer {name} in {timeout} s: QEMU serves one QMP client "
            "at a time, so another tool may hold it (or the guest hung)"
        ) from None
    except OSError as exc:
        raise QmpError(f"QMP {name} on {path}: {exc}") from exc
    finally:
        sock.close()


class Throttle:
    """True at most once per `interval` seconds (the first call included)."""

    __slots__ = ("_interval", "_next")

    def __init__(self, interval: float = POLL_INTERVAL) -> None:
        self._interval = interval
        self._next = 0.0

    def __call__(self) -> bool:
        now = time.monotonic()
        if now < self._next:
            return False
        self._next = now + self._interval
        return True


__all__ = ["POLL_INTERVAL", "ProcessWatch", "QmpEvents", "Throttle", "peer_pid", "qmp_command"]
