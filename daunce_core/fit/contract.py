"""The fitter contract: what every way of fitting DAUNCE's perturbed models returns.

DAUNCE is one method with several ways of fitting the K perturbed models (Algorithm 1): a vmapped
classifier ensemble (:mod:`daunce_core.fit.ensemble`), LoRA adapters (:mod:`daunce_core.fit.lm`),
fine-tuning jobs or prompt learning for closed models (:mod:`daunce_core.fit.endpoint`,
:mod:`daunce_core.fit.bdpl`). Each implements :class:`Fitter` -- fit the models ``ks`` of one chunk
at one learning rate and return :class:`Signals`, ``[K, n]`` and ``[K, m]`` with their example ids --
and everything around it is shared (:mod:`daunce_core.fit.chunks`). What :class:`Signals` carries
beyond the signals: docs/design.md#daunce_corefitcontractpy-the-fitter-contract."""
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
