"""registry/labels.py: the checks and the documented patterns say the same thing."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import registry as registry_package
from registry.errors import InvalidField
from registry.labels import (
    KEY_PATTERN,
    SELECTOR_PATTERN,
    VALUE_PATTERN,
    key_problem,
    parse_selector,
    value_problem,
)

SPEC = json.loads((Path(registry_package.__file__).parent / "openapi.json").read_text())
KEY = st.from_regex(f"^{KEY_PATTERN}$", fullmatch=True)


def test_the_document_carries_the_patterns() -> None:
    schemas = SPEC["components"]["schemas"]
    assert schemas["Labels"]["propertyNames"]["pattern"] == f"^{KEY_PATTERN}$"
    assert schemas["Labels"]["additionalProperties"]["pattern"] == f"^{VALUE_PATTERN}$"
    (selector,) = [
        p for p in SPEC["paths"]["/workspaces"]["get"]["parameters"] if p["name"] == "selector"
    ]
    assert selector["schema"]["pattern"] == SELECTOR_PATTERN


@given(KEY, st.from_regex(f"^{VALUE_PATTERN}$", fullmatch=True))
def test_every_key_and_value_the_patterns_admit_is_accepted(key: str, value: str) -> None:
    assert key_problem(key) is None
    assert value_problem(value) is None


@given(st.text(max_size=80))
def test_a_key_the_checks_accept_matches_the_pattern(key: str) -> None:
    if key_problem(key) is None:
        assert re.fullmatch(KEY_PATTERN, key, re.ASCII)


@settings(suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow])
@given(st.from_regex(SELECTOR_PATTERN, fullmatch=True).filter(lambda s: len(s) < 600))
def test_every_selector_the_pattern_admits_parses_unless_it_contradicts_itself(
    text: str,
) -> None:
    refusal = None
    try:
        parse_selector(text)
    except InvalidField as exc:
        refusal = exc.message
    # key=a,key=b cannot hold: the one rule the pattern cannot state.
    assert refusal is None or "two values" in refusal, refusal


@given(st.text(alphabet="ab=!,() in/.-_", max_size=30))
def test_a_selector_that_parses_matches_the_pattern(text: str) -> None:
    try:
        parse_selector(text)
    except InvalidField:
        return
    assert re.fullmatch(SELECTOR_PATTERN, text, re.ASCII)


@pytest.mark.parametrize(
    "key", ["a", "a/b", "a.b-c/d_e.f", "A9", "x" * 63, ("a" * 63 + ".") * 3 + "b" * 61 + "/n"]
)
def test_kubernetes_keys_are_accepted(key: str) -> None:
    assert key_problem(key) is None
