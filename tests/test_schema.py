"""One declaration per setting: the workflow's schema is generated from the settings dataclasses,
and what the workflow builds from each shipped config is pinned."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

from daunce_core.config import workflow_schema
from daunce_core.settings import SCHEMA_HEADER, ConfigError, check_schema

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = ROOT / "workflow" / "schemas" / "config.schema.yaml"


def test_the_committed_schema_is_the_generated_one():
    """workflow/schemas/config.schema.yaml is exactly what ``python -m daunce_core.settings
    --schema`` prints: a key, type or limit changed in a dataclass without regenerating fails here."""
    out = subprocess.run([sys.executable, "-m", "daunce_core.settings", "--schema"], cwd=ROOT, check=True,
                         capture_output=True, text=True, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}).stdout
    assert out.startswith(SCHEMA_HEADER)
    assert out == SCHEMA.read_text(), ("workflow/schemas/config.schema.yaml is stale; regenerate with "
                                       "python -m daunce_core.settings --schema > workflow/schemas/config.schema.yaml")
    assert yaml.safe_load(out) == workflow_schema()


def test_the_generated_schema_is_a_valid_draft_2020_12_schema():
    jsonschema.Draft202012Validator.check_schema(workflow_schema())


def test_the_shipped_configs_resolve_to_the_pinned_settings():
    """Every settings object the workflow builds from config/config.yaml and each config/*/*.yaml
    (merged over it, the schema's defaults filled in) equals tests/data/resolved_settings.json."""
    sys.path.insert(0, str(Path(__file__).parent))
    from resolved_settings import resolve_all

    pinned = json.loads((Path(__file__).parent / "data" / "resolved_settings.json").read_text())
    now = json.loads(json.dumps(resolve_all(), sort_keys=True, default=repr))
    for path in pinned:
        assert now[path] == pinned[path], path
    assert set(now) == set(pinned)


@pytest.mark.parametrize("mutate, match", [
    (lambda c: c["daunce"].update(Ratio=0.5), r"^unknown key\(s\) daunce.Ratio \(did you mean daunce.ratio\?\)$"),
    (lambda c: c["llm"]["finetune"].update(master_weight=False),
     r"did you mean llm.finetune.master_weights\?"),
    (lambda c: c["blackbox"]["logprobs"].update(top_logprobs=21), r"^blackbox.logprobs.top_logprobs must be <= 20"),
    (lambda c: c["baselines"].update(methods=["trak_k0"]), r"^baselines.methods\[0\]"),
    (lambda c: c["daunce"].update(lr_grid=[]), r"^daunce.lr_grid must be a list of at least 1 entries"),
    (lambda c: c["daunce"].pop("K"), r"^daunce.K is required"),
])
def test_the_generated_schema_refuses_in_one_line_naming_the_key(mutate, match):
    config = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    mutate(config)
    with pytest.raises(ConfigError, match=match):
        check_schema(config, yaml.safe_load(SCHEMA.read_text()))


def test_every_readme_llm_key_is_in_the_schema():
    """README.md's llm.finetune.master_weights (a key that once drifted out of the hand-kept schema)."""
    schema = yaml.safe_load(SCHEMA.read_text())
    assert "master_weights: false" in (ROOT / "README.md").read_text()
    jsonschema.validate({"llm": {"finetune": {"master_weights": False}}}, {**schema, "required": []})
