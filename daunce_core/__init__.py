"""DAUNCE: data attribution through uncertainty estimation.

The public API, in a few names::

    from daunce_core import daunce_scores
    scores = daunce_scores(model, (X_train, y_train), (X_query, y_query), K=100, lr=0.03)

* :func:`daunce_scores`, :func:`perturbed_losses` -- DAUNCE on a PyTorch classifier in one call;
* :class:`Fitter`, :class:`Signals`, :class:`Plan` -- the contract every way of fitting the K
  perturbed models follows (classifier ensembles, LoRA on LMs, closed models through an API);
* :func:`score_file`, :func:`pairwise_scores`, :func:`read_losses` -- scores from losses
  (equation 6), streamed from disk or in memory;
* :class:`ExperimentConfig`, :class:`ConfigError` -- the workflow's settings as typed dataclasses.

Names are loaded on first use (PEP 562), so ``import daunce_core`` stays fast and imports no torch.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> the module that defines it
_PUBLIC = {
    "daunce_scores": "daunce_core.attribute",
    "perturbed_losses": "daunce_core.attribute",
    "ExperimentConfig": "daunce_core.config",
    "ConfigError": "daunce_core.settings",
    "Signals": "daunce_core.fit.contract",
    "Fitter": "daunce_core.fit.contract",
    "Plan": "daunce_core.perturb",
    "score_file": "daunce_core.scoring",
    "pairwise_scores": "daunce_core.scoring",
    "read_losses": "daunce_core.store",
}

__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name]), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module 'daunce_core' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))
