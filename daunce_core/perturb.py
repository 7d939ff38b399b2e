"""Subset masks and perturbation weights keyed by (seed, k) -- Algorithm 1, steps 2 and 3.

Perturbed model ``k`` draws everything random from ``numpy.random.default_rng([seed, k])``: its
subset ``D^k``, its ``xi^k`` and its minibatch order; matched-noise DAUNCE's labels come from
``default_rng([seed, k, 4])`` (:func:`matched_labels`). Model ``k`` is therefore the same whether
K models are trained in one job or split over many.
"""
from __future__ import annotations

import numpy as np


def model_rng(seed: int, k: int) -> np.random.Generator:
    """The random stream of perturbed model ``k`` (independent of every other k)."""
    return np.random.default_rng([int(seed), int(k)])


def subset_size(n: int, ratio: float) -> int:
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"subset ratio r must be in (0, 1], got {ratio}")
    return max(1, int(round(ratio * n)))


def subset_and_xi(seed: int, k: int, n: int, ratio: float) -> tuple[np.ndarray, np.ndarray]:
    """Subset ``D^k`` (sorted indices, size ``round(r n)``) and ``xi^k ~ U(0, 1)`` for all n.

    ``xi`` is drawn for every example so that its value for example ``i`` does not depend on
    which other examples are in the subset.
    """
    rng = model_rng(seed, k)
    idx = np.sort(rng.choice(n, size=subset_size(n, ratio), replace=False)).astype(np.int64)
    xi = rng.random(n)
    return idx, xi


def matched_labels(seed: int, k: int, probs: np.ndarray, mirror: bool = False) -> np.ndarray:
    """``~y_i^k ~ p(. | x_i, theta_0)`` for every example: int64 [n] from theta_0's probabilities
    ``probs`` [n, C] (rows summing to 1), by inverse CDF of one uniform per example drawn from
    ``default_rng([seed, k, 4])``. ``mirror`` uses ``1 - u`` (an antithetic partner's labels).

    The stream is model k's own, so its labels do not depend on the chunking of K; the rows are
    renormalised in float64, so float32 probabilities give the same labels on any device.
    """
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or not np.isfinite(p).all() or (p < 0).any():
        raise ValueError(f"matched_labels needs finite non-negative probabilities [n, C], got shape {p.shape}")
    u = np.random.default_rng([int(seed), int(k), 4]).random(len(p))
    if mirror:
        u = 1.0 - u
    cdf = np.cumsum(p / p.sum(1, keepdims=True), axis=1)
    return np.minimum((cdf < u[:, None]).sum(1), p.shape[1] - 1).astype(np.int64)


def batch_order(key: tuple[int, ...], subset: np.ndarray, epochs: int, batch_size: int) -> np.ndarray:
    """Minibatch schedule of the model keyed ``key``: [steps, batch_size] training indices.

    ``key`` is ``(seed, k)`` for perturbed model k, ``(seed, -1)`` for the batch order that every
    model shares under common batches, and longer tuples for retrains.

    Each epoch is a fresh permutation of the subset; a last incomplete batch is dropped so that
    all models of a chunk take identically shaped steps (the subset is re-shuffled every epoch,
    so every example is seen).
    """
    # SeedSequence takes non-negative entries only; a negative tag (-1: the stream that every model
    # shares under common batches, fit.contract.Plan) maps to 2**64 + v, no model's k
    rng = np.random.default_rng([*(int(v) % 2**64 for v in key), 1])
    bs = min(batch_size, len(subset))
    per_epoch = len(subset) // bs
    steps = [rng.permutation(subset)[: per_epoch * bs].reshape(per_epoch, bs) for _ in range(epochs)]
    return np.concatenate(steps, axis=0)


def lds_masks(seed: int, M: int, n: int, alpha: float, offset: int = 0) -> np.ndarray:
    """M random subsets of size ceil(alpha n) as a boolean [M, n] array (Appendix B, eq. 8-9).

    Mask ``j`` comes from ``default_rng([seed, offset + j, 2])``: test masks and the masks used
    to select hyperparameters are disjoint streams (different ``offset``).
    """
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"LDS alpha must be in (0, 1), got {alpha}")
    size = int(np.ceil(alpha * n))
    masks = np.zeros((M, n), dtype=bool)
    for j in range(M):
        rng = np.random.default_rng([int(seed), int(offset + j), 2])
        masks[j, rng.choice(n, size=size, replace=False)] = True
    return masks
