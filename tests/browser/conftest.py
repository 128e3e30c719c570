"""Browser tier: a real `receiver serve` driven through Debian's Chromium by Playwright.

Playwright's own browser download cannot work here, so it drives `/usr/bin/chromium`,
installed with apt-get when missing. Where that cannot be done the tests skip with the
reason, except under CI=true, where a missing browser is a broken pipeline and fails.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, sync_playwright

from tests.acceptance.conftest import Process, base_env, free_port

CHROMIUM = Path("/usr/bin/chromium")
# No sandbox (tests run as root in a container), and none of the browser's own network chatter.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ADMIN_TOKEN = "browser-admin-token"
WEBHOOK_SECRET = "browser-webhook-secret"


def _unavailable(reason: str) -> None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(reason)
    pytest.skip(reason)


def _install_chromium() -> str | None:
    """apt-get install chromium; None when it worked, else why not."""
    env = os.environ | {"DEBIAN_FRONTEND": "noninteractive"}
    try:
        for command in (["apt-get", "update"], ["apt-get", "install", "-y", "chromium"]):
            subprocess.run(command, env=env, check=True, capture_output=True, timeout=900)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"Chromium is not installed and apt-get could not install it: {exc}"
    return None


@pytest.fixture(scope="session")
def chromium() -> Path:
    """Debian's Chromium, installed once per session when missing."""
    if not CHROMIUM.exists():
        reason = _install_chromium()
        if reason or not CHROMIUM.exists():
            _unavailable(reason or f"apt-get installed chromium but {CHROMIUM} is missing")
    return CHROMIUM


@pytest.fixture(scope="module")
def browser(chromium: Path) -> Iterator[Browser]:
    """Headless Chromium for one module. Not for the session: Playwright's sync API holds an
    event loop in the main thread while it runs, and the async tests after it need theirs."""
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(chromium), args=CHROMIUM_ARGS)
        yield launched
        launched.close()


def start_serve(tmp_path: Path, sinks: str, **env: str) -> Process:
    """`receiver serve` with its worker, started and answering: SQLite in tmp_path, the admin
    token, the webhook secret, the `[[sinks]]` TOML given, and `env` on top."""
    port = free_port()
    sinks_file = tmp_path / "sinks.toml"
    sinks_file.write_text(sinks)
    settings = {
        "RECEIVER_DATABASE_URL": f"sqlite:///{tmp_path}/receiver.db",
        "RECEIVER_PORT": str(port),
        "RECEIVER_PUBLIC_URL": f"http://127.0.0.1:{port}",
        "RECEIVER_ADMIN_TOKEN": ADMIN_TOKEN,
        "RECEIVER_VLMRUN_WEBHOOK_SECRETS": WEBHOOK_SECRET,
        "RECEIVER_SINKS_FILE": str(sinks_file),
        "RECEIVER_LOG_FORMAT": "json",
        **env,
    }
    proc = Process(["serve"], base_env(**settings), tmp_path / "service.log", port)
    proc.start()
    return proc


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Process]:
    """`receiver serve` with its worker, the bundled VLM Run simulator (no API key: it
    answers and signs callbacks in process) and one file sink."""
    proc = start_serve(
        tmp_path, f'[[sinks]]\nname = "archive"\nurl = "file://{tmp_path}/archive.jsonl"\n'
    )
    yield proc
    proc.stop()
