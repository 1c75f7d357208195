"""Workspace labels: Kubernetes' key/value syntax and limits, and the label selector.

A key is an optional DNS-subdomain prefix and `/`, then a name of at most 63 characters:
alphanumerics with `-`, `_` and `.` inside. A value is empty or a name. Kubernetes' syntax and
limits, so labels copied from a manifest fit, with one difference: the prefix is at most four
DNS labels (`service.beta.kubernetes.io`) instead of at most 253 characters, a bound a regular
expression can state (the documented pattern is then exact; four labels of 63 are 255). A
bounded count keeps a workspace row small (the list filters read the column with a GIN index).

A selector is Kubernetes' equality- and set-based syntax, comma-separated terms that all hold:
`env=prod` (or `==`), `tier!=canary` (also true without the key), `team` (has the key),
`!legacy` (has not), `env in (prod,staging)`, `env notin (dev)` (also true without the key).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from registry.errors import InvalidField

MAX_LABELS = 64
MAX_NAME = 63
MAX_PREFIX_LABELS = 4
MAX_SELECTOR_LENGTH = 4096
MAX_SET_VALUES = 64

_NAME = re.compile(r"[a-zA-Z0-9]([-_.a-zA-Z0-9]*[a-zA-Z0-9])?", re.ASCII)
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", re.ASCII)

# The same syntax as one regular expression, for registry/openapi.json (in the subset ECMA-262
# and Python share; tests/test_labels.py checks the document carries these and that they agree
# with the checks): a schema-driven client then generates exactly what the server accepts.
_NAME_RE = "[A-Za-z0-9](?:[-_.A-Za-z0-9]{0,61}[A-Za-z0-9])?"
_DNS_LABEL_RE = "[a-z0-9](?:[-a-z0-9]{0,61}[a-z0-9])?"
KEY_PATTERN = f"(?:{_DNS_LABEL_RE}(?:[.]{_DNS_LABEL_RE}){{0,{MAX_PREFIX_LABELS - 1}}}/)?{_NAME_RE}"
VALUE_PATTERN = f"(?:{_NAME_RE})?"
_TERM_PATTERN = (
    f"!?{KEY_PATTERN}"
    f"|{KEY_PATTERN}(?:==?|!=){VALUE_PATTERN}"
    f"|{KEY_PATTERN} +(?:in|notin) *[(] *{VALUE_PATTERN} *(?:, *{VALUE_PATTERN} *)*[)]"
)
SELECTOR_PATTERN = f"^(?:{_TERM_PATTERN})(?:,(?:{_TERM_PATTERN}))*$"
_SELECTOR = re.compile(SELECTOR_PATTERN, re.ASCII)


def _dns_subdomain(text: str) -> bool:
    return text.count(".") < MAX_PREFIX_LABELS and all(
        len(part) <= MAX_NAME and _DNS_LABEL.fullmatch(part) for part in text.split(".")
    )


def key_problem(key: str) -> str | None:
    """Why `key` is not a label key, or None."""
    prefix, slash, name = key.rpartition("/")
    if slash and not prefix:
        return "its prefix before '/' is empty"
    if prefix and not _dns_subdomain(prefix):
        return (
            f"its prefix must be a DNS subdomain of at most {MAX_PREFIX_LABELS} labels of at "
            f"most {MAX_NAME} characters (lowercase alphanumerics and '-')"
        )
    if not name:
        return "its name is empty"
    if len(name) > MAX_NAME or not _NAME.fullmatch(name):
        return (
            f"its name must be at most {MAX_NAME} characters: alphanumerics, with '-', '_' "
            "and '.' between them"
        )
    return None


def value_problem(value: str) -> str | None:
    if value == "" or (len(value) <= MAX_NAME and _NAME.fullmatch(value)):
        return None
    return (
        f"a value must be empty or at most {MAX_NAME} characters: alphanumerics, with '-', "
        "'_' and '.' between them"
    )


def check_key(key: object, field_name: str) -> str:
    if not isinstance(key, str) or (problem := key_problem(key)) is not None:
        shown = repr(key)[:80]
        raise InvalidField(
            f"invalid label key {shown}: {problem or 'not a string'}", field=field_name
        )
    return key


def check_value(key: str, value: object, field_name: str) -> str:
    if not isinstance(value, str):
        raise InvalidField(f"label {key}: its value must be a string", field=field_name)
    if (problem := value_problem(value)) is not None:
        raise InvalidField(f"label {key}: {problem}", field=field_name)
    return value


def parse_labels(raw: object, field_name: str = "labels") -> dict[str, str]:
    """A complete label map from a request body (create, PUT): an object of strings."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise InvalidField(f"{field_name} must be an object of strings", field=field_name)
    labels = {check_key(k, field_name): check_value(k, v, field_name) for k, v in raw.items()}
    check_count(labels, field_name)
    return labels


def check_count(labels: dict[str, str], field_name: str = "labels") -> None:
    if len(labels) > MAX_LABELS:
        raise InvalidField(
            f"a workspace has at most {MAX_LABELS} labels ({len(labels)} given)", field=field_name
        )


def parse_patch(raw: object, field_name: str = "labels") -> tuple[dict[str, str], list[str]]:
    """A merge patch (JSON merge-patch style): {key: value} sets, {key: null} removes."""
    if not isinstance(raw, dict):
        raise InvalidField(f"{field_name} must be an object", field=field_name)
    sets: dict[str, str] = {}
    removes: list[str] = []
    for key, value in raw.items():
        check_key(key, field_name)
        if value is None:
            removes.append(key)
        else:
            sets[key] = check_value(key, value, field_name)
    return sets, removes


@dataclass(frozen=True, slots=True)
class Selector:
    """A parsed selector, grouped by what each kind of term compiles to in SQL."""

    equal: dict[str, str] = field(default_factory=dict)  # labels @> {...}
    exists: list[str] = field(default_factory=list)  # labels ?& keys
    absent: list[str] = field(default_factory=list)  # NOT labels ?| keys
    within: dict[str, list[str]] = field(default_factory=dict)  # in (...)
    outside: dict[str, list[str]] = field(default_factory=dict)  # != and notin (...)


_SET_TERM = re.compile(r"(?P<key>[^\s!=(),]+)\s+(?P<op>in|notin)\s*\((?P<values>[^()]*)\)\s*")


def _split_terms(text: str) -> list[str]:
    """Commas separate terms, except inside a set's parentheses."""
    terms, depth, start = [], 0, 0
    for i, char in enumerate(text):
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        elif char == "," and depth == 0:
            terms.append(text[start:i])
            start = i + 1
    terms.append(text[start:])
    return terms


def _bad(term: str, why: str) -> InvalidField:
    return InvalidField(f"selector term {term.strip()[:80]!r}: {why}", field="selector")


def parse_selector(text: str) -> Selector:
    if len(text) > MAX_SELECTOR_LENGTH:
        raise InvalidField(
            f"selector must be at most {MAX_SELECTOR_LENGTH} characters", field="selector"
        )
    selector = Selector()
    for term in _split_terms(text):
        _parse_term(term, selector)
    # The terms' own checks name what is wrong; this one holds the rest (stray spaces, say)
    # to exactly the documented syntax.
    if not _SELECTOR.fullmatch(text):
        raise InvalidField(
            "selector must be comma-separated terms: key, !key, key=value, key!=value, "
            "key in (a,b) or key notin (a,b), without other spaces",
            field="selector",
        )
    return selector


def _key(term: str, key: str) -> str:
    if (problem := key_problem(key)) is not None:
        raise _bad(term, f"invalid key: {problem}")
    return key


def _value(term: str, value: str) -> str:
    if (problem := value_problem(value)) is not None:
        raise _bad(term, problem)
    return value


def _parse_term(term: str, selector: Selector) -> None:
    stripped = term.strip()
    if not stripped:
        raise _bad(term, "empty term (a stray comma?)")
    if (match := _SET_TERM.fullmatch(stripped + " ")) is not None:
        key = _key(term, match["key"])
        values = [_value(term, v.strip()) for v in match["values"].split(",")]
        if len(values) > MAX_SET_VALUES:
            raise _bad(term, f"at most {MAX_SET_VALUES} values")
        target = selector.within if match["op"] == "in" else selector.outside
        if match["op"] == "in" and key in target:
            # Two `in` terms on one key hold together only for their common values.
            target[key] = [v for v in target[key] if v in values]
        else:
            target[key] = sorted(set(target.get(key, [])) | set(values))
        return
    for op in ("!=", "==", "="):
        key, sep, value = stripped.partition(op)
        if sep:
            key, value = key.strip(), value.strip()
            if "=" in value or "!" in key:
                raise _bad(term, "one operator per term")
            _key(term, key)
            _value(term, value)
            if op == "!=":
                selector.outside[key] = sorted(set(selector.outside.get(key, [])) | {value})
            elif selector.equal.get(key, value) != value:
                raise _bad(term, f"{key} cannot equal two values")
            else:
                selector.equal[key] = value
            return
    if stripped.startswith("!"):
        selector.absent.append(_key(term, stripped[1:].strip()))
        return
    if any(c in stripped for c in " ()"):
        raise _bad(term, "expected key, !key, key=value, key!=value or key in (a,b)")
    selector.exists.append(_key(term, stripped))
