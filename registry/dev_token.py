"""The development admin token: made once, kept in the data dir, so restarts keep it.

Used only when REGISTRY_ADMIN_TOKEN is unset. A token that changed on every start logged out
every `registry events --follow` and every script of the walk-through at each restart; one kept
in a file only its owner can read is as safe as the data dir (which holds the database anyway).
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

FILE_NAME = "admin-token"
PREFIX = "radm_"


def token_path(data_dir: Path) -> Path:
    return data_dir / FILE_NAME


def read_development_token(data_dir: Path) -> str | None:
    """The kept token, or None when there is none (or it is not one this code made)."""
    try:
        text = token_path(data_dir).read_text().strip()
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return None
    return text if text.startswith(PREFIX) and len(text) >= 16 else None


def development_token(data_dir: Path) -> tuple[str, bool]:
    """The kept token and whether this call made it.

    The token is written whole to a file of its own, then linked into place: a link fails if
    the name exists, so two registries starting at once on one data dir agree (one links, the
    other reads a complete file). A file that holds no valid token is replaced.
    """
    kept = read_development_token(data_dir)
    if kept is not None:
        return kept, False
    data_dir.mkdir(parents=True, exist_ok=True)
    path = token_path(data_dir)
    token = PREFIX + secrets.token_urlsafe(24)
    written = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(written, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(token + "\n")
    try:
        try:
            os.link(written, path)
        except FileExistsError:
            kept = read_development_token(data_dir)
            if kept is not None:
                return kept, False
            os.replace(written, path)
        return token, True
    finally:
        written.unlink(missing_ok=True)
