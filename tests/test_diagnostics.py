"""Monte Carlo standard errors and split-K reliability of scores (daunce_core/diagnostics.py)."""
import json

import h5py
import numpy as np
import pytest

from daunce_core import diagnostics as D
from daunce_core import store
from daunce_core.cli import main
from daunce_core.scoring import pairwise_scores


def ensemble(rng, K, n=6, m=4, d=3, noise=1.0, seed_w=1):
    """Losses of K models sharing a skewed latent z_k: train = z W + noise, query = z V + noise,
    so the true covariance of (i, j) is W_i . V_j (fixed by ``seed_w``) and the data are not
    Gaussian (exponential latents)."""
    w = np.random.default_rng(seed_w)
    W, V = w.normal(size=(d, n)), w.normal(size=(d, m))
    z = rng.standard_exponential((K, d)) - 1.0
    return (z @ W + noise * rng.normal(size=(K, n)), z @ V + noise * rng.normal(size=(K, m)))


@pytest.mark.parametrize("measure", ["correlation", "covariance"])
def test_se_matches_a_bootstrap_over_models(measure):
    a, b = ensemble(np.random.default_rng(0), K=60)
    se = D.score_se(a, b, measure)
    rng = np.random.default_rng(5)
    boot = []
    for _ in range(1500):
        i = rng.integers(0, 60, 60)
        boot.append(pairwise_scores(a[i], b[i], measure))
    ratio = se / np.std(boot, axis=0, ddof=1)
    assert 0.93 < np.median(ratio) < 1.07
    assert ratio.min() > 0.85 and ratio.max() < 1.15


@pytest.mark.parametrize("measure", ["correlation", "covariance"])
def test_se_matches_the_spread_over_independent_ensembles(measure):
    rng = np.random.default_rng(2)
    scores, ses = [], []
    for _ in range(600):
        a, b = ensemble(rng, K=50)
        scores.append(pairwise_scores(a, b, measure))
        ses.append(D.score_se(a, b, measure))
    ratio = np.mean(ses, axis=0) / np.std(scores, axis=0, ddof=1)
    assert 0.9 < np.median(ratio) < 1.1
    assert ratio.min() > 0.8 and ratio.max() < 1.2


def test_se_of_a_constant_example_is_zero():
    a, b = ensemble(np.random.default_rng(0), K=20)
    a[:, 2] = 1.5
    assert (D.score_se(a, b)[2] == 0).all() and (D.score_se(a, b)[[0, 1]] > 0).all()


def test_spearman_brown_arithmetic():
    assert D.spearman_brown(0.5, 2) == pytest.approx(2 / 3)
    assert D.spearman_brown(0.3, 1) == pytest.approx(0.3)
    assert D.models_needed(0.5, 50, 2 / 3) == pytest.approx(100)
    for rho in (0.1, 0.4, 0.8):  # inverting the prediction gives back c * h models
        for c in (0.5, 2.0, 7.0):
            assert D.models_needed(rho, 30, float(D.spearman_brown(rho, c))) == pytest.approx(c * 30)
    np.testing.assert_allclose(D.models_needed(np.array([0.5, 0.0]), 50, 2 / 3), [100, np.inf])
    assert D.models_needed(0.0, 50) == np.inf and D.models_needed(-0.2, 50) == np.inf
    with pytest.raises(ValueError, match="target reliability"):
        D.models_needed(0.5, 50, 1.0)


def test_reliability_is_one_for_duplicated_noise_free_halves():
    a, b = ensemble(np.random.default_rng(0), K=20, n=50, m=5)
    a, b = np.concatenate([a, a]), np.concatenate([b, b])  # the two halves are the same models
    d = D.diagnose(a, b)
    np.testing.assert_allclose(d.half_reliability, 1.0, atol=1e-12)
    np.testing.assert_allclose(d.reliability, 1.0, atol=1e-12)
    assert d.K_needed == 1.0


def test_reliability_is_near_zero_for_independent_noise():
    rng = np.random.default_rng(3)
    n = 4000
    d = D.diagnose(rng.normal(size=(40, n)), rng.normal(size=(40, 20)))
    assert abs(d.mean_half) < 0.02 and np.abs(d.half_reliability).max() < 5 / np.sqrt(n)
    assert d.share_significant < 0.1  # ~5% of pure-noise scores pass 2 SE


@pytest.mark.parametrize("measure", ["correlation", "covariance"])
def test_spearman_brown_predicts_the_agreement_of_two_independent_ensembles(measure):
    """R_K is the correlation between the scores of two independent ensembles of K models
    (averaged over 6 repetitions: one estimate has a spread of about 0.03 at K = 100)."""
    rng = np.random.default_rng(0)
    kw = dict(K=100, n=2000, m=8, d=20, noise=3.0)
    predicted, measured = [], []
    for _ in range(6):
        (a1, b1), (a2, b2) = ensemble(rng, **kw), ensemble(rng, **kw)
        s1, s2 = pairwise_scores(a1, b1, measure), pairwise_scores(a2, b2, measure)
        measured.append(np.mean([np.corrcoef(s1[:, j], s2[:, j])[0, 1] for j in range(8)]))
        predicted.append(D.diagnose(a1, b1, measure, splits=4).mean_reliability)
    assert 0.3 < np.mean(measured) < 0.9  # neither noise-free nor pure noise
    assert abs(np.mean(predicted) - np.mean(measured)) < 0.04


def test_streaming_equals_one_block_and_splits_are_halvings():
    a, b = ensemble(np.random.default_rng(0), K=21, n=300, m=7)
    got = []
    one = D.diagnose(a, b, splits=3, memory_gb=1.0, se_sink=lambda lo, hi, s, e: got.append(e))
    small = D.diagnose(a, b, splits=3, memory_gb=1e-5)
    assert len(got) == 1 and one.half == 10 and one.splits == 3
    np.testing.assert_allclose(small.half_reliability, one.half_reliability, atol=1e-12)
    assert small.share_significant == one.share_significant
    np.testing.assert_allclose(got[0], D.score_se(a, b), rtol=1e-12)
    first = D.diagnose(a, b, splits=1)  # the prefix split: models [0, 10) against [10, 20)
    sa, sb = pairwise_scores(a[:10], b[:10]), pairwise_scores(a[10:20], b[10:20])
    np.testing.assert_allclose(first.half_reliability,
                               [np.corrcoef(sa[:, j], sb[:, j])[0, 1] for j in range(7)], atol=1e-5)


def test_too_few_models_are_refused_and_few_are_flagged():
    with pytest.raises(ValueError, match="K=4"):
        D.diagnose(np.zeros((3, 5)), np.zeros((3, 2)))
    a, b = ensemble(np.random.default_rng(0), K=40, n=30, m=3)
    assert "caution" in D.diagnose(a[:18], b[:18]).report()
    assert "caution" not in D.diagnose(a, b).report()


def losses_file(path, K=30, positional=False):
    a, b = ensemble(np.random.default_rng(0), K=K, n=40, m=5)
    store.write_losses(path, store.Losses(a.astype(np.float32), b.astype(np.float32), np.arange(K),
                                          np.arange(40) + 100, np.arange(5), {"variant": "daunce"}))


@pytest.mark.parametrize("extra", [[], ["--topk", "4"], ["--measure", "covariance", "--threshold",
                                                          "hard", "--lambda", "0.1"]])
def test_cli_reliability_adds_diagnostics_and_changes_nothing_else(tmp_path, capsys, extra):
    losses_file(tmp_path / "l.h5")
    assert main(["score", str(tmp_path / "l.h5"), "-o", str(tmp_path / "plain.h5"), *extra]) == 0
    plain_out = capsys.readouterr().out
    assert main(["score", str(tmp_path / "l.h5"), "-o", str(tmp_path / "diag.h5"), *extra,
                 "--reliability"]) == 0
    out = capsys.readouterr().out
    assert "split-half reliability" in out and "Monte Carlo SE" in out and "K for reliability" in out
    assert "split-half" not in plain_out
    with h5py.File(tmp_path / "plain.h5") as p, h5py.File(tmp_path / "diag.h5") as d:
        assert set(d) == set(p) | {"diagnostics"} and "diagnostics" not in p
        for key in p:
            np.testing.assert_array_equal(d[key][()], p[key][()])
        assert {k: v for k, v in d.attrs.items() if k != "diagnostics"} == dict(p.attrs)
        summary = json.loads(d.attrs["diagnostics"])
        L = store.read_losses(tmp_path / "l.h5")
        measure = "covariance" if "covariance" in extra else "correlation"
        se = D.score_se(L.train, L.query, measure)
        if "--topk" in extra:
            idx = p["indices"][()]
            np.testing.assert_allclose(d["diagnostics/se"][()],
                                       se[idx, np.arange(5)[:, None]], rtol=1e-5)
        else:
            np.testing.assert_allclose(d["diagnostics/se"][()], se, rtol=1e-5)
        ref = D.diagnose(L.train, L.query, measure)
        np.testing.assert_allclose(d["diagnostics/reliability"][()], ref.reliability)
        assert summary["K"] == 30 and summary["measure"] == measure
        assert summary["reliability"] == pytest.approx(ref.mean_reliability)
        assert summary["se_median"] == pytest.approx(np.median(se))
    assert main(["info", str(tmp_path / "diag.h5")]) == 0
    assert "diagnostics/se" in capsys.readouterr().out


def test_cli_reliability_failure_leaves_no_output(tmp_path, capsys):
    losses_file(tmp_path / "l.h5", K=3)  # enough to score, too few to halve
    assert main(["score", str(tmp_path / "l.h5"), "-o", str(tmp_path / "s.h5"), "--reliability"]) == 1
    err = capsys.readouterr().err
    assert "K=4" in err and len(err.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == [tmp_path / "l.h5"]
