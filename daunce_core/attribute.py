"""DAUNCE on your own PyTorch classifier in one call, no workflow needed.

    from daunce_core.attribute import daunce_scores
    scores = daunce_scores(model, (X_train, y_train), (X_query, y_query))
    # scores[i, j] > 0: training example i helps query j

``model`` is theta_0 (trained already); its weights are not modified, and its parameters with
``requires_grad=False`` are never perturbed. BatchNorm layers keep theta_0's statistics (eval mode)
during the perturbed fits. These are shortcuts of :mod:`daunce_core.api` with its
:class:`~daunce_core.api.ClassificationTask` and the same defaults (``config.DEFAULTS``, chosen in
docs/defaults.md); any other model, loss, dataset or a causal LM goes through that module.
"""
from __future__ import annotations

import numpy as np
from torch import nn

from .api import ClassificationTask, check_keywords, default_measure, default_variant, fit_losses, score_signals
from .scoring import _check_measure


def perturbed_losses(model: nn.Module, train, query, **options) -> tuple[np.ndarray, np.ndarray]:
    """Fit K perturbed copies of ``model`` (Algorithm 1) and return the per-example signals
    (loss, or margin for ``daunce_t``) of the training and query sets: ([K, n], [K, m]).

    ``options`` are those of :func:`daunce_core.api.fit_losses` (variant, K, ratio, epochs, lr,
    batch_size, rho, gamma, seed, ...); left out, they take ``config.DEFAULTS``: matched noise
    (``daunce_m``: scale 0.1, proximal damping 0.01, 20 epochs of every example, antithetic pairs,
    common batches), K = 500, and the learning rate picked from a grid without ground truth (the
    plateau rule on 200 pilot models per lr, ``lr="auto"``; docs/defaults.md)."""
    check_keywords("perturbed_losses", options)
    signals = fit_losses(model, ClassificationTask(), train, query, **options)
    return signals.train, signals.query


def daunce_scores(model: nn.Module, train, query, *, measure: str | None = None, **options) -> np.ndarray:
    """Attribution scores [n, m] of every training example for every query (positive = helps).

    Raises FloatingPointError when the perturbed fits diverged (:func:`daunce_core.api.fit_losses`).
    ``measure`` is ``"covariance"`` (equation 6) or ``"correlation"`` (the paper's); None: the
    variant's (:func:`daunce_core.api.default_measure`, docs/defaults.md). ``options`` are
    :func:`daunce_core.api.fit_losses`'s.
    """
    check_keywords("daunce_scores", options)
    if options.get("variant") is None:
        options["variant"] = default_variant(None, train)
    if measure is None:
        measure = default_measure(options["variant"])
    _check_measure(measure)  # before the K fits, not after them
    signals = fit_losses(model, ClassificationTask(), train, query, measure=measure, **options)
    return score_signals(signals, measure)
