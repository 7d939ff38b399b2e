"""DAUNCE on your own PyTorch classifier in one call, no workflow needed.

    from daunce_core.attribute import daunce_scores
    scores = daunce_scores(model, (X_train, y_train), (X_query, y_query))   # DAUNCE-T, K = 100
    # scores[i, j] > 0: training example i helps query j

``model`` is theta_0 (trained already); its weights are not modified. BatchNorm layers keep
theta_0's statistics (eval mode) during the perturbed fits. These are shortcuts of
:mod:`daunce_core.api` with its :class:`~daunce_core.api.ClassificationTask`; any other model,
loss, dataset or a causal LM goes through that module.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .api import ClassificationTask, default_measure, fit_losses
from .scoring import _check_measure, pairwise_scores


def perturbed_losses(
    model: nn.Module,
    train: tuple[torch.Tensor, torch.Tensor],
    query: tuple[torch.Tensor, torch.Tensor],
    *,
    variant: str = "daunce_t",
    K: int = 100,
    ratio: float | None = None,
    epochs: int = 10,
    lr: float = 0.003,
    batch_size: int = 64,
    rho: float | None = None,
    gamma: float = 1.0,
    prox: float | None = None,
    seed: int = 0,
    chunk_size: int = 50,
    device: str = "auto",
    antithetic: bool = False,
    common_batches: bool = False,
    lr_schedule: str = "constant",
    first_order: str = "margin",
) -> tuple[np.ndarray, np.ndarray]:
    """Fit K perturbed copies of ``model`` (Algorithm 1) and return the per-example signals
    (loss, or margin for ``daunce_t``) of the training and query sets: ([K, n], [K, m]).

    The defaults are those the quality study supports (issue 13; ``docs/quality.md``): DAUNCE-T,
    the best variant on the embedded default, with K = 100 models of 10 epochs at lr 0.003, the
    study's setting ``api_default``. The learning rate depends on the model and data: where
    selection masks exist, choose it on them (the workflow's ``daunce.lr_grid``); without them,
    ``daunce score --reliability`` says whether K is large enough.

    ``antithetic``, ``common_batches``, ``lr_schedule`` and ``first_order`` are the estimator
    options of the config's ``daunce`` section (:func:`daunce_core.api.fit_losses`). ``ratio``,
    ``rho`` and ``prox`` None take the variant's defaults (0.3, 1, 0; ``variant="daunce_m"``,
    matched noise: its own, docs/matched_noise.md)."""
    signals = fit_losses(model, ClassificationTask(), train, query, variant=variant, K=K, ratio=ratio,
                         epochs=epochs, lr=lr, batch_size=batch_size, rho=rho, gamma=gamma, prox=prox, seed=seed,
                         chunk_size=chunk_size, device=device, antithetic=antithetic,
                         common_batches=common_batches, lr_schedule=lr_schedule, first_order=first_order)
    return signals.train, signals.query


def daunce_scores(model: nn.Module, train, query, *, measure: str | None = None, **kwargs) -> np.ndarray:
    """Attribution scores [n, m] of every training example for every query (positive = helps).

    Keyword arguments are those of :func:`perturbed_losses`; ``measure`` is ``"correlation"``
    (the paper's default) or ``"covariance"`` (equation 6); None: covariance for
    ``variant="daunce_m"``, correlation otherwise.
    """
    if measure is None:
        measure = default_measure(kwargs.get("variant", "daunce_t"))
    _check_measure(measure)  # before the K fits, not after them
    train_sig, query_sig = perturbed_losses(model, train, query, **kwargs)
    return pairwise_scores(train_sig, query_sig, measure=measure)
