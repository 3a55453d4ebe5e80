"""A JupyterLab on 127.0.0.1 for the browser tests, started and stopped by them.

Each server gets its own config, runtime and settings directories, so the
developer's Jupyter set-up plays no part; `widgets=False` turns the widget
front end off in its page config, as when JupyterLab and the kernel live in
different environments. Without JupyterLab the tests skip, except under
CI=true, where they fail.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = Path(os.environ.get("VMISHELL_ARTIFACTS", REPO / "test-artifacts")) / "browser"
WIDGET_MANAGER = "@jupyter-widgets/jupyterlab-manager"


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


def unavailable(reason: str) -> None:
    if in_ci():
        pytest.fail(f"browser test unavailable under CI: {reason}", pytrace=False)
    pytest.skip(f"browser test unavailable: {reason}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Lab:
    """A running JupyterLab: its URL, token and the folder it serves."""

    url: str
    token: str
    root: Path
    process: subprocess.Popen
    log: Path
    env: dict[str, str]

    def notebook_url(self, name: str) -> str:
        return f"{self.url}lab/tree/{name}?token={self.token}&reset"

    def trust(self, name: str) -> None:
        """Sign a notebook as this server's user would by saving it (outputs become trusted)."""
        subprocess.run(
            [sys.executable, "-m", "jupyter", "trust", str(self.root / name)],
            env=self.env,
            check=True,
            capture_output=True,
        )


def start_lab(base: Path, *, widgets: bool = True, env: dict[str, str] | None = None) -> Lab:
    """Start `jupyter lab` on 127.0.0.1 serving `base/root`; wait until it answers."""
    if shutil.which("jupyter-lab") is None and not _has_module("jupyterlab"):
        unavailable("JupyterLab is not installed (pip install 'vmishell[jupyter]')")
    root, config = base / "root", base / "config"
    for d in (root, config / "labconfig"):
        d.mkdir(parents=True, exist_ok=True)
    disabled = {} if widgets else {WIDGET_MANAGER: True}
    (config / "labconfig" / "page_config.json").write_text(
        json.dumps({"disabledExtensions": disabled})
    )
    news = base / "settings" / "@jupyterlab" / "apputils-extension"
    news.mkdir(parents=True, exist_ok=True)  # no "get notified about Jupyter news?" toast
    (news / "notification.jupyterlab-settings").write_text(json.dumps({"fetchNews": "false"}))
    port, token = _free_port(), os.urandom(12).hex()
    run_env = {
        **os.environ,
        **(env or {}),
        "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "JUPYTER_CONFIG_DIR": str(config),
        "JUPYTER_RUNTIME_DIR": str(base / "runtime"),
        "JUPYTER_DATA_DIR": str(base / "data"),  # its own notebook-signing key (trust)
        "JUPYTERLAB_SETTINGS_DIR": str(base / "settings"),
        "JUPYTERLAB_WORKSPACES_DIR": str(base / "workspaces"),
    }
    log = base / "lab.log"
    cmd = [
        sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
        f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
        "--LabApp.expose_app_in_browser=True",  # window.jupyterapp: run cells, read the model
        "--LabApp.news_url=None",  # nothing is fetched from the internet
        "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
        "--LabApp.extension_manager=readonly",  # no queries to PyPI
        "--allow-root",  # CI runs as root
    ]  # fmt: skip
    with log.open("wb") as out:
        process = subprocess.Popen(cmd, cwd=root, env=run_env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"jupyter lab exited: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{url}api/status?token={token}", timeout=2):
                return Lab(url, token, root, process, log, run_env)
        except OSError:
            time.sleep(0.3)
    process.terminate()
    raise AssertionError(f"jupyter lab did not answer in 60 s: {log.read_text()[-2000:]}")


def stop_lab(lab: Lab) -> None:
    lab.process.terminate()
    try:
        lab.process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        lab.process.kill()
        lab.process.wait(timeout=5)


def _has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


@dataclass
class Console:
    """What the page said: console messages and uncaught page errors."""

    messages: list[str] = field(default_factory=list)

    def errors(self, *needles: str) -> list[str]:
        return [m for m in self.messages if any(n in m for n in needles)]
