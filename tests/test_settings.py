"""The one settings helper: every config tree refuses unknown keys and wrong types by name, and
the workflow's JSON schema is generated from the dataclasses (tests/test_schema.py)."""
from dataclasses import dataclass

import pytest
import yaml

from daunce_core import settings
from daunce_core.baselines import BaselinesConfig
from daunce_core.config import ExperimentConfig
from daunce_core.settings import ConfigError, build, describe, nested, setting, to_dict

from helpers import ROOT


@dataclass
class Inner:
    """An inner section."""

    rate: float = setting(0.1, "a rate")
    maybe: float | None = setting(None, "optional")
    names: list = setting(["a"], "a list")

    def validate(self):
        if self.rate < 0:
            raise ConfigError(f"outer.inner.rate must be >= 0, got {self.rate}")


@dataclass
class Outer:
    count: int = setting(3, "a count")
    flag: bool = setting(False, "a flag")
    inner: Inner = nested(Inner)


def test_defaults_and_values():
    o = build(Outer, None, "outer")
    assert o == Outer() and o.inner.names == ["a"]
    assert Outer().inner.names is not Outer().inner.names  # mutable defaults are copied
    o = build(Outer, {"count": 5, "inner": {"rate": 2, "maybe": 0.5}}, "outer")
    assert o.count == 5 and o.inner.rate == 2.0 and isinstance(o.inner.rate, float) and o.inner.maybe == 0.5
    assert build(Outer, to_dict(o), "outer") == o


@pytest.mark.parametrize("raw,match", [
    ({"cuont": 1}, r"^unknown key\(s\) outer\.cuont \(did you mean outer\.count\?\)$"),
    ({"zzz": 1}, r"^unknown key\(s\) outer\.zzz; known: count, flag, inner$"),
    ({"inner": {"rtae": 1}}, r"^unknown key\(s\) outer\.inner\.rtae \(did you mean outer\.inner\.rate\?\)$"),
    ({"count": "many"}, r"outer\.count must be a int, got 'many' \(str\)"),
    ({"count": 2.5}, r"outer\.count must be a int"),
    ({"count": True}, r"outer\.count must be a int"),
    ({"flag": 1}, r"outer\.flag must be a bool"),
    ({"inner": {"rate": "fast"}}, r"outer\.inner\.rate must be a float"),
    ({"inner": {"maybe": "x"}}, r"outer\.inner\.maybe must be a float"),
    ({"inner": {"names": "a"}}, r"outer\.inner\.names must be a list"),
    ({"inner": 3}, r"outer\.inner must be a mapping"),
    ({"inner": {"rate": -1.0}}, r"outer\.inner\.rate must be >= 0"),
])
def test_errors_name_the_dotted_key(raw, match):
    with pytest.raises(ConfigError, match=match):
        build(Outer, raw, "outer")


def test_coerce_parses_command_line_strings():
    o = build(Outer, {"count": "7", "flag": "true", "inner": {"rate": "1e-3", "maybe": "null"}}, "outer",
              coerce=True)
    assert (o.count, o.flag, o.inner.rate, o.inner.maybe) == (7, True, 1e-3, None)
    with pytest.raises(ConfigError, match="outer.count"):
        build(Outer, {"count": "7"}, "outer")  # without coerce a string is not an int


def test_ignore_and_validate_switch():
    assert build(Outer, {"llm": {}}, "", ignore=("llm",)) == Outer()
    with pytest.raises(ConfigError, match=r"unknown key\(s\) llm"):
        build(Outer, {"llm": {}}, "")
    assert build(Outer, {"inner": {"rate": -1.0}}, "", validate=False).inner.rate == -1.0


def test_describe_lists_every_leaf_with_help():
    rows = {key: (default, help) for key, default, help in describe(Outer)}
    assert rows["inner.rate"] == (0.1, "a rate") and rows["count"] == (3, "a count")
    for tree in (ExperimentConfig, BaselinesConfig):
        for key, _, help in describe(tree):
            assert help, f"{tree.__name__}.{key} has no help text"


def test_every_config_tree_uses_the_helper():
    from daunce_core import config

    assert config.ConfigError is settings.ConfigError
    exp = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    ExperimentConfig.from_dict(exp).validate()
    BaselinesConfig.from_config(exp)
    with pytest.raises(ConfigError, match=r"daunce\.K must be a int"):
        ExperimentConfig.from_dict({"daunce": {"K": "ten"}})
    with pytest.raises(ConfigError, match=r"baselines\.ekfac\.damping must be a float"):
        BaselinesConfig.from_config({"baselines": {"ekfac": {"damping": "high"}}})


@pytest.mark.parametrize("text, fix", [("1e-3", "1.0e-3"), ("1E-3", "1.0e-3"), ("5e2", "5.0e2")])
def test_a_yaml_number_read_as_a_string_is_refused_with_the_spelling_that_makes_it_a_float(text, fix):
    """PyYAML reads 1e-3 (no dot) as a string: the error names the key and the spelling to write."""
    raw = yaml.safe_load(f"daunce: {{lr_grid: [{text}]}}")
    assert raw["daunce"]["lr_grid"] == [text]  # the premise: YAML 1.1 leaves it a string
    with pytest.raises(ConfigError, match=rf"^daunce\.lr_grid\[0\] must be a float, got '{text}' \(str\); "
                                          rf"YAML reads a number without a dot as a string: write {fix}$"):
        ExperimentConfig.from_dict(raw)
