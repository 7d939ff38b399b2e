"""One way to turn config dicts into typed settings, for every config tree of the project.

Every config section is a tree of dataclasses whose fields are declared once with :func:`setting`
(a default, a help text, and optionally limits and choices); :func:`build` turns a plain dict into
that tree, refusing unknown keys and wrong types in one line that names the key
(:class:`ConfigError`), :func:`check_limits` applies the declared limits, and :func:`json_schema`
generates the workflow's schema from the same declarations. Every config reader calls it. The
rules in full: docs/configuration.md#how-daunce_coresettingspy-builds-a-settings-tree."""
from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import field
from typing import Any, TypeVar

__all__ = ["ConfigError", "setting", "nested", "build", "check_limits", "to_dict", "describe", "nearest",
           "check_schema", "load_schema", "json_schema"]

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration value is missing, unknown, of the wrong type or out of range; the message
    names the key and what to do."""


# the limits a setting may declare, by the JSON-schema keyword that states the same limit
LIMITS = {"ge": "minimum", "gt": "exclusiveMinimum", "le": "maximum", "lt": "exclusiveMaximum",
          "choices": "enum", "pattern": "pattern"}


def setting(default: Any, help: str, *, ge: float | None = None, gt: float | None = None,
            le: float | None = None, lt: float | None = None, choices: tuple | None = None,
            pattern: str | None = None, items: type | None = None, mapping: type | None = None,
            why: str = "", what: str = "", required: bool = False, fill: bool = False, schema: dict | None = None,
            **kw: Any) -> Any:
    """A dataclass field with a default and a help text (``metadata["help"]``).

    Mutable defaults (lists, dicts) are copied for each instance. The optional limits, checked by
    :func:`check_limits` (on each entry of a list value): ``ge``/``gt``/``le``/``lt`` bounds (the
    value must also be finite), ``choices``, a regular expression ``pattern`` the whole string
    must match; ``items``: the type of a list's entries (checked by :func:`build`); ``mapping``: a
    settings dataclass a dict value is checked against (its keys, types and limits; the value stays
    a dict); ``why``: said in the message when a limit is not met; ``what``: the noun of a range in
    that message (``what="a share"``: "must be a share in [0, 1]").

    For the workflow's JSON schema (:func:`json_schema`) only: ``required``, the workflow's config
    must state the key; ``fill``, the workflow writes this default into the config it runs (its
    effective config); ``schema``, JSON-schema keywords no limit above expresses (``minItems``, an
    ``anyOf`` of names), merged over the generated property.
    """
    limits = {k: v for k, v in dict(ge=ge, gt=gt, le=le, lt=lt, choices=choices, pattern=pattern).items()
              if v is not None}
    meta = {"help": help, "limits": limits, "items": items, "mapping": mapping, "why": why, "what": what,
            "required": required, "fill": fill, "schema": schema or {}}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


def nested(cls: type, help: str = "", *, required: bool = False) -> Any:
    """A field holding a nested settings dataclass (built from a sub-dict by :func:`build`);
    ``required``: the workflow's config must state the section (:func:`json_schema`)."""
    return field(default_factory=cls, metadata={"help": help or (cls.__doc__ or "").strip().split("\n")[0],
                                                "required": required})


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
    hint = ""
    if t is float and isinstance(value, str) and re.fullmatch(r"[-+]?[0-9]+[eE][-+]?[0-9]+", value):
        hint = f"; YAML reads a number without a dot as a string: write {re.sub('[eE]', '.0e', value, count=1)}"
    raise ConfigError(f"{where} must be a {t.__name__}, got {value!r} ({type(value).__name__}){hint}")


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
        raise ConfigError(_unknown_key(unknown, sorted(set(fields) | set(ignore)), where))
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
            value = _check_type(raw[name], hints.get(name), key, coerce)
            if f.metadata.get("items") is not None and isinstance(value, list):
                value = [_check_type(v, f.metadata["items"], f"{key}[{i}]", coerce) for i, v in enumerate(value)]
            kwargs[name] = value
    try:
        obj = cls(**kwargs)
    except TypeError as exc:  # pragma: no cover - a required field without default
        raise ConfigError(f"{where or 'config'}: {exc}") from exc
    if validate:
        check_limits(obj, where, nested=False)  # the nested ones were checked when built
    check = getattr(obj, "validate", None)
    if validate and callable(check):
        check()
    return obj


def nearest(key: Any, known: Any) -> str | None:
    """The known key closest in spelling to ``key`` (difflib), or None when none is close."""
    close = difflib.get_close_matches(str(key), sorted(map(str, known)), n=1, cutoff=0.6)
    if not close:  # a key spelt in another case (Ratio for ratio)
        close = [k for k in sorted(map(str, known)) if k.lower() == str(key).lower()]
    return close[0] if close else None


def _unknown_key(unknown: list, known: Any, where: str) -> str:
    """The one-line message for unknown keys: their dotted names, each with the nearest known key,
    or the known keys when none is close."""
    def dotted(k: Any) -> str:
        return f"{where}.{k}" if where else str(k)

    near = {u: nearest(u, known) for u in unknown}
    names = ", ".join(dotted(u) + (f" (did you mean {dotted(near[u])}?)" if near[u] else "") for u in unknown)
    if all(near.values()):
        return f"unknown key(s) {names}"
    return f"unknown key(s) {names}; known: {', '.join(sorted(map(str, known)))}"


def _number(x: float) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def _limit_error(value: Any, limits: dict[str, Any], what: str = "") -> str | None:
    """What ``value`` must be to meet ``limits`` (a phrase), or None when it meets them."""
    if "choices" in limits:
        c = limits["choices"]
        if value in c and isinstance(value, str):
            return None
        return f"'{c[0]}' or '{c[1]}'" if len(c) == 2 else f"one of {', '.join(map(str, c))}"
    if "pattern" in limits:
        if isinstance(value, str) and re.fullmatch(limits["pattern"], value):
            return None
        return f"a string matching {limits['pattern']}"
    low = ("ge", limits["ge"]) if "ge" in limits else ("gt", limits["gt"]) if "gt" in limits else None
    high = ("le", limits["le"]) if "le" in limits else ("lt", limits["lt"]) if "lt" in limits else None
    if low is None and high is None:
        return None
    ok = (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
          and (low is None or (value >= low[1] if low[0] == "ge" else value > low[1]))
          and (high is None or (value <= high[1] if high[0] == "le" else value < high[1])))
    if ok:
        return None
    if low and high:
        phrase = (f"in {'[' if low[0] == 'ge' else '('}{_number(low[1])}, "
                  f"{_number(high[1])}{']' if high[0] == 'le' else ')'}")
    elif low:
        phrase = (f"at least {low[1]}" if low[0] == "ge" and isinstance(low[1], int) and not isinstance(value, float)
                  else f"{'>=' if low[0] == 'ge' else '>'} {_number(low[1])}")
    else:
        phrase = f"{'<=' if high[0] == 'le' else '<'} {_number(high[1])}"
    if what:
        return f"{what} {phrase}"
    finite = isinstance(value, float) and not math.isfinite(value)
    return f"a finite number {phrase}" if finite else phrase


def check_limits(obj: Any, where: str = "", *, nested: bool = True) -> None:
    """Check every field of the settings tree ``obj`` against the limits its :func:`setting`
    declares (each entry of a list value; ``None`` passes: a field that allows null says so in
    its type). ``nested``: also the nested settings dataclasses.

    Raises:
        ConfigError: ``<dotted key> must be <limit> (<why>), got <value>`` for the first failure.
    """
    for f in dataclasses.fields(obj):
        key = f"{where}.{f.name}" if where else f.name
        value = getattr(obj, f.name)
        if _nested_type(f) is not None:
            if nested:
                check_limits(value, key)
            continue
        if f.metadata.get("mapping") is not None and value is not None:
            build(f.metadata["mapping"], value, key)  # its keys, types and limits
        limits = f.metadata.get("limits") or {}
        if not limits or value is None:
            continue
        entries = [(f"{key}[{i}]", v) for i, v in enumerate(value)] if isinstance(value, list) else [(key, value)]
        for name, v in entries:
            need = _limit_error(v, limits, f.metadata.get("what", ""))
            if need is not None:
                why = f" ({f.metadata['why']})" if f.metadata.get("why") else ""
                raise ConfigError(f"{name} must be {need}{why}, got {v!r}")


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


# --- the workflow config against its JSON schema, one line per refusal --------------------------

_JSON_NAMES = {"number": "a number", "integer": "an integer", "boolean": "true or false", "string": "a string",
               "array": "a list", "object": "a mapping", "null": "null"}


def _types_of(prop: dict) -> set[str]:
    kinds = prop.get("type", [])
    out = set(kinds) if isinstance(kinds, list) else {kinds}
    for branch in prop.get("oneOf", []) + prop.get("anyOf", []):
        out |= _types_of(branch)
    return out


def _coerced(value: str, prop: dict) -> Any:
    """A command-line string as the scalar the schema property wants, when it parses exactly as
    one (``"0.5"`` -> 0.5, ``"1e-3"`` -> 0.001, ``"true"`` -> True, ``"null"`` -> None); else the
    string itself. A property that takes strings keeps them."""
    kinds = _types_of(prop)
    if not kinds or "string" in kinds:
        return value
    import yaml

    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError:
        return value
    if isinstance(parsed, str) and kinds & {"number", "integer"}:
        try:  # YAML 1.1 reads "1e-3" (no dot) as a string
            parsed = float(value)
        except ValueError:
            return value
    if isinstance(parsed, float) and not math.isfinite(parsed):
        return value  # nan and inf are no setting: the schema refuses the string by name
    if isinstance(parsed, float) and "integer" in kinds and "number" not in kinds and parsed.is_integer():
        parsed = int(parsed)
    ok = (parsed is None and "null" in kinds
          or isinstance(parsed, bool) and "boolean" in kinds
          or isinstance(parsed, int) and not isinstance(parsed, bool) and kinds & {"integer", "number"}
          or isinstance(parsed, float) and "number" in kinds)
    return parsed if ok else value


def _coerce(config: Any, overrides: Any, prop: dict) -> Any:
    """``config`` with the string leaves that ``overrides`` (Snakemake's parsed ``--config``)
    put there turned into the types ``prop`` (a schema) declares."""
    if isinstance(config, dict) and isinstance(overrides, dict):
        props = prop.get("properties", {})
        extra = prop.get("additionalProperties")
        for key in overrides:
            if key in config:
                sub = props.get(key, extra if isinstance(extra, dict) else {})
                config[key] = _coerce(config[key], overrides[key], sub)
        return config
    if isinstance(config, list) and isinstance(overrides, list) and config == overrides:
        return [_coerce(c, o, prop.get("items", {})) for c, o in zip(config, overrides)]
    if isinstance(config, str) and config == overrides:
        return _coerced(config, prop)
    return config


def _dotted(path: Any) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _schema_message(err: Any) -> str:
    """One line for a jsonschema ``ValidationError``: the dotted key, what it must be, what it got."""
    key = _dotted(err.absolute_path)
    got = f"got {err.instance!r}" if not isinstance(err.instance, (dict, list)) else ""
    kw, arg = err.validator, err.validator_value
    if kw == "additionalProperties" and isinstance(err.instance, dict):
        known = list(err.schema.get("properties", {}))
        unknown = sorted(k for k in err.instance if k not in known)
        return _unknown_key(unknown, known, key)
    if kw == "required":
        missing = [k for k in arg if k not in err.instance]
        return f"{_dotted([*err.absolute_path, missing[0]])} is required (no default); set it in the config"
    if kw == "type":
        kinds = [arg] if isinstance(arg, str) else list(arg)
        what = " or ".join(_JSON_NAMES.get(k, k) for k in kinds)
        hint = ""
        if isinstance(err.instance, str) and set(kinds) & {"number", "integer"}:
            hint = "; write a number (0.5, 1.0e-3)"
        elif isinstance(err.instance, str) and "boolean" in kinds:
            hint = "; write true or false"
        desc = err.schema.get("description", "")
        desc = f" ({desc})" if desc and "null" in kinds else ""
        return f"{key or 'the config'} must be {what}{desc}, {got}{hint}"
    need = {"enum": lambda: f"one of {', '.join(map(str, arg))}", "minimum": lambda: f">= {arg}",
            "exclusiveMinimum": lambda: f"> {arg}", "maximum": lambda: f"<= {arg}",
            "exclusiveMaximum": lambda: f"< {arg}", "pattern": lambda: f"a string matching {arg}",
            "minItems": lambda: f"a list of at least {arg} entries",
            "maxItems": lambda: f"a list of at most {arg} entries",
            "minLength": lambda: f"a string of at least {arg} characters", "const": lambda: repr(arg)}.get(kw)
    if need is not None:
        return f"{key or 'the config'} must be {need()}{', ' + got if got else ''}"
    return f"{key or 'the config'}: {' '.join(err.message.split())}"


def check_schema(config: dict, schema: dict, overrides: dict | None = None) -> dict:
    """Check a workflow config against its JSON schema before Snakemake's own ``validate`` (whose
    message is the whole schema excerpt): the first error as one line naming the dotted key (an
    unknown key with the nearest known one).

    ``overrides``: Snakemake's parsed ``--config`` (``workflow.config_settings.config``), whose
    nested values arrive as strings (``--config 'daunce={ratio: 0.5}'`` gives ``"0.5"``): those
    strings are first turned into the number, boolean or null the schema wants at their key,
    where they parse exactly as one; ``config`` is changed in place and returned.

    Raises:
        ConfigError: the first error jsonschema's ``best_match`` picks.
    """
    import jsonschema

    if overrides:
        _coerce(config, overrides, schema)
    errors = jsonschema.Draft202012Validator(schema).iter_errors(config)
    err = jsonschema.exceptions.best_match(errors)
    if err is not None:
        raise ConfigError(_schema_message(err))
    return config


def load_schema(path: str) -> dict:
    """A YAML (or JSON) schema file as a dict."""
    import yaml

    with open(path, encoding="utf-8") as fh:
        return yaml.safe_load(fh)


# --- the JSON schema of a settings tree (the workflow's config.schema.yaml is generated) ---------

_JSON_TYPES = {int: "integer", float: "number", bool: "boolean", str: "string", list: "array", dict: "object",
               type(None): "null"}


def _json_types(declared: Any) -> list[str]:
    """The JSON types of a declared annotation (``int | None`` -> integer, null); [] for Any."""
    if typing.get_origin(declared) in (typing.Union, types.UnionType):
        return [t for a in typing.get_args(declared) for t in _json_types(a)]
    base = typing.get_origin(declared) or declared
    return [_JSON_TYPES[base]] if base in _JSON_TYPES else []


def _limit_keywords(limits: dict[str, Any], nullable: bool) -> dict[str, Any]:
    out = {}
    for k, v in limits.items():
        if k == "choices":
            v = list(v) + ([None] if nullable else [])
        out[LIMITS[k]] = v
    return out


def _field_schema(f: dataclasses.Field, declared: Any) -> dict[str, Any]:
    meta = f.metadata
    sub = _nested_type(f)
    if sub is not None:
        out = json_schema(sub)
        out.pop("description", None)
        out = {"type": "object", **({"description": meta["help"]} if meta.get("help") else {}),
               **{k: v for k, v in out.items() if k != "type"}}
        return out
    kinds = _json_types(declared)
    out: dict[str, Any] = {}
    if kinds:
        out["type"] = kinds[0] if len(kinds) == 1 else kinds
    if meta.get("help"):
        out["description"] = meta["help"]
    if meta.get("fill"):
        out["default"] = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    limits = _limit_keywords(meta.get("limits") or {}, "null" in kinds)
    listy = "array" in kinds or meta.get("items") is not None
    scalar = [k for k in kinds if k not in ("array", "null")]
    if not listy or scalar:
        out.update(limits)
    if listy:
        items: dict[str, Any] = {}
        if meta.get("items") is not None:
            items["type"] = _JSON_TYPES[meta["items"]]
        items.update(_limit_keywords(meta.get("limits") or {}, False))
        if items:
            out["items"] = items
    if meta.get("mapping") is not None:
        mapped = json_schema(meta["mapping"])
        out.update({k: v for k, v in mapped.items() if k not in ("type", "description")})
    for k, v in (meta.get("schema") or {}).items():
        out[k] = {**out.get(k, {}), **v} if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def json_schema(cls: type) -> dict[str, Any]:
    """The JSON schema (draft 2020-12 keywords) of the settings dataclass ``cls``: an object that
    refuses unknown keys, each field a property with its type (from the annotation), its help as
    description and the limits its :func:`setting` declares (on a list's entries as ``items``),
    nested dataclasses as nested objects; ``required``, ``fill`` and ``schema`` as
    :func:`setting` says."""
    hints = _declared(cls)
    props, required = {}, []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        props[f.name] = _field_schema(f, hints.get(f.name, Any))
        if f.metadata.get("required"):
            required.append(f.name)
    out: dict[str, Any] = {"type": "object"}
    doc = (cls.__doc__ or "").strip().split("\n")[0]
    if doc and not doc.startswith(cls.__name__ + "("):  # dataclasses' generated docstring says nothing
        out["description"] = doc
    if required:
        out["required"] = required
    out["additionalProperties"] = False
    out["properties"] = props
    return out
