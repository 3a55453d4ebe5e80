"""A small synchronous QMP client for QEMU guests, built on `qemu.qmp`.

`qemu.qmp` is asyncio-only and its legacy synchronous wrapper drives the
caller's event loop, which fails inside IPython/Jupyter where a loop is
already running. So this client owns a private event loop in a daemon thread
and hands it coroutines: every method here blocks the caller, works from
plain scripts and notebooks alike, and raises only QmpError (naming the
socket) for anything that goes wrong.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Coroutine
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from qemu.qmp import QMPClient
from qemu.qmp.error import QMPError

from vmishell.errors import QmpError
from vmishell.sources.base import Registers
from vmishell.sources.registers_text import parse_registers
from vmishell.sources.registers_text import parse_x86_registers as parse_x86_registers

T = TypeVar("T")

#: Default seconds to wait for a QMP reply (dumps pass their own, longer one).
DEFAULT_TIMEOUT = 30.0

#: A QMP socket answers its greeting at once unless another client holds it.
CONNECT_TIMEOUT = 5.0


class QmpClient:
    """A blocking connection to one QEMU's QMP unix socket."""

    def __init__(self, path: str | Path, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.path = str(path)
        self.timeout = timeout
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name=f"qmp {self.path}", daemon=True
        )
        self._thread.start()
        self._client: QMPClient | None = None
        try:
            self._client = self._run(self._connect(), min(timeout, CONNECT_TIMEOUT), "connect")
        except QmpError as exc:
            self._stop_loop()
            if "no reply" in str(exc):
                raise QmpError(
                    f"QMP {self.path} does not answer: QEMU serves one QMP client at a "
                    "time, so another tool may hold it (or the guest hung)"
                ) from None
            raise
        except BaseException:
            self._stop_loop()
            raise

    async def _connect(self) -> QMPClient:
        client = QMPClient("vmishell")
        await client.connect(self.path)
        return client

    def _run(self, coro: Coroutine[Any, Any, T], timeout: float | None, what: str) -> T:
        if self._loop.is_closed():
            coro.close()
            raise QmpError(f"QMP {self.path}: connection is closed")
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result(timeout)
        except TimeoutError:
            future.cancel()
            raise QmpError(f"QMP {what} on {self.path}: no reply in {timeout} s") from None
        except (QMPError, OSError, EOFError) as exc:
            raise QmpError(f"QMP {what} on {self.path}: {exc}") from exc

    # -- commands -----------------------------------------------------------------
    def command(
        self,
        name: str,
        arguments: dict[str, Any] | None = None,
        *,
        timeout: float | None = None,
        **args: Any,
    ) -> Any:
        """Execute QMP command `name` and return its result.

        Keyword arguments have underscores turned into dashes (QMP's usual
        spelling: `command_line=` sends "command-line"); pass `arguments` for
        the few legacy commands whose argument names contain underscores.
        """
        client = self._require()
        merged = dict(arguments or {})
        merged.update({k.replace("_", "-"): v for k, v in args.items()})
        return self._run(client.execute(name, merged or None), timeout or self.timeout, name)

    def hmp(self, cmdline: str) -> str:
        """Run a human-monitor command (e.g. "info registers") and return its text."""
        out = self.command("human-monitor-command", command_line=cmdline)
        return str(out)

    def registers(self) -> Registers:
        """The current vCPU's control registers (x86 guests)."""
        return parse_registers(self.hmp("info registers"))

    def status(self) -> str:
        """QEMU's run state: "running", "paused", "shutdown", ..."""
        return str(self.command("query-status")["status"])

    def running(self) -> bool:
        return bool(self.command("query-status")["running"])

    def stop(self) -> None:
        """Pause the vCPUs (guest RAM then holds still)."""
        self.command("stop")

    def cont(self) -> None:
        """Resume the vCPUs."""
        self.command("cont")

    def quit(self) -> None:
        """Ask QEMU to exit; the connection closing under the reply is success."""
        with contextlib.suppress(QmpError):
            self.command("quit", timeout=5.0)
        self.close()

    # -- lifetime -----------------------------------------------------------------
    def _require(self) -> QMPClient:
        if self._client is None:
            raise QmpError(f"QMP {self.path}: connection is closed")
        return self._client

    def close(self) -> None:
        """Disconnect and stop the private event loop (idempotent)."""
        client, self._client = self._client, None
        if client is not None and not self._loop.is_closed():
            # The peer may already be gone (after quit): nothing left to release then.
            with contextlib.suppress(QmpError):
                self._run(client.disconnect(), 5.0, "disconnect")
        self._stop_loop()

    def _stop_loop(self) -> None:
        if self._loop.is_closed():
            return
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5.0)
        if not self._thread.is_alive():
            self._loop.close()

    def __enter__(self) -> QmpClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    def __repr__(self) -> str:
        state = "open" if self._client is not None else "closed"
        return f"<QmpClient {self.path} {state}>"
