"""LDS on constructed cases with known answers."""
import numpy as np
import pytest

from daunce_core import lds as L
from daunce_core.perturb import lds_masks


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


# --- selection kept apart from test (issue 12, item 7) ---------------------------------------

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
