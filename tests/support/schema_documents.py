"""Hypothesis strategies that draw JSON documents from a JSON Schema.

Covers the keywords the event schemas use, and raises on any other constraint keyword, so
a rule added to the models later cannot be silently skipped here. (hypothesis-jsonschema
did this once; it no longer runs on current Hypothesis.) ``oneOf`` is drawn as its
branches' union: the caller filters with a validator, as that library did.
"""

from __future__ import annotations

import math
from datetime import UTC
from typing import Any

from hypothesis import strategies as st

#: keywords that only annotate
_NOTES = {"title", "description", "default", "discriminator", "format", "$defs", "examples"}
_KNOWN = _NOTES | {
    "$ref",
    "type",
    "const",
    "enum",
    "anyOf",
    "oneOf",
    "properties",
    "required",
    "additionalProperties",
    "items",
    "minItems",
    "maxItems",
    "minimum",
    "maximum",
    "multipleOf",
    "minLength",
    "maxLength",
    "pattern",
    "components",
}
_LONGEST = 40  # strings drawn are at most this long (base64's bound is 14 million)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=6,
)


def documents(schema: dict[str, Any], root: dict[str, Any] | None = None) -> st.SearchStrategy[Any]:
    """Documents shaped by ``schema`` (``$ref`` resolved against ``root``)."""
    root = root if root is not None else schema
    unknown = set(schema) - _KNOWN
    if unknown:
        raise NotImplementedError(f"no strategy for keywords {sorted(unknown)}")
    if "$ref" in schema:
        return documents(_resolve(root, schema["$ref"]), root)
    if "const" in schema:
        return st.just(schema["const"])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    branches = schema.get("anyOf") or schema.get("oneOf")
    if branches and "type" not in schema:
        return st.one_of([documents(b, root) for b in branches])
    kind = schema.get("type")
    if kind is None:
        return json_values
    return _TYPES[kind](schema, root)


def _resolve(root: dict[str, Any], ref: str) -> dict[str, Any]:
    node: Any = root
    for part in ref.removeprefix("#/").split("/"):
        node = node[part]
    return node


def _integers(schema: dict[str, Any], _root: Any) -> st.SearchStrategy[Any]:
    low, high = schema.get("minimum"), schema.get("maximum")
    step = schema.get("multipleOf", 1)
    low_n = None if low is None else math.ceil(low / step)
    high_n = None if high is None else math.floor(high / step)
    whole = st.integers(low_n, high_n).map(lambda n: n * step)
    # JSON Schema's integer is a number with no fraction: 512.0 is one too.
    return whole | whole.filter(lambda n: abs(n) < 2**53).map(float)


def _numbers(schema: dict[str, Any], root: Any) -> st.SearchStrategy[Any]:
    low, high = schema.get("minimum"), schema.get("maximum")
    floats = st.floats(low, high, allow_nan=False, allow_infinity=False)
    return floats | _integers(schema, root)


def _strings(schema: dict[str, Any], _root: Any) -> st.SearchStrategy[Any]:
    if schema.get("format") == "date-time":
        return st.datetimes(timezones=st.just(UTC)).map(lambda t: t.isoformat())
    if "pattern" in schema:
        return st.from_regex(schema["pattern"], fullmatch=True)
    low = schema.get("minLength", 0)
    high = min(schema.get("maxLength", _LONGEST), _LONGEST)
    return st.text(min_size=low, max_size=max(low, high))


def _arrays(schema: dict[str, Any], root: Any) -> st.SearchStrategy[Any]:
    items = documents(schema.get("items", {}), root)
    low = schema.get("minItems", 0)
    return st.lists(items, min_size=low, max_size=max(low, min(schema.get("maxItems", 4), 4)))


@st.composite
def _objects(draw: st.DrawFn, schema: dict[str, Any], root: Any) -> dict[str, Any]:
    required = set(schema.get("required", ()))
    document = {}
    for name, field in schema.get("properties", {}).items():
        if name in required or draw(st.booleans()):
            document[name] = draw(documents(field, root))
    if schema.get("additionalProperties", True) is not False:
        extra = draw(st.dictionaries(st.text(min_size=1, max_size=10), json_values, max_size=2))
        document.update({k: v for k, v in extra.items() if k not in document})
    branches = schema.get("oneOf") or ()
    if branches:  # ``required`` branches (ImageSource): add what one of them names
        chosen = draw(st.sampled_from(branches))
        for name in chosen.get("required", ()):
            if name not in document:
                document[name] = draw(documents(schema["properties"][name], root))
    return document


_TYPES = {
    "integer": _integers,
    "number": _numbers,
    "string": _strings,
    "boolean": lambda _s, _r: st.booleans(),
    "null": lambda _s, _r: st.none(),
    "array": _arrays,
    "object": _objects,
}
