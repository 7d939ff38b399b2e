"""daunce_core.removal: query selection, ranking by summed scores, the removal loop, table, figure."""
import json

import numpy as np
import pytest

from daunce_core import removal, store


def test_select_queries_needs_every_seed():
    correct = np.array([[1, 1, 0, 1], [1, 0, 0, 1], [1, 1, 1, 1]], bool)
    np.testing.assert_array_equal(removal.select_queries(correct), [0, 3])
    with pytest.raises(ValueError):
        removal.select_queries(np.ones(3, bool))


def test_split_queries_is_disjoint_and_seeded():
    sel = np.arange(0, 40, 2)
    a, b = removal.split_queries(sel, 0.3, seed=0)
    assert len(a) == 6 and len(b) == 14 and not set(a) & set(b) and set(a) | set(b) == set(sel)
    a2, _ = removal.split_queries(sel, 0.3, seed=0)
    np.testing.assert_array_equal(a, a2)
    none, everything = removal.split_queries(sel, 0.0, seed=0)
    assert len(none) == 0 and len(everything) == 20


def test_ranking_sums_over_the_given_queries_only_with_stable_ties():
    scores = np.array([[1.0, -5.0, 0.0], [0.5, 9.0, 0.0], [2.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    np.testing.assert_array_equal(removal.ranking_from_scores(scores, [0]), [2, 0, 3, 1])
    np.testing.assert_array_equal(removal.ranking_from_scores(scores, [0, 1]), [1, 2, 3, 0])
    with pytest.raises(ValueError, match="no queries"):
        removal.ranking_from_scores(scores, [])
    bad = scores.copy()
    bad[0, 0] = np.nan
    with pytest.raises(store.StoreError):
        removal.ranking_from_scores(bad, [0])


def test_ranking_from_file_selects_queries_by_id(tmp_path):
    S = np.array([[0.0, 3.0], [1.0, 0.0], [2.0, -1.0]], np.float32)
    store.write_scores(tmp_path / "s.h5", train_ids=np.arange(3), query_ids=np.array([10, 20]), scores=S,
                       attrs={"method": "x"})
    np.testing.assert_array_equal(removal.ranking_from_file(tmp_path / "s.h5", [20]), [0, 1, 2])
    np.testing.assert_array_equal(removal.ranking_from_file(tmp_path / "s.h5", [10]), [2, 1, 0])
    with pytest.raises(store.StoreError, match="not in the scores file"):
        removal.ranking_from_file(tmp_path / "s.h5", [30])


def test_removal_effect_removes_the_top_and_averages_seeds():
    calls = []

    def retrain(keep, seed):
        calls.append((keep.copy(), seed))
        # a query stays correct only while its supporting example 0 is kept; the second not at seed 1
        return np.array([0 in keep, seed != 1])

    res = removal.removal_effect(np.array([0, 3, 1, 2]), 2, [0, 1, 2], retrain)
    assert res["removed"] == [0, 3]
    for keep, _ in calls:
        np.testing.assert_array_equal(keep, [1, 2])
    assert res["wrong"] == [0.5, 1.0, 0.5]
    assert res["mean"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        removal.removal_effect(np.arange(4), 4, [0], retrain)


def test_random_ranking_is_a_seeded_permutation():
    r = removal.random_ranking(50, 3)
    assert sorted(r) == list(range(50))
    np.testing.assert_array_equal(r, removal.random_ranking(50, 3))
    assert not np.array_equal(r, removal.random_ranking(50, 4))


def test_results_table_and_figure(tmp_path):
    paths = []
    for m, effect in (("daunce", 0.3), ("random", 0.1)):
        for N in (5, 10):
            p = tmp_path / f"{m}{N}.json"
            removal.write_result(p, {"N": N, "removed": [], "wrong": [effect * N / 10] * 3,
                                     "mean": effect * N / 10, "std": 0.0}, method=m, queries=7, n_train=40)
            paths.append(p)
    p = tmp_path / "none0.json"  # the measured full-data retrain gives every method its N = 0 row
    removal.write_result(p, {"N": 0, "removed": [], "wrong": [0.0, 0.1, 0.0], "mean": 0.1 / 3, "std": 0.0},
                         method=removal.NOISE_METHOD, queries=7, n_train=40)
    rows = removal.summarise(removal.read_results([*paths, p]))
    assert [(r["method"], r["N"]) for r in rows if r["kind"] == "wrong"] == [
        ("daunce", 0), ("daunce", 5), ("daunce", 10), ("random", 0), ("random", 5), ("random", 10)]
    assert [r["mean"] for r in rows if r["N"] == 0] == pytest.approx([0.1 / 3] * 2)
    removal.write_table(rows, tmp_path / "t.csv")
    assert (tmp_path / "t.csv").read_text().splitlines()[0].startswith("method,N,mean,std,seeds,queries")
    back = removal.read_table(tmp_path / "t.csv")
    assert [(r["method"], r["N"]) for r in back] == [(r["method"], r["N"]) for r in rows]
    removal.plot_removal(rows, tmp_path / "f.pdf", title="t", n_train=40, n_queries=7)
    assert (tmp_path / "f.pdf").read_bytes()[:4] == b"%PDF"
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(store.StoreError, match="rerun"):
        removal.read_results([tmp_path / "bad.json"])
    assert json.loads(paths[0].read_text())["method"] == "daunce"


def test_removal_seeds_pair_methods_and_random_ranks_afresh_per_seed():
    seen = {}

    def retrain(keep, seed):
        seen.setdefault(seed, []).append(keep.copy())
        return np.array([0 in keep, 1 in keep])

    rand = removal.removal_effect(lambda s: removal.random_ranking(20, (0, s)), 5, [3, 4, 5], retrain)
    assert rand["seeds"] == [3, 4, 5] and len(rand["removed"]) == 3
    assert len({tuple(r) for r in rand["removed"]}) == 3  # a fresh random ranking per seed
    full = removal.removal_effect(np.arange(20), 0, [3, 4, 5], retrain)
    assert full["removed"] == [] and full["wrong"] == [0.0, 0.0, 0.0]
    for keep in (k for ks in seen.values() for k in ks[1:]):
        assert len(keep) == 20


def test_paired_differences_use_common_seeds_and_t_intervals():
    from scipy import stats

    a = {"method": "daunce", "N": 8, "seeds": [0, 1, 2, 3], "wrong": [0.5, 0.6, 0.4, 0.7]}
    b = {"method": "random", "N": 8, "seeds": [1, 2, 3, 0], "wrong": [0.1, 0.2, 0.3, 0.0]}
    rows = removal.summarise([a, b])
    d = [r for r in rows if r["kind"] == "difference"]
    assert [(r["method"], r["N"], r["seeds"]) for r in d] == [("daunce - random", 8, 4)]
    diffs = np.array([0.5 - 0.0, 0.6 - 0.1, 0.4 - 0.2, 0.7 - 0.3])
    lo, hi = stats.t.interval(0.95, 3, loc=diffs.mean(), scale=stats.sem(diffs))
    assert d[0]["mean"] == pytest.approx(diffs.mean())
    assert (d[0]["ci_low"], d[0]["ci_high"]) == pytest.approx((lo, hi))
    assert not any(r["N"] == 0 for r in rows)  # no measured full-data retrain, no N = 0 row
    assert np.isnan(removal.t_interval([0.3])[1])


def test_cap_queries_is_a_seeded_subset():
    q = np.arange(100, 150)
    c = removal.cap_queries(q, 20, seed=0)
    assert len(c) == 20 and set(c) <= set(q) and list(c) == sorted(c)
    np.testing.assert_array_equal(c, removal.cap_queries(q, 20, seed=0))
    assert not np.array_equal(c, removal.cap_queries(q, 20, seed=1))
    np.testing.assert_array_equal(removal.cap_queries(q, 0, seed=0), q)
    np.testing.assert_array_equal(removal.cap_queries(q, 500, seed=0), q)
    with pytest.raises(ValueError, match="cap"):
        removal.cap_queries(q, -1, seed=0)
