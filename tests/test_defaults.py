"""The defaults of the library calls: one declaration, the label-free learning rate, the warnings.

The values themselves come from benchmarks/defaults_study.py (docs/defaults.md); these tests check
that every call reads the one declaration, that the lr rule rejects diverging learning rates and
lands on a useful one, and that a user is told about fits too short, diverged or flat.
"""
import inspect
import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from daunce_core import api, store
from daunce_core.attribute import daunce_scores, perturbed_losses
from daunce_core.config import DEFAULTS, DaunceConfig, api_options

torch.set_num_threads(1)


def _defaults(fn) -> dict:
    return {k: p.default for k, p in inspect.signature(fn).parameters.items()
            if p.default is not inspect.Parameter.empty}


def test_every_call_reads_the_one_declaration():
    fit = _defaults(api.fit_losses)
    for name in ("K", "lr", "gamma", "seed", "chunk_size", "lr_grid", "lr_pilot_K", "lr_schedule", "first_order"):
        assert fit[name] == getattr(DEFAULTS, name), name
    # None: the variant's fit length (matched_epochs, else DEFAULTS.min_steps), DEFAULTS.batch_size, the
    # variant's ratio/rho/prox (DaunceConfig.for_variant), estimator options (config.api_options) and
    # measure (MEASURES; DEFAULTS.measure for DEFAULTS.variant)
    for name in ("variant", "epochs", "batch_size", "ratio", "rho", "prox", "measure", "antithetic",
                 "common_batches"):
        assert fit[name] is None, name
    # the variant: DEFAULTS.variant for a classifier on tensors, DEFAULTS.task_variant otherwise
    assert api.default_variant(None, (X, Y)) == DEFAULTS.variant
    assert api.default_variant(api.ClassificationTask(), (X, Y)) == DEFAULTS.variant
    assert api.default_variant(api.Task(), (X, Y)) == DEFAULTS.task_variant
    assert _defaults(api.scores)["measure"] is None and _defaults(daunce_scores)["measure"] is None
    assert api.default_measure(DEFAULTS.variant) == DEFAULTS.measure
    assert DaunceConfig().for_variant(DEFAULTS.variant).ratio == DEFAULTS.ratio or DEFAULTS.variant == "daunce_m"
    # daunce_scores / perturbed_losses add nothing of their own: every option is fit_losses'
    assert set(_defaults(daunce_scores)) == {"measure"} and not _defaults(perturbed_losses)
    # the shared values are DaunceConfig's (daunce fit and the workflow read those)
    d = DaunceConfig()
    for name in ("ratio", "batch_size", "rho", "gamma", "seed", "chunk_size", "antithetic", "common_batches",
                 "lr_schedule", "first_order"):
        assert getattr(DEFAULTS, name) == getattr(d, name), name
    assert DEFAULTS.lr_pilot_K == d.K  # the lr rule reads DaunceConfig's K models; the API then fits to its own K
    assert list(DEFAULTS.lr_grid) == d.lr_grid


def test_the_default_is_matched_noise_with_the_studys_settings():
    """docs/defaults.md: daunce_m, covariance, K = 200, scale 0.1, prox 0.01, 20 epochs of all
    examples, antithetic pairs and common batches, lr by the plateau rule; the other variants keep
    the paper's estimator options."""
    assert (DEFAULTS.variant, DEFAULTS.measure, DEFAULTS.K, DEFAULTS.lr_pilot_K, DEFAULTS.lr) == \
        ("daunce_m", "covariance", 500, 200, "auto")
    m = DaunceConfig().for_variant(DEFAULTS.variant)
    assert (m.rho, m.prox, m.epochs, m.ratio) == (0.1, 0.01, 20, 1.0)
    assert api_options("daunce_m") == {"antithetic": True, "common_batches": True}
    for v in ("daunce", "daunce_t", "daunce_t_q", "daunce_e"):
        assert api_options(v) == {"antithetic": False, "common_batches": False}, v
    # the call resolves them: a default fit records daunce_m's settings and its 20 epochs
    sig = api.fit_losses(mlp(), None, (X, Y), (X[:4], Y[:4]), K=4, lr=0.01, device="cpu")
    cfg = sig.attrs["config"]
    assert sig.attrs["form"] == "daunce_m" and sig.attrs["steps"] == 20 * (80 // 64)
    assert (cfg["antithetic"], cfg["common_batches"]) == (True, True)
    with pytest.raises(ValueError, match=r"even K .*got K=5 \(variant daunce_m's default; pass antithetic=False\)"):
        api.fit_losses(mlp(), None, (X, Y), (X[:4], Y[:4]), K=5, lr=0.01, device="cpu")


def test_the_default_fit_length_gives_min_steps():
    # the new user's problem: 398 examples, r = 0.3, batch 64 -> 1 step per epoch
    assert api._steps(398, 0.3, 64, 1) == 1
    e = api.fit_epochs(398, 0.3, 64, DEFAULTS.min_steps)
    assert api._steps(398, 0.3, 64, e) >= DEFAULTS.min_steps > api._steps(398, 0.3, 64, e - 1)


# --- a small classification problem the fits can move --------------------------------------------

_g = torch.Generator().manual_seed(0)
X = torch.randn(80, 5, generator=_g)
Y = (X[:, 0] + 0.5 * X[:, 1] > 0).long()


def mlp(seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 2))
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    for _ in range(100):
        opt.zero_grad()
        nn.functional.cross_entropy(net(X), Y).backward()
        opt.step()
    return net


@pytest.mark.parametrize("variant, steps, fix", [
    ("daunce", 1, r"epochs=50 gives 50 steps"),  # r = 0.3: 24 examples, one batch; min_steps' length
    (None, 5, r"epochs=20 gives 100 steps")])    # daunce_m, r = 1: its own 20 epochs
def test_too_few_steps_warn_with_the_count_and_the_fix(variant, steps, fix):
    kw = dict(variant=variant, K=4, lr=0.01, batch_size=16, device="cpu")
    with pytest.warns(RuntimeWarning, match=rf"only {steps} optimiser step\(s\) .*raise epochs \({fix}\)"):
        api.fit_losses(mlp(), None, (X, Y), (X[:4], Y[:4]), epochs=1, **kw)
    with warnings.catch_warnings(record=True) as seen:  # the default fit length does not warn about steps
        warnings.simplefilter("always")
        api.fit_losses(mlp(), None, (X, Y), (X[:4], Y[:4]), **kw)
    assert not [w for w in seen if "optimiser step" in str(w.message)]


def test_a_diverging_lr_is_refused_not_scored():
    """lr = 1e6 gives finite but exploded signals: the scores are refused, the signals warned about."""
    with pytest.raises(FloatingPointError, match=r"no scores: the perturbed models diverged at lr=1e\+06"):
        daunce_scores(mlp(), (X, Y), (X[:4], Y[:4]), K=4, lr=1e6, device="cpu")
    with pytest.warns(RuntimeWarning, match="diverged at lr=1e\\+06"):  # the loss variant stays finite here
        sig = api.fit_losses(mlp(), None, (X, Y), (X[:4], Y[:4]), variant="daunce", K=4, lr=1e6, device="cpu")
    assert np.isfinite(sig.train).all()  # not caught by a non-finite check: by the growth of the signals
    st = api.lr_statistics(sig)
    assert st["diverged"] and ("signals reach" in st["why"] or "training loss grew" in st["why"])


def test_loss_growth_is_divergence_even_when_signals_stay_small():
    sig = api.fit_losses(mlp(), None, (X, Y), (X[:4], Y[:4]), K=4, lr=0.01, device="cpu")
    assert not api.lr_statistics(sig)["diverged"]
    p0 = sig.p0_train
    grown = sig.train + 20 * np.mean(-np.log(p0)) + 3.0  # every model's loss far above theta_0's
    bad = api.Signals(train=grown, query=sig.query, model_index=sig.model_index, train_ids=sig.train_ids,
                      query_ids=sig.query_ids, signal="loss", p0_train=p0)
    st = api.lr_statistics(bad)
    assert st["diverged"] and "training loss grew" in st["why"]


def test_zero_variance_is_warned_and_recorded(tmp_path):
    """Examples at x = 0 under a bias-free linear model never move: their share is in the
    console warning, the losses file's attributes and the scores file's."""
    torch.manual_seed(0)
    net = nn.Linear(5, 2, bias=False)
    Xz = X.clone()
    Xz[:20] = 0.0  # a quarter of the training set
    with pytest.warns(RuntimeWarning, match=r"25\.0% of the training examples and 0\.0% of the queries have zero"):
        path = api.scores(net, None, (Xz, Y), (X[40:44], Y[40:44]), K=6, lr=0.1, device="cpu",
                          out=tmp_path / "s.h5", losses_out=tmp_path / "l.h5")
    assert store.read_losses(tmp_path / "l.h5").attrs["zero_variance_train"] == pytest.approx(0.25)
    import h5py

    with h5py.File(path) as f:
        assert int(f.attrs["zero_variance_train"]) == 20


def test_plateau_rule_takes_the_largest_agreeing_lr_and_skips_diverged_ones():
    rng = np.random.default_rng(0)
    base = rng.standard_normal((40, 6))
    # scores the same up to scale and a little noise agree; unrelated scores do not
    assert api.agreement(base, 3.0 * base + 0.01 * rng.standard_normal(base.shape)) > 0.99
    assert abs(api.agreement(base, rng.standard_normal(base.shape))) < 0.3
    nan = float("nan")
    rows = [{"lr": 0.001, "diverged": False, "agreement": nan},   # the smallest: no neighbour below
            {"lr": 0.003, "diverged": False, "agreement": 0.95},
            {"lr": 0.01, "diverged": False, "agreement": 0.85},   # a dip does not stop the rule
            {"lr": 0.03, "diverged": False, "agreement": 0.92},   # the largest agreeing lr
            {"lr": 0.1, "diverged": False, "agreement": 0.60}]    # past the plateau: nonlinear fits
    assert api.pick_lr(rows) == 0.03
    assert api.pick_lr(rows[::-1]) == 0.03  # the grid's order does not matter
    # an lr that agrees but lies less than 10x below a diverged one is out; exactly 10x below is in
    cliff = [dict(r, agreement=0.95) if r["lr"] == 0.1 else r for r in rows] + \
        [{"lr": 0.3, "diverged": True, "agreement": nan}]
    assert api.pick_lr(cliff) == 0.03
    assert api.pick_lr(cliff[:-1] + [{"lr": 1.0, "diverged": True, "agreement": nan}]) == 0.1
    assert api.pick_lr(cliff[:-1]) == 0.1  # without the diverged lr: the largest agreeing one
    # a diverged lr's own agreement is never read
    assert api.pick_lr(rows + [{"lr": 1.0, "diverged": True, "agreement": 0.99}]) == 0.03
    # none agreeing: the smallest lr left; every lr diverged: None
    assert api.pick_lr([dict(r, agreement=0.5 if r["agreement"] == r["agreement"] else nan) for r in rows]) == 0.001
    assert api.pick_lr([dict(r, diverged=True) for r in rows]) is None


def test_auto_lr_rejects_diverging_lrs_and_scores_like_the_best_of_the_grid(tmp_path):
    """lr='auto' over a grid holding a diverging lr: it never picks it, records the table, and its
    scores make sense: for every query the training examples of its class help more than the others."""
    net = mlp()
    q = np.arange(0, 80, 8)
    grid = (1e6, 0.3, 0.1, 0.03, 0.01)
    sig = api.fit_losses(net, None, (X, Y), (X[q], Y[q]), K=40, lr="auto", lr_grid=grid, device="cpu")
    table = sig.attrs["lr_rule"]
    assert [r["lr"] for r in table] == list(grid) and table[0]["diverged"]
    assert sig.attrs["lr"] != 1e6 and sig.attrs["lr"] == api.pick_lr(table)
    # each lr's agreement is that of its scores with the next smaller lr's, the same seeds refitted
    from daunce_core.scoring import pairwise_scores as ps

    refit = {lr: api.fit_losses(net, None, (X, Y), (X[q], Y[q]), K=40, lr=lr, device="cpu") for lr in (0.01, 0.03)}
    want = api.agreement(*(ps(refit[lr].train, refit[lr].query, DEFAULTS.measure) for lr in (0.03, 0.01)))
    assert table[3]["agreement"] == pytest.approx(want, abs=1e-6) and math.isnan(table[4]["agreement"])
    # the scores file records the lr and the rule's table too
    import json

    import h5py

    path = api.scores(net, None, (X, Y), (X[q], Y[q]), K=40, lr="auto", lr_grid=grid[2:], device="cpu",
                      out=tmp_path / "s.h5")
    with h5py.File(path) as f:
        rule = json.loads(f.attrs["lr_rule"])
        assert [r["lr"] for r in rule] == list(grid[2:]) and f.attrs["lr"] == api.pick_lr(rule)
        assert rule[0]["agreement"] == pytest.approx(table[2]["agreement"], abs=1e-6)
    from daunce_core.scoring import pairwise_scores

    s = pairwise_scores(sig.train, sig.query, DEFAULTS.measure)
    same = (Y.numpy()[:, None] == Y.numpy()[q][None, :])  # [n, m]: training example of the query's class
    helps = (s * same).sum(0) / same.sum(0) > (s * ~same).sum(0) / (~same).sum(0)
    assert helps.all()  # same-class examples help each query more than the other class's
    with pytest.raises(FloatingPointError, match="diverged at every lr"):
        api.fit_losses(net, None, (X, Y), (X[q], Y[q]), K=4, lr="auto", lr_grid=(1e6, 1e7), device="cpu")


def test_auto_lr_extends_the_chosen_lr_to_K_with_the_models_an_explicit_lr_fits(tmp_path):
    """lr='auto' with a pilot: the rule reads lr_pilot_K models per lr, then the chosen lr is fitted
    to K. The K models are exactly those of a call with that lr given (same seeds, same pairs), the
    rule's table is the pilot's, and the scores file records the pilot size."""
    net = mlp()
    q = np.arange(0, 80, 8)
    grid = (0.3, 0.1, 0.03)
    kw = dict(variant="daunce_m", K=12, device="cpu", chunk_size=5)  # chunks that straddle the pilot's end
    sig = api.fit_losses(net, None, (X, Y), (X[q], Y[q]), lr="auto", lr_grid=grid, lr_pilot_K=6, **kw)
    pilot = api.fit_losses(net, None, (X, Y), (X[q], Y[q]), lr="auto", lr_grid=grid, lr_pilot_K=None, K=6,
                           **{k: v for k, v in kw.items() if k != "K"})
    lr = sig.attrs["lr"]
    assert lr == pilot.attrs["lr"] and sig.attrs["lr_pilot_K"] == 6 and sig.K == 12
    np.testing.assert_array_equal([r["agreement"] for r in sig.attrs["lr_rule"]],
                                  [r["agreement"] for r in pilot.attrs["lr_rule"]])
    direct = api.fit_losses(net, None, (X, Y), (X[q], Y[q]), lr=lr, **kw)
    np.testing.assert_array_equal(sig.model_index, np.arange(12))
    np.testing.assert_array_equal(sig.train, direct.train)
    np.testing.assert_array_equal(sig.query, direct.query)
    # the pilot's models are the first 6 of the K
    np.testing.assert_array_equal(sig.train[:6], pilot.train)
    import h5py

    path = api.scores(net, None, (X, Y), (X[q], Y[q]), lr="auto", lr_grid=grid, lr_pilot_K=6,
                      out=tmp_path / "s.h5", **kw)
    with h5py.File(path) as f:
        assert f.attrs["lr_pilot_K"] == 6 and f.attrs["lr"] == lr
    # the Q-weighted form rewrites its scores: the lr's record is written with them there too
    path = api.scores(net, None, (X, Y), (X[q], Y[q]), variant="daunce_t_q", K=4, lr="auto", lr_grid=grid,
                      device="cpu", out=tmp_path / "q.h5")
    with h5py.File(path) as f:
        assert f.attrs["q_weight"] == "train" and "lr_rule" in f.attrs and f.attrs["lr_pilot_K"] == 4
    for bad in (1, 2.5, True, "200"):
        with pytest.raises(ValueError, match="lr_pilot_K must be a whole number"):
            api.fit_losses(net, None, (X, Y), (X[q], Y[q]), lr="auto", lr_grid=grid, lr_pilot_K=bad, **kw)
    with pytest.raises(ValueError, match="even K and lr_pilot_K.*lr_pilot_K=5"):
        api.fit_losses(net, None, (X, Y), (X[q], Y[q]), lr="auto", lr_grid=grid, lr_pilot_K=5, **kw)


CLI_CONFIG = """
experiment: tiny_auto
device: cpu
data: {name: digits, n_train: 120, n_query: 12}
model: {arch: mlp, hidden: [8]}
base: {epochs: 3, batch_size: 32, lr: 0.05}
daunce: {K: 8, ratio: 0.5, epochs: 4, batch_size: 16, chunk_size: 8, lr_grid: [1.0e+6, 0.03, 0.01],
         variants: [daunce], k_curve: [2, 8]}
"""


def test_daunce_fit_lr_auto_picks_by_the_rule_and_never_a_diverging_lr(tmp_path, capsys):
    from daunce_core.cli import main

    (tmp_path / "c.yaml").write_text(CLI_CONFIG)
    # no --lr: the rule, the library calls' default (the config's grid holds several rates)
    assert main(["fit", "--configfile", str(tmp_path / "c.yaml"), "-o", str(tmp_path / "l.h5")]) == 0
    err = capsys.readouterr().err
    assert "chosen by the plateau rule" in err and "1e+06: diverged" in err and "0.03: " in err
    assert store.read_losses(tmp_path / "l.h5").attrs["lr"] in (0.03, 0.01)
    # an explicit diverging lr is refused by loss growth, not only by non-finite values
    assert main(["fit", "--configfile", str(tmp_path / "c.yaml"), "--lr", "1e6", "-o", str(tmp_path / "x.h5")]) == 1
    assert "diverged at lr=1e+06" in capsys.readouterr().err and not (tmp_path / "x.h5").exists()


def test_daunce_t_q_is_daunce_t_fits_scored_with_traks_q(tmp_path):
    """variant='daunce_t_q' fits DAUNCE-T and multiplies each training example's scores by
    1 - p_i(theta_0), in memory and in a scores file alike; a Task without label probabilities
    is refused before any fit."""
    from daunce_core.scoring import pairwise_scores

    kw = dict(K=6, epochs=3, lr=0.01, batch_size=16, device="cpu", measure="covariance")
    sig = api.fit_losses(mlp(), None, (X, Y), (X[:4], Y[:4]), variant="daunce_t", **kw)
    got = daunce_scores(mlp(), (X, Y), (X[:4], Y[:4]), variant="daunce_t_q", **kw)
    want = pairwise_scores(sig.train, sig.query, "covariance") * (1 - sig.p0_train)[:, None]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-9)
    path = api.scores(mlp(), None, (X, Y), (X[:4], Y[:4]), variant="daunce_t_q", out=tmp_path / "s.h5", **kw)
    dense, _ = store.dense_scores(path)
    np.testing.assert_allclose(dense, got, rtol=1e-5, atol=1e-9)

    class Generic(api.ClassificationTask):
        pass

    with pytest.raises(ValueError, match="needs theta_0's label probabilities"):
        api.fit_losses(mlp(), Generic(), (X, Y), (X[:4], Y[:4]), variant="daunce_t_q", **kw)


@pytest.mark.parametrize("call", ["daunce_scores", "perturbed_losses", "scores"])
def test_an_unknown_keyword_is_one_line_naming_the_nearest(call):
    """A misspelt option of the one-call API is refused before any fit, with the keyword meant."""
    fn = {"daunce_scores": daunce_scores, "perturbed_losses": perturbed_losses,
          "scores": lambda *a, **kw: api.scores(a[0], None, *a[1:], **kw)}[call]
    with pytest.raises(TypeError, match=rf"^{call}: unknown keyword\(s\) k \(did you mean K\?\)$"):
        fn(mlp(), (X, Y), (X[:4], Y[:4]), k=5)


def _study():
    """benchmarks/defaults_study.py, the study behind the defaults, as a module."""
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "defaults_study.py"
    spec = importlib.util.spec_from_file_location("defaults_study", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["defaults_study"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_the_study_reads_the_librarys_plateau_rule():
    study = _study()
    assert study.agreement is api.agreement
    cells = [{"lr": 0.01, "diverged": False, "agreement": float("nan")},
             {"lr": 0.03, "diverged": False, "agreement": 0.95},
             {"lr": 0.1, "diverged": True, "agreement": float("nan")}]
    assert study.plateau_lr(cells) == api.pick_lr(cells) == 0.01


def test_study_passes_its_estimator_options_to_the_fits(monkeypatch):
    study = _study()
    seen = {}

    def fake_run(name, cfg, ds, device, variants, lengths, quick, **kw):
        seen.update(kw["options"])
        return [], []

    monkeypatch.setattr(study, "run_problem", fake_run)
    monkeypatch.setattr(study, "problem_tabular", lambda: (None, None))
    monkeypatch.setattr(study, "write", lambda *a, **k: None)
    monkeypatch.setattr(study.Path, "read_text", lambda self: "")
    study.main(["--problems", "tabular", "--variants", "daunce_m", "--antithetic", "--common-batches",
                "--out", "/nonexistent"])
    assert seen == {"antithetic": True, "common_batches": True}
