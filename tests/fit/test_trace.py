"""Figure 3's log (vision): per-term gradient norms of the perturbed fits."""

import h5py
import numpy as np
import pytest
import torch

from daunce_core import ensemble as E
from daunce_core.config import DaunceConfig, ModelConfig, TrainConfig
from daunce_core.fit import chunks
from daunce_core.fit.ensemble import EnsembleFitter
from daunce_core.models import model_factory
from daunce_core.perturb import theta0_key


@pytest.fixture(scope="module")
def setup():
    rng = np.random.default_rng(0)
    X = torch.as_tensor(rng.normal(size=(60, 1, 2, 3)).astype(np.float32))
    y = torch.as_tensor(rng.integers(0, 3, 60))
    factory = model_factory(ModelConfig(arch="mlp", hidden=[8]), (1, 2, 3), 3)
    _, p, b = E.fit_from_scratch(factory, X, y, [np.arange(60)], [theta0_key(0)],
                                 TrainConfig(epochs=5, batch_size=16, lr=0.1))
    return factory, {**E.unstack(p, 0), **E.unstack(b, 0)}, (X, y), (X[:7], y[:7])


def fit(setup, variant, trace_every):
    factory, theta0, train, query = setup
    cfg = DaunceConfig(K=4, ratio=0.5, epochs=3, batch_size=8, trace_every=trace_every)
    return EnsembleFitter(factory(), theta0, train, query, variant=variant, cfg=cfg).fit([0, 1, 2, 3], 0.05)


@pytest.mark.parametrize("variant", ["daunce", "daunce_e", "daunce_t", "daunce_bb", "daunce_t_bb"])
def test_trace_logs_every_n_steps_and_changes_no_fit(setup, variant):
    traced, plain = fit(setup, variant, 4), fit(setup, variant, 0)
    assert plain.trace is None and np.array_equal(traced.train, plain.train)  # logging changes nothing
    t = traced.trace
    steps = 3 * (30 // 8)  # epochs x full batches of the 30-example subset
    assert list(t["step"]) == [s + 1 for s in range(steps) if s % 4 == 0 or s == steps - 1]
    for term in ("total", "erm", "first_order"):
        assert t[term].shape == (4, len(t["step"])) and np.isfinite(t[term]).all()
    assert (t["total"] > 0).all()
    if variant.endswith("_bb"):  # no first-order term: the whole objective is the ERM term
        assert np.allclose(t["first_order"], 0) and np.allclose(t["erm"], t["total"])
    elif variant in ("daunce_e", "daunce_t"):  # at theta_0 the squared term has zero gradient
        assert np.allclose(t["erm"][:, 0], 0, atol=1e-6) and np.allclose(t["first_order"][:, 0], t["total"][:, 0])
    else:  # daunce at theta_0: gamma grad L plus (1 + sigma) times minus the same: |total| < |erm| + |first|
        assert (t["erm"][:, 0] > 0).all() and (t["total"] <= t["erm"] + t["first_order"] + 1e-6).all()


def test_trace_is_stored_with_the_losses(setup, tmp_path):
    s = fit(setup, "daunce", 2)
    assert chunks.write_signals(tmp_path / "c.h5", s)
    with h5py.File(tmp_path / "c.h5") as f:
        assert sorted(f["trace"]) == ["erm", "first_order", "model_index", "step", "total"]
        assert np.array_equal(f["trace"]["total"][()], s.trace["total"])


def test_loop_mode_logs_the_same_norms(setup):
    factory, theta0, train, query = setup
    cfg = DaunceConfig(K=3, ratio=0.5, epochs=2, batch_size=8, trace_every=3)
    a = EnsembleFitter(factory(), theta0, train, query, variant="daunce_e", cfg=cfg).fit([0, 1, 2], 0.05)
    b = EnsembleFitter(factory(), theta0, train, query, variant="daunce_e", cfg=cfg, mode="loop").fit([0, 1, 2], 0.05)
    assert np.array_equal(a.trace["step"], b.trace["step"])
    for term in ("total", "erm", "first_order"):
        assert np.allclose(a.trace[term], b.trace[term], rtol=1e-4, atol=1e-6)


def test_fig3_draws_the_selected_lrs_trace_and_says_when_there_is_none(setup, tmp_path):
    import json

    from daunce_core import figures

    s = fit(setup, "daunce", 2)
    chunks.write_signals(tmp_path / "lr0.01.h5", s)
    s.trace = None
    chunks.write_signals(tmp_path / "lr0.1.h5", s)
    sel = tmp_path / "selection.json"
    sel.write_text(json.dumps({"selected_lr": 0.01}))
    side = {"selection": str(sel), "chunks": {"0.01": [str(tmp_path / "lr0.01.h5")],
                                              "0.1": [str(tmp_path / "lr0.1.h5")]}}
    assert figures.fig3(side, None, tmp_path / "f.pdf") == ["vision"] and (tmp_path / "f.pdf").stat().st_size > 0
    sel.write_text(json.dumps({"selected_lr": 0.1}))  # a losses file without the log: an empty panel
    assert figures.fig3(side, side, tmp_path / "g.pdf") == []
    sel.write_text(json.dumps({"selected_lr": 0.3}))
    with pytest.raises(ValueError, match="none of the grid"):
        figures.fig3(side, None, tmp_path / "h.pdf")
