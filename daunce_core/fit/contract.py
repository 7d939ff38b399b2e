"""The fitter contract: what every way of fitting DAUNCE's perturbed models returns.

DAUNCE is one method with three ways of fitting the K perturbed models (Algorithm 1):

* :mod:`daunce_core.fit.ensemble` -- a vmapped ensemble of classifiers (``torch.func``), with a
  one-by-one fallback for models that cannot be vmapped;
* :mod:`daunce_core.fit.lm` -- LoRA adapters on a causal language model;
* :mod:`daunce_core.fit.api` / :mod:`daunce_core.fit.bdpl` -- fine-tuning through an
  OpenAI-compatible API, or black-box prompt learning, for closed models.

Each implements :class:`Fitter`: fit the models ``ks`` of one chunk at one learning rate and return
:class:`Signals` -- per-example signals ``[K, n]`` (training) and ``[K, m]`` (queries) with their
example ids. Everything around it is shared (:mod:`daunce_core.fit.chunks`): which ``k`` a chunk
holds, writing and gathering chunk files, learning-rate selection, and scoring through
:func:`daunce_core.scoring.score_file`.

What the contract carries beyond the signals, for the evaluations that need it:

* ``p0_train`` / ``p0_query`` -- theta_0's probability of each example's label, for DAUNCE-T's
  ``(1 - p)`` factor (TRAK's Q matrix);
* ``trace`` -- per-step logs of each term of the perturbed objective (Figure 3);
* ``control`` -- the signals of an unperturbed control fit (same subsets and batches, xi = 1/2),
  for control-variate estimators. No fitter fills it: for the white-box forms at the paper's
  gamma = 1 that fit never leaves theta_0 (its minibatch gradient there is 0), so it would cancel
  nothing (docs/differences.md, "Estimators beyond the paper");
* ``Plan`` -- how models share randomness: common batch orders across k, antithetic pairs
  (``xi`` and ``1 - xi`` on the same subset and batches); options ``daunce.common_batches`` and
  ``daunce.antithetic`` (:meth:`Plan.from_daunce`);
* distributed fitters run under ``torchrun``; only rank 0 returns signals (other ranks ``None``),
  and :func:`daunce_core.fit.chunks.run_chunk` writes only what it is given.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

from .. import perturb

__all__ = ["Signals", "Plan", "Fitter"]


@dataclass
class Signals:
    """Per-example signals of the perturbed models of one chunk (the fitter contract's result).

    ``signal`` is ``"loss"`` (every variant but DAUNCE-T) or ``"margin"`` (DAUNCE-T). A model
    whose fit diverged has non-finite rows; :func:`daunce_core.fit.chunks.run_chunk` records the
    chunk as diverged rather than writing them.
    """

    train: np.ndarray  # [K, n]
    query: np.ndarray  # [K, m]
    model_index: np.ndarray  # [K]: the k of each row
    train_ids: np.ndarray  # [n]
    query_ids: np.ndarray  # [m]
    signal: str = "loss"
    attrs: dict[str, Any] = field(default_factory=dict)
    p0_train: np.ndarray | None = None  # [n] theta_0's probability of the label
    p0_query: np.ndarray | None = None  # [m]
    trace: dict[str, np.ndarray] | None = None  # {"step": [S], term: [K, S]} (Figure 3)
    control: tuple[np.ndarray, np.ndarray] | None = None  # unperturbed fit: ([n], [m])

    @property
    def K(self) -> int:
        return int(self.train.shape[0])

    def diverged(self) -> np.ndarray:
        """Boolean [K]: the models with a non-finite signal."""
        return ~(np.isfinite(self.train).all(1) & np.isfinite(self.query).all(1))


@dataclass(frozen=True)
class Plan:
    """The randomness of perturbed model k (Algorithm 1, steps 2-3), keyed by ``(seed, k)``.

    Both options off reproduce the paper's independent draws (``daunce.antithetic`` and
    ``daunce.common_batches``, issue 13 item 4; both off by default):

    * ``common_batches`` -- common random numbers: every model takes its minibatches from the same
      stream. ``perturb.batch_order`` permutes a subset by positions, so models whose subsets
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
        idx, xi = perturb.subset_and_xi(self.seed, self.pair_base(k), n, self.ratio)
        if self.antithetic and k % 2:
            xi = 1.0 - xi
        return idx, xi

    def matched_labels(self, k: int, probs: np.ndarray) -> np.ndarray:
        """Matched-noise DAUNCE's labels of model k drawn from theta_0's probabilities [n, C]
        (:func:`daunce_core.perturb.matched_labels`); an antithetic pair mirrors its uniforms."""
        return perturb.matched_labels(self.seed, self.pair_base(k), probs, mirror=self.antithetic and k % 2 == 1)

    def batch_key(self, k: int) -> tuple[int, ...]:
        """Key of :func:`daunce_core.perturb.batch_order` for model k."""
        if self.common_batches:
            return (self.seed, -1)  # no model's k: the shared stream
        return (self.seed, self.pair_base(k))


@runtime_checkable
class Fitter(Protocol):
    """Fits the perturbed models of one chunk. Implementations hold theta_0, the data and the
    variant's settings; ``fit`` only gets which models and which learning rate."""

    variant: str

    def fit(self, ks: Sequence[int], lr: float) -> Signals | None:
        """Fit models ``ks`` at learning rate ``lr``; ``None`` on non-zero ranks of a
        distributed fit."""
        ...
