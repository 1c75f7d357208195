"""Settings come from REGISTRY_* variables; a bad value stops start-up with a clear message."""

from __future__ import annotations

from pathlib import Path

import pytest

from registry.cli import main
from registry.settings import Settings, SettingsError


def test_settings_are_read_from_the_environment() -> None:
    settings = Settings.from_env(
        {
            "REGISTRY_DSN": "postgresql://db/registry",
            "REGISTRY_PORT": "9000",
            "REGISTRY_PLUGINS_DIR": "/srv/plugins",
            "REGISTRY_PLUGIN_ALLOWLIST": "file:///srv/a/, github://acme/",
            "REGISTRY_HEARTBEAT_INTERVAL_S": "0.5",
        }
    )

    assert settings.dsn == "postgresql://db/registry"
    assert settings.port == 9000
    assert settings.resolved_plugins_dir == Path("/srv/plugins")
    assert settings.plugin_allowlist == ("file:///srv/a/", "github://acme/")
    assert settings.heartbeat_interval_s == 0.5


def test_flags_override_the_environment() -> None:
    settings = Settings.from_env({"REGISTRY_PORT": "9000"}, port=9100)

    assert settings.port == 9100


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("REGISTRY_PORT", "http", "REGISTRY_PORT='http'"),
        ("REGISTRY_PORT", "70000", "port must be 1..65535"),
        ("REGISTRY_HEARTBEAT_INTERVAL_S", "nan", "finite"),
        ("REGISTRY_ADMIN_TOKEN", "short", "at least 16"),
        ("REGISTRY_RECONCILE_CONCURRENCY", "50", "below pool_max_size"),
    ],
)
def test_bad_setting_is_a_clear_error(name: str, value: str, message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        Settings.from_env({name: value})


def test_bad_setting_stops_the_cli_with_exit_code_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("REGISTRY_PORT", "not-a-port")

    code = main(["migrate", "--dsn", "postgresql://unused/db"])

    assert code == 2
    assert "REGISTRY_PORT='not-a-port'" in capsys.readouterr().err
