"""The suite's database chain: the REGISTRY_TEST_DOCKER switch, the testcontainers import, and
the one container shared by pytest-xdist workers."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import pytest

from tests.pg_source import DockerUnavailable, docker_switch, postgres_container_class


@pytest.mark.parametrize(
    ("value", "expected"), [("", None), ("auto", None), ("0", False), ("1", True)]
)
def test_docker_switch_reads_0_1_or_unset(
    monkeypatch: pytest.MonkeyPatch, value: str, expected: bool | None
) -> None:
    monkeypatch.setenv("REGISTRY_TEST_DOCKER", value)
    assert docker_switch() is expected


def test_docker_switch_rejects_other_values(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REGISTRY_TEST_DOCKER", "yes")
    with pytest.raises(DockerUnavailable, match="must be 0, 1 or unset"):
        docker_switch()


def test_postgres_container_import_raises_no_deprecation_warning() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert postgres_container_class().__name__ == "PostgresContainer"


def test_the_summary_names_the_container_without_its_password(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from tests import pg_source

    lines: list[str] = []

    class Reporter:
        def write_line(self, line: str) -> None:
            lines.append(line)

    # Its own list: on the testcontainers path this run's real container is already in there.
    dsn = pg_source._without_password("postgresql://u:secret@127.0.0.1:5/db")
    monkeypatch.setattr(pg_source, "started", [("abc123", "img:1", dsn)])
    pg_source.pytest_terminal_summary(Reporter())
    assert lines == [
        "registry database: testcontainers container=abc123 image=img:1 "
        "dsn=postgresql://u@127.0.0.1:5/db"
    ]


def test_xdist_workers_get_the_controllers_one_container_and_it_stops_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from tests import pg_source

    events: list[str] = []

    @contextlib.contextmanager
    def one_container() -> Iterator[tuple[str, str]]:
        events.append("start")
        yield "postgresql://test:secret@127.0.0.1:5/test", "c0ffee"
        events.append("stop")

    monkeypatch.setattr(pg_source, "container_dsn", one_container)
    shared = pg_source.SharedContainer()
    shared.start()
    handed = {pg_source.SHARED_KEY: shared.for_workers()}  # what pytest_configure_node sends

    for _worker in range(4):
        assert pg_source.shared_for_worker(handed) == {
            "dsn": "postgresql://test:secret@127.0.0.1:5/test",
            "container": "c0ffee",
        }
    shared.stop()
    shared.stop()  # pytest_unconfigure may be reached twice on an interrupted run
    assert events == ["start", "stop"]
    assert pg_source.shared_for_worker(None) is None  # not an xdist worker
    assert pg_source.shared_for_worker({}) is None  # a worker on the DSN or embedded path


def test_xdist_workers_learn_why_the_container_did_not_start(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from tests import pg_source

    def no_container() -> Iterator[tuple[str, str]]:
        raise RuntimeError("no such image")

    monkeypatch.setattr(pg_source, "container_dsn", contextlib.contextmanager(no_container))
    shared = pg_source.SharedContainer()
    shared.start()

    assert pg_source.shared_for_worker({pg_source.SHARED_KEY: shared.for_workers()}) == {
        "error": "RuntimeError('no such image')"
    }
