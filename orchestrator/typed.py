"""Typed values from user files: YAML read strictly (a key given twice is an error) and nested
mappings turned into frozen dataclasses field by field, every error a ``ConfigError`` that starts
with the dotted path of the field."""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from orchestrator.errors import ConfigError


class _StrictLoader(yaml.SafeLoader):
    """``yaml.safe_load`` that refuses a key given twice in one mapping (PyYAML keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` may be overridden on purpose
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:  # an unhashable key: the base class names that problem
                continue
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} on line {key_node.start_mark.line + 1}", key_node.start_mark
                )
        return super().construct_mapping(node, deep=deep)


def read_yaml_mapping(path: str | Path, what: str) -> dict[str, Any]:
    """Read a YAML file that must hold a mapping (empty file: {}); errors name ``what`` and the file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{what}: {p} not found")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{what}: {p} is not UTF-8 text (byte {exc.start}: {exc.reason})") from None
    except OSError as exc:
        raise ConfigError(f"{what}: {p} cannot be read ({exc.strerror})") from None
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise ConfigError(f"{what}: {p} is not valid YAML ({first_line(exc)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{what}: {p} must hold a mapping")
    return data


def build_dataclass(cls: type, raw: Any, path: str) -> Any:
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys and wrong types."""
    if dataclasses.is_dataclass(raw) and isinstance(raw, cls):
        return raw
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{path}: expected a mapping, got {type(raw).__name__} {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    reject_unknown(raw, tuple(fields), path + ".")
    hints = typing.get_type_hints(cls)
    kwargs = {name: coerce(hints[name], value, f"{path}.{name}") for name, value in raw.items()}
    try:
        return cls(**kwargs)
    except ValueError as exc:
        message = first_line(exc)
        field_name = message.split(":", 1)[0]
        if field_name.split(".")[0] in fields:
            raise ConfigError(f"{path}.{message}") from None
        raise ConfigError(f"{path}: {message}") from None


def reject_unknown(raw: Mapping[str, Any], known: tuple[str, ...], prefix: str) -> None:
    for key in raw:
        if key not in known:
            hint = difflib.get_close_matches(str(key), known, n=1)
            suggestion = f"; did you mean {prefix}{hint[0]}?" if hint else f"; known keys: {', '.join(known)}"
            raise ConfigError(f"{prefix}{key}: unknown config key{suggestion}")


def coerce(tp: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return build_dataclass(tp, value, path)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in typing.get_args(tp):
            if option is type(None) and value is None:
                return None
            try:
                return coerce(option, value, path)
            except ConfigError as exc:
                errors.append(str(exc))
        # The last option's reason: for ``bool | float`` a number's, more telling than "true or false".
        raise ConfigError(errors[-1] if errors else f"{path}: bad value {value!r}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {type(value).__name__} {value!r}")
        args = typing.get_args(tp)
        item_tp = args[0] if args else Any
        return tuple(coerce(item_tp, v, f"{path}[{i}]") for i, v in enumerate(value))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {type(value).__name__} {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {type(value).__name__} {value!r}")
        number = as_float(value)
        if not math.isfinite(number):
            raise ConfigError(f"{path}: expected a finite number, got {value!r}")
        return number
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {type(value).__name__} {value!r}")
        return value
    raise ConfigError(f"{path}: unsupported config type {tp!r}")


def as_float(value: int | float) -> float:
    """``float(value)``, with an integer beyond the float range read as infinity."""
    try:
        return float(value)
    except OverflowError:
        return math.inf


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
