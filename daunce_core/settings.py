"""One way to turn config dicts into typed settings, for every config tree of the project.

Every section of a config (the experiment, ``baselines``, ``llm``, ``blackbox``) is a tree of
dataclasses whose fields are declared with :func:`setting` (a default and a help text). :func:`build`
turns a plain dict (YAML, JSON, a Snakemake ``config``) into that tree:

* unknown keys are refused by name, with the known ones listed;
* a value of the wrong type is refused by name (an ``int`` is accepted where a ``float`` is
  declared; strings are coerced only when ``coerce=True``, for ``--config key=value`` overrides);
* nested dataclass fields are built recursively, with dotted names in every message;
* every error is a :class:`ConfigError` (a ``ValueError``), one line that names the key.

Range and cross-field checks live in each tree's ``validate()`` method, called by ``build``.
The workflow's JSON schema (``workflow/schemas/config.schema.yaml``) checks shapes only; the test
``tests/test_settings.py`` keeps its keys in step with these dataclasses.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import field
from typing import Any, TypeVar

__all__ = ["ConfigError", "setting", "nested", "build", "to_dict", "describe"]

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration value is missing, unknown, of the wrong type or out of range; the message
    names the key and what to do."""


def setting(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field with a default and a help text (``metadata["help"]``).

    Mutable defaults (lists, dicts) are copied for each instance.
    """
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


def nested(cls: type, help: str = "") -> Any:
    """A field holding a nested settings dataclass (built from a sub-dict by :func:`build`)."""
    return field(default_factory=cls, metadata={"help": help or (cls.__doc__ or "").strip().split("\n")[0]})


def _nested_type(f: dataclasses.Field) -> type | None:
    fac = f.default_factory
    if fac is not dataclasses.MISSING and isinstance(fac, type) and dataclasses.is_dataclass(fac):
        return fac
    return None


_SCALARS = {"int": int, "float": float, "bool": bool, "str": str, "list": list, "dict": dict}


def _declared(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except Exception:  # pragma: no cover - unresolvable annotation: no type check
        return {}


def _optional_of(declared: Any) -> Any:
    """``X`` for a declared ``X | None`` (``Optional[X]``), else ``None``."""
    if typing.get_origin(declared) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(declared) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(declared)) == 2:
            return args[0]
    return None


def _check_type(value: Any, declared: Any, where: str, coerce: bool) -> Any:
    """``value`` as the declared scalar type, or a ConfigError naming ``where``."""
    inner = _optional_of(declared)
    if inner is not None:  # ``X | None``: null stays null, anything else must be an X
        if value is None or coerce and value in ("null", "None", "~"):
            return None
        return _check_type(value, inner, where, coerce)
    t = _SCALARS.get(getattr(declared, "__name__", ""), None)
    if t is None or value is None and declared is not bool:
        return value  # Any, unions, Optional: the tree's validate() decides
    if value is None:
        raise ConfigError(f"{where} must be a {t.__name__}, got null")
    if coerce and isinstance(value, str) and t is not str:
        import yaml

        value = yaml.safe_load(value)
        if t is float and isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
    if t is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if t is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, t) and not (t is int and isinstance(value, bool)):
        return value
    raise ConfigError(f"{where} must be a {t.__name__}, got {value!r} ({type(value).__name__})")


def build(cls: type[T], raw: Any, where: str, *, ignore: tuple[str, ...] = (), coerce: bool = False,
          validate: bool = True) -> T:
    """Build the settings dataclass ``cls`` from ``raw`` (a dict or ``None`` for all defaults).

    Args:
        cls: a dataclass whose fields come from :func:`setting` / :func:`nested`.
        raw: the config section.
        where: its dotted name in messages (``"llm.finetune"``; ``""`` for the top level).
        ignore: top-level keys that belong to other trees and are passed over.
        coerce: parse string values as YAML scalars (command-line overrides).
        validate: call ``validate()`` on every built dataclass that defines it.

    Raises:
        ConfigError: naming the first unknown key, wrongly typed value or failed check.
    """
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise ConfigError(f"{where or 'config'} must be a mapping, got {type(raw).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(raw) - set(fields) - set(ignore))
    if unknown:
        dotted = ", ".join(f"{where}.{u}" if where else u for u in unknown)
        raise ConfigError(f"unknown key(s) {dotted}; known: {', '.join(sorted(fields))}")
    hints = _declared(cls)
    kwargs = {}
    for name, f in fields.items():
        if name not in raw:
            continue
        key = f"{where}.{name}" if where else name
        sub = _nested_type(f)
        if sub is not None:
            kwargs[name] = build(sub, raw[name], key, coerce=coerce, validate=validate)
        else:
            kwargs[name] = _check_type(raw[name], hints.get(name), key, coerce)
    try:
        obj = cls(**kwargs)
    except TypeError as exc:  # pragma: no cover - a required field without default
        raise ConfigError(f"{where or 'config'}: {exc}") from exc
    check = getattr(obj, "validate", None)
    if validate and callable(check):
        check()
    return obj


def to_dict(obj: Any) -> dict[str, Any]:
    """The plain-dict form of a settings tree (what :func:`build` reads back)."""
    return dataclasses.asdict(obj)


def describe(cls: type, where: str = "") -> list[tuple[str, Any, str]]:
    """``(dotted key, default, help)`` for every leaf of a settings tree, for docs and ``--help``."""
    rows = []
    for f in dataclasses.fields(cls):
        key = f"{where}.{f.name}" if where else f.name
        sub = _nested_type(f)
        if sub is not None:
            rows.extend(describe(sub, key))
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        rows.append((key, default, f.metadata.get("help", "")))
    return rows
