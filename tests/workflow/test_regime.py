"""The regime experiment (config/regime/, docs/regime.md): its data source, its baselines and a
miniature of tier 1 through the workflow."""
import csv
import gzip
import os
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml

from daunce_core.baselines import BaselinesConfig, base_method, is_method
from daunce_core.config import DataConfig
from daunce_core.data import FASHION_FILES, DataError, load_dataset
from daunce_core.objectives import cross_entropy
from daunce_core.settings import ConfigError

import helpers
from helpers import DUP, ROOT, SNAKEMAKE, SRC, bcfg


def write_idx(folder: Path, X_train, y_train, X_test, y_test) -> Path:
    """The four idx .gz files of Fashion-MNIST's layout (uint8 images [n, H, W], uint8 labels)."""
    folder.mkdir(parents=True, exist_ok=True)

    def images(a):
        return (np.array([0, 0, 8, 3], np.uint8).tobytes() + np.array(a.shape, ">i4").tobytes()
                + np.ascontiguousarray(a, np.uint8).tobytes())

    def labels(a):
        return np.array([0, 0, 8, 1], np.uint8).tobytes() + np.array([len(a)], ">i4").tobytes() + \
            np.asarray(a, np.uint8).tobytes()

    for name, blob in zip(FASHION_FILES, (images(X_train), labels(y_train), images(X_test), labels(y_test))):
        with gzip.open(folder / f"{name}.gz", "wb") as fh:
            fh.write(blob)
    return folder


def digits_idx(folder: Path) -> Path:
    """sklearn's digits written as idx files (8x8, 0..255): real, learnable images for a miniature."""
    from sklearn.datasets import load_digits

    d = load_digits()
    X = np.round(d.images * (255 / 16)).astype(np.uint8)
    return write_idx(folder, X[:1400], d.target[:1400], X[1400:], d.target[1400:])


def test_fashion_mnist_reads_the_idx_files_with_ids_labels_and_padding(tmp_path):
    rng = np.random.default_rng(0)
    Xtr, Xte = rng.integers(0, 256, (12, 28, 28), np.uint8), rng.integers(0, 256, (5, 28, 28), np.uint8)
    ytr, yte = rng.integers(0, 10, 12), rng.integers(0, 10, 5)
    src = write_idx(tmp_path / "idx", Xtr, ytr, Xte, yte)
    cfg = DataConfig(name="fashion_mnist", idx_dir=str(src), root=str(tmp_path / "data"), n_train=10, n_query=4,
                     pad=2)
    ds = load_dataset(cfg)
    assert ds.X_train.shape == (10, 1, 32, 32) and ds.X_query.shape == (4, 1, 32, 32)
    np.testing.assert_array_equal(ds.y_train, ytr[:10])
    np.testing.assert_array_equal(ds.y_query, yte[:4])
    np.testing.assert_array_equal(ds.train_ids, np.arange(10))
    img = ds.images(ds.X_train)[..., 0]  # undo the normalisation: the pixels as read, the border zero
    np.testing.assert_allclose(img[:, 2:30, 2:30], Xtr[:10] / 255.0, atol=1e-5)
    assert np.abs(img[:, :2]).max() < 1e-5 and np.abs(img[:, :, -2:]).max() < 1e-5
    assert ds.classes[0] == "T-shirt/top" and ds.num_classes == 10
    # a second load reads the gunzipped copy: the same data, the same content hash
    assert load_dataset(cfg).content_hash == ds.content_hash


def test_fashion_mnist_without_its_files_is_one_line_naming_the_setting_and_package(tmp_path):
    with pytest.raises(DataError) as err:
        load_dataset(DataConfig(name="fashion_mnist", idx_dir=str(tmp_path / "none"), root=str(tmp_path / "d")))
    msg = str(err.value)
    assert "\n" not in msg and "data.idx_dir" in msg and "dataset-fashion-mnist" in msg
    assert not (tmp_path / "d").exists() or not any((tmp_path / "d").rglob("*ubyte"))


def test_trak_k_names_fix_the_projection_and_keep_the_other_knobs_tuned():
    assert is_method("trak_k200") and is_method("trak_ens") and is_method("if_iter")
    assert not is_method("trak_k0") and not is_method("trak_kx") and not is_method("trak_k")
    assert base_method("trak_k4000") == ("trak", {"proj_dim": 4000})
    b = BaselinesConfig.from_config({"baselines": {
        "methods": ["trak_k200", "trak_k1000", "trak_ens", "if_iter"], "max_settings": 3,
        "tune": {"trak": {"proj_dim": [8192], "lambda_reg": [0.0, 10.0]}, "if_iter": {"regularization": [0.1]}}}}
    ).validate()
    assert b.grid("trak_k200") == [{"lambda_reg": 0.0}, {"lambda_reg": 10.0}]  # proj_dim is the name's
    assert b.with_setting("trak_k200", {"lambda_reg": 10.0}).trak.proj_dim == 200
    assert b.with_setting("trak_k200", {}).trak.proj_dim == 200
    with pytest.raises(ConfigError, match="trak_k<N>"):
        BaselinesConfig.from_config({"baselines": {"methods": ["trak_200"]}}).validate()
    with pytest.raises(ConfigError, match="max_settings"):
        BaselinesConfig.from_config({"baselines": {"methods": ["trak_k10"], "max_settings": 1,
                                                   "tune": {"trak": {"lambda_reg": [0.0, 1.0]}}}}).validate()


def _snakemake(workdir: Path, configs: list[Path], *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([SNAKEMAKE, "-s", str(ROOT / "workflow" / "Snakefile"), "--directory", str(workdir),
                           "--configfile", *map(str, configs), "--cores", "2", "--nolock", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
@pytest.mark.parametrize("tier,experiment,extra", [
    ("tier1", "fmnist_mlp_regime", ["trak_k200", "trak_k1000", "trak_k4000", "trak_ens", "if_iter"]),
    ("tier2", "fmnist_resnet9q_regime", ["trak_k200", "trak_k1300", "trak_k5200", "trak_ens", "if_iter"]),
])
def test_regime_configs_plan_every_method(tmp_path, tier, experiment, extra):
    configs = [ROOT / "config" / "config.yaml", ROOT / "config" / "regime" / f"{tier}.yaml"]
    plan = _snakemake(tmp_path, configs, "-n", f"results/{experiment}/regime.pdf")
    assert plan.returncode == 0, (plan.stdout + plan.stderr)[-3000:]
    counts = dict(re.findall(r"^(\w+)\s+(\d+)$", plan.stdout, re.M))
    assert counts["baseline_extra"] == "5" and counts["regime"] == "1"
    for rule in ("baseline_logra", "baseline_ekfac", "baseline_graddot", "baseline_tracin"):
        assert counts[rule] == "1", rule
    for m in extra:
        assert f"scores/{m}/score.h5" in plan.stdout, m


MINI_METHODS = ["trak_k24", "trak_k96", "trak_ens", "logra", "ekfac", "graddot", "tracin", "if_iter"]


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("DAUNCE_REGIME_MINI") != "1",
                    reason="a whole workflow run of 10-25 minutes on 2 cores, beyond the suite's 15-minute budget: "
                           "run it with DAUNCE_REGIME_MINI=1 pytest tests/workflow/test_regime.py -k miniature")
def test_miniature_of_tier1_every_method_beats_random(tmp_path):
    """Tier 1 in miniature (sklearn's digits written as idx files, a 64-32-10 MLP of 2,410
    parameters, projections at tier 1's ratios): every method's raw LDS on the test masks is above 0
    with its 95% CI above 0 in the workflow's measure, what random scores cannot (their LDS is 0 in
    expectation)."""
    tier1 = yaml.safe_load((ROOT / "config" / "regime" / "tier1.yaml").read_text())
    mini = {
        "experiment": "mini", "device": "cpu",
        "data": {"idx_dir": str(digits_idx(tmp_path / "idx")), "root": str(tmp_path / "data"),
                 "n_train": 300, "n_query": 80},
        "model": {"hidden": [32]},
        "base": {"epochs": 20, "batch_size": 32},
        "daunce": {"K": 24, "chunk_size": 24, "lr_grid": [0.03, 0.01], "epochs": 5, "batch_size": 32,
                   "k_curve": [8, 16, 24]},
        "lds": {"M": 40, "M_select": 16, "seeds": 1, "chunk_size": 40, "bootstrap": 500},
        "baselines": {"methods": MINI_METHODS,
                      "trak": {"proj_dim": 24}, "trak_ens": {"models": 3, "proj_dim": 24},
                      "logra": {"rank": 4}, "if_iter": {"proj_dim": 24, "max_iter": 60},
                      "tune": {"trak": {"proj_dim": [24], "lambda_reg": [0.0, 1.0e+2]},
                               "trak_ens": {"lambda_reg": [0.0, 1.0e+2]}, "ekfac": {"damping": [None, 1.0e-2]},
                               "logra": {"rank": [4], "damping": [None, 1.0]}, "tracin": {"checkpoints": [5]},
                               "if_iter": {"regularization": [1.0e-2, 1.0e-1]}},
                      "max_settings": 2},
    }
    (tmp_path / "mini.yaml").write_text(yaml.safe_dump(mini))
    configs = [ROOT / "config" / "config.yaml", ROOT / "config" / "regime" / "tier1.yaml", tmp_path / "mini.yaml"]
    assert tier1["data"]["name"] == "fashion_mnist"  # the miniature runs tier 1's source, rules and variants
    run = _snakemake(tmp_path, configs, "results/mini/regime.pdf", timeout=3600)
    assert run.returncode == 0, (run.stdout + run.stderr)[-5000:]
    rows = list(csv.DictReader(open(tmp_path / "results" / "mini" / "regime.csv")))
    seen = {r["method"] for r in rows}
    assert seen == set(tier1["daunce"]["variants"]) | set(MINI_METHODS)
    for r in rows:  # every row above random; the CI above 0 in the measure the workflow scores with
        assert float(r["lds_raw"]) > 0, (r["method"], r["measure"], r["lds_raw"])
        if r["measure"] in ("score", "correlation"):  # a clean run: DAUNCE-E by covariance 0.102 [-0.001, 0.205]
            assert float(r["ci_low_raw"]) > 0, (r["method"], r["measure"], r["lds_raw"], r["ci_low_raw"])
    per = {r["method"]: float(r["floats_per_example"]) for r in rows}
    assert per["daunce"] == 24 and per["trak_k24"] == 25 and per["trak_k96"] == 97 and per["trak_ens"] == 3 * 25
    assert per["if_iter"] == 24 and per["graddot"] == 64 * 32 + 32 + 32 * 10 + 10
    assert (tmp_path / "results" / "mini" / "regime.pdf").stat().st_size > 0


# --- the added baselines against independent computations (the tiny problem of test_baselines) ---

@pytest.fixture(scope="module")
def problem():
    return helpers.baselines_problem()


@pytest.mark.parametrize("solver", [pytest.param("cg", marks=pytest.mark.slow), "arnoldi"])
def test_if_iter_equals_the_damped_hessian_influence(problem, tmp_path, solver):
    """dattri's iterative solvers on a 51-parameter MLP equal g_i^T (H + lambda I)^-1 g_q with H the
    float64 Hessian of the mean loss: CG run to convergence, Arnoldi with 40 of the 51 eigenpairs
    (the damping dominates the 11 smallest; dattri's Arnoldi breaks down with all of them)."""
    from daunce_core.baselines.dattri_methods import if_iter_scores

    lam = 0.5
    P = problem.num_params()
    H = helpers.reference_curvature(problem, "hessian", lam)
    assert np.linalg.eigvalsh(H).min() > 0
    ref = helpers.reference_grads(problem, "train", cross_entropy) @ np.linalg.solve(
        H, helpers.reference_grads(problem, "query", helpers.neg_margin).T)
    # CG converges in about 10 iterations here
    scores, attrs = if_iter_scores(problem, bcfg(if_iter={"solver": solver, "regularization": lam, "proj_dim": P - 11,
                                                           "max_iter": 20 if solver == "cg" else P}), tmp_path)
    assert scores.shape == ref.shape and attrs["solver"] == solver
    assert np.corrcoef(scores.ravel(), ref.ravel())[0, 1] > 0.999
    assert np.abs(scores - ref).max() < 0.03 * np.abs(ref).max()
    assert scores[:, DUP].argmax() == SRC


@pytest.mark.parametrize("solver,knob", [pytest.param("cg", "max_iter", marks=pytest.mark.slow),
                                         ("arnoldi", "proj_dim")])
def test_if_iter_past_its_krylov_space_is_a_clear_error(problem, tmp_path, solver, knob):
    from daunce_core.baselines.dattri_methods import if_iter_scores

    with pytest.raises(ValueError, match=f"lower baselines.if_iter.{knob}"):
        if_iter_scores(problem, bcfg(if_iter={"solver": solver, "regularization": 0.5, "max_iter": 80,
                                              "proj_dim": problem.num_params()}), tmp_path)


def test_if_iter_arnoldi_on_an_indefinite_hessian_is_its_inverse_on_the_top_eigenpairs(problem, tmp_path):
    """Damping below the Hessian's most negative eigenvalue (tier 1's case: a trained network's
    Hessian is indefinite): dattri 0.3.0's Arnoldi divides by sqrt(eigenvalue) and gave NaN. The
    adapter keeps each eigenvalue's sign: the scores equal g_i^T U diag(1/w) U^T g_q over the
    top proj_dim eigenpairs (by magnitude) of the float64 H + lambda I, negative ones included."""
    from daunce_core.baselines.dattri_methods import if_iter_scores

    lam, k = 0.03, 30
    H = helpers.reference_curvature(problem, "hessian", lam)
    w, U = np.linalg.eigh(H)
    assert w.min() < -0.03  # indefinite: the case that failed
    top = np.argsort(np.abs(w))[-k:]
    assert (w[top] < 0).any()  # a negative eigenvalue among the kept ones
    ref = (helpers.reference_grads(problem, "train", cross_entropy) @ U[:, top]) @ np.diag(1 / w[top]) @ (
        helpers.reference_grads(problem, "query", helpers.neg_margin) @ U[:, top]).T
    scores, attrs = if_iter_scores(problem, bcfg(if_iter={"solver": "arnoldi", "regularization": lam, "proj_dim": k,
                                                           "max_iter": 2 * k}), tmp_path)
    assert np.isfinite(scores).all() and attrs["negative_eigenvalues"] >= 1 and attrs["unconverged"] == 0
    assert np.corrcoef(scores.ravel(), ref.ravel())[0, 1] > 0.999
    assert np.abs(scores - ref).max() < 0.01 * np.abs(ref).max()
    assert scores[:, DUP].argmax() == SRC


def test_if_iter_arnoldi_damping_grid_shares_one_krylov_basis(problem, tmp_path, monkeypatch):
    """A damping grid runs the Arnoldi iteration once (Krylov spaces are shift-invariant): the scores at
    a second damping from the shared basis equal those of a fresh iteration at that damping, and
    equal the inverse of the float64 H + lambda I on its top eigenpairs; without the shift on the
    Hessenberg diagonal they would be the first damping's scores."""
    from dattri.func.projection import ArnoldiProjector

    from daunce_core.baselines import dattri_methods as D

    calls = []
    iterate = ArnoldiProjector._arnoldi_iter
    monkeypatch.setattr(ArnoldiProjector, "_arnoldi_iter", lambda self, *a, **kw: calls.append(1) or iterate(
        self, *a, **kw))
    k, steps, grid = 12, 40, (0.03, 0.5)  # 40 steps: inside the 51-dimensional Krylov space

    def scores(lam):
        return D.if_iter_scores(problem, bcfg(if_iter={"solver": "arnoldi", "regularization": lam, "proj_dim": k,
                                                       "max_iter": steps}), tmp_path)[0]

    D._KRYLOV.clear()
    first, shared = scores(grid[0]), scores(grid[1])
    assert len(calls) == 1
    D._KRYLOV.clear()
    fresh = scores(grid[1])
    assert len(calls) == 2
    assert np.abs(shared - fresh).max() < 1e-3 * np.abs(fresh).max()
    assert np.abs(first - fresh).max() > 0.1 * np.abs(fresh).max()
    H = helpers.reference_curvature(problem, "hessian", grid[1])
    w, U = np.linalg.eigh(H)
    top = np.argsort(np.abs(w))[-k:]
    ref = (helpers.reference_grads(problem, "train", cross_entropy) @ U[:, top]) @ np.diag(1 / w[top]) @ (
        helpers.reference_grads(problem, "query", helpers.neg_margin) @ U[:, top]).T
    assert np.corrcoef(shared.ravel(), ref.ravel())[0, 1] > 0.999


def test_if_iter_arnoldi_with_unconverged_eigenpairs_stops_naming_the_setting(problem, tmp_path):
    """max_iter close to proj_dim (tier 1's first setting, 200 and 200): the smallest Ritz pairs
    have not converged; the baseline stops with one line naming the setting, no scores."""
    from daunce_core.baselines.dattri_methods import if_iter_scores

    with pytest.raises(ValueError, match="have not converged") as err:
        if_iter_scores(problem, bcfg(if_iter={"solver": "arnoldi", "regularization": 0.03, "proj_dim": 20,
                                              "max_iter": 21}), tmp_path)
    msg = str(err.value)
    assert "\n" not in msg and "regularization=0.03" in msg and "max_iter=21" in msg and "proj_dim=20" in msg
    assert "raise baselines.if_iter.max_iter" in msg


@pytest.mark.slow
def test_trak_ensemble_of_one_is_trak_and_more_models_are_summed(problem, tmp_path):
    from daunce_core.baselines.trak import ensemble_states, trak_ensemble_scores, trak_scores

    one, attrs1 = trak_ensemble_scores(problem, bcfg(trak_ens={"models": 1, "proj_dim": 30}), tmp_path / "a")
    plain, _ = trak_scores(problem, bcfg(trak={"proj_dim": 30}), tmp_path / "b")
    np.testing.assert_allclose(one, plain, rtol=1e-4, atol=1e-6 * np.abs(plain).max())
    assert attrs1["bytes_per_example"] == 31 * 4
    states, info = ensemble_states(problem, 3, "seeds")
    assert len(states) == 3 and "trained from scratch" in info["ensemble_source"]
    assert all(set(s) == set(states[0]) for s in states)
    k = next(iter(states[0]))
    assert not np.allclose(states[0][k].numpy(), states[1][k].numpy())  # other seeds: other models
    three, attrs3 = trak_ensemble_scores(problem, bcfg(trak_ens={"models": 3, "proj_dim": 30}), tmp_path / "c")
    assert attrs3["ensemble"] == 3 and attrs3["bytes_per_example"] == 3 * 31 * 4
    assert three[:, DUP].argmax() == SRC and not np.allclose(three, one)
    ckpt, attrs_c = trak_ensemble_scores(problem, bcfg(trak_ens={"models": 3, "proj_dim": 30,
                                                                 "source": "checkpoints"}), tmp_path / "d")
    assert attrs_c["ensemble"] == 3 and ckpt[:, DUP].argmax() == SRC
