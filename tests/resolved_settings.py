"""The settings objects the workflow builds from each shipped config, as plain data.

``python tests/resolved_settings.py > tests/data/resolved_settings.json`` writes them;
tests/test_schema.py checks that the committed file still equals what the code builds, so a change to
a declaration (a default, a limit, the generated schema's defaults) cannot change what a shipped
config runs without the file changing too.
"""
from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = ROOT / "workflow" / "schemas" / "config.schema.yaml"
CONFIGS = ["config/config.yaml", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "config").glob("*/*.yaml"))]


def _merge(base: dict, extra: dict) -> dict:
    """Snakemake's merge of a --configfile onto the config: dicts key by key, the rest replaced."""
    out = copy.deepcopy(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def resolve(path: str) -> dict:
    """What workflow/Snakefile and workflow/rules/common.smk build from ``path`` merged over
    config/config.yaml: the config after the schema checks (defaults filled in), and every
    settings tree as a dict."""
    from snakemake.utils import validate

    from daunce_core.baselines import BaselinesConfig
    from daunce_core.blackbox.study import load_config
    from daunce_core.config import ExperimentConfig, check_figures
    from daunce_core.lm.settings import LLMSettings
    from daunce_core.settings import check_schema, load_schema, to_dict

    config = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    if path != "config/config.yaml":
        config = _merge(config, yaml.safe_load((ROOT / path).read_text()))
    check_schema(config, load_schema(str(SCHEMA)))
    validate(config, schema=str(SCHEMA))
    cfg = ExperimentConfig.from_dict(config).validate()
    baselines = BaselinesConfig.from_config(config).validate()
    return {"config": json.loads(json.dumps(config)), "experiment": to_dict(cfg),
            "figures": check_figures(config.get("figures"), cfg), "llm": to_dict(LLMSettings.from_config(config)),
            "blackbox": to_dict(load_config(config)),
            "baselines": {**to_dict(baselines), "thinned": baselines.thinned}}


def resolve_all() -> dict:
    return {path: resolve(path) for path in CONFIGS}


if __name__ == "__main__":
    json.dump(resolve_all(), sys.stdout, indent=1, sort_keys=True, default=repr)
    sys.stdout.write("\n")
