"""DAUNCE-T with TRAK's Q (docs/daunce_t_factor.md): the ``daunce_t_q`` form.

theta_0's label probabilities travel from the fitter through the losses file (``p0_train``), and
the form's scores are ``(1 - p_i) * s_ij``: the factor on the training side, after normalising.
"""
import numpy as np
import pytest

from daunce_core import store
from daunce_core.config import fit_variant, q_weighted
from daunce_core.fit import chunks
from daunce_core.fit.contract import Signals
from daunce_core.scoring import pairwise_scores
from daunce_core.steps import vision as P


def signals(ks, n=30, m=6, seed=0):
    rng = np.random.default_rng(seed)
    return Signals(train=rng.normal(size=(len(ks), n)), query=rng.normal(size=(len(ks), m)),
                   model_index=np.asarray(ks), train_ids=np.arange(n) + 10, query_ids=np.arange(m) + 90,
                   signal="margin", attrs={"variant": "daunce_t", "signal": "margin", "seed": 0},
                   p0_train=rng.uniform(0.5, 1.0, n), p0_query=rng.uniform(0.5, 1.0, m))


def test_p0_is_stored_with_the_losses_and_survives_gathering(tmp_path):
    a, b = signals([0, 1, 2], seed=1), signals([3, 4], seed=2)
    b.p0_train, b.p0_query = a.p0_train, a.p0_query  # theta_0's: the same in every chunk
    a.p0_train[0] = 1.0 - 1e-12  # a well-fitted example: 1 - p must not round to 0 (float64)
    for name, s in (("c0", a), ("c1", b)):
        chunks.write_signals(tmp_path / f"{name}.h5", s)
    got = chunks.gather([tmp_path / "c0.h5", tmp_path / "c1.h5"], tmp_path / "all.h5")
    back = store.read_losses(tmp_path / "all.h5")
    assert got.K == 5 and np.array_equal(back.p0_train, a.p0_train) and np.array_equal(back.p0_query, a.p0_query)
    assert P.q_train(back)[0] == pytest.approx(1e-12, rel=1e-3)


def test_the_form_is_q_times_the_score_after_normalising():
    s = signals(list(range(40)), n=25, m=5, seed=3)
    L = store.Losses(s.train, s.query, s.model_index, s.train_ids, s.query_ids, {}, p0_train=s.p0_train)
    q = 1.0 - s.p0_train
    for measure in ("correlation", "covariance"):
        plain = P.scores_from_losses(L, measure)
        form = P.scores_from_losses(L, measure, "daunce_t_q")
        assert np.allclose(form, q[:, None] * plain, rtol=1e-5, atol=1e-7)
    # applied to the signals *before* correlation, the factor cancels: nothing would change
    before = pairwise_scores(q[None, :] * s.train, s.query, "correlation")
    assert np.allclose(before, P.scores_from_losses(L, "correlation"), atol=1e-5)
    assert not np.allclose(before, P.scores_from_losses(L, "correlation", "daunce_t_q"), atol=1e-3)
    assert fit_variant("daunce_t_q") == "daunce_t" and q_weighted("daunce_t_q") and not q_weighted("daunce_t")


def test_score_step_writes_the_q_form_and_refuses_files_without_p0(tmp_path):
    s = signals(list(range(12)), seed=4)
    chunks.write_signals(tmp_path / "l.h5", s)
    P.score_variant("daunce_t_q", tmp_path / "l.h5", tmp_path / "q.h5", "covariance")
    P.score_variant("daunce_t", tmp_path / "l.h5", tmp_path / "p.h5", "covariance")
    q_scores, meta = store.dense_scores(tmp_path / "q.h5")
    plain, _ = store.dense_scores(tmp_path / "p.h5")
    assert meta["attrs"]["q_weight"] == "train" and meta["attrs"]["method"] == "daunce_t_q"
    assert np.allclose(q_scores, (1.0 - s.p0_train)[:, None] * plain, rtol=1e-5, atol=1e-7)
    s.p0_train = s.p0_query = None
    chunks.write_signals(tmp_path / "old.h5", s)
    with pytest.raises(store.StoreError, match="p0_train"):
        P.score_variant("daunce_t_q", tmp_path / "old.h5", tmp_path / "x.h5", "covariance")
