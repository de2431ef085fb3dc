"""YAML files validated by pydantic, with every error as one line naming the file, the field, the bad value and the
valid choices. Recipes, batch matrices and device profiles all load through here.

A leaf module (it imports nothing of edgesmith but the error base), so `pipeline` and `targets` can both use it.
"""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from edgesmith.errors import EdgesmithError

M = TypeVar("M", bound=BaseModel)


def suggest(bad: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(bad, valid, n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def read_mapping(text: str, source: str, what: str, error: type[EdgesmithError]) -> dict:
    """A YAML mapping from `text`; syntax errors give their line and column."""
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise error(f"{source}: not valid YAML{where} ({problem}); fix the file's syntax") from None
    if not isinstance(data, dict):
        raise error(f"{source}: {what} is a mapping of fields, got {type(data).__name__}")
    return data


def read_text(path: Path, what: str, error: type[EdgesmithError]) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{what} file '{path}' is not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
    except OSError as exc:
        raise error(f"{what} file '{path}' cannot be read ({exc.strerror}); check the path") from None


def validated(cls: type[M], raw: dict, source: str, error: type[EdgesmithError],
              tags: dict[str, type[BaseModel]] | None = None) -> M:
    """`cls(**raw)`, or `error` with one line. `tags`: the member class of each discriminated-union tag (the
    recipe's stage kinds), which pydantic puts in the error location."""
    try:
        return cls(**raw)
    except ValidationError as exc:
        raise error(f"{source}: {one_line(exc, cls, tags or {})}") from None


def one_line(exc: ValidationError, root: type[BaseModel], tags: dict[str, type[BaseModel]]) -> str:
    err = exc.errors()[0]
    located = [str(p) for p in err["loc"] if not str(p).startswith(("function-after", "tagged-union"))]
    # Discriminated unions put the tag in the location (stages.0.train.epochs): keep it to find the member's class,
    # drop it from the field name the user sees.
    loc = [p for i, p in enumerate(located) if not _is_tag(located, i, tags)]
    field = ".".join(loc) or root.__name__.lower()
    if err["type"] == "extra_forbidden":
        parent = _model_at(root, located[:-1], tags)
        names = list(parent.model_fields) if parent else []
        valid = f"; valid fields: {', '.join(names)}" if parent else ""
        return f"field '{field}' is not allowed{suggest(loc[-1], names)}{valid}"
    msg = err["msg"].removeprefix("Value error, ")
    value = err.get("input")
    if err["type"] == "union_tag_invalid" or err["type"].endswith("_kind"):
        if isinstance(value, dict):
            value = {k: value[k] for k in ("kind", "method") if k in value}
        return f"field '{field}': {msg} (got {value})"
    shown = "" if isinstance(value, (dict, list)) or err["type"] in ("missing", "value_error") else f" (got {value!r})"
    return f"field '{field}': {msg}{shown}"


def _is_tag(loc: list[str], i: int, tags: dict) -> bool:
    return i > 0 and loc[i - 1].isdigit() and loc[i] in tags


def _model_at(root: type[BaseModel], loc: list[str], tags: dict) -> type[BaseModel] | None:
    """The pydantic model class that sits at a field path, to list its valid fields."""
    current = root
    for i, part in enumerate(loc):
        if part.isdigit():
            continue
        if _is_tag(loc, i, tags):
            current = tags[part]
            continue
        field = current.model_fields.get(part)
        inner = _model_in_annotation(field.annotation) if field else None
        if inner is None:
            return None
        current = inner
    return current


def _model_in_annotation(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _model_in_annotation(arg)
        if found:
            return found
    return None
