"""The user's inputs: reading YAML/JSON files (plans, run configs, study specs) and the one schema
layer every input is checked by (pydantic: strict types, finite numbers, ranges, unknown keys,
cross-field rules), every problem one line naming the file, the field and the value.

Below every layer (models, faults and the harness all may use it); it imports nothing of the package.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, create_model

# A section of a user's file: no unknown keys, strict types (a bool is no number, "1" no int, an
# int is a float), no inf or nan; a model validator holds its cross-field rules.
SECTION = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, frozen=True)


class Section(BaseModel):
    """The base of every input schema (``SECTION``)."""

    model_config = SECTION


Positive = Annotated[float, Field(gt=0)]
NonNegative = Annotated[float, Field(ge=0)]
Fraction = Annotated[float, Field(ge=0, le=1)]
PositiveInt = Annotated[int, Field(ge=1)]
NonNegativeInt = Annotated[int, Field(ge=0)]


def _lo_le_hi(pair: list) -> list:
    if pair[0] > pair[1]:
        raise ValueError(f"must be [lo, hi] with lo <= hi (got {pair})")
    return pair


def bounds(item: Any) -> Any:
    """The type of a ``[lo, hi]`` pair of `item` values with lo <= hi."""
    return Annotated[list[item], Field(min_length=2, max_length=2), AfterValidator(_lo_le_hi)]


def read_mapping_file(path: str | Path, what: str, error: type[Exception]) -> Any:
    """The parsed content of `path` (``.json`` as JSON, anything else as YAML; empty: ``None``).
    Unreadable, non-UTF-8 or unparsable files raise `error` with one line naming `path` and the
    problem; `what` names the file's role ("fault plan", "config", "study spec")."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise error(f"{path}: cannot read {what} ({exc.strerror})") from None
    except UnicodeDecodeError as exc:
        raise error(f"{path}: not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset {exc.start}): "
                    f"a {what} is a UTF-8 YAML or JSON file") from None
    try:
        if p.suffix == ".json":
            return json.loads(text) if text.strip() else None
        import yaml
        return yaml.safe_load(text)
    except Exception as exc:  # any parse error becomes one line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise error(f"{path}: not valid {'JSON' if p.suffix == '.json' else 'YAML'} ({first})") from None


def checked(schema: Any, data: Any, where: str, error: type[Exception], at: str = "") -> Any:
    """`data` validated by `schema`: a :class:`Section`, a dataclass (its fields' annotations and
    defaults read as a Section, a field typed by another dataclass as that one's section; the
    instances are built with the fields given, the others keep the dataclass's defaults) or any
    type (a pydantic ``TypeAdapter``). A problem raises `error` with :func:`problem_line`'s one
    line; `where` names the file or section ("" for none), `at` the section's own field path in the
    file ("kv_offload": ``kv_offload.policy: ...``)."""
    try:
        if dataclasses.is_dataclass(schema):
            return _built(_dataclass_section(schema).model_validate(data))
        if isinstance(schema, type) and issubclass(schema, BaseModel):
            return schema.model_validate(data)
        return _adapter(schema).validate_python(data)
    except ValidationError as exc:
        raise error(problem_line(exc, where, schema, at)) from None


@lru_cache(maxsize=None)
def _adapter(schema: Any) -> TypeAdapter:
    return TypeAdapter(schema, config=SECTION)


_DATACLASS_OF: dict[type, type] = {}  # a dataclass's section -> the dataclass


@lru_cache(maxsize=None)
def _dataclass_section(cls: type) -> type[Section]:
    hints = typing.get_type_hints(cls, include_extras=True)
    specs = {}
    for f in dataclasses.fields(cls):
        hint = _sectioned(hints[f.name])
        if f.default is not dataclasses.MISSING:
            specs[f.name] = (hint, f.default)
        elif f.default_factory is not dataclasses.MISSING:
            specs[f.name] = (hint, Field(default_factory=f.default_factory))
        else:
            specs[f.name] = (hint, ...)
    model = create_model(cls.__name__, __base__=Section, **specs)
    _DATACLASS_OF[model] = cls
    return model


def _sectioned(hint: Any) -> Any:
    """`hint` with a dataclass (alone or in ``X | None``) replaced by its section."""
    if dataclasses.is_dataclass(hint):
        return _dataclass_section(hint)
    args = typing.get_args(hint)
    if args and type(None) in args and any(dataclasses.is_dataclass(a) for a in args):
        return typing.Optional[tuple(_sectioned(a) for a in args if a is not type(None))[0]]
    return hint


def _built(m: BaseModel) -> Any:
    cls = _DATACLASS_OF[type(m)]
    return cls(**{name: _built(v) if type(v) in _DATACLASS_OF else v
                  for name in m.model_fields_set for v in (getattr(m, name),)})


def problem_line(exc: ValidationError, where: str, schema: Any = None, at: str = "") -> str:
    """The first problem of `exc` as one line: ``WHERE: field.path: problem (got VALUE)``; an
    unknown key lists the known fields of its section (when `schema` names them)."""
    e = exc.errors(include_url=False)[0]
    kind = e["type"]
    loc = (*((at,) if at else ()), *e["loc"])
    if kind in ("missing", "extra_forbidden"):
        parent, name = loc[:-1], loc[-1]
        if kind == "missing":
            problem = f"missing field {name!r}"
        else:
            known = _fields_at(schema, parent[1:] if at else parent)
            problem = f"unknown field {name!r}" + (f" (fields: {', '.join(known)})" if known else "")
        return _join(where, _path(parent), problem)
    msg = e["msg"]
    if kind in ("value_error", "assertion_error"):  # a validator's own sentence names the values
        return _join(where, _path(loc), msg.split(", ", 1)[1] if msg.startswith(("Value error, ", "Assertion failed, ")) else msg)
    ctx = dict(e.get("ctx", {}))
    if kind == "too_short" and ctx.get("min_length") == 1:
        kind = "empty"
    if kind == "literal_error":
        ctx["expected"] = ctx["expected"].replace(" or ", ", ").replace("'", "")
    if kind == "union_tag_invalid":
        ctx["expected_tags"] = ctx["expected_tags"].replace("'", "")
    ctx = {k: (f"{v:,}" if isinstance(v, int) and abs(v) >= 10_000 else f"{v:g}" if isinstance(v, float) else v)
           for k, v in ctx.items()}
    problem = (WORDING[kind].format(**ctx) if kind in WORDING
               else "must be " + msg[len("Input should be "):] if msg.startswith("Input should be ") else msg)
    if kind.startswith("union_tag_"):  # names the tag itself
        return _join(where, _path(loc), problem)
    return _join(where, _path(loc), f"{problem} (got {show(e['input'])})")


WORDING = {  # pydantic's error types in the project's words
    "model_type": "must be a mapping", "dict_type": "must be a mapping", "model_attributes_type": "must be a mapping",
    "int_type": "must be an integer", "float_type": "must be a number", "string_type": "must be a string",
    "int_parsing": "must be an integer", "float_parsing": "must be a number",  # text (a CSV field) that is not one
    "bool_type": "must be true or false", "list_type": "must be a list", "finite_number": "must be finite",
    "greater_than": "must be > {gt}", "greater_than_equal": "must be >= {ge}", "less_than": "must be < {lt}",
    "less_than_equal": "must be <= {le}", "literal_error": "must be one of {expected}",
    "too_short": "must have at least {min_length} items", "empty": "must not be empty", "too_long": "must have at most {max_length} items",
    "string_too_short": "must be a non-empty string",
    "union_tag_invalid": "unknown kind {tag!r} (known: {expected_tags})", "union_tag_not_found": "missing field 'kind'",
}


def show(value: Any, limit: int = 60) -> str:
    """`value` as the one-line messages quote it: its type and repr, cut at `limit` characters."""
    text = repr(value)
    text = text if len(text) <= limit else text[:limit - 3] + "..."
    return text if isinstance(value, (str, int, float)) and not isinstance(value, bool) else f"{type(value).__name__} {text}"


def _join(*parts: str) -> str:
    return ": ".join(p for p in parts if p)


def _path(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _fields_at(schema: Any, loc: tuple) -> list[str]:
    """The field names of the section at `loc` under `schema` (empty where it cannot tell)."""
    model = _dataclass_section(schema) if dataclasses.is_dataclass(schema) else schema
    for part in loc:
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return []
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        if field is None:
            return []
        model = _section_in(field.annotation)
    return list(model.model_fields) if isinstance(model, type) and issubclass(model, BaseModel) else []


def _section_in(annotation: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _section_in(arg)
        if found is not None:
            return found
    return None
