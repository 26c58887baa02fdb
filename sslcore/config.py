"""Typed configs: dataclasses with attribute docstrings, YAML presets, `--a.b value` overrides.

The dataclasses are the single home of defaults. A YAML preset and command-line overrides are
merged on top; an unknown key or a value of the wrong type raises `ConfigError` naming the key
and the valid ones, so a typo never silently trains the default.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import itertools
import textwrap
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

from sslcore.errors import UserError

T = TypeVar("T")


class ConfigError(UserError, ValueError):
    """A config key, value or file that cannot be used, with what to do instead."""


def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings (a string literal right after a field) of a dataclass and its bases."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):
            continue
        body = ast.parse(source).body[0].body  # type: ignore[attr-defined]
        for node, following in itertools.pairwise(body):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(following, ast.Expr)
                and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)
            ):
                docs[node.target.id] = " ".join(following.value.value.split())
    return docs


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`, converting only where it is lossless."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        options = get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(f"{key}: {value!r} is not a valid {_type_name(tp)}")
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{key}: {value!r} is not one of {list(get_args(tp))}")
        return value
    if origin in (list, tuple):
        if isinstance(value, str | int | float):
            value = [value]
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item_type, *_) = get_args(tp) or (Any,)
        items = [_coerce(item, item_type, f"{key}[{i}]") for i, item in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a section (mapping) for {tp.__name__}, got {value!r}")
        return build(tp, value, prefix=f"{key}.")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:  # YAML reads "1e-4" (no dot) as a string
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{key}: expected {tp.__name__}, got {value!r}")
    return value


def build(cls: type[T], values: dict[str, Any], prefix: str = "") -> T:
    """Instantiate dataclass `cls` from a (nested) mapping, validating every key and type."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown config key {prefix}{unknown[0]!s}; valid keys in "
            f"{prefix.rstrip('.') or cls.__name__}: {', '.join(sorted(fields))}"
        )
    kwargs = {}
    for name, value in values.items():
        factory = fields[name].default_factory
        if isinstance(value, dict) and dataclasses.is_dataclass(hints[name]) and factory is not dataclasses.MISSING:
            # A section starts from the field's own default instance, so an objective can ship
            # its own defaults for a shared section (e.g. word2vec's `train`) without a subclass.
            value = merge(to_dict(factory()), value)
        kwargs[name] = _coerce(value, hints[name], f"{prefix}{name}")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except ValueError as error:
        # A range check in a section's __post_init__ (e.g. masking.mlm_probability in (0, 1)) is a config error.
        raise ConfigError(str(error)) from error


def to_dict(config: Any) -> dict[str, Any]:
    """Plain nested dict of a config (for YAML dumps, model cards and checkpoints)."""
    return dataclasses.asdict(config)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--{dotted}: {part} is a value, not a section")
        node = child
    node[leaf] = value


def parse_overrides(argv: list[str]) -> dict[str, Any]:
    """`--train.max_steps 200 --model.hidden_size=64` -> nested dict (values parsed as YAML)."""
    tree: dict[str, Any] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}: overrides look like --section.key value")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                value = "true"  # a bare flag
            else:
                i += 1
                value = argv[i]
        _set_dotted(tree, key, yaml.safe_load(value) if value != "" else "")
        i += 1
    return tree


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge; `update` wins."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist (presets live in recipes/configs/)")
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
    return data


def load(cls: type[T], path: str | Path | None = None, overrides: list[str] | dict | None = None) -> T:
    """Defaults of `cls`, then the YAML file at `path`, then overrides (CLI list or nested dict)."""
    values = read_yaml(path) if path else {}
    if overrides:
        values = merge(values, parse_overrides(overrides) if isinstance(overrides, list) else overrides)
    return build(cls, values)


def describe(cls_or_config: Any, prefix: str = "") -> list[str]:
    """One line per option for `--help`: `--section.key (type, value): docstring`.

    Given a config object (the preset merged over the defaults, plus overrides), the value shown is the
    one the run would use, with the default beside it where they differ; given a class, the defaults."""
    if isinstance(cls_or_config, type):
        return _describe(cls_or_config, None, None, prefix)
    try:
        defaults = type(cls_or_config)()
    except TypeError:  # a config with required fields: no defaults to compare with
        defaults = None
    return _describe(type(cls_or_config), cls_or_config, defaults, prefix)


def _describe(cls: type, config: Any, defaults: Any, prefix: str) -> list[str]:
    lines = []
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if defaults is not None:
            default = getattr(defaults, f.name)
        else:
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else "required")
        if dataclasses.is_dataclass(tp):
            lines.append(f"\n[{prefix}{f.name}] {docs.get(f.name, '')}")
            if config is None:
                lines.extend(_describe(tp, None, None, f"{prefix}{f.name}."))
            else:
                lines.extend(_describe(type(getattr(config, f.name)), getattr(config, f.name),
                                       default if dataclasses.is_dataclass(default) else None, f"{prefix}{f.name}."))
            continue
        if config is None:
            shown = f"default {default!r}"
        else:
            value = getattr(config, f.name)
            shown = f"{value!r}" if value == default else f"{value!r}; default {default!r}"
        lines.append(f"  --{prefix}{f.name} ({_type_name(tp)}, {shown}): {docs.get(f.name, '')}")
    return lines
