"""TEMPORARY (delete at merge): the two names of :mod:`daunce_core.fit.chunks` the black-box study
uses, until part A's module lands on this branch. The lead switches ``from ._chunks_stub_bb``
/ ``from ..fit._chunks_stub_bb`` imports to ``.chunks`` / ``..fit.chunks`` and deletes this file.
"""
from __future__ import annotations

from typing import Any

import h5py
import numpy as np

from .. import scoring, store
from .contract import Signals


def write_signals(out, signals: Signals, attrs: dict[str, Any]) -> None:
    """The losses file of ``signals`` (store layout), with ``attrs`` and the fitter's own attrs."""
    store.write_losses(out, store.Losses(
        train=np.asarray(signals.train, np.float32), query=np.asarray(signals.query, np.float32),
        model_index=np.asarray(signals.model_index, np.int64),
        train_ids=np.asarray(signals.train_ids, np.int64), query_ids=np.asarray(signals.query_ids, np.int64),
        attrs={"signal": signals.signal, **attrs, **signals.attrs}))


def score(losses_path, out, measure: str, method: str | None = None) -> None:
    """Dense scores of a losses file through :func:`daunce_core.scoring.score_file`."""
    scoring.score_file(losses_path, out, measure=measure)
    if method is not None:
        with h5py.File(out, "r+") as f:
            f.attrs["method"] = method
