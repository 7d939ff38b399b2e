"""Theorem 1 on a problem solved exactly: L2-regularised softmax regression.

theta_0 is the exact regularised optimum (Newton). Each perturbed model k minimises the DAUNCE
(Hessian) objective of ``daunce_core.objectives`` plus the same L2 term centred at theta_0, also
by Newton to convergence, with r = 1 and a small perturbation (rho = 0.1). Linearising, the
covariance of losses across the K models estimates

    (rho^2 / 3n) g_i^T H^-1 F H^-1 g_j          (F = mean of per-example gradient outer products)

which equals the influence function g_i^T H^-1 g_j / n when F = H (docs/facts.md, "What Theorem 1
really promises"). We check the sandwich form tightly and report the influence-function
agreement beside it (``pytest -s`` prints both per-query Pearson values).
"""
import numpy as np
import pytest
import torch
from torch.func import grad, hessian, vmap

from daunce_core import objectives as O
from daunce_core.perturb import subset_and_xi

N, M, D, C = 200, 40, 4, 3
LAM, RHO = 1e-2, 0.1


def logits_of(theta, X):
    W = theta[: C * D].reshape(C, D)
    return X @ W.T + theta[C * D:]


def newton(fun, theta, steps=12):
    g, h = grad(fun), hessian(fun)
    for _ in range(steps):
        theta = theta - torch.linalg.solve(h(theta), g(theta))
    return theta


@pytest.fixture
def float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


# K = 1500 models in the full suite; K = 300 in the fast loop, with a looser bound on the sandwich
# agreement (the covariance's Monte Carlo error grows as K shrinks).
@pytest.mark.parametrize("K, min_r", [pytest.param(1500, 0.98, marks=pytest.mark.slow), (300, 0.95)])
def test_covariance_matches_theorem1(float64, K, min_r):
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(N + M, D, generator=gen)
    W_true = torch.randn(C, D, generator=gen) * 1.5
    y = torch.distributions.Categorical(logits=X @ W_true.T).sample()
    Xtr, ytr, Xq, yq = X[:N], y[:N], X[N:], y[N:]

    def erm(theta):
        return O.cross_entropy(logits_of(theta, Xtr), ytr).mean() + 0.5 * LAM * (theta**2).sum()

    theta0 = newton(erm, torch.zeros(C * D + C))
    assert grad(erm)(theta0).abs().max() < 1e-10
    logits0 = logits_of(theta0, Xtr).detach()
    xi = torch.tensor(np.stack([subset_and_xi(0, k, N, 1.0)[1] for k in range(K)]))

    def perturbed(theta, xi_k):
        obj = O.classifier_objective("daunce", logits_of(theta, Xtr), ytr, logits0=logits0, xi=xi_k, rho=RHO)
        return obj.mean() + 0.5 * LAM * ((theta - theta0) ** 2).sum()

    def solve(xi_k):
        f = lambda th: perturbed(th, xi_k)  # noqa: E731
        return newton(f, theta0, steps=6)

    thetas = vmap(solve)(xi)  # [K, P]
    Ltr = vmap(lambda th: O.cross_entropy(logits_of(th, Xtr), ytr))(thetas).numpy()
    Lq = vmap(lambda th: O.cross_entropy(logits_of(th, Xq), yq))(thetas).numpy()
    cov = np.cov(np.concatenate([Ltr, Lq], axis=1).T)[:N, N:]  # [N, M]

    per_ex = lambda Xs, ys: vmap(grad(lambda th, x, t: O.cross_entropy(logits_of(th, x[None]), t[None]).squeeze()),  # noqa: E731
                                 in_dims=(None, 0, 0))(theta0, Xs, ys)
    G, Gq = per_ex(Xtr, ytr).numpy(), per_ex(Xq, yq).numpy()
    H = hessian(erm)(theta0).numpy()
    F = G.T @ G / N
    Hinv = np.linalg.inv(H)
    sandwich = RHO**2 / (3 * N) * G @ Hinv @ F @ Hinv @ Gq.T
    influence = G @ Hinv @ Gq.T / N

    def per_query_pearson(a, b):
        a = a - a.mean(0)
        b = b - b.mean(0)
        return (a * b).sum(0) / np.sqrt((a**2).sum(0) * (b**2).sum(0))

    r_sandwich = per_query_pearson(cov, sandwich).mean()
    r_if = per_query_pearson(cov, influence).mean()
    print(f"Theorem 1: per-query Pearson {r_sandwich:.3f} (sandwich), {r_if:.3f} (influence function)")
    assert r_sandwich > min_r
    assert r_if > 0.85
    # the scale too, not only the direction: slope of cov on the sandwich form near 1
    slope = (cov * sandwich).sum() / (sandwich**2).sum()
    assert 0.8 < slope < 1.25
