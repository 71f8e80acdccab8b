"""Dataclass configs read from YAML or TOML, overridden with dotted ``key=value`` arguments.

A config is a tree of dataclasses whose fields all have defaults. A file names only what it
changes; so does each override::

    cfg = load_config(TrainConfig, "baby.yaml", ["optim.lr=3e-4", "train.steps=200"])
    save_config(cfg, run_dir / "config.yaml")   # load_config reads it back to an equal object

Every value is checked against its field's annotation (int, float, bool, str, Literal,
Optional, tuple, list, nested dataclass), so a typo or a wrong type fails at start-up with a
one-line :class:`ZImageKitError` naming the key, not hours later inside the training loop.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from .errors import ZImageKitError
from .fileio import atomic_write

C = TypeVar("C")

# ----------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------


def require_config(ok: bool, key: str, problem: str) -> None:
    """The one-line error of a config value that fails a check: ``config key 'KEY' PROBLEM``."""
    if not ok:
        raise ZImageKitError(f"config key {key!r} {problem}")


def import_object(spec: str, what: str) -> Any:
    """The object ``package.module:name`` names: how a config plugs in code of one's own (a
    prompt source, a dataset, an enhancer, a reward). ``what`` names the role in errors."""
    module, sep, name = spec.partition(":")
    if not (sep and module and name.isidentifier()):
        raise ZImageKitError(f"{what} {spec!r}: name it as module:Name, e.g. zimagekit.shapes.world:training_prompts")
    try:
        found = importlib.import_module(module)
    except ImportError as e:
        raise ZImageKitError(f"{what} {spec}: cannot import {module} ({e})") from None
    try:
        return getattr(found, name)
    except AttributeError:
        raise ZImageKitError(f"{what} {spec}: {module} has no {name}") from None


def load_config(cls: type[C], path: str | Path | None = None, overrides: typing.Iterable[str] = ()) -> C:
    """``cls()`` updated by the file at ``path`` (``.yaml``/``.yml``/``.toml``), then by each
    ``dotted.key=value`` override in order."""
    cfg = cls()
    if path is not None:
        cfg = _merge(cfg, _read_file(Path(path)), "")
    for item in overrides:
        cfg = apply_override(cfg, item)
    return cfg


def peek_config(path: str | Path | None, overrides: typing.Iterable[str], key: str, default=None):
    """The value a top-level ``key`` will have (the last ``key=value`` override, else the
    file's, else ``default``), read before choosing which config class to load."""
    value = _read_file(Path(path)).get(key, default) if path is not None else default
    for item in overrides:
        name, sep, text = item.partition("=")
        if sep and name.strip() == key:
            value = yaml.safe_load(text)
    return value


def apply_override(cfg: C, item: str) -> C:
    """A copy of ``cfg`` with one ``dotted.key=value`` applied. The value is YAML
    (``[0.9, 0.95]``, ``null``, ``true``), except for text fields, which take the raw text so
    that ``run.name=007`` stays the string "007"."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ZImageKitError(f"override {item!r} is not key=value; write it like optim.lr=3e-4")
    parts = key.split(".")
    obj = cfg
    for depth, name in enumerate(parts):
        if not dataclasses.is_dataclass(obj):
            raise ZImageKitError(f"config key {key!r}: {'.'.join(parts[:depth])!r} is a value, not a section")
        hints = _field_types(type(obj))
        if name not in hints:
            raise _unknown_key(".".join(parts[: depth + 1]), hints)
        tp = hints[name]
        obj = getattr(obj, name)
    value = _parse_override_value(text.strip(), tp, key)
    nested: Any = value
    for name in reversed(parts):
        nested = {name: nested}
    return _merge(cfg, nested, "")


def config_to_dict(cfg) -> dict:
    """Plain nested dicts, lists and scalars: what YAML, TOML and JSON can hold."""
    return {f.name: _plain(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}


def save_config(cfg, path: str | Path) -> None:
    """Write ``cfg`` as YAML, atomically, in field order."""
    text = yaml.safe_dump(config_to_dict(cfg), sort_keys=False, allow_unicode=True)
    atomic_write(Path(path), lambda tmp: tmp.write_text(text, encoding="utf-8"))


# ----------------------------------------------------------------------------------------
# Reading files
# ----------------------------------------------------------------------------------------


def _read_file(path: Path) -> dict:
    if not path.is_file():
        raise ZImageKitError(f"config file {path} does not exist; check the path")
    suffix = path.suffix.lower()
    if suffix not in (".yaml", ".yml", ".toml"):
        raise ZImageKitError(f"config file {path} must end in .yaml, .yml or .toml")
    toml = _toml_module() if suffix == ".toml" else None
    try:
        if toml is not None:
            with path.open("rb") as fh:
                data = toml.load(fh)
        else:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, ValueError) as exc:  # tomllib.TOMLDecodeError is a ValueError
        detail = " ".join(str(exc).split())
        raise ZImageKitError(f"config file {path} is not valid {suffix[1:].upper()}: {detail}") from None
    if data is None:  # an empty YAML file changes nothing
        return {}
    if not isinstance(data, dict):
        raise ZImageKitError(f"config file {path} must hold a mapping of sections, not {type(data).__name__}")
    return data


def _toml_module():
    # tomllib is in the standard library from Python 3.11; 3.10 needs the tomli backport,
    # which is only worth installing for people who write TOML configs.
    try:
        import tomllib
    except ModuleNotFoundError:
        try:
            import tomli as tomllib
        except ModuleNotFoundError:
            raise ZImageKitError("reading TOML configs on Python 3.10 needs tomli: pip install tomli") from None
    return tomllib


# ----------------------------------------------------------------------------------------
# Merging and type checking
# ----------------------------------------------------------------------------------------


def _field_types(cls) -> dict[str, Any]:
    # get_type_hints resolves the string annotations of `from __future__ import annotations`
    # in each defining class's module, so subclasses defined elsewhere work too.
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def _unknown_key(key: str, hints: dict) -> ZImageKitError:
    section, _, _ = key.rpartition(".")
    where = f"under {section!r}" if section else "at the top level"
    return ZImageKitError(f"unknown config key {key!r}; valid keys {where}: {', '.join(hints)}")


def _merge(obj, data, prefix: str):
    """``obj`` (a dataclass instance) with the fields named in the mapping ``data`` replaced."""
    if not isinstance(data, dict):
        section = prefix.rstrip(".") or "top level"
        raise ZImageKitError(f"config section {section!r} must be a mapping, got {data!r}")
    hints = _field_types(type(obj))
    changes = {}
    for name, value in data.items():
        key = prefix + str(name)
        if name not in hints:
            raise _unknown_key(key, hints)
        current = getattr(obj, name)
        if dataclasses.is_dataclass(hints[name]) and dataclasses.is_dataclass(current):
            changes[name] = _merge(current, value, key + ".")
        else:
            changes[name] = _coerce(value, hints[name], key)
    return dataclasses.replace(obj, **changes)


def _coerce(value, tp, key: str):
    """``value`` as an instance of annotation ``tp``, or a ZImageKitError naming ``key``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        for option in options:
            with contextlib.suppress(ZImageKitError):
                return _coerce(value, option, key)
        expected = [_describe(o) for o in options] + (["null"] if len(options) < len(args) else [])
        raise _bad(key, value, " or ".join(expected))
    if origin is typing.Literal:
        # type() too, so that true does not pass for Literal[1]
        if any(value == a and type(value) is type(a) for a in args):
            return value
        raise _bad(key, value, "one of " + ", ".join(repr(a) for a in args))
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise _bad(key, value, "a list like [1, 2]")
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):
                raise _bad(key, value, f"a list of {len(args)} values")
            items = [_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args))]
        else:
            item_type = args[0] if args else Any
            items = [_coerce(v, item_type, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if dataclasses.is_dataclass(tp):
        return _merge(tp(), value, key + ".")
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _bad(key, value, _describe(bool))
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        number = _as_number(value)
        if number is not None and float(number).is_integer():
            return int(number)
        raise _bad(key, value, _describe(int))
    if tp is float:
        number = _as_number(value)
        if number is not None:
            return float(number)
        raise _bad(key, value, _describe(float))
    if tp is str:
        if isinstance(value, str):
            return value
        raise _bad(key, value, _describe(str))
    raise TypeError(f"config field {key!r} has annotation {tp!r}, which runconfig does not handle")


def _as_number(value) -> int | float | None:
    # PyYAML follows YAML 1.1, where "3e-4" (no dot) is a string, not a float; people write
    # learning rates exactly like that, so numeric text counts as a number.
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, str):
        for parse in (int, float):
            try:
                return parse(value.strip())
            except ValueError:
                continue
    return None


def _bad(key: str, value, expected: str) -> ZImageKitError:
    return ZImageKitError(f"config key {key!r} got {value!r}; expected {expected}")


def _describe(tp) -> str:
    names = {bool: "true or false", int: "an integer", float: "a number", str: "text (quote it)"}
    return names.get(tp, getattr(tp, "__name__", repr(tp)))


def _parse_override_value(text: str, tp, key: str):
    if _is_text(tp):
        optional = typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in typing.get_args(tp)
        return None if optional and text in ("null", "~", "None") else text
    try:
        return yaml.safe_load(text) if text else None
    except yaml.YAMLError:
        raise ZImageKitError(f"override for {key!r} has an unreadable value {text!r}; "
                             f"write YAML like 3, 0.5, true, [1, 2]") from None


def _is_text(tp) -> bool:
    """A str field, a Literal of strings, or Optional of either."""
    if tp is str:
        return True
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Literal:
        return all(isinstance(a, str) for a in args)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        return len(options) == 1 and _is_text(options[0])
    return False


def _plain(value):
    if dataclasses.is_dataclass(value):
        return config_to_dict(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value
