"""Command line: `registry serve` and `registry migrate`."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import secrets
import sys
from typing import Any

from aiohttp import web

from registry import __version__
from registry.app import create_app
from registry.db.migrate import MigrationError, migrate
from registry.embedded_pg import EmbeddedPostgresError, start_embedded_postgres
from registry.settings import Settings, SettingsError

log = logging.getLogger("registry")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="registry", description=__doc__)
    parser.add_argument("--version", action="version", version=f"registry {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (
        ("serve", "apply pending migrations, then serve the HTTP API"),
        ("migrate", "apply pending migrations and exit"),
    ):
        command = commands.add_parser(name, help=help_text)
        command.add_argument("--dsn", help="PostgreSQL DSN (REGISTRY_DSN); default: embedded")
        if name == "serve":
            command.add_argument("--host", help="listen address (REGISTRY_HOST)")
            command.add_argument("--port", type=int, help="listen port (REGISTRY_PORT)")
    return parser


def _settings(args: argparse.Namespace) -> Settings:
    overrides: dict[str, Any] = {"dsn": args.dsn}
    if args.command == "serve":
        overrides.update(host=args.host, port=args.port)
    return Settings.from_env(**overrides)


def _database(settings: Settings) -> tuple[str, Any]:
    if settings.dsn is not None:
        return settings.dsn, None
    return start_embedded_postgres(settings.data_dir / "postgres")


def _serve(settings: Settings, dsn: str) -> None:
    applied = asyncio.run(migrate(dsn))
    log.info("migrations: %d applied", len(applied))
    if settings.admin_token is None:
        token = "radm_" + secrets.token_urlsafe(24)
        # Development convenience only: a fresh token per start, shown once, never stored.
        print(f"REGISTRY_ADMIN_TOKEN not set; admin token for this run: {token}", flush=True)
        settings = dataclasses.replace(settings, admin_token=token)
    settings.resolved_plugins_dir.mkdir(parents=True, exist_ok=True)
    log.info("registry %s listening on http://%s:%d", __version__, settings.host, settings.port)
    web.run_app(
        create_app(settings, dsn),
        host=settings.host,
        port=settings.port,
        print=None,
        access_log=None,
    )


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # pgserver narrates every initdb/pg_ctl call at INFO; only its problems matter here.
    logging.getLogger("pgserver").setLevel(logging.WARNING)
    try:
        settings = _settings(args)
        dsn, _server = _database(settings)
        if args.command == "migrate":
            applied = asyncio.run(migrate(dsn))
            print(f"applied {len(applied)} migration(s)")
        else:
            _serve(settings, dsn)
    except (SettingsError, MigrationError, EmbeddedPostgresError) as exc:
        print(f"registry: {exc}", file=sys.stderr)
        return 2
    return 0
