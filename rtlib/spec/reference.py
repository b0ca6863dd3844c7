"""The spec reference (docs/spec-reference.md), generated from the schema's own descriptions."""

import types
import typing

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from rtlib.spec.schema import Spec


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        return _type_name(typing.get_args(tp)[0])
    if origin is typing.Literal:
        return " \\| ".join(f"`{a}`" for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if tp is type(None):
        return "null"
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return f"[{tp.__name__}](#{tp.__name__.lower()})"
    return getattr(tp, "__name__", str(tp))


def _models(tp, seen: list) -> None:
    """Every BaseModel reachable from `tp`, depth first, in field order."""
    origin = typing.get_origin(tp)
    if origin is not None:
        for arg in typing.get_args(tp):
            _models(arg, seen)
        return
    if isinstance(tp, type) and issubclass(tp, BaseModel) and tp not in seen:
        seen.append(tp)
        for field in tp.model_fields.values():
            _models(field.annotation, seen)


def _bounds(field) -> str:
    marks = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<", "min_length": "length >="}
    parts = [f"{sym} {getattr(m, key)}" for m in field.metadata for key, sym in marks.items()
             if getattr(m, key, None) is not None]
    return f" ({', '.join(parts)})" if parts else ""


def _default(field) -> str:
    if field.default_factory is not None:
        return "(section defaults)"
    if field.default is PydanticUndefined:
        return "**required**"
    return f"`{field.default!r}`" if field.default is not None else "`null`"


def spec_reference_markdown() -> str:
    """docs/spec-reference.md: one table per spec section, from the schema's descriptions, so
    the reference cannot drift from the code (a test compares them)."""
    models: list = []
    _models(Spec, models)
    lines = [
        "# Spec reference",
        "",
        "Generated from `rtlib/spec/schema.py` by `python tools/spec_reference.py`; a test keeps "
        "it in sync. Every section forbids unknown keys. Keys are addressed with dots on the "
        "command line (`model.attention.heads.1.clusters=16`).",
        "",
    ]
    for model in models:
        lines += [f"## {model.__name__}", "", (model.__doc__ or "").strip(), "",
                  "| key | type | default | description |", "|---|---|---|---|"]
        for name, field in model.model_fields.items():
            desc = (field.description or "").replace("|", "\\|")
            lines.append(f"| `{name}` | {_type_name(field.annotation)}{_bounds(field)} "
                         f"| {_default(field)} "
                         f"| {desc} |")
        lines.append("")
    return "\n".join(lines)
