"""Bad configuration: each mistake is a clear error naming the key, before any job runs."""
import subprocess

import pytest
import yaml

from daunce_core.config import ConfigError, ExperimentConfig

from helpers import ROOT, SNAKEMAKE


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
    (lambda c: c.pop("daunce"), "daunce is required (no default); set it in the config"),
    (lambda c: c["daunce"].update(ratio=1.5), "daunce.ratio must be <= 1, got 1.5"),
    (lambda c: c["daunce"].update(K=1), "daunce.K must be >= 2, got 1"),
    (lambda c: c["daunce"].update(typo=1), "unknown key(s) daunce.typo; known: K, "),
    pytest.param(lambda c: c["data"].update(name="imagenet"), "data.name: unknown dataset 'imagenet'",
                 marks=pytest.mark.slow),
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


# --- the ranges and choices of the workflow schema, applied by validate() (daunce fit, the API) ---

@pytest.mark.parametrize("override,match", [
    ({"daunce": {"lr_grid": [0.03, 0]}}, r"^daunce\.lr_grid\[1\] must be > 0, got 0\.0$"),
    ({"daunce": {"lr_grid": [float("nan")]}}, r"^daunce\.lr_grid\[0\] must be a finite number > 0, got nan$"),
    ({"base": {"lr": float("inf")}}, r"^base\.lr must be a finite number > 0, got inf$"),
    ({"base": {"lr": 0}}, r"^base\.lr must be > 0, got 0\.0$"),
    ({"daunce": {"lr_grid": ["0.03"]}}, r"^daunce\.lr_grid\[0\] must be a float, got '0\.03' \(str\)$"),
    ({"daunce": {"lr_grid": ["1e-3"]}}, r"daunce\.lr_grid\[0\] must be a float.*: write 1\.0e-3$"),
    ({"model": {"hidden": [64, "a"]}}, r"^model\.hidden\[1\] must be a int, got 'a' \(str\)$"),
    ({"model": {"hidden": [0]}}, r"^model\.hidden\[0\] must be at least 1, got 0$"),
    ({"daunce": {"batch_size": 0}}, r"^daunce\.batch_size must be at least 1, got 0$"),
    ({"daunce": {"epochs": 0}}, r"^daunce\.epochs must be at least 1, got 0$"),
    ({"base": {"epochs": 0}}, r"^base\.epochs must be at least 1, got 0$"),
    ({"daunce": {"optimizer": "adamw"}}, r"^daunce\.optimizer must be 'sgd' or 'adam', got 'adamw'$"),
    ({"base": {"optimizer": "adamw"}}, r"^base\.optimizer must be 'sgd' or 'adam', got 'adamw'$"),
    ({"base": {"lr_schedule": "cosine"}}, r"^base\.lr_schedule must be one of constant, linear, triangle"),
    ({"daunce": {"momentum": -0.1}}, r"^daunce\.momentum must be >= 0, got -0\.1$"),
    ({"daunce": {"variants": ["daunce", "dance"]}}, r"^daunce\.variants\[1\] must be one of daunce, "),
    ({"daunce": {"k_curve": [1, 5]}}, r"^daunce\.k_curve\[0\] must be at least 2, got 1$"),
    ({"daunce": {"select_measure": "spearman"}}, r"^daunce\.select_measure must be 'correlation' or"),
    ({"lds": {"bootstrap": 50}}, r"^lds\.bootstrap must be at least 100, got 50$"),
    ({"lds": {"threshold": {"kind": "hard", "quantile": 0.9, "qunatile": 0.8}}},
     r"^unknown key\(s\) lds\.threshold\.qunatile \(did you mean lds\.threshold\.quantile\?\)$"),
    ({"lds": {"threshold": {"kind": "hard", "quantile": 1.0}}}, r"^lds\.threshold\.quantile must be in \[0, 1\)"),
    ({"lds": {"threshold": {"kind": "hard", "quantile": "0.9"}}}, r"^lds\.threshold\.quantile must be a float"),
    ({"lds": {"threshold": {"kind": "topk", "k": 0}}}, r"^lds\.threshold\.k must be at least 1, got 0$"),
    ({"lds": {"threshold": {"kind": "top"}}}, r"^lds\.threshold\.kind must be one of none, soft, hard, topk"),
    ({"data": {"n_train": -1}}, r"^data\.n_train must be at least 0 \(0 = all\), got -1$"),
    ({"device": "gpu"}, r"^device must be a string matching"),
    ({"experiment": "../elsewhere"}, r"^experiment must be a string matching .*it names a folder\), got"),
], ids=lambda v: None if isinstance(v, str) else str(v))
def test_validate_applies_the_schema_limits_naming_the_key(override, match):
    """What the workflow's schema refuses, validate() refuses too, one line naming the key: the
    ranges and choices are declared once, on each setting (audit finding 7)."""
    from snakemake.utils import update_config

    cfg = default()
    update_config(cfg, override)
    with pytest.raises(ConfigError, match=match) as err:
        ExperimentConfig.from_dict(cfg).validate()
    assert "\n" not in str(err.value)


def test_threshold_values_are_typed_and_valid_input_unchanged():
    cfg = default()
    cfg["lds"]["threshold"] = {"kind": "topk", "k": 10.0}
    assert ExperimentConfig.from_dict(cfg).validate().lds.threshold == {"kind": "topk", "k": 10}
    assert ExperimentConfig.from_dict(default()).validate().lds.threshold == default()["lds"]["threshold"]


def test_a_scoring_form_may_come_first_in_the_variants():
    """daunce_t_q (DAUNCE-T's fits scored with TRAK's Q) is accepted in any position, as the
    workflow's schema accepts it."""
    cfg = default()
    cfg["daunce"]["variants"] = ["daunce_t_q", "daunce"]
    assert ExperimentConfig.from_dict(cfg).validate().daunce.variants == ["daunce_t_q", "daunce"]


def test_the_variant_choices_are_the_objectives_and_the_scoring_forms():
    from daunce_core.config import Q_FORMS, VARIANTS
    from daunce_core.objectives import VARIANTS as OBJECTIVES

    assert set(VARIANTS) == set(OBJECTIVES) | set(Q_FORMS)


@pytest.mark.parametrize("K,curve", [(4, [4]), (30, [5, 10, 20, 30]), (100, [5, 10, 20, 50, 100]),
                                     (200, [5, 10, 20, 50, 100])])
def test_an_unset_k_curve_follows_K(K, curve):
    """daunce: {K: 4} alone is a config: the default k_curve keeps its values <= K, plus K (audit
    finding 8); a K the default fits leaves it as it was."""
    assert ExperimentConfig.from_dict({"daunce": {"K": K}}).validate().daunce.k_curve == curve


def test_a_k_curve_above_K_says_what_to_set():
    cfg = default()
    cfg["daunce"]["K"] = 4  # config/config.yaml sets k_curve up to 200
    with pytest.raises(ConfigError, match=r"daunce\.k_curve values must lie in \[2, K=4\].*; set "
                                          r"daunce\.k_curve to values <= 4, e\.g\. \[4\]$"):
        ExperimentConfig.from_dict(cfg).validate()

