"""What a request constrains its output to, as the engine carries it: `GuideSpec`.

One frozen, hashable value per request (it rides in `SamplingParams`), built from any of
the API's ways to ask: OpenAI's `response_format` (`json_object`, `json_schema`), vLLM's
`structured_outputs` extra (`json`, `regex`, `choice`, `grammar`), and tool calling
(`tool_choice: required` or a named function, as an xgrammar structural tag). `value` is a
canonical string (compact JSON, keys in the client's order: a schema's property order is
the order the output is generated in), so equal constraints share one compiled grammar.
`param` names the request field it came from, for errors.

JSON schemas get two changes (`normalize_schema`): an `integer` without bounds is kept
within JavaScript's safe range (±2^53 - 1), so a small model cannot fill `max_tokens` with
digits; and a string with `minLength`/`maxLength` (and no pattern) becomes the same bound
as a pattern of characters JSON allows unescaped, because xgrammar 0.2.8's length-bounded
string rule admits raw control characters, which strict JSON parsers reject.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

GuideKind = Literal["json_object", "json_schema", "regex", "choice", "grammar",
                    "structural_tag"]
MAX_GUIDE_CHARS = 100_000


class GuideSpecError(ValueError):
    """A constraint that cannot be built; `param` names the request field."""

    def __init__(self, message: str, *, param: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class GuideSpec:
    kind: GuideKind
    value: str = ""
    param: str = "response_format"

    @classmethod
    def json_object(cls, *, param: str = "response_format") -> GuideSpec:
        return cls("json_object", "", param)

    @classmethod
    def json_schema(cls, schema: Any, *, param: str = "response_format") -> GuideSpec:
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except ValueError as exc:
                raise GuideSpecError(f"{param}: the JSON schema is not JSON: {exc}",
                                     param=param) from None
        if not isinstance(schema, dict | bool):
            raise GuideSpecError(f"{param}: a JSON schema must be an object, got "
                                 f"{type(schema).__name__}", param=param)
        return cls("json_schema", _canonical(normalize_schema(schema), param), param)

    @classmethod
    def regex(cls, pattern: Any, *, param: str) -> GuideSpec:
        return cls("regex", _text(pattern, "a regular expression", param), param)

    @classmethod
    def choice(cls, choices: Any, *, param: str) -> GuideSpec:
        if (not isinstance(choices, list) or not choices
                or not all(isinstance(c, str) and c for c in choices)):
            raise GuideSpecError(f"{param}: choice must be a non-empty list of non-empty "
                                 "strings", param=param)
        return cls("choice", _canonical(choices, param), param)

    @classmethod
    def grammar(cls, ebnf: Any, *, param: str) -> GuideSpec:
        return cls("grammar", _text(ebnf, "a grammar (EBNF)", param), param)

    @classmethod
    def structural_tag(cls, tag: dict[str, Any], *, param: str) -> GuideSpec:
        return cls("structural_tag", _canonical(tag, param), param)


SAFE_INTEGER = 2**53 - 1
_BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")


_STRING_KEYWORDS = ("pattern", "format", "enum", "const")


def normalize_schema(schema: Any) -> Any:
    """`schema` with unbounded integers given JavaScript's safe range and length-bounded
    strings written as patterns (see the module's docstring)."""
    if isinstance(schema, list):
        return [normalize_schema(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    normal = {key: normalize_schema(value) for key, value in schema.items()}
    if _has_type(schema, "integer") and not any(bound in schema for bound in _BOUNDS):
        normal.update(minimum=-SAFE_INTEGER, maximum=SAFE_INTEGER)
    if (schema.get("type") == "string" and ("minLength" in schema or "maxLength" in schema)
            and not any(keyword in schema for keyword in _STRING_KEYWORDS)):
        low, high = normal.pop("minLength", 0), normal.pop("maxLength", "")
        normal["pattern"] = f'^[^\\x00-\\x1f"\\\\]{{{low},{high}}}$'
    return normal


def _has_type(schema: dict[str, Any], name: str) -> bool:
    kind = schema.get("type")
    return kind == name or (isinstance(kind, list) and name in kind)


def _canonical(value: Any, param: str) -> str:
    text = json.dumps(value, separators=(",", ":"))
    if len(text) > MAX_GUIDE_CHARS:
        raise GuideSpecError(f"{param} is {len(text)} characters; at most {MAX_GUIDE_CHARS}",
                             param=param)
    return text


def _text(value: Any, what: str, param: str) -> str:
    if not isinstance(value, str) or not value:
        raise GuideSpecError(f"{param} must be {what} as a non-empty string", param=param)
    if len(value) > MAX_GUIDE_CHARS:
        raise GuideSpecError(f"{param} is {len(value)} characters; at most "
                             f"{MAX_GUIDE_CHARS}", param=param)
    return value
