"""Subset masks and perturbation weights keyed by (seed, k) -- Algorithm 1, steps 2 and 3.

Perturbed model ``k`` draws everything random from ``numpy.random.default_rng([seed, k])``: its
subset ``D^k``, its ``xi^k`` and its minibatch order; matched-noise DAUNCE's labels come from
``default_rng([seed, k, 4])`` (:func:`matched_labels`). Model ``k`` is therefore the same whether
K models are trained in one job or split over many. A :class:`Plan` says how the K models share
these streams (independent draws, common batches, antithetic pairs).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

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
    # shares under common batches, Plan) maps to 2**64 + v, no model's k
    rng = np.random.default_rng([*(int(v) % 2**64 for v in key), 1])
    bs = min(batch_size, len(subset))
    per_epoch = len(subset) // bs
    steps = [rng.permutation(subset)[: per_epoch * bs].reshape(per_epoch, bs) for _ in range(epochs)]
    return np.concatenate(steps, axis=0)


def theta0_key(seed: int) -> tuple[int, ...]:
    """Key of theta_0's initialisation and batch order (the ``base`` rule's fit from scratch)."""
    return (seed, 0, 0, 11)


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


@dataclass(frozen=True)
class Plan:
    """The randomness of perturbed model k (Algorithm 1, steps 2-3), keyed by ``(seed, k)``.

    Both options off reproduce the paper's independent draws (``daunce.antithetic`` and
    ``daunce.common_batches``; both off by default):

    * ``common_batches`` -- common random numbers: every model takes its minibatches from the same
      stream. :func:`batch_order` permutes a subset by positions, so models whose subsets
      have the same size visit their sorted subsets in the same positional order at every step.
      This removes the part of the across-k variation that comes from the batch order alone.
    * ``antithetic`` -- models ``2j`` and ``2j + 1`` share subset and batch order, with ``xi`` and
      ``1 - xi`` (so ``sigma = rho (2 xi - 1)`` and ``-sigma``). A pair's mean has no first-order
      ``sigma`` part, and the product of a pair's centred signals loses the cross term between
      ``sigma`` and the subsampling noise, which is odd in ``sigma``. The part that is even in
      ``sigma`` (the ``sigma^2`` term, the estimand) is the same for both models of a pair, so it
      is not averaged down. Pairs are not independent draws: the sample covariance over the K
      models is then biased by the factor ``K/(K-1) * (1 - Var(mean)/Var)``, one constant for
      every pair of examples, which a correlation or a per-query ranking does not see. K must be
      even. A pair is the same in any chunk (model k is keyed by k alone), so chunk boundaries may
      fall inside a pair.
    """

    seed: int = 0
    ratio: float = 0.3
    common_batches: bool = False
    antithetic: bool = False

    @classmethod
    def from_daunce(cls, cfg: Any) -> Plan:
        """The plan of a :class:`daunce_core.config.DaunceConfig` (``seed``, ``ratio``,
        ``common_batches``, ``antithetic``)."""
        return cls(seed=cfg.seed, ratio=cfg.ratio, common_batches=cfg.common_batches, antithetic=cfg.antithetic)

    def pair_base(self, k: int) -> int:
        """The k whose subset (and batch order) model k uses: itself, or ``2j`` for antithetic pairs."""
        return k - (k % 2) if self.antithetic else k

    def subset_and_xi(self, k: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        idx, xi = subset_and_xi(self.seed, self.pair_base(k), n, self.ratio)
        if self.antithetic and k % 2:
            xi = 1.0 - xi
        return idx, xi

    def matched_labels(self, k: int, probs: np.ndarray) -> np.ndarray:
        """Matched-noise DAUNCE's labels of model k drawn from theta_0's probabilities [n, C]
        (:func:`matched_labels`); an antithetic pair mirrors its uniforms."""
        return matched_labels(self.seed, self.pair_base(k), probs, mirror=self.antithetic and k % 2 == 1)

    def batch_key(self, k: int) -> tuple[int, ...]:
        """Key of :func:`batch_order` for model k."""
        if self.common_batches:
            return (self.seed, -1)  # no model's k: the shared stream
        return (self.seed, self.pair_base(k))
