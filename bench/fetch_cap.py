"""The fetch-cap probe of issue 13 item 7: a git source far larger than the byte cap.

    .venv/bin/python -m bench.fetch_cap [--size-mib 300] [--cap-mib 50] [--max-files 10000]

Builds a local repository of --size-mib incompressible data, stages it under a cap of
--cap-mib, and reports the error code, how long the attempt took and the most bytes the
staging directory held (sampled every millisecond). Before the caps held during the transfer
the probe read: 313 MB on disk, then `tree_too_large`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

from bench.disk import peak_bytes_under
from registry.plugins import FetchFailed, FetchLimits, SourceSettings, parse_source, stage
from registry.plugins.transfer import TransferCaps

MIB = 1024 * 1024
_CHUNK_MIB = 16


def _git(cwd: Path, *args: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    env.update(GIT_CONFIG_NOSYSTEM="1", GIT_CONFIG_GLOBAL=os.devnull)
    identity = ["-c", "user.email=bench@example.com", "-c", "user.name=bench"]
    subprocess.run(["git", *identity, *args], cwd=cwd, env=env, check=True, capture_output=True)


def build_repo(path: Path, size_mib: int) -> None:
    path.mkdir(parents=True)
    _git(path, "init", "-q", "-b", "main")
    for index in range(0, size_mib, _CHUNK_MIB):
        with open(path / f"blob-{index:05}.bin", "wb") as out:
            out.write(os.urandom(min(_CHUNK_MIB, size_mib - index) * MIB))
    _git(path, "add", "-A")
    _git(path, "commit", "-q", "-m", "big")


async def probe(size_mib: int, cap_mib: int, max_files: int) -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix="bench-fetch-cap-") as tmp:
        repo, staging = Path(tmp) / "repo", Path(tmp) / "staging"
        build_repo(repo, size_mib)
        staging.mkdir()
        settings = SourceSettings(allowlist=("*",))
        limits = FetchLimits(max_bytes=cap_mib * MIB, max_files=max_files, timeout_s=600.0)
        started = time.monotonic()
        code = "staged"
        with peak_bytes_under(staging) as peak:
            try:
                await stage(
                    parse_source(f"git+file://{repo}#main", settings), settings, limits, staging
                )
            except FetchFailed as exc:
                code = exc.code
        return {
            "size_mib": size_mib,
            "cap_mib": cap_mib,
            "transfer_cap_bytes": TransferCaps.for_tree(limits.max_bytes, max_files).store_bytes,
            "code": code,
            "seconds": round(time.monotonic() - started, 3),
            "peak_staging_bytes": peak.bytes,
            "samples": peak.samples,
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=300)
    parser.add_argument("--cap-mib", type=int, default=50)
    parser.add_argument("--max-files", type=int, default=10_000)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(probe(args.size_mib, args.cap_mib, args.max_files))))


if __name__ == "__main__":
    main()
