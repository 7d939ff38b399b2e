"""The fitter contract: what every way of fitting DAUNCE's perturbed models returns.

DAUNCE is one method with three ways of fitting the K perturbed models (Algorithm 1):

* :mod:`daunce_core.fit.ensemble` -- a vmapped ensemble of classifiers (``torch.func``), with a
  one-by-one fallback for models that cannot be vmapped;
* :mod:`daunce_core.fit.lm` -- LoRA adapters on a causal language model;
* :mod:`daunce_core.fit.endpoint` / :mod:`daunce_core.fit.bdpl` -- fine-tuning through an
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
* :class:`daunce_core.perturb.Plan` -- how models share randomness: common batch orders across
  k, antithetic pairs (``xi`` and ``1 - xi`` on the same subset and batches); options
  ``daunce.common_batches`` and ``daunce.antithetic`` (:meth:`~daunce_core.perturb.Plan.from_daunce`);
* distributed fitters run under ``torchrun``; only rank 0 returns signals (other ranks ``None``),
  and :func:`daunce_core.fit.chunks.run_chunk` writes only what it is given.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

from ..perturb import Plan

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


@runtime_checkable
class Fitter(Protocol):
    """Fits the perturbed models of one chunk. Implementations hold theta_0, the data and the
    variant's settings; ``fit`` only gets which models and which learning rate."""

    variant: str

    def fit(self, ks: Sequence[int], lr: float) -> Signals | None:
        """Fit models ``ks`` at learning rate ``lr``; ``None`` on non-zero ranks of a
        distributed fit."""
        ...
