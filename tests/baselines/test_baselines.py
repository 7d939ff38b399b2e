"""Baseline adapters: shape, orientation and sign of every library's scores on a tiny MLP.

The reference for every check is computed here independently (float64 autograd loops, numpy
solves): a duplicated training point must be the query's most helpful example under exact IF,
Grad-Dot and TracIn must equal their definitions, kronfluence's identity strategy must equal
Grad-Dot (so its transpose and sign are right), and TRAK / EK-FAC / LoGra must rank the duplicate
first and agree in sign with the exact influence.
"""
import numpy as np
import pytest
import torch
from scipy import stats

from daunce_core import baselines as B
from daunce_core import store
from daunce_core.baselines import exact as X
from daunce_core.config import ConfigError, ExperimentConfig
from daunce_core.objectives import cross_entropy, margin

from helpers import (
    BASELINES_M,
    BASELINES_N,
    DUP,
    SRC,
    baselines_problem,
    bcfg,
    neg_margin,
    reference_curvature,
    reference_grads,
)

torch.set_num_threads(1)

N, M = BASELINES_N, BASELINES_M


@pytest.fixture(scope="module")
def problem():
    return baselines_problem()


# --- configuration ---------------------------------------------------------------------------------

def test_config_defaults_and_errors():
    c = B.BaselinesConfig.from_config({})
    assert c.methods == list(B.METHODS) and c.measurement == "margin" and c.logra.rank == 128
    c = B.BaselinesConfig.from_config({"baselines": {"methods": ["trak"], "trak": {"proj_dim": 64}}})
    assert c.methods == ["trak"] and c.trak.proj_dim == 64 and c.trak.half_precision is False
    with pytest.raises(ConfigError, match="baselines.trak.proj_dm"):
        B.BaselinesConfig.from_config({"baselines": {"trak": {"proj_dm": 3}}})
    with pytest.raises(ConfigError, match="unknown"):
        B.BaselinesConfig.from_config({"baselines": {"methods": ["trak", "datamodels"]}})
    with pytest.raises(ConfigError, match="measurement"):
        B.BaselinesConfig.from_config({"baselines": {"measurement": "accuracy"}})


def test_check_scores_refuses_transposed_and_nan():
    with pytest.raises(ValueError, match="orientation"):
        B.check_scores(np.zeros((M, N)), N, M, "x")
    bad = np.zeros((N, M))
    bad[3, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        B.check_scores(bad, N, M, "x")


# --- exact influence -------------------------------------------------------------------------------

@pytest.mark.parametrize("curvature", ["ggn", "hessian"])
def test_exact_if_matches_independent_float64(problem, curvature):
    wd = problem.cfg.base.weight_decay
    H = reference_curvature(problem, curvature, wd)
    damping = max(0.05, 0.05 - np.linalg.eigvalsh(H)[0])  # positive definite
    c = bcfg(exact_if={"curvature": curvature, "damping_grid": [damping]})
    scores, attrs = X.exact_if_scores(problem, c)
    Gt = reference_grads(problem, "train", cross_entropy)
    Gq = reference_grads(problem, "query", neg_margin)
    ref = Gt @ np.linalg.solve(H + damping * np.eye(len(H)), Gq.T)
    assert scores.shape == (N, M)
    np.testing.assert_allclose(scores, ref, rtol=1e-7, atol=1e-9 * np.abs(ref).max())
    assert attrs["damping"] == damping and attrs["bytes_per_example"] == 8 * problem.num_params()


def test_exact_if_sign_duplicate_is_most_helpful(problem):
    scores, _ = X.exact_if_scores(problem, bcfg(exact_if={"damping_grid": [0.01]}))
    assert scores[:, DUP].argmax() == SRC and scores[SRC, DUP] > 0


def test_exact_if_skips_indefinite_damping_and_refuses_big_models(problem):
    c = bcfg(exact_if={"curvature": "hessian", "damping_grid": [0.0]})
    H = reference_curvature(problem, "hessian", problem.cfg.base.weight_decay)
    if np.linalg.eigvalsh(H)[0] < 0:  # theta_0 of SGD: the Hessian is indefinite
        with pytest.raises(ValueError, match="indefinite"):
            X.exact_if_scores(problem, c)
    with pytest.raises(ValueError, match="max_params"):
        X.exact_if_scores(problem, bcfg(exact_if={"max_params": 10}))


def test_exact_if_selects_damping_on_select_masks_only(problem):
    rng = np.random.default_rng(1)
    gt = {"masks": rng.random((30, N)) < 0.5, "outputs": rng.normal(size=(1, 30, M)), "attrs": {"split": "test"}}
    with pytest.raises(store.StoreError, match="selection split"):
        X.exact_if_scores(problem, bcfg(exact_if={"damping_grid": [0.01, 0.1]}), select_gt=gt)
    gt["attrs"]["split"] = "select"
    _, attrs = X.exact_if_scores(problem, bcfg(exact_if={"damping_grid": [0.01, 0.1]}), select_gt=gt)
    ok = [r for r in attrs["damping_grid"] if r["lds_select"] is not None]
    assert attrs["damping"] == max(ok, key=lambda r: r["lds_select"])["damping"]


# --- dattri: Grad-Dot, TracIn, LoGra ---------------------------------------------------------------

def test_graddot_equals_its_definition(problem, tmp_path):
    from daunce_core.baselines.dattri_methods import graddot_scores

    scores, _ = graddot_scores(problem, bcfg(), tmp_path)
    ref = reference_grads(problem, "train", cross_entropy) @ reference_grads(problem, "query", neg_margin).T
    assert scores.shape == (N, M)
    np.testing.assert_allclose(scores, ref, rtol=2e-4, atol=1e-5 * np.abs(ref).max())
    assert scores[:, DUP].argmax() == SRC


def test_graddot_leaves_dattri_projector_defaults_alone(problem, tmp_path):
    from dattri.algorithm import tracin as dt

    from daunce_core.baselines.dattri_methods import graddot_scores

    before = dict(dt.DEFAULT_PROJECTOR_KWARGS)
    graddot_scores(problem, bcfg(), tmp_path)
    assert dt.DEFAULT_PROJECTOR_KWARGS == before


def test_tracin_replays_theta0_and_equals_its_definition(problem, tmp_path):
    from daunce_core.baselines.dattri_methods import replay_checkpoints, tracin_scores

    states, weights, info = replay_checkpoints(problem, 3)
    assert len(states) == 3 and info["replay_rel_diff"] < 1e-6
    for k, v in problem.state.items():
        torch.testing.assert_close(states[-1][k], v)
    assert all(w > 0 for w in weights) and weights[0] > weights[-1]  # linear decay
    scores, attrs = tracin_scores(problem, bcfg(tracin={"checkpoints": 3}), tmp_path)
    ref = sum(w * reference_grads(problem, "train", cross_entropy, s) @
              reference_grads(problem, "query", neg_margin, s).T for w, s in zip(weights, states))
    np.testing.assert_allclose(scores, ref, rtol=2e-4, atol=1e-5 * np.abs(ref).max())
    assert attrs["checkpoint_steps"][-1] == info["steps"]


def test_tracin_refuses_a_replay_that_is_not_theta0(problem):
    from daunce_core.baselines.dattri_methods import replay_checkpoints

    other = B.Problem(problem.cfg, problem.ds, problem.model,
                      {k: v + 0.1 for k, v in problem.state.items()}, problem.device)
    with pytest.raises(RuntimeError, match="theta_0"):
        replay_checkpoints(other, 2)


def test_logra_orientation_and_sign(problem, tmp_path):
    from daunce_core.baselines.dattri_methods import logra_scores

    scores, attrs = logra_scores(problem, bcfg(logra={"rank": 4}), tmp_path)
    assert scores.shape == (N, M) and np.isfinite(scores).all()
    assert scores[:, DUP].argmax() == SRC and scores[SRC, DUP] > 0
    assert attrs["bytes_per_example"] == 4 * 16 * len(attrs["layers"])
    assert not (tmp_path.parent / "batch_metadata.json").exists()


# --- traker ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("block_size", [100, 8])
def test_trak_equals_its_formula_with_trakers_projection(problem, tmp_path, block_size):
    from trak.projectors import BasicProjector, ProjectionType

    from daunce_core.baselines.trak import trak_scores

    # k <= 100 (traker's block size): one block, which also exercises the adapter's fix of traker's
    # freed matrix; block_size 8: the projector rebuilt with 4 blocks, each of its own seed
    k = 32
    scores, attrs = trak_scores(problem, bcfg(trak={"proj_dim": k, "seed": 3, "block_size": block_size}), tmp_path)
    assert scores.shape == (N, M) and attrs["block_size"] == min(k, block_size)
    # TRAK by hand (float64) with traker's own projection matrix: phi (XᵀX)^-1 phi_q^T * (1 - p)
    p = problem.num_params()
    proj = BasicProjector(grad_dim=p, proj_dim=k, seed=3, proj_type=ProjectionType.normal, device="cpu",
                          block_size=block_size)
    P = proj.project(torch.eye(p), model_id=0).double().numpy()
    Phi = reference_grads(problem, "train", margin) @ P / np.sqrt(p)
    Phq = reference_grads(problem, "query", margin) @ P / np.sqrt(p)
    with torch.no_grad():
        prob = torch.softmax(problem.model(torch.as_tensor(problem.ds.X_train)), -1).numpy()
    Q = 1 - prob[np.arange(N), problem.ds.y_train]
    inv = np.linalg.inv(Phi.T @ Phi)
    inv /= np.abs(inv).mean()  # traker rescales (XᵀX)^-1 by its mean |entry| (a global constant)
    ref = Phi @ inv @ Phq.T * Q[:, None]
    rho = [stats.pearsonr(scores[:, j], ref[:, j])[0] for j in range(M)]
    assert min(rho) > 0.999, rho
    np.testing.assert_allclose(scores, ref, rtol=0.05, atol=0.01 * np.abs(ref).max())
    assert scores[:, DUP].argmax() == SRC and scores[SRC, DUP] > 0
    assert attrs["bytes_per_example"] == (k + 1) * 4 and attrs["projector"] == "BasicProjector"


# --- kronfluence -----------------------------------------------------------------------------------

def test_kronfluence_identity_equals_graddot(problem, tmp_path):
    from daunce_core.baselines.kronfluence_ekfac import ekfac_scores

    scores, _ = ekfac_scores(problem, bcfg(ekfac={"strategy": "identity"}), tmp_path)
    ref = reference_grads(problem, "train", cross_entropy) @ reference_grads(problem, "query", neg_margin).T
    np.testing.assert_allclose(scores, ref, rtol=2e-4, atol=1e-5 * np.abs(ref).max())


@pytest.mark.slow
def test_ekfac_orientation_and_sign(problem, tmp_path):
    from daunce_core.baselines.kronfluence_ekfac import ekfac_scores

    scores, attrs = ekfac_scores(problem, bcfg(), tmp_path)
    assert scores.shape == (N, M)
    assert scores[:, DUP].argmax() == SRC and scores[SRC, DUP] > 0
    exact, _ = X.exact_if_scores(problem, bcfg(exact_if={"damping_grid": [0.01]}))
    rho = np.mean([stats.spearmanr(scores[:, j], exact[:, j])[0] for j in range(M)])
    assert rho > 0.3, rho  # a sanity check: the exact orientation test is the identity one above
    assert len(attrs["tracked_modules"]) == 2  # every Linear layer of the MLP


# --- end to end: the scores file and the cost table ------------------------------------------------

def test_write_result_and_cost_table(problem, tmp_path):
    from daunce_core.baselines import cost

    scores, attrs = X.exact_if_scores(problem, bcfg(exact_if={"damping_grid": [0.01]}))
    out = tmp_path / "scores" / "exact_if" / "score.h5"
    B.write_result(out, scores, problem, "exact_if", {**attrs, "seconds_in_process": 1.5})
    dense, meta = store.dense_scores(out)
    np.testing.assert_allclose(dense, scores.astype(np.float32))
    assert meta["attrs"]["method"] == "exact_if" and list(meta["train_ids"][:2]) == [100, 101]

    head = "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"
    for name, s, rss in (("ex", 7.5, 900.0), ("fit", 8.0, 1100.0), ("score", 2.0, 950.0), ("base", 3.0, 800.0)):
        (tmp_path / f"{name}.tsv").write_text(head + f"{s}\t0:00:0{int(s)}\t{rss}\t1\t1\t1\t0\t0\t90\t{s}\n")
    zeros = store.Losses(np.zeros((25, N), np.float32), np.zeros((25, M), np.float32), np.arange(25), np.arange(N),
                         np.arange(M), {"variant": "daunce"})
    store.write_losses(tmp_path / "losses.h5", zeros)
    (tmp_path / "lds.csv").write_text("method,measure,threshold,lds,ci_low,ci_high,n_queries,n_masks\n"
                                      "daunce,correlation,hard(q=0.9),0.3000,0.2900,0.3100,7,30\n"
                                      "daunce,correlation,none,0.2500,0.2400,0.2600,7,30\n"
                                      "exact_if,score,hard(q=0.9),0.6000,0.5900,0.6100,7,30\n"
                                      "exact_if,score,none,0.6100,0.6000,0.6200,7,30\n")
    md = tmp_path / "cost.md"
    rows = cost.write_cost_table(
        [{"kind": "daunce", "method": "daunce", "fit_benchmarks": [str(tmp_path / "fit.tsv")],
          "score_benchmark": str(tmp_path / "score.tsv"), "grid": 4, "losses": str(tmp_path / "losses.h5")},
         {"kind": "baseline", "method": "exact_if", "benchmark": str(tmp_path / "ex.tsv"), "scores": str(out)}],
        str(tmp_path / "lds.csv"), str(tmp_path / "base.tsv"), str(md), experiment="tiny")
    d, e = rows
    assert d["wall"] == pytest.approx(8.0 / 4 + 2.0) and d["rss"] == 1100.0 and d["per_example"] == 25 * 4
    assert e["wall"] == 7.5 and e["per_example"] == 8 * problem.num_params()
    text = md.read_text()
    assert "| DAUNCE | 0.250 [0.240, 0.260] | 0.300" in text and "| Exact IF | 0.610" in text  # raw first
    with pytest.raises(store.StoreError, match="benchmark"):
        cost.read_benchmark(tmp_path / "missing.tsv")
    start = cost.startup_baseline()
    assert start["s"] > 0 and start["max_rss"] > 50  # MB: an interpreter with torch


def _tiny_digits_base(tmp_path):
    """A 60-example digits split and its theta_0 on disk, through the rules' own steps."""
    from daunce_core.steps.vision import prepare_data, train_base

    cfg = ExperimentConfig.from_dict({
        "data": {"name": "digits", "n_train": 60, "n_query": 9},
        "model": {"arch": "mlp", "hidden": [8]},
        "base": {"epochs": 3, "batch_size": 16, "lr": 0.05},
        "device": "cpu"}).validate()
    split, theta0 = tmp_path / "split.npz", tmp_path / "theta_0.safetensors"
    ds = prepare_data(cfg, split)
    train_base(cfg, split, theta0, tmp_path / "metrics.json")
    return cfg, ds, split, theta0


def test_run_baseline_end_to_end_on_digits(tmp_path):
    """The rule's path: dataset from the config, theta_0 from disk, scores file with the split's ids."""
    cfg, ds, split, theta0 = _tiny_digits_base(tmp_path)
    out = tmp_path / "scores" / "exact_if" / "score.h5"
    c = bcfg(exact_if={"damping_grid": [0.1]})
    attrs = B.run_baseline("exact_if", cfg, c, split, theta0, out)
    dense, meta = store.dense_scores(out)
    assert dense.shape == (60, 9) and np.array_equal(meta["train_ids"], ds.train_ids)
    assert meta["attrs"]["method"] == "exact_if" and attrs["seconds_in_process"] > 0
    assert not list(out.parent.glob(".*work*"))  # scratch folders are removed
    wrong = ExperimentConfig.from_dict({"data": {"name": "digits", "n_train": 60, "n_query": 9},
                                        "model": {"arch": "mlp", "hidden": [9]}, "device": "cpu"})
    with pytest.raises(store.StoreError, match="rerun the base rule"):
        B.load_problem(wrong, split, theta0)
    with pytest.raises(ValueError, match="unknown baseline"):
        B.run_baseline("datamodels", cfg, c, split, theta0, out)


# --- tuning on equal footing --------------------------------------------------------------------

def test_tune_grid_budget_and_unknown_knobs_are_checked():
    c = B.BaselinesConfig.from_config({"daunce": {"lr_grid": [0.1, 0.01, 0.001]},
                                       "baselines": {"tune": {"trak": {"proj_dim": [64, 128], "lambda_reg": [0.0, 1.0]},
                                                              "ekfac": {"damping": [None, 1e-3]}}}})
    assert c.max_settings == 3  # null: as many settings as DAUNCE's lr grid
    assert c.grid("ekfac") == [{"damping": None}, {"damping": 1e-3}] and c.grid("graddot") == [{}]
    # null: a longer grid is thinned to the budget (the longest axis first), evenly spread
    assert c.tune["trak"] == {"proj_dim": [128], "lambda_reg": [0.0, 1.0]} and len(c.grid("trak")) == 2
    assert c.exact_if.damping_grid == [1e-3, 1e-1, 1.0] and c.thinned[0].startswith("baselines.exact_if")
    assert c.with_setting("trak", {"proj_dim": 64}).trak.proj_dim == 64 and c.trak.proj_dim == 512
    c.validate()
    with pytest.raises(ConfigError, match=r"baselines.tune.trak: 4 settings exceed the budget"):
        B.BaselinesConfig.from_config({"baselines": {"max_settings": 3, "tune": {
            "trak": {"proj_dim": [64, 128], "lambda_reg": [0.0, 1.0]}}}}).validate()
    with pytest.raises(ConfigError, match=r"baselines.tune.logra.rnk: unknown knob"):
        bcfg(tune={"logra": {"rnk": [8]}}).validate()
    with pytest.raises(ConfigError, match=r"baselines.tune.graddot: not a tunable method"):
        bcfg(tune={"graddot": {"x": [1]}}).validate()
    with pytest.raises(ConfigError, match=r"baselines.exact_if.damping_grid: 5 settings exceed"):
        bcfg(max_settings=4, exact_if={"damping_grid": [1e-3, 1e-2, 1e-1, 1.0, 10.0]}).validate()


@pytest.mark.slow
def test_run_baseline_tunes_on_the_selection_queries_and_records_the_choice(tmp_path):
    """Every setting is judged on the selection ground truth (its queries only); the best setting's
    scores are written with the table, and a test-split ground truth is refused."""
    from daunce_core.lds import per_query_lds
    from daunce_core.scoring import apply_threshold

    cfg, ds, split, theta0 = _tiny_digits_base(tmp_path)
    rng = np.random.default_rng(0)
    q = np.array([1, 4, 6])  # the selection queries
    gt = {"masks": rng.random((20, 60)) < 0.5, "outputs": rng.normal(size=(1, 20, len(q))),
          "train_ids": ds.train_ids, "query_ids": ds.query_ids[q], "attrs": {"split": "select"}}
    grid = [1e-3, 1e-1, 10.0]
    c = bcfg(tune={"ekfac": {"damping": grid}})
    out = tmp_path / "ekfac.h5"
    attrs = B.run_baseline("ekfac", cfg, c, split, theta0, out, select_gt=gt)
    t = attrs["tuning"]
    assert [r["damping"] for r in t["grid"]] == grid and t["selected_on"] == "select masks and select queries"
    best = max(t["grid"], key=lambda r: r["lds_select"])
    assert t["selected"] == {"damping": best["damping"]} and t["on_edge"] == (best["damping"] != 1e-1)
    dense, meta = store.dense_scores(out)
    assert meta["attrs"]["tuning"]["selected"] == t["selected"] and meta["attrs"]["damping"] == best["damping"]
    # the recorded judge is the raw LDS on the selection queries' columns of the written scores
    # (a threshold is configured, and no selection applies it)
    assert cfg.lds.threshold["kind"] != "none"
    own = per_query_lds(dense[:, q], gt["masks"], gt["outputs"]).mean()
    assert own == pytest.approx(best["lds_select"])
    thresholded = per_query_lds(apply_threshold(dense[:, q], cfg.lds.threshold), gt["masks"], gt["outputs"]).mean()
    assert thresholded != pytest.approx(own)
    with pytest.raises(store.StoreError, match="selection split"):
        B.run_baseline("ekfac", cfg, c, split, theta0, out, select_gt={**gt, "attrs": {"split": "test"}})
    with pytest.raises(ValueError, match="no selection ground truth"):
        B.run_baseline("ekfac", cfg, c, split, theta0, out)


def test_a_choice_at_the_knobs_bound_is_not_on_the_edge_of_its_grid():
    """TRAK's proj_dim at or past the parameter count, LoGra's rank at every layer's width and
    TracIn's checkpoints at every step of theta_0's training cannot usefully grow: choosing them
    at the top of a grid flags nothing. Below the bound, and for other knobs, the top of a grid
    still counts as an edge."""
    import types

    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    base = types.SimpleNamespace(seed=0, epochs=3, batch_size=10)
    problem = types.SimpleNamespace(model=model, num_params=lambda: sum(p.numel() for p in model.parameters()),
                                    cfg=types.SimpleNamespace(base=base), ds=types.SimpleNamespace(n=50))
    p = problem.num_params()
    assert B.at_bound("trak", "proj_dim", p, problem) and B.at_bound("trak", "proj_dim", 2 * p, problem)
    assert not B.at_bound("trak", "proj_dim", p - 1, problem)
    assert B.at_bound("logra", "rank", 64, problem) and not B.at_bound("logra", "rank", 32, problem)
    assert not B.at_bound("trak", "lambda_reg", 1e9, problem)
    assert B.at_bound("tracin", "checkpoints", 15, problem)  # 3 epochs x 5 steps: every step
    assert not B.at_bound("tracin", "checkpoints", 14, problem)


@pytest.mark.slow
def test_logra_runs_on_a_convolutional_network(tmp_path):
    """dattri 0.3.0 sets LoGra's projectors up with a forward on one image without its batch axis:
    on a convolutional network (the regime's ResNet-9) that raised before the adapter's fix."""
    from daunce_core.baselines.dattri_methods import logra_scores
    from daunce_core.config import ModelConfig
    from daunce_core.data import Dataset
    from daunce_core.models import build_model

    rng = np.random.default_rng(0)
    n, m = 24, 4
    X = rng.normal(size=(n + m, 1, 16, 16)).astype(np.float32)
    y = rng.integers(0, 3, n + m).astype(np.int64)
    X[n] = X[5]
    y[n] = y[5]  # query 0 is a copy of training example 5
    ds = Dataset(X[:n], y[:n], np.arange(n, dtype=np.int64), X[n:], y[n:], np.arange(m, dtype=np.int64), 3,
                 ["a", "b", "c"], np.zeros(1, np.float32), np.ones(1, np.float32))
    cfg = ExperimentConfig(model=ModelConfig(arch="resnet9", width=0.0625))
    torch.manual_seed(0)
    model = build_model(cfg.model, (1, 16, 16), 3).eval()
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    problem = B.Problem(cfg, ds, model, state, torch.device("cpu"))
    scores, attrs = logra_scores(problem, bcfg(logra={"rank": 2}), tmp_path)
    assert scores.shape == (n, m) and np.isfinite(scores).all()
    assert scores[:, 0].argmax() == 5  # the copy is its own query's most influential example


def test_convolutions_as_im2col_linear_compute_the_same_map():
    from daunce_core.baselines.dattri_methods import _convs_as_linear
    from daunce_core.config import ModelConfig
    from daunce_core.models import build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="resnet9", width=0.0625), (1, 16, 16), 3).eval()
    x = torch.randn(5, 1, 16, 16)
    before = model(x)
    n = sum(isinstance(m, torch.nn.Conv2d) for m in model.modules())
    assert _convs_as_linear(model) == n > 0
    assert not any(isinstance(m, torch.nn.Conv2d) for m in model.modules())
    torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)
