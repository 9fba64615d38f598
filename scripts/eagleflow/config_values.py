"""Typed values for config overrides given on the command line.

`snakemake --config 'eagle={top_k: 12}'` hands nested values over as text ('12'), which the schema
would reject. Where the schema asks for a number, an integer, a boolean or null and the text reads
as exactly one of them, the typed value replaces the text before validation, so the parameters that
reach the rules (and the outputs' provenance) record 12, not '12'.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

_INTEGER = re.compile(r"[+-]?\d+")
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")
_BOOLEANS = {"true": True, "false": False}
_NULLS = {"null", "none", "~"}


def _types(schema: Mapping[str, Any]) -> set[str]:
    kind = schema.get("type", [])
    return {kind} if isinstance(kind, str) else set(kind)


def _typed(text: str, types: set[str]) -> tuple[bool, Any]:
    """(True, value) if `text` reads as one of the non-text `types`, else (False, None)."""
    word = text.strip()
    if "null" in types and word.lower() in _NULLS:
        return True, None  # before the text check: a nullable text key given as null
    if "string" in types:
        return False, None
    if "integer" in types and _INTEGER.fullmatch(word):
        return True, int(word)
    if "number" in types and _NUMBER.fullmatch(word):
        return True, int(word) if _INTEGER.fullmatch(word) else float(word)
    if "boolean" in types and word.lower() in _BOOLEANS:
        return True, _BOOLEANS[word.lower()]
    return False, None


def _resolve(schema: Mapping[str, Any], root: Mapping[str, Any]) -> Mapping[str, Any]:
    ref = schema.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/"):
        target: Any = root
        for part in ref[2:].split("/"):
            target = target[part]
        return target
    return schema


def _merge_alternatives(schema: Mapping[str, Any], root: Mapping[str, Any]) -> Mapping[str, Any]:
    """A `oneOf`/`anyOf` schema as one: the union of its types, the first alternative's items.

    `eagle.top_k` is an integer or a list of integers: '12' reads as 12, ['5', '10'] as [5, 10].
    """
    alternatives = [_resolve(a, root) for a in schema.get("oneOf", schema.get("anyOf", []))]
    if not alternatives:
        return schema
    types = set().union(*(_types(a) for a in alternatives))
    merged: dict[str, Any] = {**schema, "type": sorted(types)}
    for alternative in alternatives:
        for key in ("items", "properties", "additionalProperties"):
            if key in alternative and key not in merged:
                merged[key] = alternative[key]
    return merged


def _child_schema(schema: Mapping[str, Any], key: str) -> Mapping[str, Any] | None:
    if key in schema.get("properties", {}):
        return schema["properties"][key]
    for pattern, child in schema.get("patternProperties", {}).items():
        if re.search(pattern, key):
            return child
    extra = schema.get("additionalProperties")
    return extra if isinstance(extra, Mapping) else None


def coerce_command_line_strings(
    config: Any, schema: Mapping[str, Any], root: Mapping[str, Any] | None = None, at: str = ""
) -> tuple[Any, list[str]]:
    """`config` with text turned into the number/boolean/null its schema asks for.

    Returns the new value and the dotted keys that were converted. Text that does not read as the
    required type is left alone, for the schema validation to report.
    """
    root = schema if root is None else root
    schema = _merge_alternatives(_resolve(schema, root), root)
    changed: list[str] = []
    if isinstance(config, str):
        converted, value = _typed(config, _types(schema))
        return (value, [at]) if converted else (config, [])
    if isinstance(config, Mapping):
        out = {}
        for key, value in config.items():
            child = _child_schema(schema, str(key))
            if child is None:
                out[key] = value
                continue
            out[key], more = coerce_command_line_strings(
                value, child, root, f"{at}.{key}" if at else str(key)
            )
            changed += more
        return out, changed
    if isinstance(config, list) and isinstance(schema.get("items"), Mapping):
        out_list = []
        for i, item in enumerate(config):
            value, more = coerce_command_line_strings(item, schema["items"], root, f"{at}[{i}]")
            out_list.append(value)
            changed += more
        return out_list, changed
    return config, changed
