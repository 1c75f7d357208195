"""schemathesis hooks for tests/schemathesis/schemathesis.toml (loaded by the CLI, not pytest)."""

from __future__ import annotations

import uuid
from typing import Any

import schemathesis


def _is_uuid(value: object) -> bool:
    try:
        uuid.UUID(str(value))
    except ValueError:
        return False
    return isinstance(value, str)


@schemathesis.hook
def before_call(context: Any, case: Any, kwargs: dict[str, Any]) -> None:
    """Register: `id` is an alias of `workspace_id` and must equal it when both are given, a
    rule a JSON schema cannot state. Where both are UUIDs (the configuration pins
    `workspace_id` to the runtime's workspace; stateful links may set it to another), the alias
    follows; a mutated `id` stays. Before the call, so every phase, stateful included, gets it."""
    body = case.body
    if (
        case.operation.path == "/registry/register"
        and isinstance(body, dict)
        and _is_uuid(body.get("workspace_id"))
        and _is_uuid(body.get("id"))
    ):
        body["id"] = body["workspace_id"]
