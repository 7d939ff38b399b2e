"""Whether a fit of perturbed models diverged, and the label-free statistics of its signals that the
library's learning-rate rule (:func:`daunce_core.api.pick_lr`) and the workflow's mislabel step read."""
from __future__ import annotations

import numpy as np

from ..config import DEFAULTS
from .contract import Signals

__all__ = ["LOSS_FACTOR", "LOSS_MARGIN", "SIGNAL_LIMIT", "lr_statistics"]

# A perturbed model whose mean training loss exceeds theta_0's by this factor (and by LOSS_MARGIN
# nats), or whose |signal| exceeds SIGNAL_LIMIT anywhere, diverged.
LOSS_FACTOR, LOSS_MARGIN, SIGNAL_LIMIT = 10.0, 2.0, 1e4


def lr_statistics(signals: Signals, measure: str = DEFAULTS.measure, *, reliability: bool = True) -> dict:
    """What the checks read of one fit: divergence (which the lr rule, :func:`pick_lr`, rules
    out), loss growth, zero-variance shares and, with ``reliability``, the split-K reliability of
    the scores (``diagnostics.diagnose``: the Spearman-Brown reliability of the scores from all K
    models, mean over queries; NaN when diverged; a diagnostic, not read by the rule).

    Divergence: a non-finite signal; any |signal| above ``SIGNAL_LIMIT`` (margins of a model whose
    logits exploded); or, where theta_0's label probabilities are known (classifiers), a model's
    mean training loss above ``LOSS_FACTOR`` times theta_0's and ``LOSS_MARGIN`` nats above it."""
    train, query = np.asarray(signals.train, np.float64), np.asarray(signals.query, np.float64)
    out = {"steps": signals.attrs.get("steps"), "diverged": False, "why": "", "loss_ratio": float("nan"),
           "reliability": float("nan"), "zero_variance_train": 0.0, "zero_variance_query": 0.0}
    finite = np.isfinite(train).all(1) & np.isfinite(query).all(1)
    if not finite.all():
        out.update(diverged=True, why=f"{int((~finite).sum())} of {len(finite)} models non-finite")
        return out
    big = max(np.abs(train).max(initial=0.0), np.abs(query).max(initial=0.0))
    if big > SIGNAL_LIMIT:
        out.update(diverged=True, why=f"signals reach {big:.3g} (|{signals.signal}| > {SIGNAL_LIMIT:g})")
    if signals.p0_train is not None:
        loss0 = float(np.mean(-np.log(np.clip(signals.p0_train, 1e-300, None))))
        loss = train if signals.signal == "loss" else np.logaddexp(0.0, -train)  # margin f: -log sigmoid(f)
        per_model = loss.mean(1)
        out["loss_ratio"] = float(np.median(per_model) / max(loss0, 1e-12))
        grown = per_model > max(LOSS_FACTOR * loss0, loss0 + LOSS_MARGIN)
        if grown.any() and not out["diverged"]:
            out.update(diverged=True, why=f"{int(grown.sum())} of {len(grown)} models' training loss grew from "
                       f"theta_0's {loss0:.3g} to a median {np.median(per_model[grown]):.3g}")
    out["zero_variance_train"] = float((train.std(0) == 0).mean()) if train.size else 0.0
    out["zero_variance_query"] = float((query.std(0) == 0).mean()) if query.size else 0.0
    if reliability and not out["diverged"] and len(train) >= 4:
        from ..diagnostics import diagnose

        out["reliability"] = diagnose(train, query, measure, se=False).mean_reliability
    return out
