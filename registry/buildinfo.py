"""What is running: the package version and the git commit it was built from."""

from __future__ import annotations

import functools
import os
import subprocess
from pathlib import Path

from registry import __version__

SOURCE_ROOT = Path(__file__).resolve().parents[1]


@functools.cache
def git_sha() -> str | None:
    """REGISTRY_GIT_SHA (set by image builds), else the checkout's HEAD, else unknown."""
    baked = os.environ.get("REGISTRY_GIT_SHA")
    if baked:
        return baked
    try:
        result = subprocess.run(
            ["git", "-C", str(SOURCE_ROOT), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() or None


def build_info() -> dict[str, str | None]:
    return {"version": __version__, "git_sha": git_sha()}
