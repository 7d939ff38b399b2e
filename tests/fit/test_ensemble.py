"""The chunk trainer: per-model randomness keyed by (seed, k), chunk invariance, vmap == loop."""
import numpy as np
import pytest
import torch

from daunce_core import ensemble as E
from daunce_core.config import DaunceConfig, ModelConfig, TrainConfig
from daunce_core.models import build_model
from daunce_core.perturb import batch_order, subset_and_xi

import helpers

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def problem():
    return helpers.trained_mlp()


def losses_of(net, theta0, X, y, ks, variant, **kw):
    d = DaunceConfig(K=8, ratio=0.5, epochs=3, batch_size=16, **kw)
    p, b = E.fit_perturbed(net, theta0, X, y, ks, variant=variant, cfg=d, lr=0.05)
    return E.signals(E.predict(net, p, b, X), y, "loss").numpy()


@pytest.mark.parametrize("variant", ["daunce", "daunce_t", "daunce_bb"])
def test_chunk_invariance(problem, variant):
    net, theta0, X, y = problem
    one = losses_of(net, theta0, X, y, list(range(6)), variant)
    split = np.concatenate([losses_of(net, theta0, X, y, [0, 1], variant),
                            losses_of(net, theta0, X, y, [2, 3, 4, 5], variant)])
    alone = losses_of(net, theta0, X, y, [4], variant)
    np.testing.assert_allclose(one, split, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(one[4:5], alone, rtol=1e-5, atol=1e-6)
    assert np.abs(one[0] - one[1]).max() > 1e-3  # different k are really different models


def test_vmap_and_loop_modes_agree(problem):
    net, theta0, X, y = problem
    p0, b0 = E.split_state(net, theta0)
    sched = np.stack([batch_order((0, k), subset_and_xi(0, k, 120, 0.5)[0], 2, 16) for k in range(3)])

    def objective(logits, idx, models):
        C, B, nc = logits.shape
        return torch.nn.functional.cross_entropy(logits.reshape(C * B, nc), y[idx.reshape(-1)],
                                                 reduction="none").reshape(C, B)
    spec = E.OptimSpec("sgd", 0.05, 0.9)
    out = {}
    for mode in ("vmap", "loop"):
        p, b = E.train_stacked(net, E.stack_states([p0] * 3, "cpu"), E.stack_states([b0] * 3, "cpu"), X, sched,
                               objective, spec, mode=mode)
        out[mode] = E.predict(net, p, b, X).numpy()
    np.testing.assert_allclose(out["vmap"], out["loop"], rtol=1e-5, atol=1e-5)


def test_subset_and_xi_are_keyed_and_sized():
    a_idx, a_xi = subset_and_xi(3, 7, 1000, 0.3)
    b_idx, b_xi = subset_and_xi(3, 7, 1000, 0.3)
    c_idx, _ = subset_and_xi(3, 8, 1000, 0.3)
    assert len(a_idx) == 300 and np.all(np.diff(a_idx) > 0)
    np.testing.assert_array_equal(a_idx, b_idx)
    np.testing.assert_array_equal(a_xi, b_xi)
    assert not np.array_equal(a_idx, c_idx)
    assert 0 <= a_xi.min() and a_xi.max() < 1
    with pytest.raises(ValueError, match="ratio r must be in"):
        subset_and_xi(0, 0, 10, 1.5)


def test_resnet9_runs_batched_perturbed_fits_and_loop_retrains():
    X = torch.randn(16, 3, 32, 32)
    y = torch.randint(0, 10, (16,))
    cfg = ModelConfig(arch="resnet9", width=0.125)
    factory = lambda: build_model(cfg, (3, 32, 32), 10)  # noqa: E731
    net, p, b = E.fit_from_scratch(factory, X, y, [np.arange(8), np.arange(8, 16)], [(0, 0), (0, 1)],
                                   TrainConfig(epochs=1, batch_size=4, lr=0.01), augment=True)
    assert p["net.0.0.weight"].shape[0] == 2
    theta0 = {**E.unstack(p, 0), **E.unstack(b, 0)}
    pp, bb = E.fit_perturbed(net, theta0, X, y, [0, 1, 2], variant="daunce",
                             cfg=DaunceConfig(K=3, ratio=0.5, epochs=1, batch_size=4), lr=0.01)
    out = E.predict(net, pp, bb, X)
    assert out.shape == (3, 16, 10) and torch.isfinite(out).all()
