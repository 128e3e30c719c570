"""Settings and the sinks file: invalid input stops the start with a message naming the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from receiver.config import load_settings, load_sinks
from receiver.errors import ConfigError


def test_defaults_run_on_sqlite_with_the_simulator(monkeypatch: pytest.MonkeyPatch) -> None:
    """With nothing set: SQLite, no API key (simulated), callbacks to this host and port."""
    for name in ("RECEIVER_DATABASE_URL", "RECEIVER_VLMRUN_API_KEY", "RECEIVER_PUBLIC_URL"):
        monkeypatch.delenv(name, raising=False)
    s = load_settings(port=9000)
    assert s.database_url.startswith("sqlite:")
    assert s.simulated
    assert s.callback_base == "http://127.0.0.1:9000"


def test_secrets_are_comma_separated_newest_first(monkeypatch: pytest.MonkeyPatch) -> None:
    """RECEIVER_VLMRUN_WEBHOOK_SECRETS splits on commas, keeps order, trims spaces."""
    monkeypatch.setenv("RECEIVER_VLMRUN_WEBHOOK_SECRETS", "new, old")
    s = load_settings()
    assert [x.get_secret_value() for x in s.vlmrun_webhook_secrets] == ["new", "old"]
    assert "new" not in repr(s)


@pytest.mark.parametrize(
    ("name", "value", "hint"),
    [
        ("RECEIVER_PORT", "eighty", "RECEIVER_PORT"),
        ("RECEIVER_DATABASE_URL", "mysql://x", "postgresql://"),
        ("RECEIVER_PUBLIC_URL", "hooks.example.com", "absolute http(s) URL"),
        ("RECEIVER_LOG_FORMAT", "xml", "json, console or auto"),
    ],
)
def test_bad_settings_name_the_variable(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, hint: str
) -> None:
    """A bad value is a ConfigError naming the variable and the fix."""
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert name in str(info.value) and hint in str(info.value)


def test_sinks_file_expands_env_and_builds_routes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`${VAR}` is expanded; filters become routes."""
    monkeypatch.setenv("ERP_SECRET", "whsec_c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0")
    path = tmp_path / "sinks.toml"
    path.write_text(
        '[[sinks]]\nname = "erp"\nurl = "https://erp.example.com/hook"\nsecret = "${ERP_SECRET}"\n'
        'statuses = ["completed"]\n\n[[sinks]]\nname = "log"\nurl = "file:///tmp/events.jsonl"\n'
    )
    sinks = load_sinks(path)
    assert [s.name for s in sinks] == ["erp", "log"]
    assert sinks[0].signing_secrets == ["whsec_c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0"]
    assert sinks[0].route.statuses == ("completed",)


@pytest.mark.parametrize(
    ("text", "hint"),
    [
        ("[[sinks]]\nname = 'a'\nurl = 'ftp://x'\n", "scheme 'ftp'"),
        ("[[sinks]]\nname = 'a'\nurl = 'https://x'\n", "needs `secret`"),
        (
            "[[sinks]]\nname = 'a'\nurl = 'file:///a'\n[[sinks]]\nname = 'a'\nurl = 'file:///b'\n",
            "unique",
        ),
        ("[[sinks]]\nname = 'a'\nurl = 'https://x'\nsecret = '${NOPE_NOT_SET}'\n", "NOPE_NOT_SET"),
        ("[[sinks]\n", "not valid TOML"),
        ("[[sinks]]\nname = 'a'\nurl = 'file:///a'\ncolour = 'red'\n", "colour"),
    ],
)
def test_bad_sinks_files_are_explained(tmp_path: Path, text: str, hint: str) -> None:
    """Each sinks-file mistake is a ConfigError that names the file and the problem."""
    path = tmp_path / "sinks.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_sinks(path)
    assert hint in str(info.value) and str(path) in str(info.value)


def test_missing_sinks_file_is_a_clear_error(tmp_path: Path) -> None:
    """A sinks file that does not exist is reported, not a stack trace."""
    with pytest.raises(ConfigError, match="cannot read sinks file"):
        load_sinks(tmp_path / "nope.toml")
