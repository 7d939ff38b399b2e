"""LDS on constructed cases with known answers."""
import numpy as np
import pytest

from daunce_core import lds as L
from daunce_core.perturb import lds_masks

from helpers import ROOT


def test_lds_is_one_for_the_true_linear_datamodel_and_minus_one_reversed():
    rng = np.random.default_rng(0)
    n, m, M = 60, 8, 40
    masks = lds_masks(0, M, n, 0.5)
    assert masks.shape == (M, n) and (masks.sum(1) == 30).all()
    a = rng.normal(size=(n, m))
    outputs = (masks @ a)[None]  # exactly additive ground truth, one seed
    res, pq = L.evaluate(a, {"masks": masks, "outputs": outputs})
    assert res.lds == pytest.approx(1.0) and pq == pytest.approx(np.ones(m))
    res, _ = L.evaluate(-a, {"masks": masks, "outputs": outputs})
    assert res.lds == pytest.approx(-1.0)
    # monotone transforms of the outputs do not change a rank correlation
    res, _ = L.evaluate(a, {"masks": masks, "outputs": np.exp(outputs / 10)})
    assert res.lds == pytest.approx(1.0)


def test_lds_of_noisy_scores_and_its_bootstrap_ci():
    rng = np.random.default_rng(1)
    n, m, M = 200, 50, 100
    masks = lds_masks(1, M, n, 0.5)
    a = rng.normal(size=(n, m))
    outputs = np.stack([masks @ a + rng.normal(scale=0.5, size=(M, m)) for _ in range(3)])
    good, _ = L.evaluate(a + rng.normal(scale=1.0, size=a.shape), {"masks": masks, "outputs": outputs})
    rand, _ = L.evaluate(rng.normal(size=a.shape), {"masks": masks, "outputs": outputs})
    assert 0.4 < good.lds < 0.95 and good.ci_low < good.lds < good.ci_high and good.ci_low > 0.3
    assert abs(rand.lds) < 0.1 and rand.ci_low < 0 < rand.ci_high


def test_constant_predictions_count_as_zero_with_a_warning():
    masks = lds_masks(0, 10, 20, 0.5)
    with pytest.warns(RuntimeWarning, match="constant predictions"):
        pq = L.per_query_lds(np.zeros((20, 2)), masks, np.random.default_rng(0).normal(size=(10, 2)))
    assert (pq == 0).all()


def test_test_and_selection_masks_are_disjoint_streams():
    from daunce_core.config import ExperimentConfig

    cfg = ExperimentConfig.from_dict({"lds": {"M": 5, "M_select": 5}})
    ti, tm = L.masks_for(cfg, "test", 50)
    si, sm = L.masks_for(cfg, "select", 50)
    assert not set(ti) & set(si)
    assert not any((tm[i] == sm[j]).all() for i in range(5) for j in range(5))


def test_shape_mismatch_is_explained():
    with pytest.raises(ValueError, match="do not match the ground truth"):
        L.evaluate(np.zeros((3, 2)), {"masks": np.ones((4, 5), bool), "outputs": np.zeros((1, 4, 2))})


def test_nan_scores_few_subsets_and_bad_bootstrap_are_refused():
    masks = lds_masks(0, 10, 20, 0.5)
    gt = {"masks": masks, "outputs": np.random.default_rng(0).normal(size=(1, 10, 3))}
    scores = np.random.default_rng(1).normal(size=(20, 3))
    bad = scores.copy()
    bad[4, 1] = np.nan
    with pytest.raises(ValueError, match="1 scores are NaN or infinite"):
        L.evaluate(bad, gt)
    nan_gt = {"masks": masks, "outputs": np.where(np.eye(10, 3)[None] > 0, np.inf, gt["outputs"])}
    with pytest.raises(ValueError, match="ground-truth outputs are NaN or infinite"):
        L.evaluate(scores, nan_gt)
    with pytest.raises(ValueError, match="at least 2"):
        L.evaluate(scores, {"masks": masks[:1], "outputs": gt["outputs"][:, :1]})
    for n_resamples in (0, -5, 2.5):
        with pytest.raises(ValueError, match=r"n_resamples \(--bootstrap\)"):
            L.evaluate(scores, gt, n_resamples=n_resamples)
    with pytest.raises(ValueError, match="no queries"):
        L.summarize(np.array([]))


# --- selection kept apart from test ------------------------------------------------------

def test_query_split_is_seeded_disjoint_and_complete():
    from daunce_core.config import ConfigError

    sel, test = L.query_split(300, 0.3, 0)
    assert len(sel) == 90 and len(test) == 210 and not set(sel) & set(test)
    assert sorted([*sel, *test]) == list(range(300))
    assert (np.diff(sel) > 0).all() and (np.diff(test) > 0).all()
    again, _ = L.query_split(300, 0.3, 0)
    other, _ = L.query_split(300, 0.3, 1)
    assert np.array_equal(sel, again) and not np.array_equal(sel, other)
    assert not np.array_equal(sel, np.arange(90))  # a random choice, not the first queries
    with pytest.raises(ConfigError, match="lds.select_fraction"):
        L.query_split(3, 0.1, 0)


def test_scores_of_all_queries_are_evaluated_on_the_ground_truths_queries_only():
    from daunce_core import store

    rng = np.random.default_rng(0)
    n, m, M = 30, 12, 20
    masks = lds_masks(0, M, n, 0.5)
    a = rng.normal(size=(n, m))
    qids = np.arange(m) + 100
    sel, test = L.query_split(m, 0.25, 0)
    gt = {"masks": masks, "outputs": (masks @ a[:, test])[None], "train_ids": np.arange(n),
          "query_ids": qids[test], "attrs": {"split": "test"}}
    scores = a.copy()
    scores[:, sel] = rng.normal(size=(n, len(sel)))  # garbage on the selection queries: never looked at
    aligned, _ = L.align_to_ground_truth(scores, np.arange(n), qids, gt)
    assert aligned.shape == (n, len(test))
    assert L.evaluate(aligned, gt)[0].lds == pytest.approx(1.0)
    with pytest.raises(store.StoreError, match="query_ids"):  # a ground-truth query the scores lack
        L.align_to_ground_truth(scores[:, 1:], np.arange(n), qids[1:], {**gt, "query_ids": qids})


def test_on_edge_and_tuning_label():
    assert L.on_edge([0.1, 0.01, 0.001], 0.001) and L.on_edge([0.1, 0.01, 0.001], 0.1)
    assert not L.on_edge([0.1, 0.01, 0.001], 0.01) and not L.on_edge([0.1], 0.1)
    assert not L.on_edge([None, 1e-3, 1e-2, 1e-1], None) and L.on_edge([None, 1e-3, 1e-2], 1e-3)
    assert L.tuning_label(None) == ("", "")
    assert L.tuning_label({"selected": {"proj_dim": 4096, "lambda_reg": 1000.0}, "on_edge": True}) == \
        ("proj_dim=4096, lambda_reg=1000", "true")


# --- the joint bootstrap over masks and queries, and paired differences --------------------------

def _noisy_ground_truth(seed=1, n=200, m=60, M=30, mask_noise=0.0):
    """Additive effects ``a`` [n, m] and ground truth with per-mask noise; ``mask_noise`` adds a
    shock per mask shared by every query (masks as a random factor the query bootstrap misses)."""
    rng = np.random.default_rng(seed)
    masks = lds_masks(seed, M, n, 0.5)
    a = rng.normal(size=(n, m))
    shock = rng.normal(size=(M, 1)) * rng.normal(size=(1, m)).clip(0.5)
    outputs = masks @ a + rng.normal(scale=3.0, size=(M, m)) + mask_noise * shock * np.sqrt(n)
    return a, {"masks": masks, "outputs": outputs[None]}


def test_resampled_ranks_are_rankdata_of_the_resampled_masks():
    """The rank shortcut equals scipy's Spearman on the materialised resample, ties included."""
    from scipy import stats

    rng = np.random.default_rng(0)
    M, m = 25, 7
    actual = rng.normal(size=(M, m))
    predicted = actual + rng.normal(size=(M, m))
    predicted[:, :3] = np.round(predicted[:, :3])  # ties within a column
    mc, _ = next(L.bootstrap_draws(M, m, 4, seed=3))
    got = L.resampled_spearman(predicted, actual, mc)
    for b in range(4):
        idx = np.repeat(np.arange(M), mc[b])
        ref = [stats.spearmanr(predicted[idx, q], actual[idx, q]).statistic for q in range(m)]
        assert got[b] == pytest.approx(ref, abs=1e-12)


def test_joint_bootstrap_is_wider_than_query_only_when_masks_vary():
    a, gt = _noisy_ground_truth(mask_noise=1.0)
    scores = a + np.random.default_rng(5).normal(size=a.shape)
    joint, pq = L.evaluate(scores, gt, n_resamples=1000)
    queries, _ = L.evaluate(scores, gt, n_resamples=1000, resample="queries")
    assert joint.lds == queries.lds == pytest.approx(pq.mean())
    assert joint.ci_low < joint.lds < joint.ci_high
    assert joint.ci_high - joint.ci_low > 1.5 * (queries.ci_high - queries.ci_low)
    assert joint.replicates.shape == (1000,)
    # the draws depend on (M, m, n_resamples, seed) alone: a second method gets the same ones
    again, _ = L.evaluate(scores, gt, n_resamples=1000)
    assert np.array_equal(again.replicates, joint.replicates)


def test_paired_ci_separates_a_better_method_and_not_an_equal_one():
    a, gt = _noisy_ground_truth(mask_noise=0.5)
    rng = np.random.default_rng(7)
    good = a + rng.normal(scale=0.5, size=a.shape)
    worse = a + rng.normal(scale=1.5, size=a.shape)
    twin = a + rng.normal(scale=0.5, size=a.shape)  # as good as ``good``, other noise
    (g, _), (w, _), (t, _) = L.evaluate_many([good, worse, twin], gt, n_resamples=1000)
    better = L.paired_difference(g.lds, g.replicates, w.lds, w.replicates)
    assert better["diff"] > 0 and better["ci_low"] > 0
    same = L.paired_difference(g.lds, g.replicates, g.lds, g.replicates)
    assert same == {"diff": 0.0, "ci_low": 0.0, "ci_high": 0.0}
    equal = L.paired_difference(g.lds, g.replicates, t.lds, t.replicates)
    assert equal["ci_low"] < 0 < equal["ci_high"]
    # pairing matters: the paired CI of good - worse is narrower than the unpaired one
    unpaired = np.percentile(g.replicates - np.random.default_rng(0).permutation(w.replicates), [2.5, 97.5])
    assert better["ci_high"] - better["ci_low"] < unpaired[1] - unpaired[0]


def _raw_vs_thresholded_fixture():
    """Two score matrices ranked one way by raw LDS and the other way by thresholded LDS: ``A`` is
    the true effects plus large junk on examples that are in every mask (a constant shift of every
    prediction: no effect on the raw LDS, but hard thresholding keeps only the junk); ``B`` is the
    true effects plus noise."""
    rng = np.random.default_rng(3)
    n, m, M = 80, 20, 40
    masks = lds_masks(3, M, n, 0.5)
    masks[:, :8] = True  # examples 0..7 are in every subset
    a = rng.normal(size=(n, m))
    a[:8] = 0.0
    gt = {"masks": masks, "outputs": (masks @ a + rng.normal(scale=1.0, size=(M, m)))[None]}
    A = a.copy()
    A[:8] = 50.0 * rng.normal(size=(8, m))
    B = a + rng.normal(scale=1.5, size=a.shape)
    return A, B, gt


def test_the_fixture_ranks_raw_and_thresholded_differently():
    from daunce_core.scoring import apply_threshold

    A, B, gt = _raw_vs_thresholded_fixture()
    th = {"kind": "hard", "quantile": 0.9}
    raw = [L.per_query_lds(s, gt["masks"], gt["outputs"]).mean() for s in (A, B)]
    with pytest.warns(RuntimeWarning, match="constant"):  # A thresholded: the junk alone
        thr = [L.per_query_lds(apply_threshold(s, th), gt["masks"], gt["outputs"]).mean() for s in (A, B)]
    assert raw[0] > raw[1] + 0.1 and thr[1] > thr[0] + 0.1


def test_selection_judges_by_raw_lds_even_when_a_threshold_is_configured():
    """Baselines' knobs, exact IF's and the references' damping (``selection_lds``) and DAUNCE's
    learning rate (``pipeline.selection_score``) pick by raw LDS: with ``lds.threshold`` hard, the
    raw-best candidate A still wins, though thresholding would rank B first."""
    from types import SimpleNamespace

    from daunce_core import store
    from daunce_core.baselines.common import selection_lds
    from daunce_core.config import ExperimentConfig
    from daunce_core.steps import vision as pipeline

    A, B, gt = _raw_vs_thresholded_fixture()
    cfg = ExperimentConfig.from_dict({"lds": {"threshold": {"kind": "hard", "quantile": 0.9}}})
    problem = SimpleNamespace(cfg=cfg)
    assert selection_lds(problem, A, gt) > selection_lds(problem, B, gt)
    # DAUNCE: losses whose covariance scores are exactly A (or B); the select measure is covariance
    n, m = A.shape
    K = n + 20
    T = np.random.default_rng(0).normal(size=(K, n))
    T -= T.mean(0)
    T, _ = np.linalg.qr(T)  # columns orthonormal and centred (orthogonal to the ones vector)
    T *= np.sqrt(K - 1)
    ids = {"train_ids": np.arange(n), "query_ids": np.arange(m)}
    gt_ids = {**gt, **ids, "attrs": {"split": "select"}}

    def losses(S):
        return store.Losses(T.astype(np.float64), T @ S, np.arange(K), ids["train_ids"], ids["query_ids"], {})

    got = pipeline.scores_from_losses(losses(A), "covariance")  # A up to a positive factor
    assert np.corrcoef(got.ravel(), A.ravel())[0, 1] > 0.9999
    va, vb = (pipeline.selection_score(cfg, losses(S), gt_ids, "covariance") for S in (A, B))
    assert va > vb


def test_every_method_gets_raw_and_thresholded_rows_and_a_paired_delta(tmp_path):
    """pipeline.evaluate_scores writes each method's raw and thresholded LDS from one set of draws;
    the paired table reports thresholded - raw for every (method, measure) and each DAUNCE row
    against each baseline, with CIs; the README block shows them raw first."""
    import contextlib
    import csv
    import subprocess
    import sys

    from daunce_core import store
    from daunce_core.config import ExperimentConfig
    from daunce_core.steps import vision as pipeline

    A, B, gt = _raw_vs_thresholded_fixture()
    n, m = A.shape
    store.write_ground_truth(tmp_path / "test.h5", masks=gt["masks"], outputs=gt["outputs"],
                             train_ids=np.arange(n), query_ids=np.arange(m), attrs={"split": "test"})
    cfg = ExperimentConfig.from_dict({"lds": {"threshold": {"kind": "hard", "quantile": 0.9}, "bootstrap": 200}})
    evals = []
    for method, measure, S in (("daunce", "correlation", A), ("daunce", "covariance", B), ("trak", "score", B),
                               ("exact_if", "score", A)):
        store.write_scores(tmp_path / f"{method}_{measure}.h5", scores=S.astype(np.float32),
                           train_ids=np.arange(n), query_ids=np.arange(m), attrs={"method": method})
        evals.append(tmp_path / f"{method}_{measure}.json")
        with pytest.warns(RuntimeWarning) if S is A else contextlib.nullcontext():
            pipeline.evaluate_scores(cfg, tmp_path / f"{method}_{measure}.h5", tmp_path / "test.h5", method,
                                     measure, evals[-1])
    rows = L.lds_table(evals, tmp_path / "lds.csv")
    assert [(r["method"], r["measure"], r["threshold"]) for r in rows][:2] == \
        [("daunce", "correlation", "none"), ("daunce", "correlation", "hard(q=0.9)")]
    paired = L.paired_table(evals, tmp_path / "lds_paired.csv", ["daunce"])
    deltas = {(p["method"], p["measure"]): p for p in paired if p["kind"] == "threshold"}
    assert set(deltas) == {("daunce", "correlation"), ("daunce", "covariance"), ("trak", "score"),
                           ("exact_if", "score")}
    lds = {(r["method"], r["measure"], r["threshold"]): r["lds"] for r in rows}
    for (method, measure), p in deltas.items():
        assert p["diff"] == pytest.approx(lds[(method, measure, "hard(q=0.9)")] - lds[(method, measure, "none")])
        assert p["ci_low"] <= p["diff"] <= p["ci_high"]
    assert deltas[("daunce", "correlation")]["ci_high"] < 0  # A loses to thresholding, clearly
    versus = {(p["measure"], p["versus"], p["threshold"]) for p in paired if p["kind"] == "method"}
    assert versus == {(meas, o, th) for meas in ("correlation", "covariance") for o in ("trak", "exact_if")
                      for th in ("none", "hard(q=0.9)")}
    # the README block: raw first, the thresholded value and the change beside it, both DAUNCE measures
    results = tmp_path / "results"
    results.mkdir()
    for f in ("lds.csv", "lds_paired.csv"):
        (results / f).write_text((tmp_path / f).read_text())
    readme = tmp_path / "README.md"
    readme.write_text("<!-- results:begin -->\n<!-- results:end -->\n")
    subprocess.run([sys.executable, str(ROOT / "scripts" / "readme_results.py"), "--results", str(results),
                    "--readme", str(readme)], check=True)
    text = readme.read_text()
    with open(tmp_path / "lds.csv") as fh:
        table = list(csv.DictReader(fh))
    raw_a = next(r for r in table if r["method"] == "daunce" and r["measure"] == "correlation"
                 and r["threshold"] == "none")
    line = next(x for x in text.splitlines() if x.startswith("| DAUNCE | correlation |"))
    d = deltas[("daunce", "correlation")]
    assert line.startswith(f"| DAUNCE | correlation | {float(raw_a['lds']):.3f} |")
    assert f"{d['diff']:+.3f} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}]" in line
    assert "| DAUNCE | covariance |" in text and "− TRAK" in text
