"""Tests of the scoring engine against a plain numpy float64 reference (paper eq. 6)."""
from __future__ import annotations

import os
import tracemalloc
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daunce_core import scoring, store
from daunce_core.scoring import pairwise_scores, quantile_lambda, score_file, threshold_scores, topk_scores

# --- references ------------------------------------------------------------------------------

def ref_scores(train, query, measure="correlation"):
    """Covariance (1/(K-1)) or Pearson correlation across K, float64; zero variance -> 0."""
    x = np.asarray(train, np.float64)
    y = np.asarray(query, np.float64)
    xc, yc = x - x.mean(0), y - y.mean(0)
    cov = xc.T @ yc / (x.shape[0] - 1)
    if measure == "covariance":
        return cov
    sx, sy = np.sqrt((xc**2).sum(0)), np.sqrt((yc**2).sum(0))
    with np.errstate(divide="ignore", invalid="ignore"):
        corr = (xc.T @ yc) / np.outer(sx, sy)
    corr[(sx == 0)[:, None] | (sy == 0)[None, :]] = 0.0
    return corr


def ref_threshold(s, kind, lam):
    lam = np.broadcast_to(np.asarray(lam, np.float64), (s.shape[1],))[None, :]
    if kind == "soft":
        return np.sign(s) * np.maximum(np.abs(s) - lam, 0.0)
    if kind == "hard":
        return s * (np.abs(s) > lam)
    return s


def losses(rng, K, n, m, offset=0.0, dtype=np.float32):
    """Correlated losses: a shared per-model factor so scores are not all near zero."""
    shared = rng.standard_normal((K, 1))
    train = offset + 0.7 * shared * rng.standard_normal(n) + rng.standard_normal((K, n))
    query = offset + 0.7 * shared * rng.standard_normal(m) + rng.standard_normal((K, m))
    return train.astype(dtype), query.astype(dtype)


def assert_topk(idx, val, R, k, tol):
    """``idx``/``val`` [m, k] are the top-k of each column of ``R`` [n, m], near-ties aside."""
    n, m = R.shape
    assert idx.shape == val.shape == (m, k)
    assert idx.dtype == np.int64 and val.dtype == np.float32
    for j in range(m):
        col = R[:, j]
        ref_vals = -np.sort(-col)[:k]
        np.testing.assert_allclose(val[j], ref_vals, atol=tol, rtol=0)
        np.testing.assert_allclose(col[idx[j]], val[j], atol=tol, rtol=0)
        assert np.all(np.diff(val[j]) <= 0), "values must be best first"
        assert len(set(idx[j].tolist())) == k and idx[j].min() >= 0 and idx[j].max() < n
        clearly_in = np.flatnonzero(col > ref_vals[-1] + tol)
        assert set(clearly_in.tolist()) <= set(idx[j].tolist())


@pytest.fixture
def small_blocks(monkeypatch):
    """Force many blocks (and a ragged last one) on small inputs."""
    monkeypatch.setattr(scoring, "DEFAULT_BLOCK", 64)
    monkeypatch.setattr(scoring, "_DENSE_TEMP_BYTES", 8 * 64 * 7)


# --- pairwise_scores -------------------------------------------------------------------------

SHAPES = [(2, 1, 1), (2, 130, 1), (3, 1, 4), (5, 1001, 7), (17, 333, 65)]


@pytest.mark.parametrize("measure", scoring.MEASURES)
@pytest.mark.parametrize("K,n,m", SHAPES)
def test_pairwise_matches_float64_reference(K, n, m, measure, small_blocks):
    rng = np.random.default_rng([K, n, m])
    train, query = losses(rng, K, n, m, offset=3.0)
    s = pairwise_scores(train, query, measure)
    assert s.shape == (n, m) and s.dtype == np.float32
    ref = ref_scores(train, query, measure)
    np.testing.assert_allclose(s, ref, rtol=1e-5, atol=1e-12 * np.abs(ref).max())


def test_pairwise_float64_input_and_large_offset():
    # Losses far from zero: centring must happen in float64, not after a float32 product.
    rng = np.random.default_rng(1)
    train, query = losses(rng, 8, 50, 3, dtype=np.float64)
    train, query = 1e4 + 1e-3 * train, 1e4 + 1e-3 * query
    ref = ref_scores(train, query)
    np.testing.assert_allclose(pairwise_scores(train, query), ref, rtol=1e-5, atol=1e-9)


def test_pairwise_correlation_is_bounded_and_self_is_one():
    rng = np.random.default_rng(2)
    train, _ = losses(rng, 6, 20, 1)
    s = pairwise_scores(train, train)
    np.testing.assert_allclose(np.diag(s), 1.0, rtol=1e-6)
    assert np.all(np.abs(s) <= 1.0 + 1e-6)


def test_covariance_sign_not_flipped():
    # Training loss and query loss that move together -> positive score (helps the query).
    base = np.array([[0.0], [1.0], [2.0], [3.0]])
    s = pairwise_scores(base, 2 * base + 1, "covariance")
    np.testing.assert_allclose(s, [[2 * np.var(base, ddof=1)]], rtol=1e-6)
    assert s[0, 0] > 0


@pytest.mark.parametrize("measure", scoring.MEASURES)
def test_zero_variance_gives_zero_and_one_warning(measure):
    rng = np.random.default_rng(3)
    train, query = losses(rng, 5, 30, 4)
    train[:, [2, 7, 11]] = 0.25
    query[:, 1] = -4.0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        s = pairwise_scores(train, query, measure)
    assert np.isfinite(s).all()
    assert np.all(s[[2, 7, 11]] == 0) and np.all(s[:, 1] == 0)
    msgs = [str(w.message) for w in caught if "zero variance" in str(w.message)]
    if measure == "correlation":
        assert len(msgs) == 1 and "3 training and 1 query" in msgs[0]
    else:
        assert msgs == []
    np.testing.assert_allclose(s, ref_scores(train, query, measure), atol=1e-6)


def test_nan_and_inf_name_the_first_positions():
    rng = np.random.default_rng(4)
    train, query = losses(rng, 4, 500, 2)
    train[1, 321] = np.nan
    train[3, 400] = np.inf
    with pytest.raises(store.StoreError, match=r"2 training example\(s\).*first ids: 321, 400"):
        pairwise_scores(train, query)
    train = np.nan_to_num(train, nan=0.0, posinf=0.0)
    query[0, 1] = -np.inf
    with pytest.raises(store.StoreError, match=r"query example\(s\).*first ids: 1"):
        topk_scores(train, query, 3)


def test_mismatched_k_and_too_few_models():
    with pytest.raises(ValueError, match="K=3 models but 'query' has K=4"):
        pairwise_scores(np.zeros((3, 5)), np.zeros((4, 2)))
    with pytest.raises(ValueError, match="at least K=2"):
        pairwise_scores(np.zeros((1, 5)), np.zeros((1, 2)), "covariance")
    with pytest.raises(ValueError, match="measure"):
        pairwise_scores(np.zeros((3, 5)), np.zeros((3, 2)), "spearman")


# --- thresholding ----------------------------------------------------------------------------

finite = st.floats(-10, 10, allow_nan=False, width=32)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 12), st.integers(1, 5), st.data())
def test_soft_and_hard_match_definitions(n, m, data):
    values = data.draw(st.lists(finite, min_size=n * m, max_size=n * m))
    s = np.array(values, np.float32).reshape(n, m)
    lam = data.draw(st.one_of(st.floats(0, 5), st.lists(st.floats(0, 5), min_size=m, max_size=m)))
    for kind in ("soft", "hard"):
        out = threshold_scores(s, kind, lam)
        assert out.shape == s.shape and out.dtype == s.dtype
        np.testing.assert_allclose(out, ref_threshold(s.astype(np.float64), kind, lam), atol=1e-6)
    soft = threshold_scores(s, "soft", lam)
    assert np.all(np.abs(soft) <= np.abs(s)) and np.all(soft * s >= 0)


def test_threshold_topk_keeps_k_largest_per_query():
    rng = np.random.default_rng(5)
    s = rng.standard_normal((50, 4))
    out = threshold_scores(s, "topk", k=7)
    for j in range(4):
        kept = np.flatnonzero(out[:, j])
        assert set(kept) == set(np.argsort(-s[:, j])[:7])
        np.testing.assert_array_equal(out[kept, j], s[kept, j])
    np.testing.assert_array_equal(threshold_scores(s, "topk", k=50), s)
    np.testing.assert_array_equal(threshold_scores(s, "none"), s)
    with pytest.raises(ValueError, match="k >= 1"):
        threshold_scores(s, "topk")
    with pytest.raises(ValueError, match="kind"):
        threshold_scores(s, "median")
    with pytest.raises(ValueError, match="non-negative"):
        threshold_scores(s, "soft", -1.0)
    with pytest.raises(ValueError, match="one value per query"):
        threshold_scores(s, "hard", np.ones(3))


def test_quantile_lambda_is_per_query_and_scale_free():
    rng = np.random.default_rng(6)
    s = rng.standard_normal((1000, 3)) * np.array([1e-4, 1.0, 1e3])
    lam = quantile_lambda(s, 0.9)
    np.testing.assert_allclose(lam, [np.quantile(np.abs(s[:, j]), 0.9) for j in range(3)])
    kept = (threshold_scores(s, "hard", lam) != 0).mean(0)
    np.testing.assert_allclose(kept, 0.1, atol=0.002)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        quantile_lambda(s, 1.5)


# --- top-k streaming -------------------------------------------------------------------------

@pytest.mark.parametrize("threshold,lam", [("none", 0.0), ("soft", 0.2), ("hard", 0.25),
                                           ("hard", "per-query")])
@pytest.mark.parametrize("K,n,m,k", [(2, 1000, 1, 10), (5, 203, 9, 64), (31, 130, 3, 1),
                                     (7, 5, 2, 9)])
def test_topk_matches_reference(K, n, m, k, threshold, lam, small_blocks):
    rng = np.random.default_rng([K, n, m, k])
    train, query = losses(rng, K, n, m, offset=1.0)
    if lam == "per-query":
        lam = np.linspace(0.0, 0.5, m)
    for measure in scoring.MEASURES:
        R = ref_threshold(ref_scores(train, query, measure), threshold, lam)
        idx, val = topk_scores(train, query, k, measure, threshold, lam)
        assert_topk(idx, val, R, min(k, n), tol=1e-5 * np.abs(R).max())


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(K=st.integers(2, 6), n=st.integers(1, 300), m=st.integers(1, 4), k=st.integers(1, 20),
       seed=st.integers(0, 2**16), kind=st.sampled_from(["none", "soft", "hard"]))
def test_topk_property(K, n, m, k, seed, kind, small_blocks):
    rng = np.random.default_rng(seed)
    train, query = losses(rng, K, n, m)
    lam = 0.3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # K=2 draws can have constant columns
        R = threshold_scores(ref_scores(train, query), kind, lam)
        idx, val = topk_scores(train, query, k, threshold=kind, lam=lam)
    assert_topk(idx, val, R, min(k, n), tol=1e-5)


def test_topk_memory_is_bounded_by_blocks_not_n_times_m():
    rng = np.random.default_rng(7)
    n, m, K = 100_000, 100, 8
    train = rng.standard_normal((K, n), dtype=np.float32)
    query = rng.standard_normal((K, m), dtype=np.float32)
    topk_scores(train[:, :10], query, 5)  # compile outside the measurement
    tracemalloc.start()
    try:
        idx, val = topk_scores(train, query, 5)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    dense = 4 * n * m  # 40 MB
    assert peak < dense / 5, f"peak {peak / 2**20:.1f} MiB is of the order of n x m"
    assert idx.shape == (m, 5)


def test_plan_blocks():
    a = scoring.plan_blocks(200, 10**6, 10_000, 1.0, k=100, threads=2)
    assert a == scoring.DEFAULT_BLOCK
    assert a == scoring.plan_blocks(200, 10**9, 10_000, 1.0, k=100, threads=2), "n must not matter"
    tight = scoring.plan_blocks(200, 10**6, 10_000, 0.27, k=100, threads=2)
    assert 64 <= tight < a
    # Dense output needs a full [b, m] tile per block: narrower blocks for the same budget.
    assert scoring.plan_blocks(200, 10**6, 10_000, 0.27, threads=2) < tight
    with pytest.raises(ValueError, match="too small.*at least"):
        scoring.plan_blocks(200, 10**6, 10**6, 0.5, k=100)


@pytest.mark.parametrize("threads,m", [(1, 300), (3, 1), (2, 40)])
def test_topk_worker_layouts(threads, m, small_blocks, monkeypatch):
    # Many queries: tasks split the queries; few: each worker takes a share of every block's
    # columns with its own top-k ("lanes"), merged at the end. Both must give the same answer.
    monkeypatch.setattr(scoring, "_QUERY_TILE", 16)
    rng = np.random.default_rng([threads, m])
    train, query = losses(rng, 4, 517, m)
    R = ref_scores(train, query)
    idx, val = topk_scores(train, query, 12, threads=threads)
    assert_topk(idx, val, R, 12, tol=1e-5)


# --- score_file ------------------------------------------------------------------------------

def write_losses_file(path, train, query, id_offset=1000):
    K = train.shape[0]
    store.write_losses(path, store.Losses(
        train, query, np.arange(K), np.arange(train.shape[1]) + id_offset,
        np.arange(query.shape[1]) + 7, {"variant": "daunce_e", "signal": "loss"}))


def test_score_file_dense_matches_reference(tmp_path, small_blocks):
    rng = np.random.default_rng(8)
    train, query = losses(rng, 6, 700, 5, offset=2.0)
    write_losses_file(tmp_path / "l.h5", train, query)
    out = score_file(tmp_path / "l.h5", tmp_path / "s.h5", measure="covariance")
    s = store.read_scores(out)
    assert s["format"] == "dense" and s["attrs"]["method"] == "daunce_e"
    assert s["attrs"]["measure"] == "covariance" and s["attrs"]["K"] == 6
    np.testing.assert_array_equal(s["train_ids"], np.arange(700) + 1000)
    ref = ref_scores(train, query, "covariance")
    np.testing.assert_allclose(s["scores"], ref, atol=1e-5 * np.abs(ref).max(), rtol=0)

    score_file(tmp_path / "l.h5", tmp_path / "h.h5", threshold="hard", lam=np.full(5, 0.2))
    h = store.read_scores(tmp_path / "h.h5")
    R = ref_threshold(ref_scores(train, query), "hard", 0.2)
    near = np.abs(np.abs(ref_scores(train, query)) - 0.2) < 1e-5  # borderline: either is right
    np.testing.assert_allclose(h["scores"][~near], R[~near], atol=1e-5, rtol=0)
    assert h["attrs"]["threshold"] == "hard" and h["attrs"]["lambda"] == [0.2] * 5


def test_score_file_refuses_dense_beyond_budget_and_gives_topk_when_asked(tmp_path, monkeypatch,
                                                                          small_blocks):
    monkeypatch.setattr(scoring, "_RUNTIME_BYTES", 0)
    rng = np.random.default_rng(9)
    train, query = losses(rng, 4, 3000, 20)
    write_losses_file(tmp_path / "l.h5", train, query)
    with pytest.raises(ValueError, match=r"need .* GiB but memory_gb.* 0.0001 GiB.*--topk N.*"
                                         r"raise memory_gb"):
        score_file(tmp_path / "l.h5", tmp_path / "s.h5", threshold="soft", lam=0.1, memory_gb=1e-4)
    assert not (tmp_path / "s.h5").exists(), "no silent switch to top-k"
    score_file(tmp_path / "l.h5", tmp_path / "s.h5", threshold="soft", lam=0.1, memory_gb=1e-4,
               topk=100)
    s = store.read_scores(tmp_path / "s.h5")
    assert s["format"] == "topk" and s["attrs"]["k"] == 100  # 3000 x 20 floats exceed 1e-4 GiB
    R = ref_threshold(ref_scores(train, query), "soft", 0.1)
    assert_topk(s["indices"], s["values"], R, 100, tol=1e-5)

    # threshold="topk" writes top-k; read back densely it is threshold_scores(..., "topk").
    score_file(tmp_path / "l.h5", tmp_path / "t.h5", threshold="topk", topk=5)
    dense, t = store.dense_scores(tmp_path / "t.h5")
    assert t["format"] == "topk" and t["values"].shape == (20, 5)
    ref_dense = threshold_scores(ref_scores(train, query), "topk", k=5)
    np.testing.assert_allclose(dense, ref_dense, atol=1e-5)


@pytest.mark.parametrize("topk", [None, 4])
def test_score_file_nan_names_ids_and_writes_nothing(tmp_path, small_blocks, topk):
    rng = np.random.default_rng(10)
    train, query = losses(rng, 3, 500, 4)
    write_losses_file(tmp_path / "l.h5", train, query)
    with store.atomic_h5(tmp_path / "l.h5") as f:  # corrupt after the fact, past the first block
        f["train"] = np.where(np.isin(np.arange(500), [300, 450]), np.nan, train).astype(np.float32)
        f["query"] = query
        f["train_ids"] = np.arange(500) + 1000
        f["query_ids"] = np.arange(4)
        f["model_index"] = np.arange(3)
    with pytest.raises(store.StoreError, match=r"first ids: 1300\b"):
        score_file(tmp_path / "l.h5", tmp_path / "s.h5", topk=topk)
    assert sorted(os.listdir(tmp_path)) == ["l.h5"], "no output file, no temporary left behind"


def test_streaming_zero_variance(tmp_path, small_blocks):
    rng = np.random.default_rng(11)
    train, query = losses(rng, 5, 300, 3)
    train[:, [10, 200]] = 1.5
    query[:, 2] = 0.0
    with pytest.warns(RuntimeWarning, match="2 training and 1 query example"):
        idx, val = topk_scores(train, query, 4)
    assert np.isfinite(val).all() and np.all(val[2] == 0)
    assert_topk(idx, val, ref_scores(train, query), 4, tol=1e-5)
    write_losses_file(tmp_path / "l.h5", train, query)
    with pytest.warns(RuntimeWarning, match="2 training and 1 query example"):
        score_file(tmp_path / "l.h5", tmp_path / "s.h5")
    s = store.read_scores(tmp_path / "s.h5")
    assert s["attrs"]["zero_variance_train"] == 2 and s["attrs"]["zero_variance_query"] == 1
    assert s["attrs"]["lambda"] == 0.0 and np.isfinite(s["scores"]).all()
    assert np.all(s["scores"][[10, 200]] == 0) and np.all(s["scores"][:, 2] == 0)


def test_score_file_mismatched_k(tmp_path):
    with store.atomic_h5(tmp_path / "l.h5") as f:
        f["train"] = np.ones((5, 10), np.float32)
        f["query"] = np.ones((4, 2), np.float32)
        f["train_ids"] = np.arange(10)
        f["query_ids"] = np.arange(2)
        f["model_index"] = np.arange(5)
    with pytest.raises(store.StoreError, match="K=5 models but 'query' has K=4"):
        score_file(tmp_path / "l.h5", tmp_path / "s.h5")
    assert not (tmp_path / "s.h5").exists()
    with pytest.raises(store.StoreError, match="no such file"):
        score_file(tmp_path / "missing.h5", tmp_path / "s.h5")


# --- bad values and arguments -------------------------------------------------------------

def test_covariance_that_would_overflow_float32_is_refused_not_written_as_inf(tmp_path):
    rng = np.random.default_rng(12)
    train, query = losses(rng, 4, 300, 3)
    train, query = train * np.float32(1e20), query * np.float32(1e20)  # scores ~1e40
    with pytest.raises(ValueError, match="beyond float32.*--measure correlation"):
        pairwise_scores(train, query, "covariance")
    with pytest.raises(ValueError, match="beyond float32"):
        topk_scores(train, query, 3, "covariance")
    write_losses_file(tmp_path / "l.h5", train, query)
    for topk in (None, 3):
        with pytest.raises(ValueError, match=r"l\.h5: covariance scores could reach"):
            score_file(tmp_path / "l.h5", tmp_path / "s.h5", measure="covariance", topk=topk)
    assert sorted(os.listdir(tmp_path)) == ["l.h5"]
    # The correlation of the same finite losses is well defined.
    np.testing.assert_allclose(pairwise_scores(train, query), ref_scores(train, query), atol=1e-5)


@pytest.mark.parametrize("topk", [None, 5])
def test_score_file_reads_float64_files_in_float64_and_float16_as_float32(tmp_path, topk):
    rng = np.random.default_rng(13)
    train, query = losses(rng, 5, 400, 3, dtype=np.float64)
    with store.atomic_h5(tmp_path / "l.h5") as f:
        f["train"] = train * 1e100  # beyond float32: read as float32 these would be inf
        f["query"] = query
        f["model_index"] = np.arange(5)
    score_file(tmp_path / "l.h5", tmp_path / "s.h5", topk=topk)
    dense, meta = store.dense_scores(tmp_path / "s.h5")
    R = ref_scores(train, query)
    if topk:
        assert_topk(meta["indices"], meta["values"], R, topk, tol=1e-5)
    else:
        np.testing.assert_allclose(dense, R, atol=1e-5)
    assert meta["attrs"]["ids"] == "positional"
    with store.atomic_h5(tmp_path / "h.h5") as f:
        f["train"] = train.astype(np.float16)
        f["query"] = query.astype(np.float16)
        f["model_index"] = np.arange(5)
    score_file(tmp_path / "h.h5", tmp_path / "s16.h5", topk=topk)
    half = ref_scores(train.astype(np.float16), query.astype(np.float16))
    dense16, meta16 = store.dense_scores(tmp_path / "s16.h5")
    if topk:
        assert_topk(meta16["indices"], meta16["values"], half, topk, tol=1e-5)
    else:
        np.testing.assert_allclose(dense16, half, atol=1e-5)


@pytest.mark.parametrize("memory_gb", [float("nan"), float("inf"), 0.0, -1.0, "4"])
def test_memory_budget_must_be_a_positive_finite_number(tmp_path, memory_gb):
    rng = np.random.default_rng(14)
    train, query = losses(rng, 3, 20, 2)
    if memory_gb == "4":  # a numeric string is a number
        assert scoring.plan_blocks(3, 20, 2, memory_gb) >= 1
        return
    with pytest.raises(ValueError, match="memory_gb.*finite number of GiB above 0"):
        topk_scores(train, query, 2, memory_gb=memory_gb)
    write_losses_file(tmp_path / "l.h5", train, query)
    with pytest.raises(ValueError, match="memory_gb"):
        score_file(tmp_path / "l.h5", tmp_path / "s.h5", memory_gb=memory_gb)
    assert not (tmp_path / "s.h5").exists()


def test_score_file_refuses_to_overwrite_its_input(tmp_path):
    rng = np.random.default_rng(15)
    write_losses_file(tmp_path / "l.h5", *losses(rng, 3, 20, 2))
    before = (tmp_path / "l.h5").read_bytes()
    with pytest.raises(store.StoreError, match="is the input file"):
        score_file(tmp_path / "l.h5", tmp_path / "l.h5")
    assert (tmp_path / "l.h5").read_bytes() == before


def test_non_numeric_losses_are_refused():
    with pytest.raises(ValueError, match="train holds strings"):
        pairwise_scores(np.array([["1", "2"], ["3", "4"]]), np.zeros((2, 1)))
    with pytest.raises(ValueError, match="query holds complex numbers"):
        pairwise_scores(np.zeros((2, 2)), np.zeros((2, 1), complex))
