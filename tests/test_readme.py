"""The README stays true: every setting is documented, the client example is real."""

from __future__ import annotations

import ast
from dataclasses import fields
from pathlib import Path

from registry import runtime_client
from registry.settings import Settings

README = Path(__file__).resolve().parents[1] / "README.md"


def test_every_setting_is_documented_in_the_readme() -> None:
    text = README.read_text()

    missing = [f.name for f in fields(Settings) if f"REGISTRY_{f.name.upper()}" not in text]

    assert missing == []


def test_the_runtime_client_example_compiles_and_uses_the_public_api() -> None:
    text = README.read_text()
    example = text.split("```python\n", 1)[1].split("```", 1)[0]
    # The example's `async with` stands at top level, as in `python -m asyncio`.
    compile(example, "README.md", "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
    tree = ast.parse(example)
    imported = {
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module == "registry.runtime_client"
        for alias in node.names
    }
    assert imported
    assert imported <= set(runtime_client.__all__)
