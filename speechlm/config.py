"""The one config system: a dataclass tree, filled from YAML, then from ``key=value`` overrides.

    cfg = load_config(Stage1Config, "recipes/configs/tiny_stage1.yaml", ["optim.lr=3e-4", "steps=200"])

Nested dataclasses are addressed with dots. Values of overrides are parsed as YAML scalars
(``3e-4`` -> float, ``true`` -> bool, ``[1,2]`` -> list). Unknown keys are errors, not silently ignored.

A *tagged* section (a dataclass with a ``config_tag`` class attribute, the name of the field that selects
the concrete class, and a ``config_variants()`` classmethod mapping each tag value to its dataclass, e.g.
``model.connector`` with ``name: ssr | stack | ...``) is filled as the class its tag names, so a key that
class lacks is refused when the config loads, naming its path.
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from speechlm.errors import ConfigError

T = TypeVar("T")


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _dataclass_of(tp: Any) -> type | None:
    """The dataclass inside ``tp`` (also ``X | None``), or None."""
    if dataclasses.is_dataclass(tp):
        return tp
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            if dataclasses.is_dataclass(arg):
                return arg
    return None


def _is_tagged(cls: type) -> bool:
    return isinstance(getattr(cls, "config_tag", None), str) and callable(getattr(cls, "config_variants", None))


def _variant(cls: type, data: dict, prefix: str, default: type | None) -> type:
    """The dataclass a tagged section ``data`` is filled as: the one its tag names, else ``default`` (the
    field's default class), else ``cls`` itself when it is a variant, else the variant of ``cls``'s own tag."""
    tag = cls.config_tag
    variants: dict[str, type] = cls.config_variants()
    if tag in data:
        value = data[tag]
        if not isinstance(value, str) or value not in variants:
            raise ConfigError(f"{prefix}{tag}: {value!r} is not one of {', '.join(variants)}")
        chosen = variants[value]
    elif default is not None:
        chosen = default
    elif cls in variants.values():
        chosen = cls
    else:
        chosen = variants.get(getattr(cls(), tag), None)
        if chosen is None:
            raise ConfigError(f"{prefix}{tag}: missing (one of {', '.join(variants)})")
    if not issubclass(chosen, cls):
        raise ConfigError(f"{prefix}{tag}: {getattr(chosen(), tag)!r} is not a {cls.__name__}")
    return chosen


def _field_default_class(f: dataclasses.Field) -> type | None:
    if f.default is not dataclasses.MISSING:
        return None if f.default is None else type(f.default)
    if f.default_factory is not dataclasses.MISSING:
        return type(f.default_factory())
    return None


def _coerce(value: Any, tp: Any, key: str, f: dataclasses.Field | None = None) -> Any:
    if value is None:
        return None
    sub = _dataclass_of(tp)
    if sub is not None:
        if isinstance(value, sub):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping for {sub.__name__}, got {value!r}")
        default = None
        if _is_tagged(sub) and sub.config_tag not in value and f is not None:
            default = _field_default_class(f)
        return from_dict(sub, value, prefix=key + ".", default=default)
    if tp is float and isinstance(value, (int, float, str)) and not isinstance(value, bool):
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if tp is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if tp is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is bool and not isinstance(value, bool):
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is str and not isinstance(value, str):
        return str(value)
    origin = typing.get_origin(tp)
    if origin in (list, tuple) and isinstance(value, (list, tuple)):
        return origin(value)
    return value


def from_dict(cls: type[T], data: dict, prefix: str = "", default: type | None = None) -> T:
    """Build dataclass ``cls`` from a (nested) mapping; unknown keys raise :class:`ConfigError`.

    A tagged ``cls`` (see the module docstring) is built as the class ``data``'s tag names; ``default``: the
    class to build when ``data`` names none."""
    if _is_tagged(cls):
        cls = _variant(cls, data, prefix, default)
    types_ = _field_types(cls)
    unknown = sorted(set(data) - set(types_))
    if unknown:
        raise ConfigError(f"unknown config key(s) {', '.join(prefix + k for k in unknown)} for {cls.__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {k: _coerce(v, types_[k], prefix + k, fields[k]) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{cls.__name__}: {e}") from None


def to_dict(cfg: Any) -> dict:
    """A plain nested dict of a config (for saving next to a run)."""
    return dataclasses.asdict(cfg)


def _defaults_dict(cfg: Any) -> dict:
    """The plain dict of a config's defaults, YAML and overrides are merged into. A tagged section holds only
    its tag and the fields that differ from its class's defaults: a YAML or override that sets another tag
    then starts from that class's defaults instead of carrying the first class's keys along."""
    plain = type(cfg)() if _is_tagged(type(cfg)) else None
    out = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if plain is not None and f.name != cfg.config_tag and value == getattr(plain, f.name):
            continue
        out[f.name] = _defaults_dict(value) if dataclasses.is_dataclass(value) else copy.deepcopy(value)
    return out


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Set ``a.b.c=value`` entries into the nested mapping ``data`` (in place; returned)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: {e}") from None
        node = data
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {p!r} is not a section")
        node[parts[-1]] = value
    return data


def _merge(base: dict, extra: dict) -> dict:
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _merge(base[k], v)
        else:
            base[k] = v
    return base


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Defaults of ``cls`` <- YAML file ``path`` <- ``overrides`` (``key=value`` strings)."""
    data: dict = _defaults_dict(cls())
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML ({e})") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
        _merge(data, loaded)
    apply_overrides(data, overrides or [])
    return from_dict(cls, data)


def save_config(cfg: Any, path: str | Path) -> None:
    """Write a config as YAML, atomically."""
    from speechlm.atomic import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))
