"""What every fitter shares: chunks of models, chunk files, learning-rate selection and scoring.

A fitter (:class:`~daunce_core.fit.contract.Fitter`) fits the perturbed models ``ks`` of one
chunk at one learning rate. Around it, the same steps serve the classifier ensemble, the LoRA
fitter and the black-box fitters alike:

* :func:`chunk_models` / :func:`n_chunks` -- which k a job fits. Model k's randomness is keyed
  by ``(seed, k)`` (:class:`~daunce_core.perturb.Plan`), so chunking changes no result;
* :func:`run_chunk` / :func:`write_signals` -- fit a chunk for every lr of the grid and write
  one losses file per lr (``store.write_losses``), or a diverged marker
  (``store.write_diverged``) when a model's signal is non-finite: an expected outcome of a grid
  search, which :func:`select_lr` skips;
* :func:`fit_all` -- every chunk in memory, for the one-call library API;
* :func:`gather` -- concatenate the chunk files along K (``store.concat_losses``, which refuses
  mixed settings and repeated k);
* :func:`select_lr` -- keep the grid's best learning rate by a judge the caller gives (LDS on the
  selection masks for classifiers, removal on selection queries for LMs);
* :func:`score` -- covariance / correlation scores of a losses file (equation 6) through the
  streaming engine :func:`daunce_core.scoring.score_file`.

No torch here: the gathering, selection and scoring steps start in well under a second.
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import h5py
import numpy as np

from .. import store
from ..config import q_weighted
from ..lds import on_edge
from .contract import Fitter, Signals

__all__ = ["chunk_models", "n_chunks", "losses_config", "write_signals", "run_chunk", "fit_all", "gather", "select_lr",
           "score"]

log = logging.getLogger(__name__)


def chunk_models(K: int, chunk_size: int, chunk: int) -> list[int]:
    """The model indices k of chunk ``chunk``: ``chunk * chunk_size`` up to K (exclusive)."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
    ks = list(range(chunk * chunk_size, min(K, (chunk + 1) * chunk_size)))
    if not ks:
        raise ValueError(f"chunk {chunk} is empty for K={K} and chunk_size={chunk_size}")
    return ks


def n_chunks(total: int, chunk_size: int) -> int:
    """How many chunks of ``chunk_size`` cover ``total`` models (at least one)."""
    return max(1, math.ceil(total / chunk_size))


def losses_config(d: Any, **context: Any) -> dict:
    """A classifier losses file's ``config`` attribute: the settings of :class:`daunce_core.config.DaunceConfig`
    ``d`` that shape the fits, with ``context`` (e.g. the data and architecture) after the objective's."""
    return {"ratio": d.ratio, "epochs": d.epochs, "batch_size": d.batch_size, "optimizer": d.optimizer,
            "rho": d.rho, "gamma": d.gamma, "prox": d.prox, **context,
            "antithetic": d.antithetic, "common_batches": d.common_batches, "lr_schedule": d.lr_schedule,
            "first_order": d.first_order, "matched_scale": d.matched_scale, "matched_prox": d.matched_prox,
            "matched_ratio": d.matched_ratio, "matched_epochs": d.matched_epochs}


def write_signals(out: str | os.PathLike, signals: Signals, attrs: Mapping[str, Any] | None = None) -> bool:
    """Write the signals of one chunk as a losses file; ``attrs`` add to ``signals.attrs``.

    theta_0's label probabilities (``signals.p0_train`` / ``p0_query``), when the fitter gives them,
    are stored as ``p0_train`` / ``p0_query`` (float64) for DAUNCE-T's (1 - p) factor.

    When any model's signal is non-finite, a diverged marker is written instead (naming how many
    models and the first k) and ``False`` is returned: the learning-rate selection skips it.
    """
    attrs = {**signals.attrs, **(attrs or {})}
    bad = signals.diverged()
    if bad.any():
        ks = np.asarray(signals.model_index)
        lr = attrs.get("lr")
        reason = (f"{int(bad.sum())} of {len(ks)} models non-finite"
                  + (f" at lr={lr:g}" if isinstance(lr, (int, float)) else "")
                  + f" (first k={ks[int(np.argmax(bad))]})")
        log.warning("%s %s", attrs.get("variant", "?"), reason)
        store.write_diverged(out, attrs, reason)
        return False
    losses = store.Losses(signals.train, signals.query, np.asarray(signals.model_index), signals.train_ids,
                          signals.query_ids, attrs=attrs, p0_train=signals.p0_train, p0_query=signals.p0_query)
    # one atomic write (write_losses goes into this temporary): the file never lacks its trace
    with store.atomic_path(out, suffix=".h5") as tmp:
        store.write_losses(tmp, losses)
        if signals.trace:  # Figure 3's per-step log: a 'trace' group (step [S], model_index [K], term [K, S])
            with h5py.File(tmp, "a") as f:
                g = f.create_group("trace")
                g.create_dataset("model_index", data=np.asarray(signals.model_index, np.int64))
                for key, value in signals.trace.items():
                    g.create_dataset(key, data=np.asarray(value))
    return True


def run_chunk(fitter: Fitter, ks: Sequence[int], lrs: Sequence[float], outs: Sequence[str | os.PathLike],
              attrs: Mapping[str, Any] | None = None) -> None:
    """Fit models ``ks`` at each learning rate of ``lrs`` and write ``outs`` (one file per lr).

    ``attrs`` (the setting: config slice, experiment) are recorded with each file, plus ``lr``.
    A fitter that returns ``None`` (a non-zero rank of a distributed fit) writes nothing.
    """
    if len(lrs) != len(outs):
        raise ValueError(f"{len(lrs)} learning rates but {len(outs)} output files")
    for lr, out in zip(lrs, outs):
        signals = fitter.fit(list(ks), lr)
        if signals is not None:
            write_signals(out, signals, {**(attrs or {}), "lr": lr})


def fit_all(fitter: Fitter, K: int, chunk_size: int, lr: float, first: int = 0) -> Signals:
    """Fit models ``first`` .. K-1, ``chunk_size`` at a time, and join their signals in memory (k in
    order). A model's fit depends on its index k and the seed only, so models 0..K-1 fitted as
    ``fit_all(.., K1)`` and ``fit_all(.., K, first=K1)`` are those of ``fit_all(.., K)``."""
    if not 0 <= first < K:
        raise ValueError(f"fit_all: first={first} must lie in [0, K={K})")
    ks = list(range(first, K))
    parts = [fitter.fit(ks[i:i + chunk_size], lr) for i in range(0, len(ks), max(1, chunk_size))]
    if any(p is None for p in parts):
        raise RuntimeError("fit_all needs the signals of every chunk; run it on rank 0 of a distributed fit")
    return join(parts)


def join(parts: Sequence[Signals]) -> Signals:
    """The signals of several fits of the same examples, models stacked in the order given."""
    head = parts[0]

    def cat(name: str) -> np.ndarray | None:
        values = [getattr(p, name) for p in parts]
        return None if values[0] is None else np.concatenate(values)

    return Signals(train=cat("train"), query=cat("query"), model_index=cat("model_index"),
                   train_ids=head.train_ids, query_ids=head.query_ids, signal=head.signal,
                   attrs=dict(head.attrs), p0_train=head.p0_train, p0_query=head.p0_query)


def gather(paths: Sequence[str | os.PathLike], out: str | os.PathLike) -> store.Losses | None:
    """Concatenate chunk files of one setting along K (``None``: a chunk diverged, so does ``out``)."""
    return store.concat_losses(list(paths), out)


def select_lr(loss_paths: Mapping[float, str | os.PathLike], judge: Callable[[store.Losses], float],
              out_losses: str | os.PathLike, out_json: str | os.PathLike, meta: Mapping[str, Any], *,
              key: str = "judge", grid_option: str = "the lr grid") -> float:
    """Keep the learning rate whose losses ``judge`` rates highest; diverged files are skipped.

    Args:
        loss_paths: lr -> losses file (or diverged marker) of the whole K at that lr.
        judge: a losses file's quality, higher is better (e.g. LDS on the selection masks).
        out_losses: where the selected losses file is copied (atomically).
        out_json: the table ``{"variant", "selected_lr", "selected": {"lr"}, "on_edge", "grid":
            [{"lr", key}...], **meta}``; a diverged lr is ``{"lr", key: null, "diverged": true}``.
            ``on_edge`` is true when the choice is the grid's smallest or largest lr (logged as a
            warning: extend the grid), and is flagged in the LDS table.
        meta: recorded in the table; must name the ``variant``.
        key: the name of the judge's value in the table (``"lds_select"`` for classifiers).
        grid_option: the config key of the grid, named when every lr diverged.

    Returns:
        The selected learning rate.
    """
    if "variant" not in meta:
        raise ValueError("select_lr: meta must name the 'variant'")
    variant = meta["variant"]
    table = []
    for lr, path in sorted(loss_paths.items()):
        if store.is_diverged(path):
            table.append({"lr": lr, key: None, "diverged": True})
            log.info("%s lr=%g: diverged, skipped", variant, lr)
            continue
        value = float(judge(store.read_losses(path)))
        table.append({"lr": lr, key: value})
        log.info("%s lr=%g: %s %.4f", variant, lr, key, value)
    ok = [r for r in table if r[key] is not None]
    if not ok:
        raise ValueError(f"{variant}: every learning rate of the grid diverged "
                         f"({sorted(loss_paths)}); add smaller values to {grid_option}")
    best = max(ok, key=lambda r: r[key])
    # a diverged lr still bounds the search: only the grid's own ends can hide a better value
    edge = on_edge([r["lr"] for r in table], best["lr"])
    if edge:
        log.warning("%s: the selected lr=%g is at an end of the grid %s; a wider %s might do better",
                    variant, best["lr"], sorted(loss_paths), grid_option)
    with store.atomic_path(out_losses, suffix=".h5") as tmp:
        shutil.copyfile(loss_paths[best["lr"]], tmp)
    doc = {"variant": variant, "selected_lr": best["lr"], "selected": {"lr": best["lr"]}, "on_edge": edge,
           "grid": table, **{k: v for k, v in meta.items() if k != "variant"}}
    with store.atomic_path(out_json, suffix=".json") as tmp:
        tmp.write_text(json.dumps(doc, indent=2))
    return best["lr"]


def score(losses_path: str | os.PathLike, out: str | os.PathLike, measure: str, method: str | None = None,
          **score_file_kw: Any) -> str:
    """Scores of a losses file (equation 6: covariance, or correlation) via ``scoring.score_file``.

    Dense [n, m] when it fits ``memory_gb`` (``score_file_kw``), top-k per query otherwise.
    ``method`` names the scores (default: the losses file's ``variant``); the file appears at
    ``out`` only once complete, through one temporary beside it (``score_file`` writes into it).
    """
    from ..scoring import score_file

    with store.atomic_path(out, suffix=".h5") as tmp:
        score_file(losses_path, tmp, measure=measure, **score_file_kw)
        if method is not None:
            with h5py.File(tmp, "a") as f:
                f.attrs["method"] = method
    return str(out)


def q_train(losses: store.Losses, source="losses") -> np.ndarray:
    """TRAK's Q on the training side: ``1 - p_i(theta_0)`` per training example, [n] float32.

    Applied to the scores *after* normalising (correlation divides each example's centred signals
    by their norm, which would cancel any per-example factor applied before; see
    docs/daunce_t_factor.md). ``p0_train`` is stored in float64 by the perturbed-fit step.
    """
    if losses.p0_train is None:
        raise store.StoreError(f"{source}: no 'p0_train' dataset (theta_0's label probabilities) for TRAK's "
                               "(1 - p) factor; rerun the perturbed_chunk step with this version")
    return (1.0 - losses.p0_train).astype(np.float32)


def score_variant(variant: str, losses_path, out, measure: str, **score_file_kw) -> str:
    """Scores of one method's losses file (equation 6) streamed through ``scoring.score_file``;
    for ``daunce_t_q`` each training example's row is then multiplied by ``1 - p_i(theta_0)``."""
    score(losses_path, out, measure, method=variant, **score_file_kw)
    if q_weighted(variant):
        scores, meta = store.dense_scores(out)
        q = q_train(store.read_losses(losses_path), losses_path)
        store.write_scores(out, scores=scores * q[:, None], train_ids=meta["train_ids"],
                           query_ids=meta["query_ids"], attrs={**meta["attrs"], "q_weight": "train"})
    return str(out)
