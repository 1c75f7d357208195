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
        ("REGISTRY_HEAD_TIMEOUT_S", "0", "head_timeout_s must be a positive number"),
        ("REGISTRY_BODY_TIMEOUT_S", "-1", "body_timeout_s must be a positive number"),
        ("REGISTRY_MAX_HEADER_BYTES", "512", "max_header_bytes must be at least 1024"),
        ("REGISTRY_MAX_HEADERS", "4", "max_headers must be at least 8"),
        ("REGISTRY_EVENT_WRITES_PER_S", "-1", "event_writes_per_s must be zero or positive"),
        ("REGISTRY_EVENT_WRITES_PER_S", "inf", "must be a finite number"),
        ("REGISTRY_MAX_CONNECTIONS", "0", "REGISTRY_MAX_CONNECTIONS='0'"),
        ("REGISTRY_MAX_REQUESTS_IN_FLIGHT", "none", "REGISTRY_MAX_REQUESTS_IN_FLIGHT='none'"),
    ],
)
def test_bad_setting_is_a_clear_error(name: str, value: str, message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        Settings.from_env({name: value})


def test_the_defaults_are_a_safe_combination() -> None:
    Settings().validate()


# Each combination is refused with a message that names both variables.
DANGEROUS = [
    pytest.param(
        {"REGISTRY_OFFLINE_AFTER_S": "5", "REGISTRY_HEARTBEAT_INTERVAL_S": "30"},
        ("REGISTRY_OFFLINE_AFTER_S=5", "REGISTRY_HEARTBEAT_INTERVAL_S=30"),
        id="offline-window-shorter-than-two-beats",
    ),
    pytest.param(
        {"REGISTRY_TOMBSTONE_RETENTION_S": "60"},
        ("REGISTRY_TOMBSTONE_RETENTION_S=60", "REGISTRY_OFFLINE_AFTER_S (unset: 3 x "),
        id="tombstone-gone-before-the-runtime-hears-410",
    ),
    pytest.param(
        {"REGISTRY_TOMBSTONE_RETENTION_S": "60", "REGISTRY_OFFLINE_AFTER_S": "120"},
        ("REGISTRY_TOMBSTONE_RETENTION_S=60", "REGISTRY_OFFLINE_AFTER_S=120"),
        id="tombstone-gone-before-the-offline-window",
    ),
    pytest.param(
        {"REGISTRY_POOL_MAX_SIZE": "5", "REGISTRY_RECONCILE_CONCURRENCY": "4"},
        ("REGISTRY_POOL_MAX_SIZE=5", "REGISTRY_RECONCILE_CONCURRENCY=4"),
        id="pool-without-room-beside-the-reconciles",
    ),
    pytest.param(
        {"REGISTRY_RECONCILE_CONCURRENCY": "50"},
        ("REGISTRY_POOL_MAX_SIZE=10", "REGISTRY_RECONCILE_CONCURRENCY=50"),
        id="concurrency-above-the-default-pool",
    ),
    pytest.param(
        {"REGISTRY_FETCH_TIMEOUT_S": "300"},
        ("REGISTRY_FETCH_TIMEOUT_S=300", "REGISTRY_RECONCILE_TIMEOUT_S=300"),
        id="fetch-limit-not-below-the-run-limit",
    ),
    pytest.param(
        {"REGISTRY_ACTION_RETENTION_S": "60", "REGISTRY_RESTART_BUDGET_WINDOW_S": "3600"},
        ("REGISTRY_ACTION_RETENTION_S=60", "REGISTRY_RESTART_BUDGET_WINDOW_S=3600"),
        id="actions-pruned-inside-the-restart-window",
    ),
]


@pytest.mark.parametrize(("environ", "names"), DANGEROUS)
def test_a_dangerous_combination_is_refused_naming_both_settings(
    environ: dict[str, str], names: tuple[str, str]
) -> None:
    with pytest.raises(SettingsError) as refused:
        Settings.from_env(environ)

    assert all(name in str(refused.value) for name in names), str(refused.value)


@pytest.mark.parametrize(
    "environ",
    [
        {"REGISTRY_OFFLINE_AFTER_S": "60", "REGISTRY_HEARTBEAT_INTERVAL_S": "30"},
        {"REGISTRY_TOMBSTONE_RETENTION_S": "90"},
        {"REGISTRY_POOL_MAX_SIZE": "6", "REGISTRY_RECONCILE_CONCURRENCY": "4"},
        {"REGISTRY_FETCH_TIMEOUT_S": "299"},
        {"REGISTRY_ACTION_RETENTION_S": "3600", "REGISTRY_RESTART_BUDGET_WINDOW_S": "3600"},
    ],
    ids=["offline", "tombstone", "pool", "fetch", "actions"],
)
def test_each_limit_itself_is_accepted(environ: dict[str, str]) -> None:
    Settings.from_env(environ)


def test_bad_setting_stops_the_cli_with_exit_code_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("REGISTRY_PORT", "not-a-port")

    code = main(["migrate", "--dsn", "postgresql://unused/db"])

    assert code == 2
    assert "REGISTRY_PORT='not-a-port'" in capsys.readouterr().err


def test_a_dangerous_combination_stops_the_cli_with_exit_code_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("REGISTRY_HEARTBEAT_INTERVAL_S", "30")
    monkeypatch.setenv("REGISTRY_OFFLINE_AFTER_S", "5")

    code = main(["migrate", "--dsn", "postgresql://unused/db"])

    assert code == 2
    err = capsys.readouterr().err
    assert "REGISTRY_OFFLINE_AFTER_S=5" in err
    assert "REGISTRY_HEARTBEAT_INTERVAL_S=30" in err
