"""A plugin update fanned out to N workspaces: git connections and time, unshared vs shared.

    .venv/bin/python -m bench.fanout [--workspaces 200] [--files 50] [--dsn ...]

The plugin is a real git repository served by `git daemon` on 127.0.0.1, whose access hook
counts every git connection (an ls-remote is one, a fetch is one). N workspaces declaring it
are created and brought online through the API (their first installs are not measured); then
the branch moves and one POST /internal/plugins/reconcile fans the update out. Measured: git
connections and seconds from the POST until every workspace has the new commit installed.
Three modes, each on a fresh database and registry process: fetch_shared=false (what every
run did before issue 13), shared resolutions without the tree cache, and both.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import asyncpg

from bench import db, registry_proc
from bench.git_daemon import CountingGitDaemon, commit_files

WITHIN_S = 600.0
PER_100K = 100_000


@dataclass(frozen=True, slots=True)
class Mode:
    name: str
    env: dict[str, str]


MODES = (
    Mode("unshared (before)", {"REGISTRY_FETCH_SHARED": "false"}),
    Mode("shared resolution, no tree cache", {"REGISTRY_TREE_CACHE_MAX_BYTES": "0"}),
    Mode("shared resolution + tree cache", {}),
)


@dataclass(frozen=True, slots=True)
class Result:
    mode: str
    workspaces: int
    connections: int
    seconds: float

    def row(self) -> str:
        hours = self.seconds / self.workspaces * PER_100K / 3600
        return (
            f"| {self.mode} | {self.workspaces} | {self.connections} | "
            f"{self.connections / self.workspaces:.2f} | {self.seconds:.2f} | {hours:.2f} |"
        )


HEADER = (
    "| mode | workspaces | git connections | per workspace | seconds | h per 100k |\n"
    "|---|---|---|---|---|---|"
)


def _manifest(version: int) -> dict[str, str]:
    return {"plugin.json": f'{{"name": "bench-plugin", "version": "{version}"}}\n'}


def _plugin(repo: Path, files: int) -> str:
    skills = {f"skills/skill-{i}.md": f"# skill {i}\n" + "text\n" * 50 for i in range(files)}
    return commit_files(repo, {**_manifest(1), **skills}, "v1")


async def _until(check: asyncpg.Connection, sql: str, *args: object, want: int) -> None:
    deadline = time.monotonic() + WITHIN_S
    while await check.fetchval(sql, *args) != want:
        if time.monotonic() > deadline:
            raise TimeoutError(f"not settled within {WITHIN_S:g} s: {sql}")
        await asyncio.sleep(0.02)


INSTALLED_AT = "SELECT count(*) FROM installed_plugins WHERE sha = $1"
BUSY = "SELECT count(*) FROM reconciles WHERE status IN ('queued', 'running')"


async def _online_declarers(session: aiohttp.ClientSession, url: str, source: str, n: int) -> None:
    admin = {"Authorization": f"Bearer {registry_proc.ADMIN_TOKEN}"}
    for i in range(n):
        body = {"name": f"fanout-{i}", "plugins": [{"source": source}]}
        async with session.post(f"{url}/workspaces", json=body, headers=admin) as r:
            assert r.status == 201, await r.text()
            data = await r.json()
        async with session.post(
            f"{url}/registry/heartbeat",
            json={"workspace_id": data["workspace"]["id"]},
            headers={"Authorization": f"Bearer {data['token']}"},
        ) as r:
            assert r.status == 200, await r.text()


async def _measure(
    mode: Mode, url: str, dsn: str, daemon: CountingGitDaemon, repo: Path, v1: str, n: int
) -> Result:
    source = f"git+{daemon.url(repo.name)}#main"
    admin = {"Authorization": f"Bearer {registry_proc.ADMIN_TOKEN}"}
    conn = await asyncpg.connect(dsn)
    try:
        async with aiohttp.ClientSession() as session:
            await _online_declarers(session, url, source, n)
            await _until(conn, INSTALLED_AT, v1, want=n)
            await _until(conn, BUSY, want=0)
            moved = commit_files(repo, _manifest(2), "v2")
            before = daemon.connections()
            started = time.perf_counter()
            async with session.post(
                f"{url}/internal/plugins/reconcile", json={"source": source}, headers=admin
            ) as r:
                assert r.status == 202, await r.text()
                assert (await r.json())["queued"] == n
            await _until(conn, INSTALLED_AT, moved, want=n)
            seconds = time.perf_counter() - started
            await _until(conn, BUSY, want=0)
            return Result(mode.name, n, daemon.connections() - before, seconds)
    finally:
        await conn.close()


def run_mode(mode: Mode, args: argparse.Namespace, work_dir: Path) -> Result:
    dsn = asyncio.run(db.recreate(args.dsn, args.database))
    served = work_dir / "served"
    served.mkdir()
    repo = served / "bench-plugin"
    v1 = _plugin(repo, args.files)
    with CountingGitDaemon(served, work_dir) as daemon:
        env = {
            "REGISTRY_PLUGIN_ALLOWLIST": daemon.allow_prefix,
            "REGISTRY_PLUGINS_DIR": str(work_dir / "plugins"),
            **mode.env,
        }
        [proc] = registry_proc.start_many(dsn, work_dir, env, 1)
        try:
            return asyncio.run(_measure(mode, proc.url, dsn, daemon, repo, v1, args.workspaces))
        finally:
            proc.stop()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.fanout", description=__doc__.split("\n", 1)[0]
    )
    parser.add_argument("--dsn", default=db.DEFAULT_SERVER_DSN, help="a server DSN (any database)")
    parser.add_argument("--database", default="bench_fanout", help="created and dropped")
    parser.add_argument("--workspaces", type=int, default=200)
    parser.add_argument("--files", type=int, default=50, help="files in the plugin's tree")
    args = parser.parse_args(argv)
    db.check_name(args.database)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    results = []
    try:
        for mode in MODES:
            with tempfile.TemporaryDirectory(prefix="bench-fanout-") as tmp:
                result = run_mode(mode, args, Path(tmp))
            print(result.row(), flush=True)
            results.append(result)
    finally:
        asyncio.run(db.drop(args.dsn, args.database))
    print(HEADER)
    for result in results:
        print(result.row())


if __name__ == "__main__":
    main()
