"""Mislabelled-example detection by self-influence (daunce_core/steps/mislabel.py, rules/mislabel.smk)."""
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml

from daunce_core.config import MISLABEL_BASELINES, ConfigError, ExperimentConfig
from daunce_core.steps import mislabel as M

import helpers
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
    # trak_k<N>: baselines.trak's values (or its own selection's) with the proj_dim of its name
    setting_, how = M.baseline_setting("trak_k200", bcfg)
    assert setting_ == {"proj_dim": 200} and "baselines.trak values" in how and "trak_k200" in how
    assert bcfg.with_setting("trak_k200", setting_).trak.proj_dim == 200
    store.write_scores(tmp_path / "trak_k200.h5", scores=np.ones((4, 4), np.float32), train_ids=ids, query_ids=ids,
                       attrs={"tuning": {"selected": {"lambda_reg": 100.0}}})
    assert M.baseline_setting("trak_k200", bcfg, tmp_path / "trak_k200.h5")[0] == {"lambda_reg": 100.0,
                                                                                  "proj_dim": 200}


def test_config_section_is_checked():
    assert ExperimentConfig.from_dict({}).validate().mislabel.enabled is False
    cfg = ExperimentConfig.from_dict({"mislabel": {"enabled": "true"}}).validate()
    assert cfg.mislabel.enabled is True
    assert cfg.mislabel.method_list(["daunce", "daunce_t_q"], ["trak", "limit_daunce", "exact_if"]) == [
        "daunce", "daunce_t_q", "trak", "exact_if"]
    # the regime's baselines: TRAK at fixed projection sizes, over an ensemble, IF with an iterative solver
    assert cfg.mislabel.method_list(["daunce"], ["trak_k200", "trak_k1000", "trak_ens", "if_iter", "lin_bb"]) == [
        "daunce", "trak_k200", "trak_k1000", "trak_ens", "if_iter"]
    listed = {"mislabel": {"methods": ["daunce", "trak_k200", "trak_ens", "if_iter"]}}
    assert ExperimentConfig.from_dict(listed).validate().mislabel.methods[1:] == ["trak_k200", "trak_ens", "if_iter"]
    for bad, match in (({"fraction": 1.0}, "mislabel.fraction"), ({"methods": ["tarK"]}, r"mislabel.methods\[0\]"),
                       ({"methods": ["daunce", "trak_k0"]}, r"mislabel.methods\[1\] .*trak_k<N>"),
                       ({"methods": ["limit_daunce"]}, r"mislabel.methods\[0\]"),
                       ({"settings": "test"}, "mislabel.settings"), ({"enabled": "maybe"}, "mislabel.enabled"),
                       ({"methods": ["trak", "trak"]}, "mislabel.methods")):
        with pytest.raises(ConfigError, match=match):
            ExperimentConfig.from_dict({"mislabel": bad}).validate()


def test_the_mislabel_baselines_are_every_baseline_but_the_references():
    from daunce_core.baselines.common import EXTRA, METHODS, REFERENCE, is_method
    from daunce_core.config import mislabel_baseline

    assert MISLABEL_BASELINES == tuple(METHODS) + tuple(EXTRA)
    for name in [*METHODS, *EXTRA, *REFERENCE, "trak_k200", "trak_k4000", "trak_k0", "trak_k", "trak_kx", "trak_k2x",
                 "daunce"]:
        assert mislabel_baseline(name) == (is_method(name) and name not in REFERENCE), name


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


@pytest.fixture(scope="module")
def tiny_noisy(tmp_path_factory):
    """TINY's data and its theta_0 trained on the flipped labels, through the steps' own functions:
    (cfg, split, theta_0, flips)."""
    from daunce_core.steps.vision import prepare_data

    tmp_path = tmp_path_factory.mktemp("tiny_noisy")
    cfg = ExperimentConfig.from_dict(TINY).validate()
    split = tmp_path / "split.npz"
    prepare_data(cfg, split)
    state, metrics, flips = tmp_path / "theta_0.safetensors", tmp_path / "metrics.json", tmp_path / "flips.npz"
    M.train_noisy_base(cfg, split, state, metrics, flips)
    return cfg, split, state, flips


def test_self_influence_finds_flipped_labels_on_a_tiny_problem(tiny_noisy, tmp_path):
    """200 digits, 20% flipped, an MLP of 16 hidden units: DAUNCE's self-influence (covariance)
    and grad-dot rank the flipped examples first (AUC > 0.7) through the workflow's own steps;
    a random score and DAUNCE's scores with the examples shuffled do not."""
    from daunce_core.baselines import BaselinesConfig

    cfg, split, state, flips = tiny_noisy
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


def test_a_diverged_lr_steps_down_the_grid_without_reading_the_flips(tiny_noisy, tmp_path):
    """Tier 1's middle lr diverged on its noisy data and stopped the run: the step now takes the next
    smaller lr of the grid, says so in the file, and refuses only when every smaller lr diverges too."""
    import dataclasses

    cfg, split, state, flips = tiny_noisy
    small = dataclasses.replace(cfg, daunce=dataclasses.replace(cfg.daunce, K=8, chunk_size=8))
    wild = dataclasses.replace(small, daunce=dataclasses.replace(small.daunce, lr_grid=[1e7, 1e6, 0.01]))
    M.daunce_signals(wild, split, flips, state, "daunce", tmp_path / "d.npz")  # middle: 1e6
    with np.load(tmp_path / "d.npz") as f:
        assert float(f["lr"]) == 0.01 and np.isfinite(f["signals"]).all()
        assert "diverged on the noisy data at 1e+06: the next smaller lr" in str(f["how"])
    hopeless = dataclasses.replace(small, daunce=dataclasses.replace(small.daunce, lr_grid=[1e7, 1e6, 1e5]))
    with pytest.raises(ValueError, match="at every smaller lr of daunce.lr_grid.*add smaller lrs"):
        M.daunce_signals(hopeless, split, flips, state, "daunce", tmp_path / "h.npz")
    assert not (tmp_path / "h.npz").exists()


@pytest.mark.slow  # three baselines on 200 examples: about 25 s on 2 shared cores
def test_regime_baselines_through_the_step_files(tiny_noisy, tmp_path):
    """trak_k<N>, trak_ens and if_iter through the rule's step (their baselines sections, the
    proj_dim of the name) into the table: each ranks TINY's flipped examples first (AUC > 0.7, its
    CI above 0.5), and each row records the setting it ran with."""
    from daunce_core.baselines import BaselinesConfig

    cfg, split, state, flips = tiny_noisy
    bcfg = BaselinesConfig.from_config({**TINY, "baselines": {
        "trak": {"proj_dim": 512}, "trak_ens": {"models": 2, "proj_dim": 60},
        "if_iter": {"solver": "arnoldi", "proj_dim": 20, "max_iter": 80, "regularization": 0.01}}})
    files = {}
    for method in ("trak_k60", "trak_ens", "if_iter"):
        files[method] = tmp_path / f"{method}.npz"
        M.baseline_self_influence(method, cfg, bcfg, split, flips, state, files[method])
    rows = {r["method"]: r for r in M.table(cfg, files, flips, tmp_path / "mislabel.csv", tmp_path / "mislabel.md")}
    assert list(rows) == ["trak_k60", "trak_ens", "if_iter", "theta0_loss"]
    for method in files:
        assert rows[method]["auc"] > 0.7 and rows[method]["ci_low"] > 0.5, rows[method]
    assert '"proj_dim": 60' in rows["trak_k60"]["setting"] and "trak_k60" in rows["trak_k60"]["setting"]
    assert "baselines.trak_ens values" in rows["trak_ens"]["setting"]
    assert "baselines.if_iter values" in rows["if_iter"]["setting"]


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


# --- trak_k<N>, trak_ens and if_iter: their self-influence against a direct computation ------------

def noisy_problem(n: int = 150, fraction: float = 0.1):
    """A problem with planted mislabelled examples and more examples than parameters: 3 Gaussian
    classes in 4 dimensions, ``fraction`` of the labels flipped (:func:`flip_labels`), an MLP of 4
    hidden units (35 parameters) trained on the noisy labels. Returns (Problem, flipped mask)."""
    import torch

    from daunce_core import baselines as B
    from daunce_core import ensemble as E
    from daunce_core.config import ModelConfig, TrainConfig
    from daunce_core.data import Dataset
    from daunce_core.models import model_factory
    from daunce_core.perturb import theta0_key

    rng = np.random.default_rng(0)
    centers = rng.normal(size=(3, 4)) * 2.0
    y = rng.integers(0, 3, n + 10)
    X = (centers[y] + rng.normal(size=(n + 10, 4))).astype(np.float32).reshape(-1, 1, 2, 2)
    noisy, flipped = M.flip_labels(y[:n], 3, fraction, seed=0)
    ds = Dataset(X[:n], noisy.astype(np.int64), np.arange(n, dtype=np.int64), X[n:], y[n:].astype(np.int64),
                 np.arange(10, dtype=np.int64) + n, 3, ["a", "b", "c"], np.zeros(1, np.float32), np.ones(1, np.float32))
    cfg = ExperimentConfig(model=ModelConfig(arch="mlp", hidden=[4]),
                           base=TrainConfig(epochs=30, batch_size=16, lr=0.05, weight_decay=1e-3))
    factory = model_factory(cfg.model, ds.X_train.shape[1:], ds.num_classes)
    _, p, b = E.fit_from_scratch(factory, torch.as_tensor(ds.X_train), torch.as_tensor(ds.y_train), [np.arange(n)],
                                 [theta0_key(cfg.base.seed)], cfg.base)
    state = {**E.unstack(p, 0), **E.unstack(b, 0)}
    model = factory()
    model.load_state_dict(state)
    model.eval()
    return B.Problem(cfg, ds, model, state, torch.device("cpu")), flipped


@pytest.fixture(scope="module")
def noisy():
    return noisy_problem()


def _trak_reference(problem, state) -> tuple[np.ndarray, np.ndarray]:
    """TRAK's two factors at one model without projection, in float64: each training example's
    leverage g_i^T (G^T G)^+ g_i of the margin gradients G (the margin ignores a shift of all logits,
    so G has rank < P: the pseudo-inverse), and its out-to-loss weight 1 - p_i."""
    import copy

    import torch


    G = helpers.reference_grads(problem, "train", helpers.neg_margin, state=state)
    lev = np.einsum("ij,ji->i", G, np.linalg.pinv(G, rcond=1e-10))
    net = copy.deepcopy(problem.model)
    net.load_state_dict(state)
    with torch.no_grad():
        p = torch.softmax(net(torch.as_tensor(problem.ds.X_train)).double(), -1).numpy()
    return lev, 1.0 - p[np.arange(problem.n), problem.ds.y_train]


# a ridge far below the smallest non-zero eigenvalue of traker's X^T X (its gradients are divided by
# sqrt(P)): TRAK's features then project onto the column space of the gradients, whatever the projection
TINY_RIDGE = 1e-3


def test_trak_k_self_influence_is_leverage_times_out_to_loss(noisy, tmp_path):
    """trak_k<N> with N = the 35 parameters (no information projected away; 150 examples):
    traker's self-influence is a positive multiple (traker rescales (X^T X)^-1 by its mean |entry|)
    of the float64 leverage of each example's margin gradient times 1 - p_i, whatever the
    projection; and it ranks the planted flips first."""
    problem, flipped = noisy
    P = problem.num_params()
    assert P == 35 < problem.n
    s = M.self_influence(f"trak_k{P}", problem, helpers.bcfg(trak={"lambda_reg": TINY_RIDGE}), tmp_path)
    lev, q = _trak_reference(problem, problem.state)
    ref = lev * q
    c = s @ ref / (ref @ ref)
    assert s.shape == (problem.n,) and c > 0 and np.corrcoef(s, ref)[0, 1] > 0.999
    assert np.abs(s - c * ref).max() < 0.02 * c * ref.max()
    assert M.detection_auc(s, flipped) > 0.8
    # the name fixes the projection: a smaller one is another (still informative) score
    small = M.self_influence("trak_k10", problem, helpers.bcfg(trak={"lambda_reg": TINY_RIDGE}), tmp_path / "k10")
    assert np.corrcoef(small, ref)[0, 1] < 0.99 and M.detection_auc(small, flipped) > 0.7


@pytest.mark.slow  # trains two more models: about 25 s on 2 shared cores
def test_trak_ens_self_influence_sums_leverage_over_its_models(noisy, tmp_path):
    """trak_ens over theta_0 and two models of other seeds, unprojected: traker's self-influence is
    TRAK's ensemble formula, sum_m c_m lev_m(i) x mean_m (1 - p_i^m), with a positive scale c_m per
    model (traker's rescaling of each (X^T X)^-1) -- a fit of those three scales leaves no residual,
    every scale positive, and theta_0's term alone does not explain it; the flips rank first."""
    from daunce_core.baselines.trak import ensemble_states

    problem, flipped = noisy
    P = problem.num_params()
    s = M.self_influence("trak_ens", problem, helpers.bcfg(trak_ens={"models": 3, "proj_dim": P,
                                                                     "lambda_reg": TINY_RIDGE}), tmp_path)
    states, _ = ensemble_states(problem, 3, "seeds")
    factors = [_trak_reference(problem, st) for st in states]
    q = np.mean([f[1] for f in factors], 0)
    A = np.stack([f[0] * q for f in factors], 1)
    scale, *_ = np.linalg.lstsq(A, s, rcond=None)
    assert (scale > 0).all() and np.abs(s - A @ scale).max() < 0.02 * s.max(), scale
    alone = A[:, :1] * (A[:, 0] @ s / (A[:, 0] @ A[:, 0]))
    assert np.abs(s - alone[:, 0]).max() > 0.1 * s.max()  # the other models count
    assert M.detection_auc(s, flipped) > 0.8


def test_if_iter_self_influence_is_the_damped_inverse_hessian_on_its_eigenpairs(noisy, tmp_path):
    """if_iter (dattri's Arnoldi) self-influence equals g_i^T U diag(1/w) U^T g_i with g_i the
    float64 loss gradient and (w, U) the top proj_dim eigenpairs (by magnitude) of H + lambda I, H
    the Hessian of the mean training loss on the noisy labels; and it ranks the planted flips first."""
    from daunce_core.objectives import cross_entropy


    problem, flipped = noisy
    lam, k = 0.1, 20
    w, U = np.linalg.eigh(helpers.reference_curvature(problem, "hessian", lam))
    top = np.argsort(np.abs(w))[-k:]
    G = helpers.reference_grads(problem, "train", cross_entropy) @ U[:, top]
    ref = (G ** 2 / w[top]).sum(1)
    s = M.self_influence("if_iter", problem, helpers.bcfg(if_iter={"solver": "arnoldi", "regularization": lam,
                                                                   "proj_dim": k, "max_iter": problem.num_params()}),
                         tmp_path)
    assert np.corrcoef(s, ref)[0, 1] > 0.9999 and np.abs(s - ref).max() < 1e-3 * np.abs(ref).max()
    assert M.detection_auc(s, flipped) > 0.8


@pytest.mark.parametrize("tier,experiment,extra", [
    ("tier1", "fmnist_mlp_regime", ["trak_k200", "trak_k1000", "trak_k4000", "trak_ens", "if_iter"]),
    pytest.param("tier2", "fmnist_resnet9q_regime", ["trak_k200", "trak_k1300", "trak_k5200", "trak_ens", "if_iter"],
                 marks=pytest.mark.slow),
])
def test_the_regime_configs_plan_every_baseline_of_the_mislabel_table(tmp_path, tier, experiment, extra):
    """``snakemake -n results/<experiment>/mislabel.csv`` on a regime config plans a self-influence
    job for every baseline of its baselines.methods -- trak_k<N>, trak_ens and if_iter among them --
    and the table reads each one's file."""
    configs = [str(ROOT / "config" / "config.yaml"), str(ROOT / "config" / "regime" / f"{tier}.yaml")]
    proc = subprocess.run([SNAKEMAKE, "-n", "-s", str(ROOT / "workflow" / "Snakefile"), "--directory", str(tmp_path),
                           "--configfile", *configs, "--cores", "1", f"results/{experiment}/mislabel.csv"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:] + proc.stdout[-2000:]
    jobs = helpers.plan_jobs(proc.stdout)
    planned = {Path(o).stem for rule, _, outs in jobs if rule == "mislabel_baseline" for o in outs}
    regime = yaml.safe_load((ROOT / "config" / "regime" / f"{tier}.yaml").read_text())["baselines"]["methods"]
    assert set(extra) <= planned and planned == set(regime)
    (table,) = [ins for rule, ins, _ in jobs if rule == "mislabel_table"]
    for m in extra:
        assert f"results/{experiment}/mislabel/self/{m}.npz" in table, m


@pytest.mark.parametrize("method", ["graddot", "tracin"])
def test_graddot_and_tracin_self_influence_is_the_diagonal_of_their_scores(noisy, method, tmp_path):
    """Grad-Dot's and TracIn's self-influence (one gradient per example and checkpoint) equals the
    diagonal of their adapter's [n, n] scores with the training set as queries and the training
    loss as query function, and it ranks the planted flips first."""
    import dataclasses

    from daunce_core.baselines import _one as run_one

    problem, flipped = noisy
    bcfg = helpers.bcfg(tracin={"checkpoints": 3})
    s = M.self_influence(method, problem, bcfg, tmp_path / "self")
    ds = problem.ds
    square = dataclasses.replace(problem, ds=dataclasses.replace(ds, X_query=ds.X_train, y_query=ds.y_train,
                                                                 query_ids=ds.train_ids), cache={})
    full, _ = run_one(method, square, dataclasses.replace(bcfg, measurement="loss"), tmp_path / "full", None)
    np.testing.assert_allclose(s, np.diag(full), rtol=1e-4, atol=1e-6 * np.abs(s).max())
    assert M.detection_auc(s, flipped) > 0.8
