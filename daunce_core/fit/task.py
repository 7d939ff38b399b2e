"""The fitter for any model and :class:`~daunce_core.task.Task`: the perturbed objective of
equation 5 through the Task's functions, vmapped over the models of a chunk when they allow it
(the first-order term in logit space, or as a Jacobian-vector product in parameter space;
docs in :mod:`daunce_core.api`), with the data adapters that index any dataset by example."""
from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad, jvp, vmap

from .. import ensemble as E
from .. import objectives as obj
from .. import perturb
from ..config import DaunceConfig
from ..models import can_vmap
from ..task import Task, _overrides, _signal_fns
from .contract import Signals

__all__ = ["TaskFitter"]

log = logging.getLogger(__name__)


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


# --- the fitter ---------------------------------------------------------------------------------

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
                 cfg: DaunceConfig, device, plan: perturb.Plan | None = None, mode: str = "auto",
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
        self.plan = plan if plan is not None else perturb.Plan.from_daunce(cfg)
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
        batched = vmap(self._objective)
        rows = torch.as_tensor(group, device=self.device)[:, None]

        def values(step: int) -> torch.Tensor:  # [C, B]
            idx = schedule[group, step]  # [C, B]
            xi = xi_t[rows, torch.as_tensor(idx, device=self.device)]
            yn = self._y_noise[rows, torch.as_tensor(idx, device=self.device)]
            batches = [self.train.batch(i, self.device) for i in idx]
            if self.mode == "vmap":
                return batched(p, _stack(batches), xi, yn)
            return self._objective({k: v[0] for k, v in p.items()}, batches[0], xi[0], yn[0])[None]

        E.optimise(p, steps, E.OptimSpec.from_daunce(self.cfg, lr), values, prox=self.cfg.prox, center=self.p0,
                   desc=desc)
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
