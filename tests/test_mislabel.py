"""Mislabelled-example detection by self-influence (daunce_core/steps/mislabel.py, rules/mislabel.smk)."""
import subprocess

import numpy as np
import pytest
import yaml

from daunce_core.config import MISLABEL_BASELINES, ConfigError, ExperimentConfig
from daunce_core.steps import mislabel as M

from helpers import ROOT, SNAKEMAKE

# --- the AUC and the flips ---------------------------------------------------------------------------

def test_auc_of_known_rankings():
    flipped = np.array([1, 0, 1, 0], bool)
    assert M.detection_auc(np.array([4.0, 3, 2, 1]), flipped) == 0.75  # 3 of the 4 (flipped, clean) pairs in order
    assert M.detection_auc(np.array([4.0, 1, 3, 2]), flipped) == 1.0
    assert M.detection_auc(np.array([1.0, 4, 2, 3]), flipped) == 0.0
    assert M.detection_auc(np.array([1.0, 1, 1, 1]), flipped) == 0.5  # ties count one half


def test_auc_is_dattris_mislabel_detection_auc_on_untied_scores():
    import torch
    from dattri.metric import mislabel_detection_auc

    rng = np.random.default_rng(0)
    flipped = rng.random(300) < 0.1
    scores = rng.normal(size=300) + 1.5 * flipped
    ours = M.detection_auc(scores, flipped)
    assert M.rank_auc(flipped, scores) == pytest.approx(ours, abs=1e-12)
    tied = np.round(scores)  # ties: the rank form agrees with sklearn's
    assert M.rank_auc(flipped, tied) == pytest.approx(M.detection_auc(tied, flipped), abs=1e-12)
    theirs = float(mislabel_detection_auc(torch.tensor(scores), torch.tensor(flipped))[0])
    assert ours == pytest.approx(theirs, abs=1e-6)
    assert 0.75 < ours < 1.0


def test_auc_ci_brackets_the_auc_and_refuses_nan():
    rng = np.random.default_rng(1)
    flipped = rng.random(400) < 0.2
    scores = rng.normal(size=400) + flipped
    auc = M.detection_auc(scores, flipped)
    lo, hi = M.auc_ci(scores, flipped, n_resamples=300)
    assert lo < auc < hi and hi - lo < 0.2
    with pytest.raises(ValueError, match="NaN"):
        M.detection_auc(np.where(flipped, np.nan, 0.0), flipped)


def test_flipping_is_keyed_and_exact_in_count():
    y = np.random.default_rng(0).integers(0, 10, size=1000)
    noisy, flipped = M.flip_labels(y, 10, 0.1, seed=3)
    assert flipped.sum() == 100  # int(fraction * n), dattri's count
    assert (noisy[flipped] != y[flipped]).all() and (noisy[~flipped] == y[~flipped]).all()
    assert noisy.min() >= 0 and noisy.max() < 10
    again, flipped_again = M.flip_labels(y, 10, 0.1, seed=3)
    assert np.array_equal(again, noisy) and np.array_equal(flipped_again, flipped)
    other, flipped_other = M.flip_labels(y, 10, 0.1, seed=4)
    assert not np.array_equal(flipped_other, flipped)
    assert M.flip_labels(y[:7], 10, 0.2, seed=0)[1].sum() == 1  # int(1.4)
    # the new class is uniform over the other nine
    _, f = M.flip_labels(np.zeros(20000, int), 10, 0.5, seed=0)
    counts = np.bincount(M.flip_labels(np.zeros(20000, int), 10, 0.5, seed=0)[0][f], minlength=10)
    assert counts[0] == 0 and counts[1:].min() > 0.8 * counts[1:].mean()


def test_daunce_self_influence_is_the_covariance_diagonal():
    from daunce_core.scoring import pairwise_scores

    rng = np.random.default_rng(0)
    L = rng.normal(size=(50, 30)).astype(np.float32)
    s = M.self_influence_daunce(L, "daunce")
    assert np.allclose(s, np.diag(pairwise_scores(L, L, "covariance")), rtol=1e-5)
    p0 = rng.random(30)
    assert np.allclose(M.self_influence_daunce(L, "daunce_t_q", p0), s * (1 - p0))
    # correlation would make every self-score 1: no ranking at all
    assert np.allclose(np.diag(pairwise_scores(L, L, "correlation")), 1, atol=1e-5)


def test_settings_without_the_flipped_labels():
    cfg = ExperimentConfig.from_dict({"daunce": {"lr_grid": [0.3, 0.1, 0.03, 0.01, 0.003, 0.001, 0.0003]}})
    assert M.daunce_lr(cfg) == (0.01, "middle of daunce.lr_grid")
    assert M.middle([1e-3, 1e-2, 1e-1, 1.0]) == 0.1


def test_settings_from_the_lds_selection(tmp_path):
    """settings: lds reads each method's choice on the LDS selection masks: DAUNCE's selected lr,
    a baseline's tuned knobs, exact IF's damping."""
    import json

    from daunce_core import store
    from daunce_core.baselines import BaselinesConfig

    cfg = ExperimentConfig.from_dict({})
    (tmp_path / "selection.json").write_text(json.dumps({"selected_lr": 0.003, "selected": {"lr": 0.003}}))
    assert M.daunce_lr(cfg, tmp_path / "selection.json")[0] == 0.003
    ids = np.arange(4)
    store.write_scores(tmp_path / "trak.h5", scores=np.ones((4, 4), np.float32), train_ids=ids, query_ids=ids,
                       attrs={"tuning": {"selected": {"proj_dim": 8192, "lambda_reg": 1000.0}}})
    store.write_scores(tmp_path / "exact_if.h5", scores=np.ones((4, 4), np.float32), train_ids=ids, query_ids=ids,
                       attrs={"damping": 0.01, "tuning": {"selected": {"damping": 0.01}}})
    bcfg = BaselinesConfig.from_config({})
    setting_, how = M.baseline_setting("trak", bcfg, tmp_path / "trak.h5")
    assert setting_ == {"proj_dim": 8192, "lambda_reg": 1000.0} and "LDS selection" in how
    assert bcfg.with_setting("trak", setting_).trak.proj_dim == 8192
    assert M.baseline_setting("exact_if", bcfg, tmp_path / "exact_if.h5")[0] == {"damping_grid": [0.01]}
    assert M.baseline_setting("trak", bcfg) == ({}, "baselines.trak values")


def test_config_section_is_checked():
    assert ExperimentConfig.from_dict({}).validate().mislabel.enabled is False
    cfg = ExperimentConfig.from_dict({"mislabel": {"enabled": "true"}}).validate()
    assert cfg.mislabel.enabled is True
    assert cfg.mislabel.method_list(["daunce", "daunce_t_q"], ["trak", "limit_daunce", "exact_if"]) == [
        "daunce", "daunce_t_q", "trak", "exact_if"]
    for bad, match in (({"fraction": 1.0}, "mislabel.fraction"), ({"methods": ["tarK"]}, r"mislabel.methods\[0\]"),
                       ({"settings": "test"}, "mislabel.settings"), ({"enabled": "maybe"}, "mislabel.enabled"),
                       ({"methods": ["trak", "trak"]}, "mislabel.methods")):
        with pytest.raises(ConfigError, match=match):
            ExperimentConfig.from_dict({"mislabel": bad}).validate()


def test_the_baseline_names_are_the_paper_baselines():
    from daunce_core.baselines import METHODS

    assert tuple(METHODS) == MISLABEL_BASELINES


# --- the science: a tiny noisy problem -----------------------------------------------------------------

TINY = {
    "experiment": "tiny_mislabel", "device": "cpu",
    "data": {"name": "digits", "n_train": 200, "n_query": 20},
    "model": {"arch": "mlp", "hidden": [16]},
    "base": {"epochs": 30, "batch_size": 32, "lr": 0.05, "lr_schedule": "linear"},
    "daunce": {"K": 60, "ratio": 0.3, "epochs": 10, "batch_size": 32, "lr_grid": [0.03, 0.01, 0.003],
               "chunk_size": 60, "trace_every": 0},
    "mislabel": {"enabled": True, "fraction": 0.2, "seed": 0, "bootstrap": 200},
}


def test_self_influence_finds_flipped_labels_on_a_tiny_problem(tmp_path):
    """200 digits, 20% flipped, an MLP of 16 hidden units: DAUNCE's self-influence (covariance)
    and grad-dot rank the flipped examples first (AUC > 0.7) through the workflow's own steps;
    a random score and DAUNCE's scores with the examples shuffled do not."""
    from daunce_core.baselines import BaselinesConfig
    from daunce_core.steps.vision import prepare_data

    cfg = ExperimentConfig.from_dict(TINY).validate()
    split = tmp_path / "split.npz"
    prepare_data(cfg, split)
    state, metrics, flips = tmp_path / "theta_0.safetensors", tmp_path / "metrics.json", tmp_path / "flips.npz"
    M.train_noisy_base(cfg, split, state, metrics, flips)
    M.daunce_signals(cfg, split, flips, state, "daunce", tmp_path / "daunce.npz")
    bcfg = BaselinesConfig.from_config(TINY)
    M.baseline_self_influence("graddot", cfg, bcfg, split, flips, state, tmp_path / "graddot.npz")
    rows = M.table(cfg, {"daunce": tmp_path / "daunce.npz", "graddot": tmp_path / "graddot.npz"}, flips,
                   tmp_path / "mislabel.csv", tmp_path / "mislabel.md")
    auc = {r["method"]: r["auc"] for r in rows}
    assert [r["method"] for r in rows] == ["daunce", "graddot", "theta0_loss"]
    assert rows[0]["n_flipped"] == 40
    assert auc["daunce"] > 0.7 and auc["graddot"] > 0.7, auc
    assert all(r["ci_low"] > 0.5 for r in rows), rows
    with np.load(flips) as f:
        flipped = f["flipped"]
    with np.load(tmp_path / "daunce.npz") as f:
        s = M.self_influence_daunce(f["signals"], "daunce")
    rng = np.random.default_rng(0)
    assert abs(M.detection_auc(rng.random(len(flipped)), flipped) - 0.5) < 0.15
    assert abs(M.detection_auc(rng.permutation(s), flipped) - 0.5) < 0.15
    assert "| random | - | 0.500 |" in (tmp_path / "mislabel.md").read_text()


# --- the workflow ----------------------------------------------------------------------------------

@pytest.mark.slow  # two dry runs of the whole workflow: about 30 s on 2 cores
def test_the_rules_dry_run_on_any_experiment(tmp_path):
    """``snakemake -n results/mislabel.csv`` plans one fit per DAUNCE fit variant and one job per
    baseline, for the embedded config and an experiment of another name; settings: lds adds the
    LDS selections as inputs."""
    other = {"experiment": "other_exp", "daunce": {"variants": ["daunce", "daunce_t_q"]},
             "baselines": {"methods": ["graddot", "limit_daunce"]}, "mislabel": {"settings": "lds"}}
    (tmp_path / "other.yaml").write_text(yaml.safe_dump(other))
    for extra, want in (([], {"mislabel_daunce": 6, "mislabel_baseline": 6}),
                        ([str(tmp_path / "other.yaml")],
                         {"mislabel_daunce": 2, "mislabel_baseline": 1, "select_lr": 2, "baseline_graddot": 1})):
        proc = subprocess.run([SNAKEMAKE, "-n", "-s", str(ROOT / "workflow" / "Snakefile"), "--directory",
                               str(tmp_path), "--configfile", str(ROOT / "config" / "config.yaml"), *extra,
                               "--cores", "1", "results/mislabel.csv"], cwd=ROOT, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:] + proc.stdout[-2000:]
        for rule, count in want.items():
            assert any(line.split() == [rule, str(count)] for line in proc.stdout.splitlines()), (rule, proc.stdout)
        assert "mislabel_table" in proc.stdout
