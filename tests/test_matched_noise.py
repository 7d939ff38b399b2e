"""Matched-noise DAUNCE (``daunce_m``, docs/matched_noise.md): its draws, its noise and its limit.

The science: labels drawn from theta_0's prediction make the noise covariance the Gauss-Newton
matrix, so the covariance of the losses of the K fits tends to the damped Gauss-Newton influence
function ``g_a^T M^-1 G M^-1 g_b`` (``baselines.limits.matched_limit``). On a softmax regression
with noisy labels (where the empirical Fisher and G differ) the fits approach that reference as
K grows; DAUNCE's uniform ``xi`` at the same settings does not (its limit is the Fisher sandwich).
"""
import numpy as np
import pytest
import torch
from torch.func import functional_call, grad, jacrev, vmap

from daunce_core import objectives as O
from daunce_core import perturb
from daunce_core.api import ClassificationTask, fit_losses
from daunce_core.baselines.limits import matched_limit
from daunce_core.perturb import Plan
from daunce_core.scoring import pairwise_scores


def test_labels_follow_theta0_and_are_keyed_by_seed_and_k():
    probs = np.tile([0.7, 0.2, 0.1], (20000, 1))
    y = perturb.matched_labels(3, 5, probs)
    np.testing.assert_allclose(np.bincount(y, minlength=3) / len(y), [0.7, 0.2, 0.1], atol=0.01)
    np.testing.assert_array_equal(y, perturb.matched_labels(3, 5, probs))  # the same in any chunk
    assert (y != perturb.matched_labels(3, 6, probs)).any() and (y != perturb.matched_labels(4, 5, probs)).any()
    onehot = np.zeros((5, 4))
    onehot[np.arange(5), [0, 3, 1, 2, 3]] = 1.0  # certain predictions give their own class
    np.testing.assert_array_equal(perturb.matched_labels(0, 0, onehot), [0, 3, 1, 2, 3])
    with pytest.raises(ValueError, match="matched_labels needs finite"):
        perturb.matched_labels(0, 0, np.full((3, 2), np.nan))
    plan = Plan(seed=3, antithetic=True)  # a pair mirrors its uniforms: its labels differ
    assert (plan.matched_labels(10, probs[:500]) != plan.matched_labels(11, probs[:500])).any()


def test_noise_term_has_mean_zero_and_the_gauss_newton_covariance():
    """Over ~y ~ p(.|x, theta_0), the first-order term's gradient J^T (p - e_~y) has mean 0 and
    covariance J^T (diag p - p p^T) J: enumerated exactly over the classes."""
    torch.manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)).double()
    params = {k: v.detach() for k, v in net.named_parameters()}
    x = torch.randn(1, 4, dtype=torch.float64)
    logits0 = functional_call(net, params, (x,)).detach()
    p = torch.softmax(logits0, -1)[0]

    def noise_grad(c):
        def f(q):
            g = functional_call(net, q, (x,))
            return O.classifier_objective("daunce_m", g, torch.tensor([0]), logits0=logits0, rho=1.0, gamma=1.0,
                                          y_noise=torch.tensor([c])).sum()
        gr = grad(f)(params)
        return torch.cat([v.reshape(-1) for v in gr.values()])

    base = noise_grad(0)  # gamma = 1: the loss term and -lin_L cancel at theta_0; only -rho u remains
    us = torch.stack([noise_grad(c) for c in range(3)])
    mean = (p[:, None] * us).sum(0)
    torch.testing.assert_close(mean, torch.zeros_like(mean), atol=1e-12, rtol=0)
    cov = (p[:, None, None] * us[:, :, None] * us[:, None, :]).sum(0)
    flat = torch.cat([v.reshape(-1) for v in params.values()])
    names, shapes = list(params), [v.shape for v in params.values()]

    def logits_of(f):
        out, i = {}, 0
        for k, s in zip(names, shapes):
            out[k] = f[i:i + s.numel()].reshape(s)
            i += s.numel()
        return functional_call(net, out, (x,))[0]

    J = jacrev(logits_of)(flat)
    ggn = J.T @ (torch.diag(p) - torch.outer(p, p)) @ J
    torch.testing.assert_close(cov, ggn, atol=1e-12, rtol=1e-9)
    assert base.abs().sum() > 0


@pytest.fixture(scope="module")
def noisy_softmax_regression():
    """A softmax regression (theta_0 solved by L-BFGS) whose labels are 25% random: the empirical
    Fisher and the Gauss-Newton matrix then differ. Its GGN-IF reference and both fits."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    n, m, d, C = 80, 12, 5, 3
    X = torch.randn(n + m, d, dtype=torch.float64)
    y = (X @ torch.randn(d, C, dtype=torch.float64)).argmax(1)
    flip = torch.as_tensor(rng.random(n + m) < 0.25)
    y[flip] = torch.as_tensor(rng.integers(0, C, int(flip.sum())))
    net = torch.nn.Linear(d, C).double()
    opt = torch.optim.LBFGS(net.parameters(), max_iter=500, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(net(X[:n]), y[:n]) + 1e-3 * sum((v**2).sum() for v in net.parameters())
        loss.backward()
        return loss

    opt.step(closure)
    params = {k: v.detach() for k, v in net.named_parameters()}
    names, shapes = list(params), [v.shape for v in params.values()]
    flat0 = torch.cat([v.reshape(-1) for v in params.values()])

    def logits1(f, x):
        out, i = {}, 0
        for k, s in zip(names, shapes):
            out[k] = f[i:i + s.numel()].reshape(s)
            i += s.numel()
        return functional_call(net, out, (x[None],))[0]

    def loss1(f, x, t):
        return torch.nn.functional.cross_entropy(logits1(f, x)[None], t[None])

    Z = vmap(grad(loss1), in_dims=(None, 0, 0))(flat0, X[:n], y[:n]).numpy()
    Sq = vmap(grad(loss1), in_dims=(None, 0, 0))(flat0, X[n:], y[n:]).numpy()
    J = vmap(jacrev(logits1), in_dims=(None, 0))(flat0, X[:n]).numpy()  # [n, C, p]
    P = torch.softmax(net(X[:n]), -1).detach().numpy()
    lam = np.einsum("nc,cd->ncd", P, np.eye(C)) - P[:, :, None] * P[:, None, :]
    G = np.einsum("ncp,ncd,ndq->pq", J, lam, J) / n  # the mean Gauss-Newton matrix
    prox = 1e-2
    reference = matched_limit(Z, Sq, G, G + prox * np.eye(len(G)))
    train, query = (X[:n].float(), y[:n]), (X[n:].float(), y[n:])
    fits = {v: fit_losses(net.float(), ClassificationTask(), train, query, variant=v, K=400, ratio=1.0, epochs=300,
                          lr=0.5, batch_size=n, rho=0.05, prox=prox, device="cpu", chunk_size=400)
            for v in ("daunce_m", "daunce")}
    return reference, fits


def _agreement(scores, reference):
    """Mean over queries of the Pearson correlation of the scores with the reference."""
    return float(np.mean([np.corrcoef(scores[:, j], reference[:, j])[0, 1] for j in range(scores.shape[1])]))


@pytest.mark.slow
def test_matched_fits_approach_the_damped_ggn_influence_function(noisy_softmax_regression):
    reference, fits = noisy_softmax_regression
    sig = fits["daunce_m"]
    agree = {K: _agreement(pairwise_scores(sig.train[:K], sig.query[:K], measure="covariance"), reference)
             for K in (25, 100, 400)}
    assert agree[25] < agree[100] < agree[400], agree  # Monte Carlo error falls with K
    assert agree[400] > 0.95, agree
    assert agree[400] - agree[25] > 0.05, agree
    # uniform xi (DAUNCE's Hessian form) at the same settings converges elsewhere: the Fisher sandwich
    uniform = fits["daunce"]
    xi_agree = _agreement(pairwise_scores(uniform.train, uniform.query, measure="covariance"), reference)
    assert xi_agree < 0.93, (xi_agree, agree)


def test_a_task_without_logits_is_refused_in_one_line():
    from daunce_core.api import Task

    class LossOnly(Task):
        def loss(self, model, batch):
            return torch.nn.functional.cross_entropy(model(batch[0]), batch[1], reduction="none")

    net = torch.nn.Linear(3, 2)
    data = (torch.randn(6, 3), torch.randint(0, 2, (6,)))
    with pytest.raises(TypeError, match="variant daunce_m draws labels from theta_0's logits"):
        fit_losses(net, LossOnly(), data, data, variant="daunce_m", K=2, device="cpu")


def test_config_takes_the_variant_with_its_own_settings_and_refuses_augmentation():
    import yaml

    from daunce_core.config import ConfigError, ExperimentConfig

    cfg = yaml.safe_load(open("config/config.yaml"))
    cfg["daunce"].update(variants=["daunce", "daunce_m"], matched_scale=0.2, matched_prox=0.01, matched_ratio=0.5,
                         matched_epochs=7)
    d = ExperimentConfig.from_dict(cfg).validate().daunce
    m = d.for_variant("daunce_m")
    assert (m.rho, m.prox, m.ratio, m.epochs) == (0.2, 0.01, 0.5, 7)
    assert d.for_variant("daunce") is d and d.measure_for("daunce_m") == "covariance"
    cfg["daunce"]["augment"] = True
    with pytest.raises(ConfigError, match="daunce_m draws each label from theta_0 on the stored input"):
        ExperimentConfig.from_dict(cfg).validate()
