"""Bad configuration: each mistake is a clear error naming the key, before any job runs."""
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from daunce_core.config import ConfigError, ExperimentConfig

ROOT = Path(__file__).resolve().parents[1]
SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))


def default():
    return yaml.safe_load((ROOT / "config" / "config.yaml").read_text())


@pytest.mark.parametrize("mutate,match", [
    (lambda c: c["daunce"].update(ratio=1.5), r"daunce\.ratio must be in \(0, 1\]"),
    (lambda c: c["daunce"].update(ratio=0.0), r"daunce\.ratio"),
    (lambda c: c["daunce"].update(K=1), r"daunce\.K must be at least 2"),
    (lambda c: c["daunce"].update(Kk=3), r"unknown key\(s\) daunce\.Kk"),
    (lambda c: c["lds"].update(alpha=1.0), r"lds\.alpha"),
    (lambda c: c["daunce"].update(k_curve=[5, 500]), r"k_curve"),
])
def test_library_config_errors_name_the_key(mutate, match):
    cfg = default()
    mutate(cfg)
    with pytest.raises(ConfigError, match=match):
        ExperimentConfig.from_dict(cfg).validate()


def test_default_config_is_valid():
    c = ExperimentConfig.from_dict(default()).validate()
    assert c.daunce.K >= 2 and c.data.name == "digits"


@pytest.mark.parametrize("mutate,match", [
    (lambda c: c.pop("daunce"), "'daunce' is a required property"),
    (lambda c: c["daunce"].update(ratio=1.5), "1.5 is greater than the maximum of 1"),
    (lambda c: c["daunce"].update(K=1), "1 is less than the minimum of 2"),
    (lambda c: c["daunce"].update(typo=1), r"'typo' was unexpected"),
    (lambda c: c["data"].update(name="imagenet"), "data.name: unknown dataset 'imagenet'"),
])
def test_workflow_validates_the_config_before_any_job(tmp_path, mutate, match):
    cfg = default()
    mutate(cfg)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = subprocess.run([SNAKEMAKE, "-n", "--configfile", str(path), "--directory", str(tmp_path),
                           "-s", str(ROOT / "workflow" / "Snakefile")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert match in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    assert not (tmp_path / "results").exists()
