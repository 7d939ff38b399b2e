"""The estimator options, as ``daunce.*`` keys.

Each option is checked for what it does to the fits, not only that it is passed on:
antithetic pairs mirror each other's parameter step, common batches share the batch order,
the cosine schedule ends near 0, DAUNCE-T's cross-entropy first-order term is the margin's times
-(1 - p), and the defaults reproduce the fits of the code before the options bit for bit. The
control variate from an xi = 1/2 fit is shown to be the constant theta_0 for the white-box forms
at the paper's gamma = 1, which is why no ``daunce.control`` option exists.
"""
import math

import numpy as np
import pytest
import torch

from daunce_core import ensemble as E
from daunce_core import objectives as obj
from daunce_core.config import ConfigError, DaunceConfig, ExperimentConfig
from daunce_core.perturb import Plan, batch_order

import helpers

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def problem():
    return helpers.trained_mlp()


def cfg_of(**kw):
    return DaunceConfig(**{"K": 4, "ratio": 0.5, "epochs": 2, "batch_size": 16, **kw})


def steps_of(problem, ks, lr, **kw):
    """Each model's parameter step theta^k - theta_0, flattened: [C, P]."""
    net, theta0, X, y = problem
    p, _ = E.fit_perturbed(net, theta0, X, y, ks, variant=kw.pop("variant", "daunce_e"), cfg=cfg_of(**kw), lr=lr)
    p0, _ = E.split_state(net, theta0)
    return torch.cat([(p[k] - p0[k]).reshape(len(ks), -1) for k in p0], dim=1).double()


# --- antithetic pairs ---------------------------------------------------------------------------

def test_antithetic_pairs_share_subset_and_batches_with_mirrored_xi():
    plan = Plan.from_daunce(cfg_of(seed=3, antithetic=True))
    for j in (0, 3):
        (sa, xa), (sb, xb) = plan.subset_and_xi(2 * j, 500), plan.subset_and_xi(2 * j + 1, 500)
        assert np.array_equal(sa, sb) and np.array_equal(xa + xb, np.ones(500))
        assert np.array_equal(batch_order(plan.batch_key(2 * j), sa, 2, 16),
                              batch_order(plan.batch_key(2 * j + 1), sb, 2, 16))
    assert not np.array_equal(plan.subset_and_xi(0, 500)[0], plan.subset_and_xi(2, 500)[0])  # pairs differ


@pytest.mark.parametrize("optimizer,lr", [("sgd", 0.01), ("adam", 3e-4)])
def test_antithetic_pairs_take_mirrored_steps(problem, optimizer, lr):
    """sigma -> -sigma on the same subset and batches: in the linear regime the step is
    mirrored (SGD and Adam both act oddly in the gradient), so a pair's steps nearly cancel;
    independent draws do not. This also checks that fit_perturbed uses the config's plan."""
    anti = steps_of(problem, [0, 1, 2, 3], lr, antithetic=True, optimizer=optimizer)
    plain = steps_of(problem, [0, 1, 2, 3], lr, optimizer=optimizer)
    for d in (anti, plain):
        assert torch.isfinite(d).all() and d.norm(dim=1).min() > 0
    rel = lambda d: float(((d[0] + d[1]).norm() + (d[2] + d[3]).norm()) / d.norm(dim=1).sum())  # noqa: E731
    assert rel(anti) < 0.1 and rel(plain) > 0.3, (rel(anti), rel(plain))


def test_a_chunk_boundary_inside_an_antithetic_pair_changes_no_model(problem):
    together = steps_of(problem, [0, 1, 2, 3], 0.01, antithetic=True)
    split = torch.cat([steps_of(problem, ks, 0.01, antithetic=True) for ks in ([0], [1, 2], [3])])
    torch.testing.assert_close(together, split, rtol=1e-5, atol=1e-7)


def test_antithetic_needs_an_even_K():
    with pytest.raises(ConfigError, match=r"daunce\.K must be even with daunce\.antithetic"):
        ExperimentConfig.from_dict({"daunce": {"K": 5, "antithetic": True, "k_curve": [5]}}).validate()
    ExperimentConfig.from_dict({"daunce": {"K": 6, "antithetic": True, "k_curve": [6]}}).validate()


# --- common batches -----------------------------------------------------------------------------

def test_common_batches_give_every_model_the_same_positional_order(problem):
    plan = Plan.from_daunce(cfg_of(seed=3, common_batches=True))
    orders = []
    for k in range(4):
        sub, _ = plan.subset_and_xi(k, 200)
        orders.append(np.searchsorted(sub, batch_order(plan.batch_key(k), sub, 2, 16)))  # positions in D^k
    assert all(np.array_equal(orders[0], o) for o in orders[1:])
    indep = Plan.from_daunce(cfg_of(seed=3))
    sub0, sub1 = indep.subset_and_xi(0, 200)[0], indep.subset_and_xi(1, 200)[0]
    assert not np.array_equal(np.searchsorted(sub0, batch_order(indep.batch_key(0), sub0, 2, 16)),
                              np.searchsorted(sub1, batch_order(indep.batch_key(1), sub1, 2, 16)))
    assert torch.isfinite(steps_of(problem, [0, 1], 0.01, common_batches=True)).all()  # the fit runs


# --- cosine schedule ----------------------------------------------------------------------------

def test_cosine_schedule_anneals_to_zero_over_the_fit():
    spec = E.OptimSpec.from_daunce(cfg_of(lr_schedule="cosine"), 0.1)
    assert spec.schedule == "cosine" and E.OptimSpec.from_daunce(cfg_of(), 0.1).schedule == "constant"
    total = 40
    opt, sched = E._optimizer([torch.zeros(3, requires_grad=True)], spec, total)
    lrs = []
    for _ in range(total):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.1) and all(a > b for a, b in zip(lrs, lrs[1:]))
    assert lrs[-1] == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * (total - 1) / total)))
    assert lrs[-1] < 2e-3 * 0.1  # ~0 at the last step
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)  # 0 after it


def test_cosine_schedule_shortens_the_fit_step(problem):
    const = steps_of(problem, [0, 1], 0.01).norm(dim=1)
    cos = steps_of(problem, [0, 1], 0.01, lr_schedule="cosine").norm(dim=1)
    assert (cos < 0.8 * const).all()  # about half the summed lr: the same early direction, shorter


# --- DAUNCE-T's first-order term ----------------------------------------------------------------

def test_cross_entropy_first_order_gradient_is_minus_one_minus_p_times_the_margins():
    g = torch.tensor([[2.0, 0.5, -1.0], [-0.3, 1.2, 0.1]], dtype=torch.float64)
    y = torch.tensor([0, 2])
    p = torch.softmax(g, -1)[torch.arange(2), y]
    margin = obj.first_order_grad("daunce_t", g, y, "margin")
    ce = obj.first_order_grad("daunce_t", g, y, "cross_entropy")
    # by hand: margin gradient onehot(y) - softmax over the other classes
    others = torch.tensor([[0.0, math.exp(0.5), math.exp(-1.0)], [math.exp(-0.3), math.exp(1.2), 0.0]],
                          dtype=torch.float64)
    hand = torch.nn.functional.one_hot(y, 3).double() - others / others.sum(1, keepdim=True)
    torch.testing.assert_close(margin, hand)
    torch.testing.assert_close(ce, -(1 - p)[:, None] * hand)
    # the option changes DAUNCE-T only
    for v in ("daunce", "daunce_e"):
        assert torch.equal(obj.first_order_grad(v, g, y, "cross_entropy"), obj.first_order_grad(v, g, y, "margin"))
    with pytest.raises(ValueError, match="daunce.first_order"):
        obj.first_order_grad("daunce_t", g, y, "hinge")


def test_cross_entropy_first_order_term_changes_daunce_t_fits_only(problem):
    ce = steps_of(problem, [0, 1], 0.01, variant="daunce_t", first_order="cross_entropy")
    mg = steps_of(problem, [0, 1], 0.01, variant="daunce_t")
    assert (ce - mg).norm() > 1e-3 * mg.norm()
    # (1 - p) < 1 shrinks every example's push: the perturbed step is shorter
    assert (ce.norm(dim=1) < mg.norm(dim=1)).all()
    assert torch.equal(steps_of(problem, [0], 0.01, variant="daunce_e", first_order="cross_entropy"),
                       steps_of(problem, [0], 0.01, variant="daunce_e"))


# --- the defaults are today's fits --------------------------------------------------------------

@pytest.mark.parametrize("variant", ["daunce", "daunce_t", "daunce_bb"])
def test_defaults_reproduce_the_fits_before_the_options_bit_for_bit(problem, variant):
    """The fit of the code before the options, rebuilt here: Plan(seed, ratio), the margin's
    logit gradient for DAUNCE-T, a constant learning rate."""
    net, theta0, X, y = problem
    cfg, ks, lr = cfg_of(seed=2), [0, 1, 2], 0.03
    new, _ = E.fit_perturbed(net, theta0, X, y, ks, variant=variant, cfg=cfg, lr=lr)

    plan = Plan(seed=cfg.seed, ratio=cfg.ratio)
    draws = [plan.subset_and_xi(k, len(y)) for k in ks]
    schedule = np.stack([batch_order((cfg.seed, k), s, cfg.epochs, cfg.batch_size) for k, (s, _) in zip(ks, draws)])
    xi = torch.as_tensor(np.stack([x for _, x in draws]), dtype=torch.float32)
    p0, b0 = E.split_state(net, theta0)
    logits0 = E.predict(net, E.stack_states([p0], "cpu"), E.stack_states([b0], "cpu"), X)[0]
    signal = obj.signal_of(variant)

    def old_objective(logits, idx, models):
        C, B, nc = logits.shape
        flat, lg = idx.reshape(-1), logits.reshape(C * B, nc)
        s = obj.signal_value(signal, lg, y[flat])
        if obj.is_black_box(variant):
            return obj.perturbed_objective(variant, s, gamma=cfg.gamma).reshape(C, B)
        g0 = logits0[flat]
        lin = obj.first_order_term(lg, g0, obj.signal_logit_grad(signal, g0, y[flat]))
        return obj.perturbed_objective(variant, s, s0=obj.signal_value(signal, g0, y[flat]), lin=lin,
                                       xi=xi[models[:, None], idx].reshape(-1), rho=cfg.rho,
                                       gamma=cfg.gamma).reshape(C, B)

    old, _ = E.train_stacked(net, E.stack_states([p0] * 3, "cpu"), E.stack_states([b0] * 3, "cpu"), X, schedule,
                             old_objective, E.OptimSpec(cfg.optimizer, lr, cfg.momentum, False, 0.0, "constant"))
    for k in p0:
        assert torch.equal(new[k], old[k]), k


# --- the control variate that was not built -----------------------------------------------------

class _HalfXi(Plan):
    """Each model's own subset and batches with xi = 1/2: the unperturbed control fit."""

    def subset_and_xi(self, k, n):
        sub, xi = super().subset_and_xi(k, n)
        return sub, np.full_like(xi, 0.5)


@pytest.mark.parametrize("variant", ["daunce", "daunce_e", "daunce_t"])
def test_the_xi_half_control_fit_never_leaves_theta_0(problem, variant):
    """A control variate from the unperturbed fit (same subset and batches, xi = 1/2, sigma = 0)
    cancels nothing here: every minibatch gradient of the white-box objectives at theta_0 is
    gamma grad L_B - grad L_B = 0 (Hessian form, gamma = 1) or 0 (the squared forms), so the
    control fit stays at theta_0 and its signals are the constants L_0, which a covariance
    ignores. Only gamma != 1 in the Hessian form moves it (shown below)."""
    net, theta0, X, y = problem
    p0, _ = E.split_state(net, theta0)

    def step(gamma):
        p, _ = E.fit_perturbed(net, theta0, X, y, [0, 1], variant=variant, cfg=cfg_of(gamma=gamma), lr=0.05,
                               plan=_HalfXi(seed=0, ratio=0.5))
        return max(float((p[k] - p0[k]).abs().max()) for k in p0)

    perturbed = steps_of(problem, [0, 1], 0.05, variant=variant).abs().max()
    assert step(1.0) < 1e-4 * float(perturbed)
    if variant == "daunce":
        assert step(2.0) > 1e-2 * float(perturbed)


# --- the one-call API takes the same options ----------------------------------------------------

def test_api_takes_the_options_and_antithetic_signals_mirror(problem):
    import copy

    from daunce_core.api import fit_losses

    net, theta0, X, y = problem
    model = copy.deepcopy(net)
    model.load_state_dict(theta0)
    kw = dict(variant="daunce_e", ratio=0.5, epochs=2, batch_size=16, lr=0.01, device="cpu")
    with pytest.raises(ValueError, match="antithetic=True needs an even K"):
        fit_losses(model, None, (X, y), (X[:10], y[:10]), K=3, antithetic=True, **kw)
    sig = fit_losses(model, None, (X, y), (X[:10], y[:10]), K=4, antithetic=True, lr_schedule="cosine", **kw)
    assert sig.attrs["config"]["antithetic"] and sig.attrs["config"]["lr_schedule"] == "cosine"
    L0 = obj.cross_entropy(model(X), y).detach().numpy()
    d = sig.train - L0  # [4, n]: to first order sigma-odd, so a pair's changes cancel
    assert np.abs(d[0] + d[1]).sum() < 0.1 * np.abs(d[:2]).sum()
