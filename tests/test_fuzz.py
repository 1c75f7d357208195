"""A property-based fuzzer over registry/openapi.json.

For every documented operation hypothesis builds requests: bodies from the request schema
(valid ones, mutated ones, arbitrary JSON values, arbitrary bytes), path ids (real ones of
several kinds, random UUIDs, arbitrary text), query parameters (schema-valid or arbitrary),
and credentials (admin, the workspace's own token, another workspace's, garbage, none). They
go to the real app on a real database. Whatever it gets, the app must
- never answer 5xx (a working database is never a reason for one);
- answer every status >= 400 with API.md's error envelope (the SSE stream and /metrics
  are not JSON when they succeed);
- answer only statuses the document lists for the operation.
"""

from __future__ import annotations

import asyncio
import copy
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import pytest
import pytest_asyncio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator

from tests.hostile_support import SPEC, World, make_world, shared_registry
from tests.support import ADMIN, Registry, bearer

OPERATIONS = sorted(
    (op["operationId"], method.upper(), path, op)
    for path, item in SPEC["paths"].items()
    for method, op in item.items()
    if isinstance(op, dict) and "operationId" in op
)
ERROR_SCHEMA = Draft202012Validator(SPEC["components"]["schemas"]["Error"])
NOT_JSON_ON_SUCCESS = {"get_events", "get_metrics"}
EXAMPLES_PER_OPERATION = 40
# Operations that may end a workspace's usefulness get a workspace of their own to abuse,
# so the heartbeats and reads fuzzed after them still meet a live workspace.
DESTRUCTIVE = {"delete_workspace", "post_pause", "post_resume", "post_token"}
# Weighted towards credentials that get past the gate, so handlers see most of the input.
CREDENTIALS = st.sampled_from(["admin", "admin", "admin", "own", "own", "other", "none", "garbage"])
GARBAGE_TOKENS = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=30)


def inline(schema: Any, within: tuple[str, ...] = ()) -> Any:
    """The schema with every #/components reference replaced by what it points to; a reference
    back into itself (a recursive schema such as NulFreeJson) becomes `{}`, any value."""
    if isinstance(schema, dict):
        if "$ref" in schema:
            *_, kind, name = schema["$ref"].split("/")
            if name in within:
                return {}
            return inline(SPEC["components"][kind][name], (*within, name))
        return {
            k: inline(v, within) for k, v in schema.items() if k not in ("description", "default")
        }
    if isinstance(schema, list):
        return [inline(v, within) for v in schema]
    return schema


def parameters(op: dict[str, Any]) -> list[dict[str, Any]]:
    return [inline(p) for p in op.get("parameters", [])]


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=12,
)


def from_schema(schema: dict[str, Any]) -> st.SearchStrategy[Any]:
    """Values valid for the (small) subset of JSON Schema the request schemas use."""
    examples = [st.sampled_from(schema["examples"])] if schema.get("examples") else []
    if "oneOf" in schema:
        return st.one_of([from_schema(s) for s in schema["oneOf"]])
    if "anyOf" in schema and "properties" not in schema:
        return st.one_of([from_schema(s) for s in schema["anyOf"]])
    if "const" in schema:
        return st.just(schema["const"])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    types = schema.get("type", "object")
    if isinstance(types, list):
        return st.one_of([from_schema({**schema, "type": t}) for t in types])
    if types == "null":
        return st.none()
    if types == "boolean":
        return st.booleans()
    if types == "integer":
        return st.integers(schema.get("minimum"), schema.get("maximum"))
    if types == "number":
        low, high = schema.get("minimum"), schema.get("maximum")
        return st.floats(low, high, allow_nan=False, allow_infinity=False) | st.integers(
            None if low is None else int(low), None if high is None else int(high)
        )
    if types == "array":
        items = from_schema(schema.get("items", {}))
        return st.lists(items, max_size=min(schema.get("maxItems", 3), 3))
    if types == "string":
        low, high = schema.get("minLength", 0), schema.get("maxLength", 64)
        if schema.get("format") == "uuid":
            return st.uuids().map(str)
        if "pattern" in schema:
            text = st.from_regex(schema["pattern"])
        else:
            text = st.text(min_size=low, max_size=min(high, 80))
        return st.one_of(
            *examples, text.filter(lambda v: low <= len(v) <= high and "\x00" not in v)
        )
    properties = schema.get("properties")
    if properties is None:
        return st.dictionaries(st.text(max_size=12), JSON_VALUES, max_size=3)
    required = set(schema.get("required", ()))
    return st.fixed_dictionaries(
        {k: from_schema(v) for k, v in properties.items() if k in required},
        optional={k: from_schema(v) for k, v in properties.items() if k not in required},
    )


@st.composite
def mutated(draw: st.DrawFn, valid: st.SearchStrategy[Any]) -> Any:
    """A valid body with one thing wrong: a field's value, an extra field, a missing one."""
    body = copy.deepcopy(draw(valid))
    if not isinstance(body, dict):
        return body
    how = draw(st.sampled_from(["replace", "add", "drop"]))
    if how == "replace" and body:
        body[draw(st.sampled_from(sorted(body)))] = draw(JSON_VALUES)
    elif how == "add":
        body[draw(st.text(min_size=1, max_size=12))] = draw(JSON_VALUES)
    elif body:
        body.pop(draw(st.sampled_from(sorted(body))))
    return body


def body_strategy(op: dict[str, Any]) -> st.SearchStrategy[Any] | None:
    request = op.get("requestBody")
    if request is None:
        return None
    valid = from_schema(inline(request["content"]["application/json"]["schema"]))
    return st.one_of(
        valid,
        valid,
        mutated(valid),
        JSON_VALUES,
        st.binary(max_size=64),
    )


BODIES = {name: body_strategy(op) for name, _, _, op in OPERATIONS}
PATH_TEXT = st.text(
    st.characters(exclude_categories=["Cs"], exclude_characters="/?#%\\"),
    min_size=1,
    max_size=40,
).filter(lambda s: s.strip(".") != "")


@st.composite
def query_strategy(draw: st.DrawFn, op: dict[str, Any]) -> dict[str, str]:
    query = {}
    for parameter in parameters(op):
        if parameter["in"] != "query" or not draw(st.booleans()):
            continue
        valid = from_schema(parameter["schema"]).map(str)
        query[parameter["name"]] = draw(st.one_of(valid, st.text(max_size=20)))
    return query


@pytest_asyncio.fixture(loop_scope="class", scope="class")
async def shared(dsn: str, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Registry]:
    async with shared_registry(dsn, tmp_path_factory.mktemp("fuzz")) as registry:
        yield registry


@dataclass
class FuzzWorld(World):
    victim: str = ""


@pytest_asyncio.fixture(loop_scope="class", scope="class")
async def world(shared: Registry) -> FuzzWorld:
    base = await make_world(shared, shared.settings.data_dir.parent / "sources")
    victim = await shared.create_workspace()
    return FuzzWorld(**vars(base), victim=victim.id)


@pytest.mark.asyncio(loop_scope="class")
class TestFuzz:
    """Every operation, fuzzed against one app shared by the class."""

    @pytest.mark.parametrize(
        ("name", "method", "path", "op"), [pytest.param(*o, id=o[0]) for o in OPERATIONS]
    )
    @settings(
        max_examples=EXAMPLES_PER_OPERATION,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(data=st.data())
    async def test_operation_never_fails_and_answers_as_documented(
        self,
        world: FuzzWorld,
        name: str,
        method: str,
        path: str,
        op: dict[str, Any],
        data: st.DataObject,
    ) -> None:
        own, other = world.online, world.other
        victim = world.victim if name in DESTRUCTIVE else own.id
        path_id = data.draw(
            st.sampled_from([victim, other.id, world.reconcile_id, str(uuid.uuid4())]) | PATH_TEXT,
            label="id",
        )
        url = path.replace("{id}", quote(path_id, safe=""))
        credential = data.draw(CREDENTIALS, label="credential")
        if credential == "garbage":
            credential = data.draw(GARBAGE_TOKENS, label="garbage token")
        headers = {"admin": ADMIN, "own": own.auth, "other": other.auth, "none": {}}.get(
            credential, bearer(credential)
        )
        headers = dict(headers)
        if any(p["name"] == "Last-Event-ID" for p in parameters(op)) and data.draw(st.booleans()):
            headers["Last-Event-ID"] = data.draw(
                st.integers(min_value=-5, max_value=2**64).map(str)
                | st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=10),
                label="Last-Event-ID",
            )
        query = data.draw(query_strategy(op), label="query")
        kwargs: dict[str, Any] = {}
        bodies = BODIES[name]
        if bodies is not None:
            body = data.draw(bodies, label="body")
            if isinstance(body, dict) and "workspace_id" in body and data.draw(st.booleans()):
                body["workspace_id"] = own.id
            if isinstance(body, bytes):
                kwargs["data"] = body
            else:
                kwargs["data"] = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"

        # Redirects are answers too (GET / is a 302 to the dashboard): not followed.
        response = await world.registry.client.request(
            method, url, params=query, headers=headers, allow_redirects=False, **kwargs
        )
        try:
            status = response.status
            streaming = response.content_type == "text/event-stream"
            text = "" if streaming else await response.text()
        finally:
            response.close()
        if streaming:
            await asyncio.sleep(0.02)  # let the server finish the cancelled stream

        assert status < 500, f"{method} {url} {query} -> {status}: {text}"
        assert str(status) in op["responses"], f"{method} {url} -> undocumented {status}: {text}"
        if status >= 400:
            assert response.content_type == "application/json", text
            envelope = json.loads(text)
            errors = [e.message for e in ERROR_SCHEMA.iter_errors(envelope)]
            assert not errors, f"{status} is not the error envelope: {errors}: {text}"
        elif name not in NOT_JSON_ON_SUCCESS and status != 204:
            documented = documented_content(op, status)
            if "application/json" not in documented:
                # The dashboard's pages and files; a redirect has no body to check.
                assert not documented or response.content_type in documented, response
                return
            assert response.content_type == "application/json"
            body = json.loads(text)
            errors = [e.message for e in success_validator(op, status).iter_errors(body)]
            assert not errors, f"{method} {url} -> {status} does not match its schema: {errors}"


def documented_answer(op: dict[str, Any], status: int) -> dict[str, Any]:
    answer: dict[str, Any] = op["responses"][str(status)]
    if "$ref" in answer:
        answer = SPEC["components"]["responses"][answer["$ref"].rsplit("/", 1)[-1]]
    return answer


def documented_content(op: dict[str, Any], status: int) -> set[str]:
    """The media types documented for this operation's answer with this status."""
    return set(documented_answer(op, status).get("content", {}))


def success_validator(op: dict[str, Any], status: int) -> Draft202012Validator:
    """The documented JSON schema of this operation's answer with this status."""
    answer = documented_answer(op, status)
    return Draft202012Validator(inline(answer["content"]["application/json"]["schema"]))
