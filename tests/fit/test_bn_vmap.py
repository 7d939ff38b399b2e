"""BatchNorm in train mode under vmap: a vmapped chunk of ResNet-9 retrains
equals the same retrains one by one (``mode="loop"``, nn.BatchNorm updating its buffers in place),
parameters and running statistics, with the same per-model randomness (subsets, batch orders,
augmentation). The perturbed fits with ``daunce.batchnorm: train`` likewise.

The comparisons run in float64. SGD on a ResNet amplifies rounding: in float32 a relative jitter
of 1e-6 in the initial weights of one model already moves its weights by about 1% after three
steps at lr 0.05 (max-pool and ReLU switch branches), so a float32 comparison after a few steps
could only use a tolerance too loose to catch a wrong statistic. In float64 both paths agree to
about 1e-12.
"""
import dataclasses
import logging

import numpy as np
import pytest
import torch
from torch import nn

from daunce_core import ensemble as E
from daunce_core.config import DaunceConfig, ModelConfig, TrainConfig
from daunce_core.models import build_model, can_vmap

torch.set_num_threads(1)
SHAPE = (3, 32, 32)  # CIFAR-shaped
TOL = dict(rtol=1e-9, atol=1e-11)


def resnet9_factory(dtype=torch.float64):
    return lambda: build_model(ModelConfig(arch="resnet9", width=0.125), SHAPE, 10).to(dtype)


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(40, *SHAPE, generator=g, dtype=torch.float64), torch.randint(0, 10, (40,), generator=g)


RECIPE = TrainConfig(epochs=1, batch_size=8, lr=0.05, lr_schedule="triangle", weight_decay=5e-4, nesterov=True)
SUBSETS = [np.arange(0, 24), np.arange(16, 40), np.r_[0:12, 28:40]]  # 3 steps of 8 each
KEYS = [(0, j, 0, 7) for j in range(3)]


def assert_states_close(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], **TOL, msg=lambda m, k=k: f"{k}: {m}")


@pytest.fixture(scope="module")
def retrains(data):
    X, y = data
    return {mode: E.fit_from_scratch(resnet9_factory(), X, y, SUBSETS, KEYS, RECIPE, augment=True, mode=mode)[1:]
            for mode in ("vmap", "loop")}


def test_vmapped_resnet9_retrains_equal_one_by_one_retrains(retrains):
    (pv, bv), (pl, bl) = retrains["vmap"], retrains["loop"]
    assert_states_close(pv, pl)
    assert_states_close(bv, bl)  # running mean and variance: nn.BatchNorm's momentum update
    assert bv["net.0.1.num_batches_tracked"].tolist() == [3, 3, 3]
    # the statistics really moved, differently per model (own subsets, orders and augmentation)
    rm = bv["net.6.1.running_mean"]
    assert rm.abs().min() > 0 and (rm[0] - rm[1]).abs().max() > 1e-4 and (rm[1] - rm[2]).abs().max() > 1e-4


def test_a_retrain_is_the_same_in_any_chunk(data, retrains):
    """Per-model randomness keyed as before: model 2 trained alone equals row 2 of the chunk."""
    X, y = data
    _, p, b = E.fit_from_scratch(resnet9_factory(), X, y, SUBSETS[2:], KEYS[2:], RECIPE, augment=True, mode="vmap")
    pv, bv = retrains["vmap"]
    assert_states_close(p, {k: v[2:] for k, v in pv.items()})
    assert_states_close(b, {k: v[2:] for k, v in bv.items()})


def test_auto_mode_vmaps_batchnorm_models_without_a_notice(data, caplog, monkeypatch):
    X, y = data
    modes = []
    orig = E.train_stacked
    monkeypatch.setattr(E, "train_stacked", lambda *a, **kw: modes.append(kw["mode"]) or orig(*a, **kw))
    with caplog.at_level(logging.WARNING, logger="daunce_core.models"):
        E.fit_from_scratch(resnet9_factory(), X, y, SUBSETS[:1], KEYS[:1], RECIPE)
    assert modes == ["vmap"] and not caplog.records
    net = resnet9_factory(torch.float32)()
    assert can_vmap(net, X[:2].float(), train_mode=True) == (True, "ran forward and backward under vmap")


class CumulativeBN(nn.Module):
    """BatchNorm with ``momentum=None`` (a cumulative average: it reads ``float()`` of its batched
    counter, which vmap refuses): still trained, one by one, with a notice."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(12, 6), nn.BatchNorm1d(6, momentum=None), nn.ReLU(),
                                 nn.Linear(6, 3))

    def forward(self, x):
        return self.net(x)


def test_models_that_still_cannot_be_vmapped_fall_back_to_the_loop(caplog):
    g = torch.Generator().manual_seed(2)
    X, y = torch.randn(20, 1, 3, 4, generator=g), torch.randint(0, 3, (20,), generator=g)
    with caplog.at_level(logging.WARNING, logger="daunce_core.models"):
        _, p, b = E.fit_from_scratch(CumulativeBN, X, y, [np.arange(20)] * 2, [(0,), (1,)],
                                     TrainConfig(epochs=1, batch_size=5, lr=0.05))
    assert any("one by one" in r.getMessage() for r in caplog.records)
    assert b["net.2.num_batches_tracked"].tolist() == [4, 4]


@pytest.fixture(scope="module")
def theta0(data):
    """A theta_0 with learnt running statistics (one vmapped retrain)."""
    X, y = data
    net, p, b = E.fit_from_scratch(resnet9_factory(), X, y, SUBSETS[:1], KEYS[:1], RECIPE, augment=True)
    return net, {**E.unstack(p, 0), **E.unstack(b, 0)}


@pytest.mark.parametrize("augment", [False, True])
def test_perturbed_fits_with_batchnorm_train_vmap_equal_loop(data, theta0, augment):
    X, y = data
    net, th = theta0
    d = DaunceConfig(K=3, ratio=0.6, epochs=1, batch_size=8, batchnorm="train", augment=augment, trace_every=0)
    fits = {mode: E.fit_perturbed(net, th, X, y, [0, 1, 2], variant="daunce", cfg=d, lr=0.01, mode=mode)
            for mode in ("vmap", "loop")}
    assert_states_close(fits["vmap"][0], fits["loop"][0])
    assert_states_close(fits["vmap"][1], fits["loop"][1])
    b = fits["vmap"][1]
    assert b["net.0.1.num_batches_tracked"].tolist() == [th["net.0.1.num_batches_tracked"].item() + 3] * 3
    assert not torch.allclose(b["net.6.1.running_var"][0], th["net.6.1.running_var"])  # updated, not frozen
    # the signals are computed with the updated statistics
    logits = E.predict(net, *fits["vmap"], X)
    frozen = E.predict(net, fits["vmap"][0], {k: torch.stack([th[k]] * 3) for k in b}, X)
    assert (logits - frozen).abs().max() > 1e-6
    # and model 1 is the same alone
    p1, b1 = E.fit_perturbed(net, th, X, y, [1], variant="daunce", cfg=d, lr=0.01)
    assert_states_close(p1, {k: v[1:2] for k, v in fits["vmap"][0].items()})
    assert_states_close(b1, {k: v[1:2] for k, v in b.items()})


def test_perturbed_fits_default_keep_theta0_statistics(data, theta0):
    X, y = data
    net, th = theta0
    d = DaunceConfig(K=2, ratio=0.6, epochs=1, batch_size=8, trace_every=0)
    assert d.batchnorm == "eval" and d.augment is False
    _, b = E.fit_perturbed(net, th, X, y, [0, 1], variant="daunce", cfg=d, lr=0.01)
    for k, v in b.items():
        assert torch.equal(v, torch.stack([th[k]] * 2)), k


def test_augmentation_on_the_device_draws_each_models_own_stream():
    """The batched step augmentation, drawn for every step at once, equals per-model
    ``augment_batch`` calls drawn step after step on the same streams."""
    x = torch.randn(2, 5, 3, 8, 8)
    keys = [(4, 0), (4, 1)]
    plan = E._augment_plan([np.random.default_rng([*k, 3]) for k in keys], 3, 5, 4, x.device)
    ref_gens = [np.random.default_rng([*k, 3]) for k in keys]
    for step in range(3):
        batched = E._augment_step(x, plan, step, 4, "constant")
        ref = torch.stack([E.augment_batch(x[i], ref_gens[i], 4, "constant") for i in range(2)])
        assert torch.equal(batched, ref), step
        assert not torch.equal(batched[0], batched[1])


def test_speed_options_are_off_by_default_and_accepted(data, monkeypatch):
    X, y = data
    assert E.Speed.from_train(TrainConfig()) == E.Speed("fp32", False, False)
    with pytest.raises(ValueError, match="precision must be one of fp32, bf16"):
        E.Speed("fp16")
    X32 = X.float()
    subsets, keys = SUBSETS[:2], KEYS[:2]
    recipe = TrainConfig(epochs=1, batch_size=8, lr=0.005, lr_schedule="constant", nesterov=False)
    ref = E.fit_from_scratch(resnet9_factory(torch.float32), X32, y, subsets, keys, recipe, augment=True)[1:]
    cl = E.fit_from_scratch(resnet9_factory(torch.float32), X32, y, subsets, keys,
                            TrainConfig(**{**recipe.__dict__, "channels_last": True}), augment=True)[1:]
    for a, b in zip(cl, ref):
        for k in b:
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
            assert a[k].is_contiguous()
    bf = E.fit_from_scratch(resnet9_factory(torch.float32), X32, y, subsets, keys,
                            TrainConfig(**{**recipe.__dict__, "precision": "bf16"}), augment=True)[1:]
    for k in ref[0]:
        assert bf[0][k].dtype == torch.float32  # fp32 master weights
        torch.testing.assert_close(bf[0][k], ref[0][k], rtol=0.05, atol=0.02)
    assert bf[1]["net.0.1.running_var"].dtype == torch.float32
    # compile: the forward goes through torch.compile (not run here: compiling on a CPU is slow)
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compiled.append(fn) or fn)
    E.fit_from_scratch(resnet9_factory(torch.float32), X32, y, subsets, keys,
                       TrainConfig(**{**recipe.__dict__, "compile": True}))
    assert len(compiled) == 1


def test_config_keys_and_their_errors():
    from daunce_core.config import ConfigError, ExperimentConfig

    cfg = ExperimentConfig.from_dict({"base": {"precision": "bf16", "channels_last": True, "compile": True},
                                      "daunce": {"batchnorm": "train", "augment": True}}).validate()
    assert E.Speed.from_train(cfg.base) == E.Speed("bf16", True, True)
    assert (cfg.daunce.batchnorm, cfg.daunce.augment) == ("train", True)
    with pytest.raises(ConfigError, match=r"daunce.batchnorm must be 'eval' or 'train', got 'frozen'"):
        ExperimentConfig.from_dict({"daunce": {"batchnorm": "frozen"}}).validate()
    with pytest.raises(ConfigError, match=r"base.precision must be 'fp32' or 'bf16', got 'fp16'"):
        ExperimentConfig.from_dict({"base": {"precision": "fp16"}}).validate()


def test_augmented_perturbed_fits_take_theta0s_logits_on_the_augmented_images(data, theta0):
    """Equation 5's g0 is theta_0's output on the image the model sees. With rho = 0 and gamma = 1
    DAUNCE's objective L - L0 - <grad L(g0), g - g0> has zero gradient at theta_0 (BatchNorm in
    eval mode) exactly when g0 is recomputed on each augmented batch, so the models never leave
    theta_0. Against the un-augmented g0 they move (checked by disabling the recomputation)."""
    X, y = data
    net, th = theta0
    d = DaunceConfig(K=2, ratio=0.6, epochs=1, batch_size=8, rho=0.0, gamma=1.0, augment=True, trace_every=0)
    p, _ = E.fit_perturbed(net, th, X, y, [0, 1], variant="daunce", cfg=d, lr=0.05)
    assert max((p[k] - th[k]).abs().max().item() for k in p) < 1e-9
    # a real perturbation (rho = 1) does move them, so the check above is not vacuous
    p1, _ = E.fit_perturbed(net, th, X, y, [0, 1], variant="daunce", cfg=dataclasses.replace(d, rho=1.0), lr=0.05)
    assert max((p1[k] - th[k]).abs().max().item() for k in p1) > 1e-6
