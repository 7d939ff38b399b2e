"""The workflow's config schema, generated from the settings dataclasses: ``ExperimentConfig``
and the tree of every other top-level section (``python -m daunce_core.schema`` prints
workflow/schemas/config.schema.yaml). It sits above the domain packages whose settings it joins."""
from __future__ import annotations

import dataclasses

from .baselines import BaselinesConfig
from .blackbox.config import BlackboxConfig
from .config import OTHER_STAGES, ExperimentConfig, FiguresConfig, ScoringConfig
from .lm.settings import LLMSettings
from .settings import json_schema


def stages() -> dict[str, type]:
    """The settings tree of each top-level config section besides the experiment's own
    (:data:`OTHER_STAGES`)."""
    return {"baselines": BaselinesConfig, "figures": FiguresConfig, "scoring": ScoringConfig, "llm": LLMSettings,
            "blackbox": BlackboxConfig}


def workflow_schema() -> dict:
    """The JSON schema of the workflow's config (workflow/schemas/config.schema.yaml is this,
    printed by ``python -m daunce_core.schema``): :class:`ExperimentConfig` and the
    trees of :func:`stages`, every key, type, limit and help declared once in the dataclasses."""
    top = json_schema(ExperimentConfig)
    for name, cls in stages().items():
        sub = json_schema(cls)
        top["properties"][name] = {"type": "object", **{k: v for k, v in sub.items() if k != "type"}}
    assert set(top["properties"]) == {f.name for f in dataclasses.fields(ExperimentConfig)} | set(OTHER_STAGES)
    return {"$schema": "https://json-schema.org/draft/2020-12/schema",
            "description": "DAUNCE workflow configuration (experiment facts only; threads and resources come from "
                           "the command line or a profile)", **{k: v for k, v in top.items() if k != "description"}}


def main(argv: list[str] | None = None) -> int:
    """``python -m daunce_core.schema``: print the workflow's config schema (YAML)."""
    import argparse

    import yaml

    parser = argparse.ArgumentParser(prog="python -m daunce_core.schema", description=main.__doc__)
    parser.parse_args(argv)
    print(SCHEMA_HEADER + yaml.safe_dump(workflow_schema(), sort_keys=False, width=110, allow_unicode=True,
                                                default_flow_style=None), end="")
    return 0


SCHEMA_HEADER = ("# Generated from the settings dataclasses (daunce_core/config.py and the trees it names): do not\n"
                 "# edit. Regenerate with\n"
                 "#   python -m daunce_core.schema > workflow/schemas/config.schema.yaml\n"
                 "# (tests/test_schema.py checks that this file is what that prints).\n")


if __name__ == "__main__":
    raise SystemExit(main())
