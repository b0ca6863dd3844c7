"""Reading spec files: YAML (safe_load only), dotted overrides, and errors people can act on."""

import difflib
import re
import types
import typing
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from rtlib.errors import SpecError
from rtlib.spec.schema import Spec


class _UniqueKeyLoader(yaml.SafeLoader):
    """`yaml.safe_load` that rejects a key given twice in one mapping (instead of keeping the
    last silently) and reads `1e-3` as a number, as YAML 1.2 does (PyYAML's YAML 1.1 rules make
    it a string, a trap for learning rates)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_Y12_FLOAT = re.compile(r"^[-+]?(?:[0-9][0-9_]*)?(?:\.[0-9_]*)?[eE][-+]?[0-9]+$")
_UniqueKeyLoader.add_implicit_resolver("tag:yaml.org,2002:float", _Y12_FLOAT,
                                       list("-+0123456789."))


def _safe_load_unique(text: str) -> Any:
    """Like `yaml.safe_load` (plain data only, no Python objects), but duplicate keys fail."""
    loader = _UniqueKeyLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def load_spec(path: str | Path, overrides: Iterable[str] = ()) -> Spec:
    """Read a YAML spec, apply `dotted.key=value` overrides (values parsed as YAML), validate.

    Raises `SpecError` naming the file, the key path and what is wrong.
    """
    source = str(path)
    if isinstance(overrides, str):  # iterating it would give one override per character
        raise TypeError(f"load_spec: overrides must be a list of 'dotted.key=value' strings, "
                        f"got the string {overrides!r} (wrap it in a list)")
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise SpecError(source, [f"cannot read spec file: {e.strerror or e}"]) from None
    except UnicodeDecodeError as e:
        raise SpecError(source, [f"not a text (UTF-8) file: byte {e.start} is "
                                 f"{e.object[e.start:e.start + 1]!r}"]) from None
    try:
        data = _safe_load_unique(text)
    except yaml.YAMLError as e:
        raise SpecError(source, [f"invalid YAML: {e}"]) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise SpecError(source, [f"the top level must be a mapping, got {type(data).__name__}"])
    applied = apply_overrides(data, overrides, source)
    return validate_spec(data, source, applied)


def apply_overrides(data: dict, overrides: Iterable[str], source: str = "<overrides>") -> list[str]:
    """Set `a.b.0.c=value` items in nested `data` in place; returns the dotted keys set."""
    applied = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise SpecError(source, [f"override {item!r} must look like dotted.key=value"])
        try:
            value = _safe_load_unique(raw) if raw.strip() else None
        except yaml.YAMLError as e:
            raise SpecError(source, [f"override {item!r}: value is not valid YAML: {e}"]) from None
        parts = key.split(".")
        node: Any = data
        for depth, part in enumerate(parts):
            last = depth == len(parts) - 1
            where = ".".join(parts[: depth + 1])
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise SpecError(source, [f"override {item!r}: {where} is not an index of a "
                                             f"list of {len(node)} items"])
                part = int(part)
            elif not isinstance(node, dict):
                raise SpecError(source, [f"override {item!r}: {'.'.join(parts[:depth])} is a "
                                         f"value, not a section"])
            if last:
                node[part] = value
            else:
                if isinstance(node, dict) and node.get(part) is not None and \
                        not isinstance(node[part], (dict, list)):
                    raise SpecError(source, [f"override {item!r}: {where} is a value "
                                             f"({node[part]!r}), not a section"])
                if isinstance(node, dict) and node.get(part) is None:
                    node[part] = {}
                node = node[part]
        applied.append(key)
    return applied


def validate_spec(data: dict, source: str = "<spec>", overridden: Sequence[str] = ()) -> Spec:
    """Validate already-parsed spec data, turning Pydantic errors into `SpecError` lines.
    `model.vocab_size: auto` becomes the vocabulary size of the store at `data.path`."""
    data = _resolve_auto_vocab(data, source)
    try:
        return Spec.model_validate(data)
    except ValidationError as e:
        raise SpecError(source, [_describe(err, overridden) for err in e.errors()]) from None


def _resolve_auto_vocab(data: dict, source: str) -> dict:
    model = data.get("model")
    if not isinstance(model, dict) or model.get("vocab_size") != "auto":
        return data
    from rtlib.data.store import StoreError, existing_manifest
    from rtlib.spec.schema import DataSpec

    section = data.get("data") if isinstance(data.get("data"), dict) else {}
    path = section.get("path", DataSpec.model_fields["path"].default)
    try:
        manifest = existing_manifest(str(path))
    except StoreError as e:
        manifest, why = None, str(e)
    else:
        why = f"no token store at {path} (prepare it first, or give a number)"
    if manifest is None:
        raise SpecError(source, [f"model.vocab_size: auto takes the vocabulary of the token "
                                 f"store at data.path, but: {why}"])
    return {**data, "model": {**model, "vocab_size": manifest["tokenizer"]["vocab_size"]}}


def _describe(err: dict, overridden: Sequence[str]) -> str:
    loc = tuple(err["loc"])
    path = _printable_path(loc)
    if err["type"] == "spec_conflict":
        ctx = err["ctx"]
        path = ".".join(p for p in (path, ctx["path"]) if p)
        message = ctx["message"]
    elif err["type"] == "union_tag_invalid":
        tags = [t.strip(" '") for t in err["ctx"]["expected_tags"].split(",")]
        tag = err["ctx"]["tag"]
        path = f"{path}.kind" if path else "kind"
        close = difflib.get_close_matches(str(tag), tags, n=1, cutoff=0.5)
        message = f"unknown kind {tag!r}; expected one of {', '.join(tags)}"
        if close:
            message += f"; did you mean {close[0]!r}?"
    elif err["type"] == "extra_forbidden":
        parent = _model_at(loc[:-1])
        valid = list(parent.model_fields) if parent is not None else []
        close = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.5)
        message = "unknown key"
        if close:
            message += f"; did you mean {close[0]!r}?"
        elif valid:
            message += f"; valid keys here: {', '.join(valid)}"
    else:
        message = err["msg"]
        if err["type"] not in ("missing",) and "input" in err and not isinstance(err["input"], dict):
            message += f" (got {err['input']!r})"
    origin = next((o for o in overridden if path == o or path.startswith(o + ".")), None)
    suffix = f" [set by override {origin}=...]" if origin else ""
    return f"{path or '<top level>'}: {message}{suffix}"


def _unwrap(tp: Any) -> Any:
    """Strip Annotated / Optional wrappers."""
    while True:
        origin = typing.get_origin(tp)
        if origin is typing.Annotated:
            tp = typing.get_args(tp)[0]
        elif origin in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            if len(args) == 1:
                tp = args[0]
            else:
                return tp
        else:
            return tp


def _step(tp: Any, elem: Any) -> tuple[Any, bool]:
    """Follow one loc element from type `tp`: (next type, whether elem is printed in paths)."""
    tp = _unwrap(tp)
    origin = typing.get_origin(tp)
    if origin is list:
        return typing.get_args(tp)[0], True
    if origin is dict:
        return typing.get_args(tp)[1], True
    if origin in (typing.Union, types.UnionType):  # discriminated union: elem is the tag
        for member in typing.get_args(tp):
            member = _unwrap(member)
            kind = getattr(member, "model_fields", {}).get("kind")
            if kind is not None and elem in typing.get_args(kind.annotation):
                return member, False
        return None, True
    if isinstance(tp, type) and issubclass(tp, BaseModel) and elem in tp.model_fields:
        return tp.model_fields[elem].annotation, True
    return None, True


def _walk(loc: tuple) -> tuple[Any, list[str]]:
    tp: Any = Spec
    printed = []
    for elem in loc:
        tp, shown = _step(tp, elem)
        if shown:
            printed.append(str(elem))
    return tp, printed


def _printable_path(loc: tuple) -> str:
    return ".".join(_walk(loc)[1])


def _model_at(loc: tuple) -> type[BaseModel] | None:
    tp = _unwrap(_walk(loc)[0])
    return tp if isinstance(tp, type) and issubclass(tp, BaseModel) else None
