"""DAUNCE on any PyTorch model: a :class:`Task` says how to compute a per-example loss, daunce
fits the K perturbed models and returns (or writes) their losses and scores.

In the manner of kronfluence's ``Task`` and TRAK's model-output functions::

    from daunce_core.api import ClassificationTask, fit_losses, scores
    s = scores(model, ClassificationTask(), train_set, query_set, K=100, lr=0.03)   # [n, m]
    fit_losses(model, MyTask(), train_loader, query_loader, K=100, lr=0.03, out="losses.h5")

``model`` is theta_0 (trained already); it is copied, never modified, and kept in eval mode. A
positive score means the training example helps the query. The Tasks live in
:mod:`daunce_core.task`, the generic fitter and data adapters in :mod:`daunce_core.fit.task`; this
module holds the calls. The first-order term, data, speed and language models:
docs/design.md#daunce_coreapipy-daunce-on-any-pytorch-model."""
from __future__ import annotations

import copy
import dataclasses
import inspect
import logging
import math
import numbers
import os
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from . import objectives as obj
from . import perturb, store
from .config import DEFAULTS, MEASURES, DaunceConfig, api_options, fit_variant, q_weighted
from .fit import chunks
from .fit.contract import Signals
from .fit.divergence import LOSS_FACTOR, LOSS_MARGIN, SIGNAL_LIMIT, lr_statistics  # noqa: F401 (public here too)
from .fit.task import TaskFitter, _as_data, _check_ids, _Data
from .task import ClassificationTask, LMTask, Task
from .utils import pick_device

__all__ = ["Task", "ClassificationTask", "LMTask", "TaskFitter", "fit_losses", "scores", "DEFAULTS", "fit_epochs",
           "pick_lr", "agreement", "lr_statistics", "quiet"]

log = logging.getLogger(__name__)


# --- the calls ----------------------------------------------------------------------------------

def fit_losses(model: nn.Module, task: Task | LMTask | None, train: Any, query: Any, *,
               variant: str | None = None, K: int = DEFAULTS.K, ratio: float | None = None,
               epochs: int | None = None, lr: float | str = DEFAULTS.lr, batch_size: int | None = None,
               rho: float | None = None, gamma: float = DEFAULTS.gamma, prox: float | None = None,
               seed: int = DEFAULTS.seed, chunk_size: int = DEFAULTS.chunk_size, device: str = "auto",
               out: str | os.PathLike | None = None,
               train_ids: Any = None, query_ids: Any = None, mode: str = "auto",
               antithetic: bool | None = None, common_batches: bool | None = None,
               lr_schedule: str = DEFAULTS.lr_schedule, first_order: str = DEFAULTS.first_order,
               measure: str | None = None, lr_grid: Sequence[float] = DEFAULTS.lr_grid,
               lr_pilot_K: int | None = DEFAULTS.lr_pilot_K) -> Signals:
    """Fit K perturbed copies of ``model`` (Algorithm 1) and return their signals [K, n], [K, m].

    Args:
        model: theta_0, trained already (never modified; an LM is moved to ``device`` in place).
        task: a :class:`Task` (None: :class:`ClassificationTask`) or an :class:`LMTask`.
        train, query: datasets, DataLoaders or tuples of tensors; for an LMTask, JSONL paths or
            lists of ``{"prompt", "response"}`` dicts.
        variant: the perturbed objective (``objectives.VARIANTS``; None: :func:`default_variant`);
            ``daunce_t`` records margins;
            ``daunce_t_q`` fits ``daunce_t`` and marks the signals for TRAK's Q, ``1 - p_i(theta_0)``,
            on the training side of the scores (:func:`score_signals`; classifiers on tensors only);
            ``daunce_m``: matched noise (docs/matched_noise.md).
        K, ratio, epochs, lr, batch_size, rho, gamma, seed: Algorithm 1 and equation (5); the
            defaults are ``config.DEFAULTS`` (docs/defaults.md). ``epochs=None``: the variant's own
            fit length where it has one (``daunce_m``: ``matched_epochs``, 20), else the fewest
            epochs that give every model ``DEFAULTS.min_steps`` optimiser steps
            (:func:`fit_epochs`; one epoch for an LMTask). ``lr="auto"``: the label-free plateau
            rule (:func:`pick_lr`) over ``lr_grid`` -- ``lr_pilot_K`` models (at most K; None: K),
            the same seeds, are fitted at every lr of the grid, and the chosen lr's are extended to
            K (models ``lr_pilot_K`` .. K-1; the K models are those an explicit ``lr`` would fit),
            the table (each lr's agreement with the next smaller lr) in ``attrs["lr_rule"]``. The
            defaults, 200 pilot models and K = 500, cost 200 x len(lr_grid) + 300 model fits.
            ``batch_size`` defaults to the DataLoader's, else ``DEFAULTS.batch_size``. ``ratio``,
            ``rho`` and ``prox`` (the pull ``prox/2 ||theta - theta_0||^2``) default to the
            variant's (``config.DaunceConfig``: 0.3, 1 and 0; for ``daunce_m`` its ``matched_*``
            settings, ``rho`` being its label noise's scale; docs/matched_noise.md).
        measure: the measure of the scores the lr rule compares between lrs (None: the variant's,
            :func:`default_measure`).
        chunk_size: models trained together (vmapped) at once.
        device: ``"auto"`` (CUDA when present), ``"cpu"`` or ``"cuda"``.
        out: also write the losses file (HDF5 layout of daunce_core/store/) here, atomically;
            refused before any fit if it is one of the JSONL inputs (``store.check_output``).
        train_ids, query_ids: example ids (default: the dataset's ``ids``, else its indices).
        mode: ``"auto"``, ``"vmap"`` or ``"loop"`` (see :class:`TaskFitter`).
        antithetic, common_batches, lr_schedule, first_order: the estimator options of the same
            names in the config's ``daunce`` section (``config.DaunceConfig``); None: the variant's
            (``config.api_options``: both on for ``daunce_m``, off -- the paper's -- for the
            others). ``antithetic`` needs an even K. LMs take none of them.

    With :class:`ClassificationTask` on ``(inputs, labels)`` tensors, the labels must be integer
    class indices [n] within the model's outputs; a [n, 1] column is refused, not squeezed.

    Raises:
        ValueError: before any fit, a bad argument (K >= 2, epochs, chunk_size and batch_size >= 1
            whole numbers, lr finite > 0, ratio in (0, 1], ...), labels or ids, in one line.
        store.StoreError: ``out`` would replace an input or cannot be written.
        FloatingPointError: a model diverged at an explicit ``lr`` (non-finite signals, or its
            training loss or signals grown far beyond theta_0's, :func:`lr_statistics`): with
            ``out`` nothing is written; without it a warning; with ``lr="auto"``, every lr of the
            grid diverged.

    Warns (``warnings.warn``, shown once in the console): fewer than ``DEFAULTS.few_steps``
    optimiser steps per model; examples whose signal never moved across the K models (their
    scores are 0; the shares are also in ``attrs``).
    """
    variant = default_variant(task, train) if variant is None else variant
    form, variant = variant, fit_variant(variant) if isinstance(variant, str) else variant
    base = DaunceConfig().for_variant(variant) if variant in obj.VARIANTS else DaunceConfig()
    ratio = base.ratio if ratio is None else ratio
    rho = base.rho if rho is None else rho
    prox = base.prox if prox is None else prox
    if not isinstance(prox, numbers.Real) or isinstance(prox, bool) or not math.isfinite(prox) or prox < 0:
        raise ValueError(f"prox must be a finite number >= 0, got {prox!r}")
    measure = default_measure(form) if measure is None else measure
    lm = isinstance(task, LMTask)
    given = {"antithetic": antithetic, "common_batches": common_batches}
    paper = {"antithetic": DEFAULTS.antithetic, "common_batches": DEFAULTS.common_batches}
    defaults = paper if lm else api_options(variant) if isinstance(variant, str) else paper
    antithetic, common_batches = (defaults[k] if v is None else v for k, v in given.items())
    auto = isinstance(lr, str)
    if auto and lr != "auto":
        raise ValueError(f"lr must be a positive number or 'auto' (the label-free rule over lr_grid), got {lr!r}")
    if auto:
        grid = list(lr_grid) if lr_grid is not None else []
        if not grid:
            raise ValueError("lr='auto' needs a non-empty lr_grid")
        for g in grid:
            _check_fit_args(K=K, ratio=ratio, epochs=1, lr=g, batch_size=batch_size, rho=rho, gamma=gamma,
                            seed=seed, chunk_size=chunk_size, variant=variant, mode=mode, lr_schedule=lr_schedule,
                            first_order=first_order)
    from .scoring import _check_measure

    _check_measure(measure)
    _check_fit_args(K=K, ratio=ratio, epochs=1 if epochs is None else epochs, lr=lr_grid[0] if auto else lr,
                    batch_size=batch_size, rho=rho, gamma=gamma, seed=seed, chunk_size=chunk_size, variant=variant,
                    mode=mode, lr_schedule=lr_schedule, first_order=first_order)
    if out is not None:
        store.check_output(out, inputs=_files(train, query))
    pilot = K  # the models the lr rule reads per lr
    if auto and lr_pilot_K is not None:
        if isinstance(lr_pilot_K, bool) or not isinstance(lr_pilot_K, numbers.Integral) or lr_pilot_K < 2:
            raise ValueError(f"lr_pilot_K must be a whole number >= 2 (the models the lr rule reads per lr) or None "
                             f"(K), got {lr_pilot_K!r}")
        pilot = min(int(lr_pilot_K), K)
    if antithetic and (K % 2 or pilot % 2):
        why = "" if given["antithetic"] is not None else f" (variant {form}'s default; pass antithetic=False)"
        bad = f"K={K}" if K % 2 else f"lr_pilot_K={pilot}"
        raise ValueError(f"antithetic=True needs an even K and lr_pilot_K (models 2j, 2j+1 form a pair), "
                         f"got {bad}{why}")
    dev = pick_device(device)
    options = {"antithetic": antithetic, "common_batches": common_batches, "lr_schedule": lr_schedule,
               "first_order": first_order}
    cfg = DaunceConfig(K=K, ratio=ratio, epochs=1 if epochs is None else epochs,
                       batch_size=batch_size or DEFAULTS.batch_size, rho=rho, gamma=gamma, prox=prox,
                       seed=seed, chunk_size=chunk_size, variants=[variant], k_curve=[K], **options)
    own_epochs = base.epochs if obj.is_matched(variant) else None  # a variant's own fit length (daunce_m)
    if obj.is_matched(variant):  # for_variant reads these in place of rho, prox and ratio
        cfg = dataclasses.replace(cfg, matched_scale=rho, matched_prox=prox, matched_ratio=ratio,
                                  matched_epochs=own_epochs if epochs is None else epochs)
    if isinstance(task, LMTask):
        if obj.is_matched(variant):
            raise ValueError("variant daunce_m (labels drawn from theta_0) is implemented for classifiers; "
                             "choose daunce, daunce_e or daunce_t for an LMTask")
        if options != {**paper, "lr_schedule": DEFAULTS.lr_schedule, "first_order": DEFAULTS.first_order}:
            raise ValueError(f"the LoRA fitter takes none of antithetic, common_batches, lr_schedule, first_order; "
                             f"leave them at their defaults for an LMTask (got {options})")
        fitter = _lora_fitter(model, task, train, query, cfg, lr, dev, train_ids, query_ids)
    else:
        task = ClassificationTask() if task is None else task
        if not isinstance(task, Task):
            raise TypeError(f"task must be a daunce_core.api.Task or LMTask, got {type(task).__name__}")
        _check_model(model)
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
        tr = _as_data(train, "train", train_ids, dev, dtype)
        qu = _as_data(query, "query", query_ids, dev, dtype)
        if batch_size is None and tr.batch_size:
            cfg = dataclasses.replace(cfg, batch_size=tr.batch_size)
        if epochs is None:  # the variant's own fit length, else the fewest epochs giving min_steps
            cfg = dataclasses.replace(cfg, epochs=own_epochs if own_epochs is not None
                                      else fit_epochs(tr.n, ratio, cfg.batch_size, DEFAULTS.min_steps))
        fitter = _fitter(model, task, tr, qu, variant, cfg, dev, mode)
        if q_weighted(form) and isinstance(fitter, TaskFitter):
            raise ValueError(f"variant {form!r} needs theta_0's label probabilities, which only ClassificationTask on "
                             "(inputs, labels) tensors gives; use variant 'daunce_t' with this Task")
    if q_weighted(form) and isinstance(task, LMTask):
        raise ValueError(f"variant {form!r} is for classifiers; use 'daunce_t' with an LMTask")
    n = len(_lm_examples(train, "train")) if isinstance(task, LMTask) else tr.n
    steps = _steps(n, ratio, cfg.batch_size, cfg.epochs) if not isinstance(task, LMTask) or task.steps is None \
        else task.steps
    _warn_steps(steps, n, ratio, cfg.batch_size, cfg.epochs, own_epochs)
    table = None
    if auto:
        signals, table = _auto_lr(fitter, pilot, chunk_size, list(lr_grid), measure, q=q_weighted(form))
        lr = signals.attrs["lr"]
        if pilot < K:  # the chosen lr's models pilot .. K-1
            log.info("lr=%g: fitting models %d..%d (the rule read the first %d)", lr, pilot, K - 1, pilot)
            signals = chunks.join([signals, chunks.fit_all(fitter, K, chunk_size, lr, first=pilot)])
    else:
        signals = chunks.fit_all(fitter, K, chunk_size, lr)
    setting = chunks.losses_config(cfg, steps=steps, lr=lr, task=type(task).__name__)
    stats = lr_statistics(signals, measure, reliability=False)
    signals.attrs = {"config": setting, **signals.attrs, "lr": lr, "steps": steps, "form": form,
                     "zero_variance_train": stats["zero_variance_train"],
                     "zero_variance_query": stats["zero_variance_query"],
                     **({"lr_rule": table, "lr_pilot_K": pilot} if table is not None else {})}
    if stats["diverged"]:
        msg = f"the perturbed models diverged at lr={lr:g} ({stats['why']}); lower lr, or pass lr='auto'"
        if out is not None:
            raise FloatingPointError(f"{out}: not written: {msg}")
        signals.attrs["diverged"] = msg
        warnings.warn(msg, RuntimeWarning, stacklevel=2)
        return signals
    _warn_zero_variance(stats, measure)
    if out is not None:
        chunks.write_signals(out, signals)
    return signals


# --- the defaults' rules: fit length, divergence, the label-free learning rate ------------------

def score_signals(signals: Signals, measure: str | None = None) -> np.ndarray:
    """Dense scores [n, m] of :func:`fit_losses`' signals: equation 6 (or its Pearson form), times
    TRAK's Q, ``1 - p_i(theta_0)``, on the training side for a ``daunce_t_q`` fit (applied after
    normalising, docs/daunce_t_factor.md). Refuses diverged fits (:func:`refuse_diverged`)."""
    from .scoring import pairwise_scores

    refuse_diverged(signals)
    measure = default_measure(signals.attrs.get("form", "")) if measure is None else measure
    s = pairwise_scores(signals.train, signals.query, measure=measure)
    if q_weighted(signals.attrs.get("form", "")):
        s *= (1.0 - signals.p0_train).astype(s.dtype)[:, None]
    return s


def refuse_diverged(signals: Signals) -> None:
    """Raise FloatingPointError when :func:`fit_losses` found the fits diverged: no scores from them."""
    if "diverged" in signals.attrs:
        raise FloatingPointError(f"no scores: {signals.attrs['diverged']}")


_QUIET = [False]


class quiet:
    """Within ``with quiet():`` the API's warnings about steps and zero variance are not shown
    (a study that loops over many settings reads them from ``attrs`` instead)."""

    def __enter__(self):
        self._was, _QUIET[0] = _QUIET[0], True

    def __exit__(self, *exc):
        _QUIET[0] = self._was


def _steps(n: int, ratio: float, batch_size: int, epochs: int) -> int:
    """Optimiser steps of one perturbed model: ``epochs`` times the full batches of its subset."""
    sub = perturb.subset_size(n, ratio)
    return epochs * (sub // max(1, min(batch_size, sub)))


def fit_epochs(n: int, ratio: float, batch_size: int, min_steps: int) -> int:
    """The fewest epochs that give each perturbed model (``ratio`` of ``n`` examples in batches of
    ``batch_size``) at least ``min_steps`` optimiser steps."""
    return max(1, math.ceil(min_steps / max(1, _steps(n, ratio, batch_size, 1))))


def _warn_steps(steps: int, n: int, ratio: float, batch_size: int, epochs: int, own: int | None = None) -> None:
    """Warn when each model takes fewer than ``DEFAULTS.few_steps`` steps, naming the default fit
    length: the variant's ``own`` epochs, else the fewest giving ``DEFAULTS.min_steps``."""
    if steps < DEFAULTS.few_steps and not _QUIET[0]:
        sub = perturb.subset_size(n, ratio)
        need = own if own is not None else fit_epochs(n, ratio, batch_size, DEFAULTS.min_steps)
        warnings.warn(f"each perturbed model takes only {steps} optimiser step(s) ({epochs} epoch(s) over its "
                      f"{sub} examples in batches of {min(batch_size, sub)}): too few to move it from theta_0; "
                      f"raise epochs (epochs={need} gives {_steps(n, ratio, batch_size, need)} steps) or lower "
                      "batch_size, or leave epochs=None", RuntimeWarning, stacklevel=3)


def _warn_zero_variance(stats: dict, measure: str) -> None:
    zt, zq = stats["zero_variance_train"], stats["zero_variance_query"]
    if (zt or zq) and not _QUIET[0]:
        warnings.warn(f"{100 * zt:.1f}% of the training examples and {100 * zq:.1f}% of the queries have zero "
                      f"variance across the K models (their signal never moved): their {measure} scores are 0. "
                      "A larger lr or more steps moves them; the shares are in the losses' and scores' attributes",
                      RuntimeWarning, stacklevel=3)


# The plateau rule's threshold on the agreement of neighbouring lrs' scores, and the factor below the
# smallest diverged lr under which an lr must lie (docs/defaults.md)
PLATEAU, BACKOFF = 0.9, 10.0


def agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over queries of the Pearson correlation, across training examples, of two [n, m] score
    matrices (the same K models' seeds fitted at two learning rates): label-free. Queries whose
    scores are constant in either matrix are left out; NaN when all are."""
    a = np.asarray(a, np.float64) - np.mean(a, 0)
    b = np.asarray(b, np.float64) - np.mean(b, 0)
    den = np.sqrt((a * a).sum(0) * (b * b).sum(0))
    ok = den > 0
    return float(((a * b).sum(0)[ok] / den[ok]).mean()) if ok.any() else float("nan")


def pick_lr(rows: Sequence[dict], threshold: float = PLATEAU, backoff: float = BACKOFF) -> float | None:
    """The label-free learning rate of a grid: the plateau rule.

    ``rows``: ``{"lr", "agreement", "diverged"}`` per lr, ``agreement`` being :func:`agreement` of
    the lr's scores with those of the next smaller lr of the grid, the same K models' seeds (NaN
    for the smallest lr, or when that neighbour diverged).

    1. A diverged lr, and every lr less than ``backoff`` times below the smallest diverged one, is
       out: the fits just below the cliff are already chaotic.
    2. Among the others, the largest lr whose scores agree at least ``threshold`` with the next
       smaller lr's. Where the fits are converged and in their linear regime their scores do not
       depend on the lr, so neighbouring lrs agree; past it the nonlinear fits disagree, though
       each lr's scores may be reproducible (a split-K reliability does not see that).
    3. If none agrees, the smallest lr left.

    None when every lr diverged. The evidence (LDS at the rule's lr against the lr chosen on LDS
    masks, on three problems): docs/defaults.md."""
    ok = sorted((r for r in rows if not r["diverged"]), key=lambda r: r["lr"])
    if not ok:
        return None
    bad = [r["lr"] for r in rows if r["diverged"]]
    cap = min(bad) / backoff * (1 + 1e-9) if bad else math.inf
    cand = [r for r in ok if r["lr"] <= cap] or ok[:1]
    good = [r["lr"] for r in cand if math.isfinite(r.get("agreement", math.nan)) and r["agreement"] >= threshold]
    return max(good) if good else cand[0]["lr"]


def _auto_lr(fitter, K: int, chunk_size: int, grid: list[float], measure: str,
             q: bool = False) -> tuple[Signals, list[dict]]:
    """Fit K models (the same seeds) at each lr of ``grid``, pick one by :func:`pick_lr`; (its
    signals, the table: per lr its agreement with the next smaller lr, divergence, loss ratio).
    ``q``: the scores compared carry TRAK's Q on the training side (``daunce_t_q``)."""
    from .scoring import pairwise_scores

    fits, table = {}, []
    for lr in grid:
        sig = chunks.fit_all(fitter, K, chunk_size, lr)
        st = lr_statistics(sig, measure, reliability=False)
        table.append({"lr": lr, "agreement": float("nan"), "diverged": st["diverged"],
                      "loss_ratio": st["loss_ratio"], **({"why": st["why"]} if st["diverged"] else {})})
        if not st["diverged"]:
            fits[lr] = sig
    previous = None  # the scores of the next smaller lr, None after a diverged one
    for row in sorted(table, key=lambda r: r["lr"]):
        if row["diverged"]:
            previous = None
            continue
        sig = fits[row["lr"]]
        s = pairwise_scores(sig.train, sig.query, measure)
        if q:
            s *= (1.0 - sig.p0_train).astype(s.dtype)[:, None]
        if previous is not None:
            row["agreement"] = agreement(s, previous)
        previous = s
    chosen = pick_lr(table)
    for row in table:
        log.info("lr=%g: %s", row["lr"], f"diverged ({row['why']})" if row["diverged"] else
                 f"scores agree {row['agreement']:.3f} with the next smaller lr's")
    if chosen is None:
        raise FloatingPointError(f"lr='auto': the perturbed models diverged at every lr of lr_grid={grid}; "
                                 "give smaller learning rates")
    log.info("lr=%g chosen: %s", chosen, rule_line(table, chosen))
    sig = fits[chosen]
    sig.attrs = {**sig.attrs, "lr": chosen}
    return sig, table


def rule_line(table: Sequence[dict], chosen: float) -> str:
    """One line telling why the plateau rule chose ``chosen``: each lr's agreement, or divergence."""
    cells = ", ".join(f"{r['lr']:g}: " + ("diverged" if r["diverged"] else
                                          "-" if not math.isfinite(r["agreement"]) else f"{r['agreement']:.3f}")
                      for r in sorted(table, key=lambda r: -r["lr"]))
    return (f"lr={chosen:g}, the largest lr whose scores agree >= {PLATEAU:g} with the next smaller lr's "
            f"(none agreeing: the smallest; diverged lrs and those < {BACKOFF:g}x below them are out); "
            f"agreement per lr: {cells}")


def _fitter(model, task, tr: _Data, qu: _Data, variant, cfg, dev, mode):
    """The classifier fitter for a ClassificationTask on (inputs, labels) tensors, else TaskFitter."""
    from .fit.ensemble import EnsembleFitter

    if type(task) is ClassificationTask and all(d.tensors is not None and len(d.tensors) == 2 for d in (tr, qu)):
        net = copy.deepcopy(model).to(dev)
        tr, qu = _check_labels(net, tr, "train"), _check_labels(net, qu, "query")
        theta_0 = {k: v.detach().clone() for k, v in net.state_dict().items()}
        return EnsembleFitter(net, theta_0, tr.tensors, qu.tensors, variant=variant, cfg=cfg,
                              train_ids=tr.ids, query_ids=qu.ids, mode=mode)
    return TaskFitter(model, task, tr, qu, variant=variant, cfg=cfg, device=dev, mode=mode)


def _check_model(model: Any) -> None:
    """Refuse, in one line, a model the perturbed fits cannot train: not a module, no trainable
    parameter, or half-precision weights (the fits keep float32 or float64 master weights)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (theta_0), got {type(model).__name__}")
    params = list(model.parameters())
    if not params:
        raise ValueError("the model has no parameters: nothing to perturb")
    if not any(p.requires_grad for p in params):
        raise ValueError("the model has no parameter with requires_grad=True: nothing to perturb "
                         "(unfreeze the layers DAUNCE should attribute through)")
    low = sorted({str(p.dtype).replace("torch.", "") for p in params if p.dtype in (torch.bfloat16, torch.float16)})
    if low:
        raise ValueError(f"the model's parameters are {', '.join(low)}; the perturbed fits need float32 or "
                         "float64 weights: pass model.float() (its scores are then those of the same theta_0)")


def _check_labels(net: nn.Module, data: _Data, name: str) -> _Data:
    """``data`` with its labels as int64 class indices, refused (one line) unless they are integers,
    one per example, in ``[0, C)`` for the C outputs of ``net`` -- before any fit, where cross
    entropy and the margin would otherwise fail inside torch."""
    X, y = data.tensors
    if y.dtype == torch.bool or y.is_floating_point() or y.is_complex():
        raise ValueError(f"{name}: the labels are {str(y.dtype).replace('torch.', '')}; ClassificationTask needs "
                         "integer class indices (e.g. y.long(), or np.asarray(y, dtype=np.int64))")
    if y.ndim != 1:
        hint = " (pass y.reshape(-1))" if y.ndim == 2 and y.shape[1] == 1 else ""
        raise ValueError(f"{name}: the labels have shape {tuple(y.shape)}; ClassificationTask needs one class "
                         f"index per example, shape ({len(y)},){hint}")
    was = net.training
    with torch.no_grad():  # eval: a forward must not update theta_0's BatchNorm statistics
        out = net.eval()(X[:2])
    net.train(was)
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"the model's forward returns a {type(out).__name__}; ClassificationTask needs a tensor "
                        "of logits [batch, classes]: wrap the model to return the logits, or give a Task whose "
                        "logits() picks them")
    if out.ndim != 2:
        raise ValueError(f"the model's forward returns shape {tuple(out.shape)} for a batch of {len(X[:2])}; "
                         "ClassificationTask needs logits [batch, classes] (flatten or pick the class axis)")
    C = out.shape[-1]
    lo, hi = int(y.min()), int(y.max())
    if lo < 0 or hi >= C:
        bad = lo if lo < 0 else hi
        raise ValueError(f"{name}: label {bad} is outside the model's {C} classes (0..{C - 1}); "
                         "check the labels or the model's output size")
    return dataclasses.replace(data, tensors=(X, y.long()))


def _files(*data: Any) -> list[str | os.PathLike]:
    """The inputs of a call that are files (an LMTask's JSONL paths): no output may replace them."""
    return [d for d in data if isinstance(d, (str, os.PathLike))]


def _check_fit_args(*, K, ratio, epochs, lr, batch_size, rho, gamma, seed, chunk_size, variant, mode,
                    lr_schedule, first_order) -> None:
    """Refuse bad arguments of :func:`fit_losses` in one line each, before any model is fitted."""
    from .config import FIRST_ORDER, LR_SCHEDULES

    def whole(value) -> bool:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)

    def finite(value) -> bool:
        return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)

    if not whole(K) or K < 2:
        raise ValueError(f"K must be at least 2 (a covariance needs two models) and a whole number, got {K!r}")
    for name, value in (("epochs", epochs), ("chunk_size", chunk_size), ("batch_size", batch_size)):
        if not (value is None and name == "batch_size") and (not whole(value) or value < 1):
            raise ValueError(f"{name} must be a whole number of at least 1, got {value!r}")
    if not finite(lr) or lr <= 0:
        raise ValueError(f"lr must be a finite number above 0, got {lr!r}")
    if not finite(ratio) or not 0 < ratio <= 1:
        raise ValueError(f"ratio (the subset ratio r of Algorithm 1) must be in (0, 1], got {ratio!r}")
    for name, value in (("rho", rho), ("gamma", gamma)):
        if not finite(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
    if not whole(seed):
        raise ValueError(f"seed must be a whole number, got {seed!r}")
    obj.check_variant(variant)
    for name, value, allowed in (("mode", mode, ("vmap", "loop", "auto")), ("lr_schedule", lr_schedule, LR_SCHEDULES),
                                 ("first_order", first_order, FIRST_ORDER)):
        if value not in allowed:
            raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {value!r}")


def check_keywords(call: str, given: dict, *extra: str) -> None:
    """Refuse, in one line, keywords that :func:`fit_losses` does not take (nor ``extra``), naming
    each with the nearest known keyword -- before any fit, where Python's own message would come
    from inside another function."""
    from .settings import ConfigError, _unknown_key

    known = [n for n, p in inspect.signature(fit_losses).parameters.items() if p.kind is p.KEYWORD_ONLY]
    unknown = sorted(set(given) - set(known) - set(extra))
    if unknown:
        raise TypeError(f"{call}: " + str(ConfigError(_unknown_key(unknown, [*known, *extra], ""))).replace(
            "unknown key(s)", "unknown keyword(s)"))


def default_variant(task: Any, train: Any, topk: int | None = None) -> str:
    """The variant a call takes when none is given: ``DEFAULTS.variant`` for a classifier on
    ``(inputs, labels)`` tensors or arrays (``ClassificationTask``, which gives theta_0's label
    probabilities), with dense scores; ``DEFAULTS.task_variant`` for any other Task or data, an
    LMTask, or top-k scores files (docs/defaults.md)."""
    classifier = (task is None or type(task) is ClassificationTask) and isinstance(train, (tuple, list)) \
        and len(train) == 2
    if not classifier:
        return DEFAULTS.task_variant
    return DEFAULTS.variant if topk is None else fit_variant(DEFAULTS.variant)


def default_measure(variant: str) -> str:
    """The measure a variant's scores take by default (``config.MEASURES``): covariance for
    matched-noise DAUNCE (its limit is the influence function as a covariance,
    docs/matched_noise.md) and for DAUNCE-T and its Q form (docs/defaults.md), correlation (the
    paper's) for the others."""
    return MEASURES.get(variant, "correlation")


def _lm_examples(data: Any, name: str) -> list[dict]:
    from .lm.data import read_jsonl

    rows = read_jsonl(data) if isinstance(data, (str, os.PathLike)) else list(data)
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or not {"prompt", "response"} <= set(row):
            raise ValueError(f"{name}: example {i} is not a dict with 'prompt' and 'response'")
    if not rows:
        raise ValueError(f"{name}: no examples")
    return rows


def _line_of(path: str | os.PathLike, i: int) -> int:
    """The line number (from 1) of the ``i``-th example of a JSONL file, whose blank lines are skipped."""
    with open(path) as fh:
        rows = (n for n, line in enumerate(fh, 1) if line.strip())
        return next(n for j, n in enumerate(rows) if j == i)


def _lora_fitter(model, task: LMTask, train, query, cfg: DaunceConfig, lr: float, dev, train_ids, query_ids):
    from .fit.lm import LoraFitter
    from .lm.sequences import encode_examples, pad_id
    from .lm.settings import LoraFitConfig

    tr, qu = _lm_examples(train, "train"), _lm_examples(query, "query")
    ids = []
    for rows, given, name, src in ((tr, train_ids, "train", train), (qu, query_ids, "query", query)):
        has = ["id" in r for r in rows]
        if given is None and all(has):
            given = [r["id"] for r in rows]
        elif given is None and any(has):  # positions in place of the ids the other rows carry: refused
            i = has.index(False)
            where = f"{src}, line {_line_of(src, i)}" if isinstance(src, (str, os.PathLike)) else f"{name}: example {i}"
            raise ValueError(f"{where}: has no 'id' while other {name} examples have one; give every example "
                             f"an 'id', or none (ids are then the positions), or pass {name}_ids")
        ids.append(_check_ids(given, len(rows), name))
    steps = task.steps
    if steps is None:
        subset = len(perturb.subset_and_xi(cfg.seed, 0, len(tr), cfg.ratio)[0])
        steps = cfg.epochs * max(1, subset // min(cfg.batch_size, subset))
    fit_cfg = LoraFitConfig(variant=cfg.variants[0], lr=lr, steps=steps, batch_size=cfg.batch_size,
                            micro_batch_size=task.micro_batch_size, rank=task.rank, alpha=task.alpha,
                            target_modules=task.target_modules, ratio=cfg.ratio, rho=cfg.rho, gamma=cfg.gamma,
                            seed=cfg.seed, max_length=task.max_length, eval_batch_size=task.eval_batch_size)
    if next(model.parameters()).device != dev:
        model.to(dev)
    enc = [encode_examples(task.tokenizer, rows, max_length=task.max_length, template=task.template)
           for rows in (tr, qu)]
    return LoraFitter(model, enc[0], enc[1], fit_cfg, pad_id=pad_id(task.tokenizer), device=dev,
                      train_ids=ids[0], query_ids=ids[1])


def scores(model: nn.Module, task: Task | LMTask | None, train: Any, query: Any, *, measure: str | None = None,
           out: str | os.PathLike | None = None, topk: int | None = None, losses_out: str | os.PathLike | None = None,
           memory_gb: float = 4.0, **fit_kw: Any) -> np.ndarray | str:
    """Attribution scores of every training example for every query (equation 6; positive = helps).

    Without ``out``: the dense scores [n, m] in memory. With ``out``: the losses are written
    (to ``losses_out``, or a temporary file) and streamed into the scores file ``out`` by
    :func:`daunce_core.scoring.score_file` -- top-k per query with ``topk``, dense otherwise
    within ``memory_gb`` -- and ``str(out)`` is returned. Other keywords are :func:`fit_losses`'s.
    ``measure``, ``topk`` and ``memory_gb`` are checked before the fits; neither ``out`` nor
    ``losses_out`` may be one of the input files. ``measure`` None: ``"covariance"`` for
    ``daunce_m``, ``"correlation"`` otherwise.
    """
    from .scoring import _check_measure, _check_memory, score_file

    check_keywords("scores", fit_kw)
    if fit_kw.get("variant") is None:
        fit_kw["variant"] = default_variant(task, train, topk)
    if measure is None:
        measure = default_measure(fit_kw["variant"])

    _check_measure(measure)  # the cheap arguments are checked before the K fits
    if out is None:
        if topk is not None:
            raise ValueError("scores: topk streams the best examples into a file; give out='scores.h5' too")
        sig = fit_losses(model, task, train, query, out=losses_out, measure=measure, **fit_kw)
        return score_signals(sig, measure)
    if topk is not None and q_weighted(fit_kw["variant"]):
        raise ValueError(f"topk: variant {fit_kw['variant']!r} weighs the scores by TRAK's Q "
                         "after scoring, so the top k need the dense scores; leave topk out, or use variant 'daunce_t'")
    if topk is not None and (not isinstance(topk, numbers.Integral) or isinstance(topk, bool) or topk < 1):
        raise ValueError(f"topk must be a whole number of at least 1 (examples kept per query), got {topk!r}")
    _check_memory(memory_gb)
    if losses_out is not None:
        store.check_output(losses_out, inputs=_files(train, query))
    store.check_output(out, inputs=[losses_out, *_files(train, query)] if losses_out else _files(train, query))
    with tempfile.TemporaryDirectory(prefix="daunce-losses-") as tmp:
        path = losses_out if losses_out is not None else Path(tmp) / "losses.h5"
        sig = fit_losses(model, task, train, query, out=path, measure=measure, **fit_kw)
        lr = _lr_attrs(sig.attrs)
        if q_weighted(fit_kw["variant"]):
            from .fit.chunks import score_variant

            written = score_variant(fit_kw["variant"], path, out, measure, memory_gb=memory_gb, attrs=lr)
        else:
            written = score_file(path, out, measure=measure, topk=topk, memory_gb=memory_gb, attrs=lr)
    return written


def _lr_attrs(attrs: dict) -> dict:
    """The fits' lr and, with ``lr="auto"``, the rule's table (each lr's agreement) and pilot K, for
    the scores file's attributes (written with it), so a user sees why that lr was chosen."""
    import json

    out = {"lr": float(attrs["lr"])}
    if "lr_rule" in attrs:
        out.update(lr_rule=json.dumps(attrs["lr_rule"]), lr_pilot_K=int(attrs["lr_pilot_K"]))
    return out
