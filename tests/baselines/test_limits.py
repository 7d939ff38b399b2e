"""The Theorem-1 limits and linearised fits of :mod:`daunce_core.baselines.limits`, on a problem
solved exactly: L2-regularised softmax regression (as tests/test_theorem1.py).

theta_0 is the exact regularised optimum (Newton); every perturbed model minimises its variant's
objective of ``daunce_core.objectives`` on its subset, plus the L2 term centred at theta_0 (the
limits' ``prox``), by Newton to convergence, with the subsets and xi of ``perturb.Plan``.
"""
import numpy as np
import pytest
import torch
from torch.func import grad, hessian, vmap

from daunce_core import objectives as O
from daunce_core.baselines import REFERENCE
from daunce_core.baselines import limits as Lim
from daunce_core.lds import per_query_lds
from daunce_core.perturb import Plan, lds_masks, subset_size, theta0_key

N, M, D, C = 200, 40, 4, 3
LAM, RHO, RATIO = 1e-2, 0.1, 0.5


def logits_of(theta, X):
    W = theta[: C * D].reshape(C, D)
    return X @ W.T + theta[C * D:]


def newton(fun, theta, steps):
    g, h = grad(fun), hessian(fun)
    for _ in range(steps):
        theta = theta - torch.linalg.solve(h(theta), g(theta))
    return theta


def per_query_pearson(a, b):
    a = a - a.mean(0)
    b = b - b.mean(0)
    return (a * b).sum(0) / np.sqrt((a**2).sum(0) * (b**2).sum(0))


@pytest.fixture(scope="module")
def problem():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        gen = torch.Generator().manual_seed(0)
        X = torch.randn(N + M, D, generator=gen)
        with torch.random.fork_rng():  # sample() draws from the global generator: seed it, or every
            torch.manual_seed(0)         # process gets other labels (and other test values)
            y = torch.distributions.Categorical(logits=X @ (torch.randn(C, D, generator=gen) * 1.5).T).sample()
        Xtr, ytr, Xq, yq = X[:N], y[:N], X[N:], y[N:]

        def erm(theta):
            return O.cross_entropy(logits_of(theta, Xtr), ytr).mean() + 0.5 * LAM * (theta**2).sum()

        theta0 = newton(erm, torch.zeros(C * D + C), 12)

        def per_ex(signal, Xs, ys):
            f = lambda th, x, t: O.signal_value(signal, logits_of(th, x[None]), t[None]).squeeze()  # noqa: E731
            return vmap(grad(f), in_dims=(None, 0, 0))(theta0, Xs, ys).numpy()

        H = hessian(lambda th: O.cross_entropy(logits_of(th, Xtr), ytr).mean())(theta0).numpy()
        yield dict(X=(Xtr, ytr, Xq, yq), theta0=theta0, H=H, G=per_ex("loss", Xtr, ytr),
                   Gq=per_ex("loss", Xq, yq), Phi=per_ex("margin", Xtr, ytr), Phiq=per_ex("margin", Xq, yq))
    finally:
        torch.set_default_dtype(old)


def responses(pb, variant):
    """(P, Q) of the module docstring, with prox = LAM and no extra damping."""
    if Lim.fisher_form(variant):
        Z, Sq = (pb["G"], pb["Gq"]) if variant == "daunce_e" else (pb["Phi"], pb["Phiq"])
        PQ = Lim.fisher_response(Lim.fisher_svd(Z), np.concatenate([Z, Sq]), 1.0, LAM)
    else:
        Z, Sq = pb["G"], pb["Gq"]
        PQ = Lim.hessian_response(Z, np.concatenate([Z, Sq]), pb["H"] + LAM * np.eye(len(pb["H"])))
    return PQ[:, :N], PQ[:, N:]


def limit(pb, variant, measure):
    _, alpha, beta = Lim.noise_constants(variant, N, subset_size(N, RATIO), RHO, 1.0)
    return Lim.limit_kernel(*responses(pb, variant), alpha, beta, measure)


def test_registry_names_every_reference_method():
    assert set(Lim.LIMITS) | set(Lim.LINEARISED) | set(Lim.MATCHED_LIMITS) | {"exact_if_corr"} == set(REFERENCE)
    assert {Lim.variant_of(m) for m in REFERENCE if m != "exact_if_corr"} == \
        {"daunce", "daunce_e", "daunce_t", "daunce_t_q", "daunce_bb", "daunce_m"}


def test_the_limit_is_the_sandwich_with_a_third_of_the_variance():
    """docs/theory.md: Cov_k(L_a, L_b) -> (rho^2 / 3N) g_a^T M^-1 F M^-1 g_b (Var(2 xi - 1) = 1/3,
    not 1); when F = M (= H) this is (rho^2 / 3N) times the influence function's kernel, and when
    F != H it is not proportional to it."""
    from daunce_core.baselines.exact import influence

    rng = np.random.default_rng(0)
    n, p, rho = 300, 6, 0.7
    N = subset_size(n, 0.5)
    Z = rng.normal(size=(n, p)) * rng.uniform(0.2, 2.0, size=p)
    Sq = rng.normal(size=(9, p))
    F = Z.T @ Z / n
    _, alpha, beta = Lim.noise_constants("daunce", n, N, rho, 1.0)
    assert beta == 0.0 and alpha == pytest.approx(rho**2 / (3 * N * n))
    P, Q = np.split(Lim.hessian_response(Z, np.concatenate([Z, Sq]), F).T, [n])
    cov = Lim.limit_kernel(P.T, Q.T, alpha, beta, "covariance")
    np.testing.assert_allclose(cov, rho**2 / (3 * N) * influence(Z, Sq, F, 0.0), rtol=1e-8)
    H = F + np.diag(rng.uniform(0.5, 3.0, size=p))  # curvature other than the noise's F
    P, Q = np.split(Lim.hessian_response(Z, np.concatenate([Z, Sq]), H).T, [n])
    sandwich = Z @ np.linalg.solve(H, F @ np.linalg.solve(H, Sq.T))
    np.testing.assert_allclose(Lim.limit_kernel(P.T, Q.T, alpha, beta, "covariance"),
                               rho**2 / (3 * N) * sandwich, rtol=1e-8)
    assert per_query_pearson(sandwich, influence(Z, Sq, H, 0.0)).min() < 0.999


@pytest.mark.parametrize("variant", ["daunce", "daunce_bb"])
def test_limit_matches_converged_fits(problem, variant):
    """Covariance across K = 200 Newton-converged fits (subsets of r = 0.5, the Plan's xi) against
    the limit's covariance kernel: per-query Pearson > 0.95, and for DAUNCE the scale within 25%.
    The black-box fits converge to the subset's own optimum, beyond the one Newton step the limit
    linearises (measured slope ~1.9 at K = 300: the limit is right in direction, not in scale)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        Xtr, ytr, Xq, yq = problem["X"]
        theta0 = problem["theta0"]
        logits0 = logits_of(theta0, Xtr).detach()
        plan, K = Plan(seed=0, ratio=RATIO), 200
        masks, xis = [], []
        for k in range(K):
            idx, xi = plan.subset_and_xi(k, N)
            m = np.zeros(N)
            m[idx] = 1.0
            masks.append(m)
            xis.append(xi)
        masks, xis = torch.tensor(np.array(masks)), torch.tensor(np.array(xis))

        def solve(mask, xi_k):
            def f(th):
                obj = O.classifier_objective(variant, logits_of(th, Xtr), ytr, logits0=logits0, xi=xi_k, rho=RHO)
                return (obj * mask).sum() / mask.sum() + 0.5 * LAM * ((th - theta0) ** 2).sum()
            return newton(f, theta0, 4 if variant == "daunce" else 6)

        thetas = vmap(solve)(masks, xis)
        Ltr = vmap(lambda th: O.cross_entropy(logits_of(th, Xtr), ytr))(thetas).numpy()
        Lq = vmap(lambda th: O.cross_entropy(logits_of(th, Xq), yq))(thetas).numpy()
    finally:
        torch.set_default_dtype(old)
    cov = np.cov(np.concatenate([Ltr, Lq], axis=1).T)[:N, N:]
    lim = limit(problem, variant, "covariance")
    r = per_query_pearson(cov, lim).mean()
    slope = (cov * lim).sum() / (lim**2).sum()
    print(f"{variant}: per-query Pearson {r:.3f} of the fits' covariance with the limit, slope {slope:.3f}")
    assert r > 0.95
    assert 0.75 < slope < 1.33 or variant == "daunce_bb"


@pytest.mark.parametrize("variant", ["daunce", "daunce_e", "daunce_t", "daunce_bb"])
def test_linearised_fits_converge_to_the_limit(problem, variant):
    lim = limit(problem, variant, "correlation")
    P, Q = responses(problem, variant)
    plan = Plan(seed=0, ratio=RATIO)
    agree = []
    for K in (10, 100, 3000):
        W = Lim.noise_weights(variant, plan, K, N, RHO, 1.0)
        agree.append(per_query_pearson(Lim.linearised_scores(P, Q, W, "correlation"), lim).mean())
    print(f"{variant}: per-query Pearson of lin at K = 10, 100, 3000 with the limit: {np.round(agree, 3)}")
    assert agree[0] < agree[1] < agree[2]
    assert agree[2] > 0.97


def test_noise_weights_have_the_limit_covariance():
    """Cov(w) = alpha I + beta (I - 11^T/n) of the docstring, against 20,000 draws of the Plan."""
    n, K = 12, 20000
    plan = Plan(seed=3, ratio=0.5)
    for variant, gamma in (("daunce", 0.5), ("daunce_e", 1.0), ("daunce_bb", 1.0)):
        W = Lim.noise_weights(variant, plan, K, n, 1.0, gamma)
        _, alpha, beta = Lim.noise_constants(variant, n, subset_size(n, 0.5), 1.0, gamma)
        want = alpha * np.eye(n) + beta * (np.eye(n) - 1.0 / n)
        np.testing.assert_allclose(np.cov(W), want, atol=0.08 * np.abs(want).max())


def test_each_limit_beats_random_scores(problem):
    """LDS on 30 masks (alpha = 0.5) of exact retrains: every limit well above random scores."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        Xtr, ytr, Xq, yq = problem["X"]
        masks = lds_masks(0, 30, N, 0.5)

        def retrain(mask):
            def f(th):
                return (O.cross_entropy(logits_of(th, Xtr), ytr) * mask).sum() / mask.sum() + 0.5 * LAM * (th**2).sum()
            return O.margin(logits_of(newton(f, problem["theta0"], 8), Xq), yq)

        outputs = vmap(retrain)(torch.tensor(masks, dtype=torch.float64)).numpy()
    finally:
        torch.set_default_dtype(old)
    rand = per_query_lds(np.random.default_rng(0).standard_normal((N, M)), masks, outputs).mean()
    for variant in ("daunce", "daunce_e", "daunce_t", "daunce_bb"):
        v = per_query_lds(limit(problem, variant, "correlation"), masks, outputs).mean()
        print(f"{variant}: LDS of the limit {v:.3f}, random {rand:.3f}")
        assert v > rand + 0.2


def test_refused_above_max_params_and_configured_by_name():
    from types import SimpleNamespace

    from daunce_core.baselines import BaselinesConfig
    from daunce_core.settings import ConfigError

    bcfg = BaselinesConfig.from_config({"baselines": {"methods": ["exact_if", "limit_daunce", "lin_bb"]}}).validate()
    big = SimpleNamespace(num_params=lambda: bcfg.exact_if.max_params + 1)
    with pytest.raises(ValueError, match=r"limit_daunce: the model has \d+ parameters.*baselines.methods") as e:
        Lim.reference_scores("limit_daunce", big, bcfg)
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="baselines.limits.damping_grid"):
        BaselinesConfig.from_config({"baselines": {"methods": ["lin_daunce"],
                                                   "limits": {"damping_grid": [0.0]}}}).validate()
    with pytest.raises(ConfigError, match="baselines.limits.damping_grid"):  # an explicit budget binds them too
        BaselinesConfig.from_config({"daunce": {"lr_grid": [0.1]}, "baselines": {
            "methods": ["lin_daunce"], "max_settings": 1, "limits": {"damping_grid": [0.1, 1.0]}}}).validate()


# --- the references on a real Problem: limit_daunce_t_q and exact_if_corr -------------------------

@pytest.fixture(scope="module")
def small_problem():
    from daunce_core import baselines as B
    from daunce_core import ensemble as E
    from daunce_core.config import ExperimentConfig, ModelConfig, TrainConfig
    from daunce_core.data import Dataset
    from daunce_core.models import model_factory

    rng = np.random.default_rng(0)
    n, m = 40, 7
    centers = rng.normal(size=(3, 4)) * 1.5
    y = rng.integers(0, 3, n + m)
    X = (centers[y] + rng.normal(size=(n + m, 4))).astype(np.float32)
    ds = Dataset(X[:n], y[:n].astype(np.int64), np.arange(n, dtype=np.int64), X[n:], y[n:].astype(np.int64),
                 np.arange(m, dtype=np.int64) + 500, 3, ["a", "b", "c"], np.zeros(1, np.float32),
                 np.ones(1, np.float32))
    cfg = ExperimentConfig(model=ModelConfig(arch="mlp", hidden=[6]),
                           base=TrainConfig(epochs=10, batch_size=8, lr=0.05, weight_decay=1e-3))
    factory = model_factory(cfg.model, ds.X_train.shape[1:], ds.num_classes)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)  # the module's ``problem`` fixture may hold float64
    try:
        net, p, b = E.fit_from_scratch(factory, torch.as_tensor(ds.X_train), torch.as_tensor(ds.y_train),
                                       [np.arange(n)], [theta0_key(cfg.base.seed)], cfg.base)
        model = factory()
        model.load_state_dict({**E.unstack(p, 0), **E.unstack(b, 0)})
    finally:
        torch.set_default_dtype(old)
    model.eval()
    return B.Problem(cfg, ds, model, dict(model.state_dict()), torch.device("cpu"))


def test_limit_of_daunce_t_q_weights_the_training_rows_by_one_minus_p(small_problem):
    from daunce_core.baselines import BaselinesConfig

    bcfg = BaselinesConfig.from_config({"baselines": {"limits": {"damping_grid": [0.1]}}}).validate()
    plain, _ = Lim.reference_scores("limit_daunce_t", small_problem, bcfg)
    q_scores, attrs = Lim.reference_scores("limit_daunce_t_q", small_problem, bcfg)
    with torch.no_grad():
        prob = torch.softmax(small_problem.model(torch.as_tensor(small_problem.ds.X_train)).double(), -1)
    q = 1.0 - prob[np.arange(small_problem.n), small_problem.ds.y_train].numpy()
    assert q.std() > 0.05  # the factor is not a constant here: the test can tell
    np.testing.assert_allclose(q_scores, plain * q[:, None], rtol=1e-6, atol=1e-12)
    assert attrs["variant"] == "daunce_t_q" and "q_weight" in attrs


def test_exact_if_by_correlation_divides_by_each_examples_own_influence(small_problem):
    from daunce_core.baselines import BaselinesConfig
    from daunce_core.baselines import exact as X

    bcfg = BaselinesConfig.from_config({"baselines": {"exact_if": {"damping_grid": [0.05]}}}).validate()
    raw, _ = X.exact_if_scores(small_problem, bcfg)
    corr, attrs = X.exact_if_scores(small_problem, bcfg, measure="correlation")
    Gt = X.per_example_grads(small_problem, "train")
    Gq = X.per_example_grads(small_problem, "query", bcfg.measurement)
    wd = float(small_problem.cfg.base.weight_decay)
    A = X.curvature_matrix(small_problem, "ggn", wd) + 0.05 * np.eye(Gt.shape[1])
    kt = np.einsum("ip,ip->i", Gt, np.linalg.solve(A, Gt.T).T)
    kq = np.einsum("jp,jp->j", Gq, np.linalg.solve(A, Gq.T).T)
    np.testing.assert_allclose(corr, raw / np.sqrt(np.outer(kt, kq)), rtol=1e-6)
    assert np.abs(corr).max() <= 1 + 1e-9 and attrs["measure_of_scores"] == "correlation"
    # the training-side normalisation changes which examples rank first (it is not a rescaling)
    from scipy import stats
    assert min(stats.spearmanr(raw[:, j], corr[:, j]).statistic for j in range(raw.shape[1])) < 0.999


def test_shared_responses_give_the_scores_computed_in_place(small_problem, tmp_path):
    """The workflow's reference jobs read their curvature form's responses from one file (rule
    reference_responses); every method scores exactly as with the responses computed in place,
    and a file of another key or damping grid is refused."""
    from daunce_core import store
    from daunce_core.baselines import BaselinesConfig

    bcfg = BaselinesConfig.from_config({"baselines": {"limits": {"damping_grid": [0.1, 1.0]}}}).validate()
    assert Lim.RESPONSE_KEYS == ("fisher_loss", "fisher_margin", "hessian_loss")
    assert {m: Lim.response_key(m) for m in ("limit_daunce", "lin_bb", "limit_daunce_e", "limit_daunce_t_q")} == {
        "limit_daunce": "hessian_loss", "lin_bb": "hessian_loss", "limit_daunce_e": "fisher_loss",
        "limit_daunce_t_q": "fisher_margin"}
    assert Lim.response_key("limit_daunce_m") is None and Lim.response_key("exact_if_corr") is None
    rng = np.random.default_rng(0)
    sel = {"masks": rng.random((12, small_problem.n)) < 0.5, "outputs": rng.normal(size=(12, small_problem.m))}
    gt = tmp_path / "select.h5"
    store.write_ground_truth(gt, masks=sel["masks"], outputs=sel["outputs"][None], train_ids=small_problem.ds.train_ids,
                             query_ids=small_problem.ds.query_ids, attrs={"split": "select"})
    for key in Lim.RESPONSE_KEYS:
        Lim.write_responses(tmp_path / f"{key}.npz", Lim.linear_responses(key, small_problem, bcfg))
    for method in ("limit_daunce", "lin_daunce", "limit_bb", "limit_daunce_e", "lin_daunce_t", "limit_daunce_t_q"):
        here, a = Lim.reference_scores(method, small_problem, bcfg, select_gt=gt)
        read, b = Lim.reference_scores(method, small_problem, bcfg, select_gt=gt,
                                       responses=tmp_path / f"{Lim.response_key(method)}.npz")
        np.testing.assert_array_equal(read, here)
        assert a == b, method
    with pytest.raises(store.StoreError, match="not of 'hessian_loss'"):
        Lim.reference_scores("limit_daunce", small_problem, bcfg, select_gt=gt, responses=tmp_path / "fisher_loss.npz")
    other = BaselinesConfig.from_config({"baselines": {"limits": {"damping_grid": [0.1]}}}).validate()
    with pytest.raises(store.StoreError, match="rerun the reference_responses step"):
        Lim.reference_scores("limit_daunce", small_problem, other, responses=tmp_path / "hessian_loss.npz")
