"""TO BE DELETED AT MERGE: a minimal private stand-in for :mod:`daunce_core.fit.chunks` (part A).

Only the names :mod:`daunce_core.lm.steps` calls, with the signatures agreed for ``fit.chunks``;
at merge the lead points ``daunce_core.lm.steps`` at ``daunce_core.fit.chunks`` and deletes this
file.
"""
from __future__ import annotations

import json
import logging
import math
import shutil
from typing import Any, Callable, Mapping

from .. import scoring, store
from .contract import Signals

log = logging.getLogger(__name__)


def n_chunks(K: int, chunk_size: int) -> int:
    return math.ceil(K / chunk_size)


def chunk_models(K: int, chunk_size: int, chunk: int) -> list[int]:
    return list(range(chunk * chunk_size, min(K, (chunk + 1) * chunk_size)))


def write_signals(out, signals: Signals, attrs: dict[str, Any]) -> None:
    bad = signals.diverged()
    if bad.any():
        store.write_diverged(out, attrs, f"perturbed model k={int(signals.model_index[bad][0])} diverged "
                                         "(non-finite losses)")
        return
    store.write_losses(out, store.Losses(signals.train, signals.query, signals.model_index,
                                         signals.train_ids, signals.query_ids, attrs))


def gather(paths, out) -> None:
    store.concat_losses(list(paths), out)


def select_lr(loss_paths: Mapping[float, Any], judge: Callable[[store.Losses], float], out_losses, out_json,
              meta: dict[str, Any]) -> float:
    grid = []
    for lr, path in sorted(loss_paths.items()):
        if store.is_diverged(path):
            grid.append({"lr": lr, "score": None, "diverged": True})
            continue
        grid.append({"lr": lr, "score": float(judge(store.read_losses(path))), "diverged": False})
    ok = [g for g in grid if not g["diverged"]]
    if not ok:
        raise store.StoreError(f"every learning rate of {sorted(loss_paths)} diverged; lower the lr grid")
    best = max(ok, key=lambda g: g["score"])["lr"]
    with store.atomic_path(out_losses, suffix=".h5") as tmp:
        shutil.copyfile(loss_paths[best], tmp)
    with store.atomic_path(out_json, suffix=".json") as tmp:
        tmp.write_text(json.dumps({**meta, "selected_lr": best, "grid": grid}, indent=2))
    return best


def score(losses_path, out, measure: str, method: str | None = None) -> str:
    return scoring.score_file(losses_path, out, measure=measure)


__all__ = ["n_chunks", "chunk_models", "write_signals", "gather", "select_lr", "score"]
