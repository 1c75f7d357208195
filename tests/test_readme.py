"""The README stays true: every setting is documented."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

from registry.settings import Settings

README = Path(__file__).resolve().parents[1] / "README.md"


def test_every_setting_is_documented_in_the_readme() -> None:
    text = README.read_text()

    missing = [f.name for f in fields(Settings) if f"REGISTRY_{f.name.upper()}" not in text]

    assert missing == []
