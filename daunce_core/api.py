"""DAUNCE on any PyTorch model: a :class:`Task` says how to compute a per-example loss, daunce
fits the K perturbed models and returns (or writes) their losses and scores.

In the manner of kronfluence's ``Task`` and TRAK's model-output functions::

    from daunce_core.api import ClassificationTask, fit_losses, scores
    s = scores(model, ClassificationTask(), train_set, query_set, K=100, lr=0.03)   # [n, m]
    fit_losses(model, MyTask(), train_loader, query_loader, K=100, lr=0.03, out="losses.h5")

``model`` is theta_0 (trained already); it is copied, never modified, and kept in eval mode
(BatchNorm with theta_0's statistics, no dropout) as in the classifier fits. A positive score
means the training example helps the query.

**The first-order term** of the perturbed objective (equation 5) is computed

* in logit space (second line), ``<grad_g L(g(theta_0, x_i)), g(theta, x_i) - g(theta_0, x_i)>``,
  when the Task gives ``logits`` and ``loss_from_logits`` -- the loss is a function of the
  outputs. Cost: one extra forward of theta_0 per step, without gradients;
* in parameter space (first line), ``grad L_i(theta_0)^T (theta - theta_0)``, otherwise: a
  Jacobian-vector product of the per-example loss at theta_0 along ``theta - theta_0``
  (``torch.func.jvp``), differentiated like any other term. No per-example gradient is formed;
  the forward-mode pass costs about two to three forwards in time and holds a tangent beside
  each activation, so a step costs roughly two to three plain training steps.

Both are the first-order term: they coincide for a model linear in its parameters and differ at
second order in ``theta - theta_0`` otherwise (the logit-space form keeps the curvature of the
network; tests/test_api.py measures both).

**Data** are map-style datasets (``len`` and indexing), ``DataLoader`` s (their dataset,
``collate_fn`` and ``batch_size`` are used; their sampler is not: Algorithm 1 draws each model's
batches, keyed by ``(seed, k)``), or tuples of equally long tensors / arrays; the floating ones
take the model's dtype (numpy's and sklearn's float64 arrays meet a float32 model). Example ids are
``train_ids`` / ``query_ids`` when given, else the dataset's ``ids`` attribute, else its indices;
they are unique int64. Bad arguments, labels and ids are refused in one line before any fit.

**Speed.** The models of a chunk are trained together under ``torch.func.vmap`` when the Task's
functions allow it (tried on two examples first); otherwise one by one with the same draws, with
a logged notice. :class:`ClassificationTask` on tensors takes the classifier fitter
(:class:`daunce_core.fit.ensemble.EnsembleFitter`), which caches theta_0's logits.

**Language models.** :class:`LMTask` runs a Hugging Face causal LM on prompt/response pairs
(a JSONL path or a list of dicts) through the same calls, each perturbed model a LoRA adapter
(:class:`daunce_core.fit.lm.LoraFitter`, Section 4.2).

This module is longer than the usual 500 lines on purpose: it is the whole user-facing surface
(the Task, data adapters, the generic fitter and the calls), read together by its users.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import math
import numbers
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad, jvp, vmap

from . import ensemble as E
from . import objectives as obj
from . import perturb, store
from .config import DaunceConfig
from .fit import chunks
from .fit.contract import Plan, Signals
from .models import can_vmap
from .utils import pick_device

__all__ = ["Task", "ClassificationTask", "LMTask", "TaskFitter", "fit_losses", "scores"]

log = logging.getLogger(__name__)


# --- what the user gives ------------------------------------------------------------------------

class Task:
    """How to compute the per-example quantities DAUNCE needs from a model and a batch.

    Override :meth:`loss`; or :meth:`logits` and :meth:`loss_from_logits` when the loss is a
    function of the model's outputs (then the first-order term is computed in logit space).
    :meth:`measurement` is the query function (default: the variant's signal); DAUNCE-T
    (``daunce_t``) needs a margin (:meth:`margin` or :meth:`margin_from_logits`). Every function
    returns one value per example of the batch, [B], and must not mix examples.
    """

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """Per-example training loss ``L_i(theta)`` [B]."""
        if _overrides(self, "logits") and _overrides(self, "loss_from_logits"):
            return self.loss_from_logits(self.logits(model, batch), batch)
        raise NotImplementedError(f"{type(self).__name__}: define loss(model, batch), or logits(model, batch) "
                                  "and loss_from_logits(logits, batch)")

    def logits(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """The model's outputs ``g(theta, x_i)`` [B, ...] that the loss is a function of (optional)."""
        raise NotImplementedError

    def loss_from_logits(self, logits: torch.Tensor, batch: Any) -> torch.Tensor:
        """``L_i`` from the outputs [B] (optional, with :meth:`logits`)."""
        raise NotImplementedError

    def margin(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """TRAK's margin ``log p / (1 - p)`` [B], the signal of ``daunce_t`` (optional)."""
        if _overrides(self, "logits") and _overrides(self, "margin_from_logits"):
            return self.margin_from_logits(self.logits(model, batch), batch)
        raise NotImplementedError(f"{type(self).__name__}: variant daunce_t records margins; define "
                                  "margin(model, batch) or margin_from_logits(logits, batch)")

    def margin_from_logits(self, logits: torch.Tensor, batch: Any) -> torch.Tensor:
        """The margin from the outputs [B] (optional, with :meth:`logits`)."""
        raise NotImplementedError

    def measurement(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """The function of a query whose attribution is sought [B] (optional)."""
        raise NotImplementedError


class ClassificationTask(Task):
    """A classifier on ``(inputs, labels)`` batches: logits ``model(inputs)``, the cross-entropy
    loss and TRAK's margin (:mod:`daunce_core.objectives`)."""

    def logits(self, model, batch):
        return model(batch[0])

    def loss_from_logits(self, logits, batch):
        return obj.cross_entropy(logits, batch[1])

    def margin_from_logits(self, logits, batch):
        return obj.margin(logits, batch[1])


@dataclasses.dataclass
class LMTask:
    """A Hugging Face causal LM on ``{"prompt", "response"[, "id"]}`` examples, LoRA fits.

    The loss is the mean response-token NLL (:mod:`daunce_core.lm.sequences`); ``steps``
    defaults to ``epochs`` passes over the subset ``D^k`` at ``batch_size``.
    """

    tokenizer: Any
    template: str = "{prompt}"
    max_length: int = 1024
    rank: int = 64
    alpha: float = 16.0
    target_modules: Any = "all-linear"
    steps: int | None = None
    micro_batch_size: int = 8
    eval_batch_size: int = 16


def _overrides(task: Any, name: str) -> bool:
    return getattr(type(task), name, None) is not getattr(Task, name)


def _signal_fns(task: Task, signal: str) -> tuple[Callable, Callable | None]:
    """(signal(model, batch), signal_from_logits(logits, batch) or None) of a Task.

    The Task's own ``loss`` (``margin``) wins over its logit functions: it may compute more than
    a function of the outputs, so its first-order term is taken in parameter space.
    """
    if _overrides(task, signal):
        return getattr(task, signal), None
    if _overrides(task, "logits") and _overrides(task, f"{signal}_from_logits"):
        return getattr(task, signal), getattr(task, f"{signal}_from_logits")
    what = "variant daunce_t records margins; define" if signal == "margin" else "define"
    raise TypeError(f"{type(task).__name__}: {what} {signal}(model, batch), or logits(model, batch) and "
                    f"{signal}_from_logits(logits, batch)")


# --- data ---------------------------------------------------------------------------------------

@dataclasses.dataclass
class _Data:
    """Indexed access to the examples: batches by index, ids, the loader's batch size."""

    dataset: Any
    ids: np.ndarray
    collate: Callable | None = None
    batch_size: int | None = None
    tensors: tuple[torch.Tensor, ...] | None = None  # fast path: index the tensors directly

    @property
    def n(self) -> int:
        return len(self.ids)

    def batch(self, idx: np.ndarray, device) -> Any:
        if self.tensors is not None:
            i = torch.as_tensor(idx, device=self.tensors[0].device)
            return tuple(t[i].to(device) for t in self.tensors)
        return _to(self.collate([self.dataset[int(i)] for i in idx]), device)


def _as_data(data: Any, name: str, ids: Any = None, device=None, dtype: torch.dtype | None = None) -> _Data:
    """``data`` as a :class:`_Data`; floating tensors of a tuple take the model's ``dtype`` (numpy's
    and sklearn's float64 arrays meet a float32 model), other datasets are left as they are."""
    from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset
    from torch.utils.data.dataloader import default_collate

    collate, batch_size = default_collate, None
    if isinstance(data, DataLoader):
        data, collate, batch_size = data.dataset, data.collate_fn, data.batch_size
    if isinstance(data, IterableDataset):
        raise TypeError(f"{name}: an IterableDataset cannot be subset by index (Algorithm 1 draws each "
                        "model's examples); give a map-style dataset or its DataLoader")
    tensors = None
    if isinstance(data, (tuple, list)) and data and all(hasattr(t, "shape") for t in data):
        tensors = tuple(torch.as_tensor(t) for t in data)
        sizes = {len(t) for t in tensors}
        if len(sizes) != 1:
            raise ValueError(f"{name}: the tensors hold {sorted(sizes)} examples; they must be equally long")
        data = TensorDataset(*tensors)
    elif isinstance(data, TensorDataset) and collate is default_collate:
        tensors = data.tensors
    elif not (isinstance(data, Dataset) or (hasattr(data, "__len__") and hasattr(data, "__getitem__"))):
        raise TypeError(f"{name}: expected a Dataset, a DataLoader or a tuple of tensors, got "
                        f"{type(data).__name__}")
    if tensors is not None and dtype is not None:
        tensors = tuple(t.to(dtype) if t.is_floating_point() and t.dtype != dtype else t for t in tensors)
        if isinstance(data, TensorDataset):
            data = TensorDataset(*tensors)
    if tensors is not None and device is not None:
        tensors = tuple(t.to(device) for t in tensors)
    n = len(data)
    if n == 0:
        raise ValueError(f"{name}: the dataset is empty")
    return _Data(data, _check_ids(ids if ids is not None else getattr(data, "ids", None), n, name),
                 collate, batch_size, tensors)


def _check_ids(ids: Any, n: int, name: str) -> np.ndarray:
    """``ids`` as int64 [n] (positions when None), refused unless integers, one per example, unique."""
    if ids is None:
        return np.arange(n, dtype=np.int64)
    ids = np.asarray(ids.cpu() if torch.is_tensor(ids) else ids)
    if ids.ndim != 1 or len(ids) != n:
        raise ValueError(f"{name}_ids: {ids.shape} ids for {n} examples; give one id per example")
    if ids.dtype.kind not in "iu":
        raise ValueError(f"{name}_ids: ids must be integers (the losses layout stores int64), got {ids.dtype}")
    if ids.dtype.kind == "u" and (big := ids > np.iinfo(np.int64).max).any():
        raise ValueError(f"{name}_ids: id {ids[big][0]} is beyond the int64 of the losses layout; "
                         "give ids below 2**63")
    _, first, counts = np.unique(ids, return_index=True, return_counts=True)
    if (counts > 1).any():
        raise ValueError(f"{name}_ids: ids repeat (first: {ids[first[counts > 1].min()]}); "
                         "each example needs its own id")
    return ids.astype(np.int64)


def _to(batch: Any, device) -> Any:
    if torch.is_tensor(batch):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: _to(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to(v, device) for v in batch)
    return batch


def _stack(batches: Sequence[Any]) -> Any:
    """The batches of the models of a chunk stacked on a leading axis (for vmap)."""
    first = batches[0]
    if torch.is_tensor(first):
        return torch.stack(batches)
    if isinstance(first, dict):
        return {k: _stack([b[k] for b in batches]) for k in first}
    if isinstance(first, (tuple, list)):
        return type(first)(_stack([b[i] for b in batches]) for i in range(len(first)))
    raise TypeError(f"a batch holds a {type(first).__name__}, which vmap cannot stack")


# --- the generic fitter -------------------------------------------------------------------------

class _Apply(nn.Module):
    """Runs a Task function on the model, so that ``functional_call`` can swap its parameters."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.m = model

    def forward(self, fn: Callable, batch: Any) -> torch.Tensor:
        return fn(self.m, batch)


class TaskFitter:
    """The fitter contract (:class:`daunce_core.fit.contract.Fitter`) for any model and Task.

    Model k starts from theta_0 and minimises the perturbed objective of ``variant`` (Table 1,
    equation 5; :func:`daunce_core.objectives.perturbed_objective`) on its subset ``D^k`` with
    its ``xi^k`` and batch order from ``plan``; parameters with ``requires_grad=False`` stay at
    theta_0. Its signal (the loss, or margin for ``daunce_t``) is then recorded on every training
    example and the Task's measurement (default: the same signal) on every query.
    """

    def __init__(self, model: nn.Module, task: Task, train: _Data, query: _Data, *, variant: str,
                 cfg: DaunceConfig, device, plan: Plan | None = None, mode: str = "auto",
                 eval_batch_size: int = 256):
        obj.check_variant(variant)
        if mode not in ("vmap", "loop", "auto"):
            raise ValueError(f"mode must be 'vmap', 'loop' or 'auto', got {mode!r}")
        cfg = cfg.for_variant(variant)  # daunce_m: its own scale, damping and subset ratio
        self.variant, self.signal, self.cfg, self.device = variant, obj.signal_of(variant), cfg, device
        self.sig, self.sig_of_logits = _signal_fns(task, self.signal)
        if obj.is_matched(variant) and self.sig_of_logits is None:
            raise TypeError(f"{type(task).__name__}: variant daunce_m draws labels from theta_0's logits; define "
                            "logits(model, batch) and loss_from_logits(logits, batch) (not loss) in the Task")
        self.meas = task.measurement if _overrides(task, "measurement") else self.sig
        self.task, self.train, self.query = task, train, query
        self.net = copy.deepcopy(model).to(device).eval()
        self.wrapper = _Apply(self.net)
        self.p0 = {k: v.detach() for k, v in self.net.named_parameters() if v.requires_grad}
        if not self.p0:
            raise ValueError("the model has no parameter with requires_grad=True: nothing to perturb")
        self.fixed = {**{k: v.detach() for k, v in self.net.named_parameters() if not v.requires_grad},
                      **{k: v.detach() for k, v in self.net.named_buffers()}}
        if variant == "daunce_t" and cfg.first_order != "margin":
            raise ValueError(f"first_order={cfg.first_order!r} (daunce.first_order) is implemented for classifiers "
                             "on (inputs, labels) tensors only; use first_order='margin' with a Task")
        self.plan = plan if plan is not None else Plan.from_daunce(cfg)
        self.eval_batch_size = eval_batch_size
        self.probs0 = self._theta0_probs() if obj.is_matched(variant) else None
        self.mode = self._pick_mode() if mode == "auto" else mode

    @torch.no_grad()
    def _theta0_probs(self) -> np.ndarray:
        """theta_0's softmax over the Task's logits on every training example, [n, C] float64."""
        out = []
        for lo in range(0, self.train.n, self.eval_batch_size):
            batch = self.train.batch(np.arange(lo, min(self.train.n, lo + self.eval_batch_size)), self.device)
            g = self._call(self.task.logits, self.p0, batch)
            if g.dim() != 2:
                raise ValueError(f"{type(self.task).__name__}.logits gives shape {tuple(g.shape)}; variant daunce_m "
                                 "draws one label per example and needs logits [batch, classes]")
            out.append(torch.softmax(g.double(), -1).cpu().numpy())
        return np.concatenate(out)

    # a model's functions with parameters p (theta) in place of its own
    def _call(self, fn: Callable, p: dict, batch: Any) -> torch.Tensor:
        return functional_call(self.wrapper, ({f"m.{k}": v for k, v in p.items()},
                                              {f"m.{k}": v for k, v in self.fixed.items()}), (fn, batch))

    def _objective(self, p: dict, batch: Any, xi: torch.Tensor, y_noise: torch.Tensor) -> torch.Tensor:
        """The perturbed objective of one model on its batch, per example [B] (equation 5);
        ``y_noise``: daunce_m's labels drawn from theta_0 (ignored by the other variants)."""
        if self.sig_of_logits is not None:
            g = self._call(self.task.logits, p, batch)
            s = self.sig_of_logits(g, batch)
            if obj.is_black_box(self.variant):
                return obj.perturbed_objective(self.variant, s, gamma=self.cfg.gamma)
            with torch.no_grad():
                g0 = self._call(self.task.logits, self.p0, batch)
            s0 = self.sig_of_logits(g0, batch)
            # per-example signals do not mix examples, so the gradient of their sum is each one's
            grad0 = grad(lambda z: self.sig_of_logits(z, batch).sum())(g0)
            lin = obj.first_order_term(g, g0, grad0)
            if obj.is_matched(self.variant):  # the softmax cross-entropy's logit gradient at the drawn label
                lin_noise = obj.first_order_term(g, g0, obj.signal_logit_grad("loss", g0, y_noise))
                return obj.perturbed_objective(self.variant, s, s0=s0.detach(), lin=lin, rho=self.cfg.rho,
                                               gamma=self.cfg.gamma, lin_noise=lin_noise)
        else:
            s = self._call(self.sig, p, batch)
            if obj.is_black_box(self.variant):
                return obj.perturbed_objective(self.variant, s, gamma=self.cfg.gamma)
            tangent = {k: p[k] - self.p0[k] for k in p}
            s0, lin = jvp(lambda q: self._call(self.sig, q, batch), (self.p0,), (tangent,))
        return obj.perturbed_objective(self.variant, s, s0=s0.detach(), lin=lin, xi=xi, rho=self.cfg.rho,
                                       gamma=self.cfg.gamma)

    def _pick_mode(self) -> str:
        ok, reason = can_vmap(self.net)  # hooks
        if ok:
            try:
                idx = np.arange(min(2, self.train.n))
                batch = self.train.batch(idx, self.device)
                p = {k: torch.stack([v, v]).requires_grad_(True) for k, v in self.p0.items()}
                xi = torch.full((2, len(idx)), 0.5, device=self.device)
                yn = torch.zeros((2, len(idx)), dtype=torch.long, device=self.device)
                vmap(self._objective)(p, _stack([batch, batch]), xi, yn).sum().backward()
                return "vmap"
            except Exception as exc:  # noqa: BLE001 -- any failure means: fit one by one
                reason = f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
        log.warning("%s perturbed fits: the Task's functions cannot be vmapped (%s); fitting the models "
                    "one by one, with the same randomness", self.variant, reason)
        return "loop"

    def fit(self, ks: Sequence[int], lr: float) -> Signals:
        """Fit models ``ks`` at learning rate ``lr``; their signals on every example."""
        ks = [int(k) for k in ks]
        n, cfg = self.train.n, self.cfg
        xis, scheds, labels = [], [], []
        for k in ks:
            sub, xi = self.plan.subset_and_xi(k, n)
            xis.append(xi)
            scheds.append(perturb.batch_order(self.plan.batch_key(k), sub, cfg.epochs, cfg.batch_size))
            labels.append(self.plan.matched_labels(k, self.probs0) if self.probs0 is not None
                          else np.zeros(n, dtype=np.int64))
        schedule = np.stack(scheds)  # [C, steps, B]
        xi_t = torch.as_tensor(np.stack(xis), dtype=torch.float32, device=self.device)
        self._y_noise = torch.as_tensor(np.stack(labels), device=self.device)  # [C, n]
        groups = [list(range(len(ks)))] if self.mode == "vmap" else [[c] for c in range(len(ks))]
        train, query = [], []
        for group in groups:
            p = self._train_group(group, schedule, xi_t, lr, f"{self.variant} k={ks[group[0]]}")
            train.append(self._signals(p, self.train, self.sig))
            query.append(self._signals(p, self.query, self.meas))
        return Signals(train=np.concatenate(train), query=np.concatenate(query), model_index=np.asarray(ks),
                       train_ids=self.train.ids, query_ids=self.query.ids, signal=self.signal,
                       attrs={"variant": self.variant, "signal": self.signal, "seed": self.plan.seed})

    def _train_group(self, group: list[int], schedule: np.ndarray, xi_t: torch.Tensor, lr: float,
                     desc: str) -> dict[str, torch.Tensor]:
        C, steps = len(group), schedule.shape[1]
        p = {k: v.expand(C, *v.shape).clone().requires_grad_(True) for k, v in self.p0.items()}
        opt, sched = E._optimizer(list(p.values()), E.OptimSpec.from_daunce(self.cfg, lr), steps)
        batched = vmap(self._objective)
        rows = torch.as_tensor(group, device=self.device)[:, None]
        for step in range(steps):
            idx = schedule[group, step]  # [C, B]
            xi = xi_t[rows, torch.as_tensor(idx, device=self.device)]
            yn = self._y_noise[rows, torch.as_tensor(idx, device=self.device)]
            batches = [self.train.batch(i, self.device) for i in idx]
            if self.mode == "vmap":
                values = batched(p, _stack(batches), xi, yn)
            else:
                values = self._objective({k: v[0] for k, v in p.items()}, batches[0], xi[0], yn[0])[None]
            loss = values.mean(dim=1).sum()
            if self.cfg.prox > 0:
                loss = loss + 0.5 * self.cfg.prox * sum(((p[k] - self.p0[k]) ** 2).sum() for k in p)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if (step % 50 == 0 or step == steps - 1) and not math.isfinite(loss.item()):
                log.warning("%s: non-finite objective at step %d; the models diverged", desc, step)
                break
        return {k: v.detach() for k, v in p.items()}

    @torch.no_grad()
    def _signals(self, p: dict[str, torch.Tensor], data: _Data, fn: Callable) -> np.ndarray:
        """``fn`` of every example of ``data`` under each of the stacked models ``p``: [C, n]."""
        C = next(iter(p.values())).shape[0]
        out = []
        for lo in range(0, data.n, self.eval_batch_size):
            batch = data.batch(np.arange(lo, min(data.n, lo + self.eval_batch_size)), self.device)
            if self.mode == "vmap":
                out.append(vmap(lambda q, b=batch: self._call(fn, q, b))(p))
            else:
                out.append(torch.stack([self._call(fn, {k: v[c] for k, v in p.items()}, batch)
                                        for c in range(C)]))
        return torch.cat(out, dim=1).float().cpu().numpy()


# --- the calls ----------------------------------------------------------------------------------

def fit_losses(model: nn.Module, task: Task | LMTask | None, train: Any, query: Any, *, variant: str = "daunce",
               K: int = 100, ratio: float | None = None, epochs: int = 1, lr: float = 0.01,
               batch_size: int | None = None, rho: float | None = None, gamma: float = 1.0,
               prox: float | None = None, seed: int = 0,
               chunk_size: int = 50, device: str = "auto", out: str | os.PathLike | None = None,
               train_ids: Any = None, query_ids: Any = None, mode: str = "auto", antithetic: bool = False,
               common_batches: bool = False, lr_schedule: str = "constant", first_order: str = "margin") -> Signals:
    """Fit K perturbed copies of ``model`` (Algorithm 1) and return their signals [K, n], [K, m].

    Args:
        model: theta_0, trained already (never modified; an LM is moved to ``device`` in place).
        task: a :class:`Task` (None: :class:`ClassificationTask`) or an :class:`LMTask`.
        train, query: datasets, DataLoaders or tuples of tensors; for an LMTask, JSONL paths or
            lists of ``{"prompt", "response"}`` dicts.
        variant: the perturbed objective (``objectives.VARIANTS``); ``daunce_t`` records margins.
        K, ratio, epochs, lr, batch_size, rho, gamma, seed: Algorithm 1 and equation (5);
            ``batch_size`` defaults to the DataLoader's, else 64. ``ratio``, ``rho`` and ``prox``
            (the pull ``prox/2 ||theta - theta_0||^2``) default to the variant's
            (``config.DaunceConfig``: 0.3, 1 and 0; for ``daunce_m`` its ``matched_*`` settings,
            ``rho`` being its label noise's scale; docs/matched_noise.md).
        chunk_size: models trained together (vmapped) at once.
        device: ``"auto"`` (CUDA when present), ``"cpu"`` or ``"cuda"``.
        out: also write the losses file (HDF5 layout of daunce_core/store.py) here, atomically;
            refused before any fit if it is one of the JSONL inputs (``store.check_output``).
        train_ids, query_ids: example ids (default: the dataset's ``ids``, else its indices).
        mode: ``"auto"``, ``"vmap"`` or ``"loop"`` (see :class:`TaskFitter`).
        antithetic, common_batches, lr_schedule, first_order: the estimator options of the same
            names in the config's ``daunce`` section (``config.DaunceConfig``); the defaults are the
            paper's. ``antithetic`` needs an even K. LMs take none of them.

    With :class:`ClassificationTask` on ``(inputs, labels)`` tensors, the labels must be integer
    class indices [n] within the model's outputs; a [n, 1] column is refused, not squeezed.

    Raises:
        ValueError: before any fit, a bad argument (K >= 2, epochs, chunk_size and batch_size >= 1
            whole numbers, lr finite > 0, ratio in (0, 1], ...), labels or ids, in one line.
        store.StoreError: ``out`` would replace an input or cannot be written.
        FloatingPointError: with ``out``, a model's signals are not finite (lower ``lr``).
    """
    base = DaunceConfig().for_variant(variant) if variant in obj.VARIANTS else DaunceConfig()
    ratio = base.ratio if ratio is None else ratio
    rho = base.rho if rho is None else rho
    prox = base.prox if prox is None else prox
    if not isinstance(prox, numbers.Real) or isinstance(prox, bool) or not math.isfinite(prox) or prox < 0:
        raise ValueError(f"prox must be a finite number >= 0, got {prox!r}")
    _check_fit_args(K=K, ratio=ratio, epochs=epochs, lr=lr, batch_size=batch_size, rho=rho, gamma=gamma,
                    seed=seed, chunk_size=chunk_size, variant=variant, mode=mode, lr_schedule=lr_schedule,
                    first_order=first_order)
    if out is not None:
        store.check_output(out, inputs=_files(train, query))
    if antithetic and K % 2:
        raise ValueError(f"antithetic=True needs an even K (models 2j, 2j+1 form a pair), got K={K}")
    dev = pick_device(device)
    options = {"antithetic": antithetic, "common_batches": common_batches, "lr_schedule": lr_schedule,
               "first_order": first_order}
    cfg = DaunceConfig(K=K, ratio=ratio, epochs=epochs, batch_size=batch_size or 64, rho=rho, gamma=gamma,
                       prox=prox, seed=seed, chunk_size=chunk_size, variants=[variant], k_curve=[K], **options)
    if obj.is_matched(variant):  # for_variant reads these in place of rho, prox and ratio
        cfg = dataclasses.replace(cfg, matched_scale=rho, matched_prox=prox, matched_ratio=ratio, matched_epochs=epochs)
    if isinstance(task, LMTask):
        if obj.is_matched(variant):
            raise ValueError("variant daunce_m (labels drawn from theta_0) is implemented for classifiers; "
                             "choose daunce, daunce_e or daunce_t for an LMTask")
        if options != {"antithetic": False, "common_batches": False, "lr_schedule": "constant",
                       "first_order": "margin"}:
            raise ValueError(f"the LoRA fitter takes none of antithetic, common_batches, lr_schedule, first_order; "
                             f"leave them at their defaults for an LMTask (got {options})")
        fitter = _lora_fitter(model, task, train, query, cfg, lr, dev, train_ids, query_ids)
    else:
        task = ClassificationTask() if task is None else task
        if not isinstance(task, Task):
            raise TypeError(f"task must be a daunce_core.api.Task or LMTask, got {type(task).__name__}")
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
        tr = _as_data(train, "train", train_ids, dev, dtype)
        qu = _as_data(query, "query", query_ids, dev, dtype)
        if batch_size is None and tr.batch_size:
            cfg = dataclasses.replace(cfg, batch_size=tr.batch_size)
        fitter = _fitter(model, task, tr, qu, variant, cfg, dev, mode)
    signals = chunks.fit_all(fitter, K, chunk_size, lr)
    setting = {"ratio": ratio, "epochs": epochs, "batch_size": cfg.batch_size, "rho": rho, "gamma": gamma,
               "prox": prox,
               "lr": lr, "task": type(task).__name__, **options}
    signals.attrs = {"config": setting, **signals.attrs, "lr": lr}
    bad = signals.diverged()
    if bad.any():
        msg = (f"{int(bad.sum())} of {K} perturbed models diverged at lr={lr:g} (non-finite signals, first "
               f"k={int(signals.model_index[bad][0])}); lower lr")
        if out is not None:
            raise FloatingPointError(f"{out}: not written: {msg}")
        log.warning(msg)
    elif out is not None:
        chunks.write_signals(out, signals)
    return signals


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
        C = net.eval()(X[:1]).shape[-1]
    net.train(was)
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


def default_measure(variant: str) -> str:
    """Covariance for matched-noise DAUNCE (its limit is the influence function as a covariance,
    docs/matched_noise.md), correlation (the paper's) for the other variants."""
    return "covariance" if obj.is_matched(variant) else "correlation"


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
    from .scoring import _check_measure, _check_memory, pairwise_scores, score_file

    if measure is None:
        measure = default_measure(fit_kw.get("variant", "daunce"))

    _check_measure(measure)  # the cheap arguments are checked before the K fits
    if out is None:
        if topk is not None:
            raise ValueError("scores: topk streams the best examples into a file; give out='scores.h5' too")
        sig = fit_losses(model, task, train, query, out=losses_out, **fit_kw)
        return pairwise_scores(sig.train, sig.query, measure=measure)
    if topk is not None and (not isinstance(topk, numbers.Integral) or isinstance(topk, bool) or topk < 1):
        raise ValueError(f"topk must be a whole number of at least 1 (examples kept per query), got {topk!r}")
    _check_memory(memory_gb)
    if losses_out is not None:
        store.check_output(losses_out, inputs=_files(train, query))
    store.check_output(out, inputs=[losses_out, *_files(train, query)] if losses_out else _files(train, query))
    with tempfile.TemporaryDirectory(prefix="daunce-losses-") as tmp:
        path = losses_out if losses_out is not None else Path(tmp) / "losses.h5"
        fit_losses(model, task, train, query, out=path, **fit_kw)
        return score_file(path, out, measure=measure, topk=topk, memory_gb=memory_gb)
