"""Each DAUNCE variant's Theorem-1 limit, and linearised perturbed fits: exact reference methods.

For models small enough for exact IF (``baselines.exact_if.max_params``), ``limit_*`` scores the
kernel each variant's estimator converges to, ``Cov_k(s_a, s_b) = P_a^T Cov(w) P_b`` with
``P = Z M^-1 S^T``, and ``lin_*`` scores linearised fits with the run's own subsets and xi at its K,
each at the damping that wins on the LDS selection masks; :func:`daunce_core.baselines.run_baseline`
calls them. The curvature M, the constants c, alpha, beta per variant and the damping grid:
docs/theory.md#the-constants-of-limitspy-every-variants-linear-response."""
from __future__ import annotations

import logging

import numpy as np

from .common import REFERENCE, BaselinesConfig, Problem, read_selection, selection_lds

log = logging.getLogger(__name__)

# method -> the DAUNCE variant whose estimator it is the limit (or linearised fit) of
LIMITS = {"limit_daunce": "daunce", "limit_daunce_e": "daunce_e", "limit_daunce_t": "daunce_t",
          "limit_daunce_t_q": "daunce_t_q", "limit_bb": "daunce_bb"}
LINEARISED = {"lin_daunce": "daunce", "lin_daunce_e": "daunce_e", "lin_daunce_t": "daunce_t",
              "lin_bb": "daunce_bb"}
# matched-noise DAUNCE (objectives.MATCHED): its own kernel, limit_daunce_m's docstring
MATCHED_LIMITS = {"limit_daunce_m": "daunce_m"}
# the registry's list (common.py) names them all, and exact IF scored by correlation (:mod:`.exact`)
assert set(LIMITS) | set(LINEARISED) | set(MATCHED_LIMITS) | {"exact_if_corr"} == set(REFERENCE)
MEASURES = ("correlation", "covariance")


def variant_of(method: str) -> str:
    if method in LIMITS:
        return LIMITS[method]
    if method in LINEARISED:
        return LINEARISED[method]
    if method in MATCHED_LIMITS:
        return MATCHED_LIMITS[method]
    raise ValueError(f"unknown reference method {method!r}; choose one of {', '.join(REFERENCE)}")


def fisher_form(variant: str) -> bool:
    """Whether the variant's curvature is the empirical Fisher of its own signal (E and T forms)."""
    return variant in ("daunce_e", "daunce_t", "daunce_t_q")


# --- the math, on plain arrays (tests/baselines/test_limits.py calls these directly) ---------------

def noise_constants(variant: str, n: int, N: int, rho: float, gamma: float) -> tuple[float, float, float]:
    """``(c, alpha, beta)`` of docs/theory.md: ``w_i = (c + sigma_i) 1[i in S] / N`` and
    ``Cov(w) = alpha I + beta (I - 1 1^T / n)``."""
    r = N / n
    c = {"daunce": 1.0 - gamma, "daunce_e": 0.0, "daunce_t": 0.0, "daunce_t_q": 0.0, "daunce_bb": -gamma}[variant]
    alpha = 0.0 if variant == "daunce_bb" else rho**2 * r / (3.0 * N**2)
    beta = c**2 * r * (1.0 - r) * n / ((n - 1) * N**2) if n > 1 else 0.0
    return c, alpha, beta


def noise_weights(variant: str, plan, K: int, n: int, rho: float, gamma: float) -> np.ndarray:
    """``w^k`` of models ``k = 0..K-1`` as [n, K], from the same subsets and xi as the real fits."""
    from ..perturb import subset_size

    N = subset_size(n, plan.ratio)
    c, _, _ = noise_constants(variant, n, N, rho, gamma)
    W = np.zeros((n, K))
    for k in range(K):
        idx, xi = plan.subset_and_xi(k, n)
        sigma = 0.0 if variant == "daunce_bb" else rho * (2.0 * xi[idx] - 1.0)
        W[idx, k] = (c + sigma) / N
    return W


def hessian_response(Z: np.ndarray, S: np.ndarray, M: np.ndarray) -> np.ndarray | None:
    """``P = Z M^-1 S^T`` [n_z, n_s] by a Cholesky solve; ``None`` when M is not positive definite.

    The exact IF's solve (:func:`.exact.influence`, in torch: scipy's crashes on large p)."""
    from .exact import influence

    return influence(Z, S, M, 0.0)


def fisher_svd(Z: np.ndarray):
    """Thin SVD of Z [n, p] (F = Z^T Z / n): the whole damping grid of a Fisher form costs one."""
    U, s, Vt = np.linalg.svd(Z, full_matrices=False)
    return U, s, Vt


def fisher_response(svd, S: np.ndarray, gamma: float, mu: float) -> np.ndarray:
    """``P = Z (gamma Z^T Z / n + mu I)^-1 S^T`` for Z = U s Vt: Z's row space is Vt's, so the
    part of S outside it never reaches P (exact, no p x p matrix)."""
    U, s, Vt = svd
    n = U.shape[0]
    d = s / (gamma * s**2 / n + mu)
    return (U * d) @ (Vt @ S.T)


def limit_kernel(P: np.ndarray, Q: np.ndarray, alpha: float, beta: float, measure: str) -> np.ndarray:
    """The limit scores [n, m] from ``P = Z M^-1 S_train^T`` and ``Q = Z M^-1 S_query^T``:
    ``Cov = alpha P^T Q + beta Pc^T Qc`` (c: centred over Z's rows), divided by the standard
    deviations under ``measure="correlation"``."""
    cov = alpha * (P.T @ Q)
    vp, vq = alpha * (P**2).sum(0), alpha * (Q**2).sum(0)
    if beta:
        Pc, Qc = P - P.mean(0), Q - Q.mean(0)
        cov += beta * (Pc.T @ Qc)
        vp += beta * (Pc**2).sum(0)
        vq += beta * (Qc**2).sum(0)
    if measure == "covariance":
        return cov
    if measure != "correlation":
        raise ValueError(f"unknown measure {measure!r}; choose one of {MEASURES}")
    with np.errstate(divide="ignore", invalid="ignore"):
        out = cov / np.sqrt(np.outer(vp, vq))
    return np.where(np.isfinite(out), out, 0.0)


def linearised_scores(P: np.ndarray, Q: np.ndarray, W: np.ndarray, measure: str) -> np.ndarray:
    """DAUNCE's scores of the linearised fits: signals ``g_a^T Delta^k = P_a^T w^k`` of every
    example under every model ([K, n] and [K, m]), scored by :func:`scoring.pairwise_scores`."""
    from ..scoring import pairwise_scores

    return pairwise_scores(W.T @ P, W.T @ Q, measure=measure).astype(np.float64)


def q_weight(problem: Problem) -> np.ndarray:
    """TRAK's ``Q = 1 - p_i(theta_0)`` per training example (theta_0's probability of the label), [n]
    float64: the factor ``daunce_t_q`` applies to its training rows."""
    import torch

    X, y = problem.tensors("train")
    with torch.no_grad():
        logits = torch.cat([problem.model(X[i:i + 1000]) for i in range(0, len(y), 1000)]).double()
    p = torch.softmax(logits, dim=-1).gather(1, y.long().unsqueeze(1)).squeeze(1)
    return (1.0 - p).cpu().numpy()


# --- the method on a Problem ----------------------------------------------------------------------

def _refuse_large(method: str, problem: Problem, bcfg: BaselinesConfig) -> None:
    p, cap = problem.num_params(), bcfg.exact_if.max_params
    if p > cap:
        raise ValueError(f"{method}: the model has {p} parameters, above baselines.exact_if.max_params={cap} "
                         f"({p}^2 float64 = {8 * p * p / 2**30:.1f} GiB); drop {method} from baselines.methods")


def response_key(method: str) -> str | None:
    """The linear responses a limit or linearised method reads, named by curvature form and signal
    (``hessian_loss``, ``fisher_loss``, ``fisher_margin``): the methods of one key solve the same
    systems at the same dampings (:func:`linear_responses`). None: a method with its own kernel."""
    if method not in LIMITS and method not in LINEARISED:
        return None
    from ..config import fit_variant
    from ..objectives import signal_of

    variant = variant_of(method)
    return f"{'fisher' if fisher_form(variant) else 'hessian'}_{signal_of(fit_variant(variant))}"


RESPONSE_KEYS = tuple(sorted({k for k in map(response_key, [*LIMITS, *LINEARISED]) if k}))


def linear_responses(key: str, problem: Problem, bcfg: BaselinesConfig) -> dict:
    """The responses ``P = Z M^-1 S^T`` [n, n + m] (S: the training then the query signals'
    gradients) at every damping of ``baselines.limits.damping_grid``, for the methods of ``key``
    (:func:`response_key`): ``{"key", "dampings", "ok" (M + damping I positive definite), "P"
    [G, n, n + m] (zeros where not ok), "mean_eig", "curvature", "signal", "num_params"}``."""
    from .exact import curvature_matrix, per_example_grads

    if key not in RESPONSE_KEYS:
        raise ValueError(f"unknown response key {key!r}; choose one of {', '.join(RESPONSE_KEYS)}")
    _refuse_large(f"the {key} responses", problem, bcfg)
    form, signal = key.split("_", 1)
    lc, dc = bcfg.limits, problem.cfg.daunce
    gamma, prox = float(dc.gamma), float(dc.prox)
    Z = per_example_grads(problem, "train", signal=signal)  # the noise rows are the training signals
    Sq = per_example_grads(problem, "query", signal=signal)
    S = np.concatenate([Z, Sq])
    n, p = Z.shape
    if form == "fisher":
        svd = fisher_svd(Z)
        mean_eig = gamma * float((svd[1] ** 2).sum()) / n / p
        curvature = f"empirical Fisher of the {signal} gradients (gamma F, F = Z^T Z / n)"
    else:
        M0 = gamma * curvature_matrix(problem, bcfg.exact_if.curvature, 0.0)
        mean_eig = float(np.trace(M0)) / p
        curvature = f"gamma x {bcfg.exact_if.curvature} of the ERM term, no weight decay"
    grid = sorted(float(d) for d in lc.damping_grid)
    P, ok = None, np.zeros(len(grid), bool)
    for g, d in enumerate(grid):
        mu = prox + d * mean_eig
        if form == "fisher":
            r = fisher_response(svd, S, gamma, mu)
        else:
            M = M0.copy()
            M[np.diag_indices(p)] += mu
            r = hessian_response(Z, S, M)
        if r is not None:
            if P is None:  # the responses' own dtype, so the kernels compute as before
                P = np.zeros((len(grid), *r.shape), r.dtype)
            P[g], ok[g] = r, True
    if P is None:
        P = np.zeros((len(grid), n, len(S)))
    return {"key": key, "dampings": np.asarray(grid), "ok": ok, "P": P, "mean_eig": mean_eig,
            "curvature": curvature, "signal": signal, "num_params": p}


def write_responses(path, responses: dict) -> None:
    """:func:`linear_responses`' result as an uncompressed npz (float64, exact), atomically."""
    from .. import store

    with store.atomic_path(path, suffix=".npz") as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, **responses)


def read_responses(path, key: str, grid) -> dict:
    """A responses file written for ``key`` over the damping grid ``grid``, refused otherwise."""
    from .. import store

    with np.load(path, allow_pickle=False) as f:
        r = {k: f[k] for k in f.files}
    got = [float(d) for d in r["dampings"]]
    if str(r["key"]) != key or got != sorted(float(d) for d in grid):
        raise store.StoreError(f"{path}: responses of {str(r['key'])!r} at dampings {got}, not of {key!r} at "
                               f"{sorted(float(d) for d in grid)}; rerun the reference_responses step")
    for k in ("key", "curvature", "signal"):
        r[k] = str(r[k])
    r["mean_eig"], r["num_params"] = float(r["mean_eig"]), int(r["num_params"])
    return r


def reference_scores(method: str, problem: Problem, bcfg: BaselinesConfig, select_gt=None,
                     responses=None) -> tuple[np.ndarray, dict]:
    """Scores [n, m] of one limit or linearised method, its damping chosen on the selection masks.
    ``responses``: a :func:`write_responses` file of the method's :func:`response_key` (the
    workflow's shared step), else they are computed here."""
    if method in MATCHED_LIMITS:
        return limit_daunce_m(problem, bcfg, select_gt)
    from ..lds import on_edge
    from ..perturb import Plan, subset_size

    variant = variant_of(method)
    _refuse_large(method, problem, bcfg)
    lc, dc = bcfg.limits, problem.cfg.daunce
    rho, gamma, prox = float(dc.rho), float(dc.gamma), float(dc.prox)
    n = problem.n
    N = subset_size(n, dc.ratio)
    key = response_key(method)
    R = (read_responses(responses, key, lc.damping_grid) if responses is not None
         else linear_responses(key, problem, bcfg))
    signal, curvature, mean_eig, p = R["signal"], R["curvature"], R["mean_eig"], R["num_params"]
    _, alpha, beta = noise_constants(variant, n, N, rho, gamma)
    grid = [float(d) for d in R["dampings"]]
    gt = read_selection(select_gt) if len(grid) > 1 or select_gt is not None else None
    if len(grid) > 1 and gt is None:
        raise ValueError(f"{method}: several dampings in baselines.limits.damping_grid but no selection ground "
                         "truth to choose among them; pass select_gt or give a single damping")
    q = q_weight(problem)[:, None] if variant == "daunce_t_q" else 1.0  # after normalising, as daunce_t_q
    table, best = [], None
    for g, d in enumerate(grid):
        if not R["ok"][g]:
            table.append({"damping": d, "lds_select": None, "skipped": "M + damping I not positive definite"})
            log.info("%s damping=%g: not positive definite, skipped", method, d)
            continue
        PQ = R["P"][g]
        s = limit_kernel(PQ[:, :n], PQ[:, n:], alpha, beta, lc.measure) * q
        v = selection_lds(problem, s, gt) if gt is not None else None
        log.info("%s: limit at relative damping %g: selection LDS %s", method, d, v)
        table.append({"damping": d, "lds_select": v})
        if best is None or (v is not None and v > best[1]):
            best = (d, v, PQ, s)
    if best is None:
        raise ValueError(f"{method}: every damping in baselines.limits.damping_grid={grid} leaves the curvature "
                         "indefinite; add larger values")
    d, _, PQ, scores = best
    attrs = {"library": "daunce (torch.func + numpy/scipy, float64)", "variant": variant,
             "measurement": f"{signal} (the variant's signal, training and query side)",
             "measure_of_scores": lc.measure, "curvature": curvature, "damping": d,
             "damping_absolute": d * mean_eig, "prox": prox, "rho": rho, "gamma": gamma,
             "ratio": float(dc.ratio), "subset_size": N, "num_params": p,
             "bytes_per_example": 8 * p, "shared_bytes": 8 * p * p,
             "storage": f"the exact {signal} gradient ({p} float64) per example and the {p}x{p} curvature",
             **({"q_weight": "train: 1 - p_i(theta_0), after normalising"} if variant == "daunce_t_q" else {})}
    if method in LINEARISED:
        plan = Plan(seed=dc.seed, ratio=dc.ratio)
        W = noise_weights(variant, plan, dc.K, n, rho, gamma)
        scores = linearised_scores(PQ[:, :n], PQ[:, n:], W, lc.measure)
        attrs.update({"K": int(dc.K), "signals": "linearised: s(theta_0) + g^T (theta_k - theta_0)",
                      "plan": f"Plan(seed={dc.seed}, ratio={dc.ratio}): the real fits' subsets and xi"})
    if gt is not None:
        attrs["tuning"] = {"selected": {"damping": d}, "on_edge": on_edge(grid, d), "grid": table,
                           "selected_on": "select masks and select queries"
                           + (" (the limit's LDS)" if method in LINEARISED else "")}
    return scores, attrs


# --- matched noise: the damped Gauss-Newton influence function ------------------------------------

def matched_kernel(A_train: np.ndarray, A_query: np.ndarray, G: np.ndarray, alpha: float) -> np.ndarray:
    """``alpha A_train^T G A_query`` [n, m] with ``A = M^-1 S^T``: the covariance of the signals of
    matched-noise fits (:func:`limit_daunce_m`)."""
    return alpha * (A_train.T @ (G @ A_query))


def matched_limit(S_train: np.ndarray, S_query: np.ndarray, G: np.ndarray, M: np.ndarray,
                  alpha: float = 1.0) -> np.ndarray | None:
    """Matched-noise DAUNCE's Theorem-1 limit ``alpha S_train M^-1 G M^-1 S_query^T`` [n, m]
    (covariance; positive = helps) from the loss gradients at theta_0, the mean Gauss-Newton
    matrix ``G`` and the curvature of the fits ``M = gamma G + lambda I``; ``None`` when M is not
    positive definite. With ``M = G + lambda`` and lambda -> 0 it is ``alpha`` times the GGN
    influence function ``S_train G^-1 S_query^T``."""
    import scipy.linalg

    try:
        factor = scipy.linalg.cho_factor(M, lower=True, check_finite=False)
    except np.linalg.LinAlgError:
        return None
    A = scipy.linalg.cho_solve(factor, np.concatenate([S_train, S_query]).T, check_finite=False)
    n = len(S_train)
    return matched_kernel(A[:, :n], A[:, n:], G, alpha)


def limit_daunce_m(problem: Problem, bcfg: BaselinesConfig, select_gt=None) -> tuple[np.ndarray, dict]:
    """Scores [n, m] of matched-noise DAUNCE's limit: the covariance of its losses as K -> oo.

    With ``u_i^k = J_i^T (p_i - e_~y)``, ``~y ~ p(. | x_i, theta_0)`` (mean 0, covariance the
    example's Gauss-Newton matrix ``G_i``), a fit on the subset ``S^k`` (``N = round(r n)``) of
    ``gamma (L - L0) - lin_L - rho lin_~y`` plus ``lambda/2 ||theta - theta_0||^2`` moves by
    ``Delta^k = M^-1 (1/N) sum_{i in S^k} ((gamma - 1) g_i + rho u_i^k)``, ``M = gamma G + lambda``
    (G the mean GGN: the first-order terms are linear in the logits). Hence
    ``Cov_k(L_a, L_b) = (rho^2 / N) g_a^T M^-1 G M^-1 g_b`` plus, when gamma != 1, the subsampling
    term of :func:`noise_constants` (``c = 1 - gamma``). lambda is ``daunce.matched_prox``, the fits'
    own damping, so no selection is needed; with ``matched_prox = 0`` lambda = d x (mean eigenvalue
    of gamma G) for d in ``baselines.limits.damping_grid``, chosen on the selection masks. Scored
    with covariance, daunce_m's measure (``baselines.limits.measure`` is not applied).
    """
    from ..lds import on_edge
    from ..perturb import subset_size
    from .exact import curvature_matrix, per_example_grads

    method = "limit_daunce_m"
    _refuse_large(method, problem, bcfg)
    dc = problem.cfg.daunce.for_variant("daunce_m")
    rho, gamma, prox = float(dc.rho), float(dc.gamma), float(dc.prox)
    n = problem.n
    N = subset_size(n, dc.ratio)
    Z = per_example_grads(problem, "train", signal="loss")
    Sq = per_example_grads(problem, "query", signal="loss")
    p = Z.shape[1]
    G = curvature_matrix(problem, "ggn", 0.0)
    mean_eig = gamma * float(np.trace(G)) / p
    _, _, beta = noise_constants("daunce", n, N, rho, gamma)  # subsampling of (gamma - 1) g_i
    alpha = rho**2 * (N / n) * n / N**2

    def scores_at(mu: float) -> np.ndarray | None:
        M = gamma * G
        M[np.diag_indices(p)] += mu
        s = matched_limit(Z, Sq, G, M, alpha)
        if s is not None and beta:
            P = hessian_response(Z, np.concatenate([Z, Sq]), M)
            s = s + limit_kernel(P[:, :n], P[:, n:], 0.0, beta, "covariance")
        return s

    if prox > 0:
        grid, table = [0.0], []
        scores = scores_at(prox)
        if scores is None:
            raise ValueError(f"{method}: gamma G + daunce.matched_prox is not positive definite")
        best_d = 0.0
    else:
        grid = sorted(float(d) for d in bcfg.limits.damping_grid)
        gt = read_selection(select_gt) if select_gt is not None else None
        if len(grid) > 1 and gt is None:
            raise ValueError(f"{method}: daunce.matched_prox is 0 and baselines.limits.damping_grid has several "
                             "values but there is no selection ground truth; pass select_gt or set matched_prox > 0")
        table, best = [], None
        for d in grid:
            s = scores_at(d * mean_eig)
            v = selection_lds(problem, s, gt) if (s is not None and gt is not None) else None
            table.append({"damping": d, "lds_select": v} if s is not None else
                         {"damping": d, "lds_select": None, "skipped": "not positive definite"})
            if s is not None and (best is None or (v is not None and v > best[1])):
                best = (d, v, s)
        if best is None:
            raise ValueError(f"{method}: every damping in baselines.limits.damping_grid={grid} leaves gamma G "
                             "indefinite; add larger values")
        best_d, _, scores = best
    attrs = {"library": "daunce (torch.func + numpy/scipy, float64)", "variant": "daunce_m",
             "measurement": "loss (training and query side)", "measure_of_scores": "covariance",
             "curvature": "gamma x mean Gauss-Newton matrix of the cross-entropy (the noise's covariance too)",
             "damping": best_d, "damping_absolute": prox if prox > 0 else best_d * mean_eig,
             "prox": prox, "rho": rho, "gamma": gamma, "ratio": float(dc.ratio), "subset_size": N,
             "num_params": p, "bytes_per_example": 8 * p, "shared_bytes": 8 * p * p,
             "storage": f"the exact loss gradient ({p} float64) per example and the {p}x{p} GGN"}
    if prox == 0 and len(grid) > 1:
        attrs["tuning"] = {"selected": {"damping": best_d}, "on_edge": on_edge(grid, best_d), "grid": table,
                           "selected_on": "select masks and select queries"}
    return scores, attrs
