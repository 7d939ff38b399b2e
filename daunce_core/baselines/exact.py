"""Exact influence functions (Koh & Liang, 2017) for models small enough: the upper reference.

``s_ij = grad L_i(theta_0)^T (H + lambda I)^-1 grad q_j(theta_0)``, with ``H`` the full Hessian or
the Gauss-Newton matrix of the base recipe's objective built exactly in float64 (no projection, no
factoring, no iterative solver), the damping chosen on the LDS selection masks; ``exact_if_corr``
scores the same influence by correlation. :func:`daunce_core.baselines.run_baseline` calls it for
models under ``baselines.exact_if.max_params``. Derivation:
docs/theory.md#exact-influence-functions-baselinesexactpy."""
from __future__ import annotations

import logging

import numpy as np

from .common import BaselinesConfig, Problem, query_value, read_selection, selection_lds, train_loss

log = logging.getLogger(__name__)


def _flat(problem: Problem, dtype):
    """theta_0 as one flat float64 vector, and a function from such vectors to parameter dicts."""
    import torch

    model = problem.model
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    sizes = [int(np.prod(s)) for s in shapes]
    theta = torch.cat([p.detach().reshape(-1) for _, p in model.named_parameters()]).to(dtype)
    buffers = {k: v.to(dtype) if v.is_floating_point() else v for k, v in model.named_buffers()}

    def unflatten(flat):
        return {n: t.reshape(s) for n, t, s in zip(names, torch.split(flat, sizes), shapes)}

    return theta, unflatten, buffers


def _forward(problem: Problem, unflatten, buffers):
    from torch.func import functional_call

    model = problem.model

    def logits(flat, x):
        return functional_call(model, (unflatten(flat), buffers), (x,))

    return logits


def per_example_grads(problem: Problem, which: str, measurement: str = "margin", chunk: int = 250,
                      dtype=None, signal: str | None = None) -> np.ndarray:
    """Per-example gradients at theta_0 in float64: ``which="train"`` -> grad L_i [n, p];
    ``which="query"`` -> grad q_j [m, p] (q = loss-like measurement). ``signal`` (``"loss"`` or
    ``"margin"``, DAUNCE's signals, :func:`daunce_core.objectives.signal_value`) overrides both:
    the gradient of that signal on either split (the Theorem-1 limits, :mod:`.limits`)."""
    import torch
    from torch.func import grad, vmap

    from ..objectives import signal_value

    dtype = dtype or torch.float64
    theta, unflatten, buffers = _flat(problem, dtype)
    logits = _forward(problem, unflatten, buffers)
    X, y = problem.tensors(which, dtype=dtype)

    def one(flat, x, t):
        out = logits(flat, x.unsqueeze(0))
        if signal is not None:
            return signal_value(signal, out, t.unsqueeze(0)).sum()
        if which == "train":
            return train_loss(out, t.unsqueeze(0)).sum()
        return query_value(out, t.unsqueeze(0), measurement).sum()

    g = vmap(grad(one), in_dims=(None, 0, 0))
    return torch.cat([g(theta, X[i:i + chunk], y[i:i + chunk]) for i in range(0, len(y), chunk)]).cpu().numpy()


def curvature_matrix(problem: Problem, curvature: str, weight_decay: float, chunk: int = 128) -> np.ndarray:
    """H of the training objective at theta_0 in float64, [p, p] (``hessian`` or ``ggn``)."""
    import torch
    from torch.func import grad, jacrev, jvp, vmap

    dtype = torch.float64
    theta, unflatten, buffers = _flat(problem, dtype)
    logits = _forward(problem, unflatten, buffers)
    X, y = problem.tensors("train", dtype=dtype)
    n, p = len(y), theta.numel()
    if curvature == "hessian":
        def objective(flat):
            return train_loss(logits(flat, X), y).mean()

        g = grad(objective)

        def hvp(v):
            return jvp(g, (theta,), (v,))[1]

        eye = torch.eye(p, dtype=dtype, device=theta.device)
        H = torch.cat([vmap(hvp)(eye[i:i + chunk]) for i in range(0, p, chunk)])
        H = 0.5 * (H + H.T)  # symmetric up to rounding
    elif curvature == "ggn":
        def one_logits(flat, x):
            return logits(flat, x.unsqueeze(0))[0]

        jac = vmap(jacrev(one_logits), in_dims=(None, 0))
        # Accumulated by torch's GEMM (MKL on x86 CPUs, cuBLAS on GPUs), not by the OpenBLAS of
        # numpy/scipy: multithreaded OpenBLAS 0.3.30-0.3.31 dies with SIGSEGV on these products
        # and on their Cholesky factorisation from p of about 16,000 (benchmarks/exact_if_blas.py).
        H = torch.zeros((p, p), dtype=dtype, device=theta.device)
        for i in range(0, n, chunk):
            xb = X[i:i + chunk]
            J = jac(theta, xb)  # [b, C, p]
            prob = torch.softmax(logits(theta, xb), dim=-1)  # [b, C]
            sq = prob.sqrt()
            # diag(p) - p p^T = S S^T with S = diag(sqrt p) - p sqrt(p)^T
            S = torch.diag_embed(sq) - prob.unsqueeze(-1) * sq.unsqueeze(-2)  # [b, C, C]
            R = torch.einsum("bck,bcp->bkp", S, J).reshape(-1, p)
            H.addmm_(R.T, R)
        H = 0.5 * (H + H.T) / n  # symmetric up to rounding
    else:
        raise ValueError(f"unknown curvature {curvature!r}; 'hessian' or 'ggn'")
    H = H.cpu().numpy()
    H[np.diag_indices(p)] += weight_decay
    return H


def influence(G_train: np.ndarray, G_query: np.ndarray, H: np.ndarray, damping: float,
              measure: str = "score") -> np.ndarray | None:
    """``G_train (H + damping I)^-1 G_query^T`` by a Cholesky solve, [n, m]; ``None`` when
    ``H + damping I`` is not positive definite (no influence function then). ``measure=
    "correlation"`` divides entry (i, j) by ``sqrt(k_ii k_jj)``, each example's own influence
    under the same kernel (the scores of ``exact_if_corr``).

    The factorisation and products run in torch (float64), for the reason given in
    :func:`curvature_matrix`: scipy's ``cho_factor`` crashes the process there.
    """
    import torch

    if measure not in ("score", "correlation"):
        raise ValueError(f"unknown measure {measure!r}; 'score' or 'correlation'")
    A = torch.as_tensor(H, dtype=torch.float64).clone()
    A.diagonal().add_(damping)
    L, info = torch.linalg.cholesky_ex(A)
    del A
    if int(info) != 0:
        return None
    Gq = torch.as_tensor(G_query, dtype=torch.float64)
    Gt = torch.as_tensor(G_train, dtype=torch.float64)
    X = torch.cholesky_solve(Gq.T, L)  # [p, m]
    scores = (Gt @ X).numpy()
    if measure == "score":
        return scores
    k_query = torch.einsum("mp,pm->m", Gq, X).numpy()
    k_train = torch.einsum("np,pn->n", Gt, torch.cholesky_solve(Gt.T, L)).numpy()
    with np.errstate(divide="ignore", invalid="ignore"):
        out = scores / np.sqrt(np.outer(k_train, k_query))
    return np.where(np.isfinite(out), out, 0.0)


def exact_if_scores(problem: Problem, bcfg: BaselinesConfig, select_gt=None,
                    measure: str = "score") -> tuple[np.ndarray, dict]:
    """Exact IF scores [n, m] (``measure="correlation"``: ``exact_if_corr``), the damping chosen on
    the selection masks, and the attributes of the scores file."""
    from ..lds import on_edge

    ec = bcfg.exact_if
    p = problem.num_params()
    if p > ec.max_params:
        raise ValueError(f"exact_if: the model has {p} parameters; the exact curvature ({p}^2 float64 = "
                         f"{8 * p * p / 2**30:.1f} GiB) is refused above baselines.exact_if.max_params="
                         f"{ec.max_params}. Drop exact_if from baselines.methods for this model.")
    wd = float(problem.cfg.base.weight_decay)
    G_train = per_example_grads(problem, "train")
    G_query = per_example_grads(problem, "query", bcfg.measurement)
    H = curvature_matrix(problem, ec.curvature, wd)
    grid = sorted(float(d) for d in ec.damping_grid)
    gt = None
    if len(grid) > 1:
        if select_gt is None:
            raise ValueError("exact_if: several dampings in baselines.exact_if.damping_grid but no selection "
                             "ground truth to choose among them; pass select_gt or give a single damping")
        gt = read_selection(select_gt)
    table, best, best_scores = [], None, None
    for d in grid:
        s = influence(G_train, G_query, H, d, measure)
        if s is None:  # a network's Hessian at an SGD solution is indefinite
            table.append({"damping": d, "lds_select": None, "skipped": "H + damping I not positive definite"})
            log.info("exact_if damping=%g: H + damping I is not positive definite, skipped", d)
            continue
        v = None
        if gt is not None:
            v = selection_lds(problem, s, gt)
            log.info("exact_if damping=%g: selection LDS %.4f", d, v)
        table.append({"damping": d, "lds_select": v})
        if best is None or (v is not None and v > best[1]):
            best, best_scores = (d, v), s
    if best is None:
        raise ValueError(f"exact_if: every damping in baselines.exact_if.damping_grid={grid} leaves H + damping I "
                         "indefinite; add larger values")
    return best_scores, {
        "library": "daunce (torch.func + torch.linalg Cholesky, float64)",
        "curvature": ec.curvature, "weight_decay": wd, "damping": best[0], "measure_of_scores": measure,
        "damping_grid": table, "selected_on": "select masks" if gt is not None else "single value",
        **({"tuning": {"selected": {"damping": best[0]}, "on_edge": on_edge(grid, best[0]), "grid": table,
                       "selected_on": "select masks and select queries"}} if gt is not None else {}),
        "num_params": p,
        "bytes_per_example": 8 * p, "shared_bytes": 8 * p * p,
        "storage": f"the exact training gradient ({p} float64) per example and the {p}x{p} float64 "
                   "curvature (its Cholesky factor), all in memory",
    }
