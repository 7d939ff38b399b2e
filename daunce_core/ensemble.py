"""Train a whole chunk of small models at once: perturbed fits (Algorithm 1) and retrains.

The C models of a chunk share an architecture; their parameters are stacked along a leading
axis and trained together with ``torch.func.vmap`` over ``functional_call``: one forward and one
backward per step for all C models, on CPU or CUDA alike. Optimisers act elementwise (SGD with
momentum, Adam, weight decay), so stacking never couples the models: model k's trajectory is
the same in any chunk (tested).

Models whose BatchNorm layers must update running statistics (ResNet-9 trained from scratch)
cannot be vmapped (in-place buffer updates); ``mode="loop"`` trains them one after another with
the very same schedule, objective and optimiser -- an equivalent batched ensemble, one model on
the accelerator at a time. Perturbed fine-tuning keeps BatchNorm in eval mode (statistics of
theta_0) and is vmapped. Any other model that fails ``models.can_vmap`` (hooks, in-place writes,
random ops) takes the same loop, with a logged notice (``models.fit_mode``).
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, vmap
from tqdm.auto import tqdm

from . import objectives as obj
from .config import DaunceConfig, TrainConfig
from .fit.contract import Plan
from .models import fit_mode, has_batchnorm
from .perturb import batch_order

log = logging.getLogger(__name__)

Stacked = dict[str, torch.Tensor]
# objective(logits [C, B, classes], idx [C, B] training indices, models [C] positions in chunk) -> [C, B]
Objective = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class OptimSpec:
    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0
    schedule: str = "constant"

    @classmethod
    def from_train(cls, t: TrainConfig) -> OptimSpec:
        return cls(t.optimizer, t.lr, t.momentum, t.nesterov, t.weight_decay, t.lr_schedule)

    @classmethod
    def from_daunce(cls, d: DaunceConfig, lr: float) -> OptimSpec:
        return cls(d.optimizer, lr, d.momentum, False, 0.0, d.lr_schedule)


def _optimizer(params: list[torch.Tensor], spec: OptimSpec, total_steps: int):
    if spec.optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=spec.lr, momentum=spec.momentum,
                              nesterov=spec.nesterov and spec.momentum > 0, weight_decay=spec.weight_decay)
    elif spec.optimizer == "adam":
        opt = torch.optim.Adam(params, lr=spec.lr, weight_decay=spec.weight_decay)
    else:
        raise ValueError(f"unknown optimizer {spec.optimizer!r}; choose 'sgd' or 'adam'")
    total = max(1, total_steps)
    if spec.schedule == "constant":
        f = lambda s: 1.0  # noqa: E731
    elif spec.schedule == "linear":
        f = lambda s: max(0.0, 1.0 - s / total)  # noqa: E731
    elif spec.schedule == "cosine":  # annealed to 0 over the fit (torch's CosineAnnealingLR, T_max = total)
        f = lambda s: 0.5 * (1.0 + math.cos(math.pi * min(s, total) / total))  # noqa: E731
    elif spec.schedule == "triangle":
        peak = max(1, int(0.25 * total))
        f = lambda s: (s + 1) / peak if s < peak else max(0.0, (total - s) / (total - peak))  # noqa: E731
    else:
        raise ValueError(f"unknown lr schedule {spec.schedule!r}")
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, f)


def stack_states(states: list[dict[str, torch.Tensor]], device) -> Stacked:
    """Stack C state dicts (same keys) into one dict of [C, ...] tensors on ``device``."""
    return {k: torch.stack([s[k].detach().to(device) for s in states]) for k in states[0]}


def unstack(stacked: Stacked, c: int) -> dict[str, torch.Tensor]:
    return {k: v[c].detach().clone() for k, v in stacked.items()}


def split_state(net: nn.Module, state: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    pnames = {n for n, _ in net.named_parameters()}
    return ({k: v for k, v in state.items() if k in pnames},
            {k: v for k, v in state.items() if k not in pnames})


def augment_batch(x: torch.Tensor, gen: np.random.Generator, pad: int = 2) -> torch.Tensor:
    """Random horizontal flips and translations by up to ``pad`` pixels of images [N, C, H, W]."""
    N, _, H, W = x.shape
    flip = torch.as_tensor(gen.random(N) < 0.5, device=x.device)
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    dy = torch.as_tensor(gen.integers(0, 2 * pad + 1, N), device=x.device)
    dx = torch.as_tensor(gen.integers(0, 2 * pad + 1, N), device=x.device)
    xp = torch.nn.functional.pad(x, (pad, pad, pad, pad), mode="reflect")
    rows = (dy[:, None] + torch.arange(H, device=x.device))[:, :, None]  # [N, H, 1]
    cols = (dx[:, None] + torch.arange(W, device=x.device))[:, None, :]  # [N, 1, W]
    n_idx = torch.arange(N, device=x.device)[:, None, None]
    return xp.permute(0, 2, 3, 1)[n_idx, rows, cols].permute(0, 3, 1, 2).contiguous()


def train_stacked(
    net: nn.Module,
    params: Stacked,
    buffers: Stacked,
    X: torch.Tensor,
    schedule: np.ndarray,
    objective: Objective,
    spec: OptimSpec,
    *,
    mode: str = "vmap",
    train_mode: bool = False,
    prox_center: Stacked | None = None,
    prox: float = 0.0,
    augment_keys: list[tuple[int, ...]] | None = None,
    desc: str = "train",
    erm_objective: Objective | None = None,
    trace_every: int = 0,
    trace_out: dict | None = None,
) -> tuple[Stacked, Stacked]:
    """Optimise C stacked models on their own minibatch schedules.

    Args:
        net: the architecture (its own weights are not used).
        params, buffers: [C, ...] stacked parameters and buffers (``split_state``).
        X: all training inputs on the device, [n, ...].
        schedule: [C, steps, B] training indices of each model at each step.
        objective: per-example objective values [C, B] from logits [C, B, classes].
        spec: optimiser and learning-rate schedule.
        mode: ``"vmap"`` (all models per step) or ``"loop"`` (one model after another).
        train_mode: put the network in train mode (BatchNorm batch statistics; loop only).
        prox_center, prox: optional pull ``prox/2 ||theta - theta_0||^2`` towards ``prox_center``.
        augment_keys: per-model keys of the augmentation random streams (None: no augmentation).
        erm_objective, trace_every, trace_out: Figure 3's log. Every ``trace_every`` steps (and at
            the last) each model's gradient norm of the full objective, of its ERM term
            (``erm_objective``, same signature as ``objective``) and of the rest (the first-order
            term) go into ``trace_out``: ``step`` [S] (1-based optimiser steps) and ``total``,
            ``erm``, ``first_order`` [C, S]. Cost: one extra backward pass per logged step (the
            first-order gradient is the difference of the two, by linearity).
    Returns:
        The trained (params, buffers), detached.
    """
    C, steps, _ = schedule.shape
    device = X.device
    if mode == "vmap" and train_mode and has_batchnorm(net):
        raise ValueError("BatchNorm in train mode cannot be vmapped; use mode='loop'")
    groups = [list(range(C))] if mode == "vmap" else [[c] for c in range(C)]
    out_p: dict[str, list[torch.Tensor]] = {k: [] for k in params}
    out_b: dict[str, list[torch.Tensor]] = {k: [] for k in buffers}
    net.train(train_mode)

    def fmodel(p, b, x):
        return functional_call(net, (p, b), (x,))

    batched = vmap(fmodel, in_dims=(0, 0, 0))
    bar = tqdm(total=steps * len(groups), desc=desc, leave=False, mininterval=2.0)
    tracing = trace_out is not None and erm_objective is not None and trace_every > 0
    traced_steps = [t for t in range(steps) if t % trace_every == 0 or t == steps - 1] if tracing else []
    norms: dict[str, list[np.ndarray]] = {t: [] for t in ("total", "erm", "first_order")}
    for group in groups:
        g = torch.as_tensor(group, device=device)
        p = {k: v[group].detach().clone().requires_grad_(True) for k, v in params.items()}
        b = {k: v[group].detach().clone() for k, v in buffers.items()}
        center = {k: v[group].detach() for k, v in prox_center.items()} if prox_center else None
        opt, sched = _optimizer(list(p.values()), spec, steps)
        gens = [np.random.default_rng([*augment_keys[c], 3]) for c in group] if augment_keys else None
        for step in range(steps):
            idx = torch.as_tensor(schedule[group, step], device=device)  # [c, B]
            xb = X[idx]  # [c, B, ...]
            if gens is not None:
                xb = torch.stack([augment_batch(xb[i], gens[i]) for i in range(len(group))])
            if mode == "vmap":
                logits = batched(p, b, xb)
            else:
                logits = fmodel({k: v[0] for k, v in p.items()}, {k: v[0] for k, v in b.items()},
                                xb[0]).unsqueeze(0)
            loss = objective(logits, idx, g).mean(dim=1).sum()
            if center is not None and prox > 0:
                loss = loss + 0.5 * prox * sum(((p[k] - center[k]) ** 2).sum() for k in p)
            traced = tracing and step in traced_steps
            if traced:  # model c's row of each gradient is the gradient of model c's own objective
                g_erm = torch.autograd.grad(erm_objective(logits, idx, g).mean(dim=1).sum(), list(p.values()),
                                            retain_graph=True)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if traced:
                g_obj = [p[k].grad - (prox * (p[k] - center[k]) if center is not None and prox > 0 else 0.0)
                         for k in p]
                _log_norms(norms, g_obj, g_erm, len(group))
            opt.step()
            sched.step()
            bar.update(1)
            if (step % 50 == 0 or step == steps - 1) and not math.isfinite(loss.item()):
                log.warning("%s: non-finite objective at step %d; the models diverged", desc, step)
                break
        for k in p:
            out_p[k].append(p[k].detach())
        for k in b:
            out_b[k].append(b[k].detach())
    bar.close()
    if tracing:
        S = len(traced_steps)
        trace_out["step"] = np.asarray(traced_steps) + 1
        for t, rows in norms.items():  # [S * groups] blocks of [c] -> [C, S]
            blocks = [np.stack(rows[i * S:(i + 1) * S], axis=1) for i in range(len(groups))]
            trace_out[t] = np.concatenate(blocks, axis=0)
    return ({k: torch.cat(v) for k, v in out_p.items()}, {k: torch.cat(v) for k, v in out_b.items()})


def _log_norms(norms: dict, g_obj: list, g_erm: tuple, c: int) -> None:
    """Per-model L2 norms [c] of the objective's gradient, its ERM part and the rest."""
    def norm(gs):
        return torch.sqrt(sum((x.detach().reshape(c, -1).double() ** 2).sum(1) for x in gs)).cpu().numpy()

    norms["total"].append(norm(g_obj))
    norms["erm"].append(norm(g_erm))
    norms["first_order"].append(norm([a - e for a, e in zip(g_obj, g_erm)]))


@torch.no_grad()
def predict(net: nn.Module, params: Stacked, buffers: Stacked, X: torch.Tensor,
            batch_size: int = 1024, mode: str = "vmap") -> torch.Tensor:
    """Logits of C stacked models on X: [C, N, classes] (eval mode); ``mode="loop"`` runs the
    models one at a time (for those that fail ``models.can_vmap``)."""
    net.eval()
    if mode == "loop":
        C = next(iter(params.values())).shape[0]
        f = lambda p, b, x: torch.stack([  # noqa: E731
            functional_call(net, ({k: v[c] for k, v in p.items()}, {k: v[c] for k, v in b.items()}), (x,))
            for c in range(C)])
    else:
        f = vmap(lambda p, b, x: functional_call(net, (p, b), (x,)), in_dims=(0, 0, None))
    return torch.cat([f(params, buffers, X[i:i + batch_size]) for i in range(0, len(X), batch_size)], dim=1)


# --- the two uses --------------------------------------------------------------------------------

def fit_perturbed(
    net: nn.Module,
    theta_0: dict[str, torch.Tensor],
    X: torch.Tensor,
    y: torch.Tensor,
    ks: list[int],
    *,
    variant: str,
    cfg: DaunceConfig,
    lr: float,
    logits0: torch.Tensor | None = None,
    mode: str = "vmap",
    plan: Plan | None = None,
    trace_out: dict | None = None,
) -> tuple[Stacked, Stacked]:
    """Algorithm 1, steps 2-4, for perturbed models ``ks`` trained together from ``theta_0``.

    With ``trace_out`` (a dict) and ``cfg.trace_every > 0`` the per-term gradient norms of
    Figure 3 are logged into it (:func:`train_stacked`): the ERM term is the variant's loss term,
    ``gamma (s - s_0)`` or ``gamma/2 (s - s_0)^2`` (the whole objective for the black-box forms),
    the first-order term the rest of equation (5).

    ``logits0`` are theta_0's logits on the whole training set [n, classes] (computed once if
    not given): the first-order term of equation (5) needs nothing else. ``plan`` draws each
    model's subset, xi and batch order; by default ``Plan.from_daunce(cfg)``: with
    ``cfg.antithetic`` and ``cfg.common_batches`` off, the paper's independent draws keyed by
    ``(seed, k)``. ``cfg.lr_schedule`` and ``cfg.optimizer`` set the optimiser
    (:meth:`OptimSpec.from_daunce`), ``cfg.first_order`` DAUNCE-T's first-order term
    (:func:`daunce_core.objectives.first_order_grad`).
    """
    obj.check_variant(variant)
    n = len(y)
    device = X.device
    if logits0 is None:
        p0, b0 = split_state(net, theta_0)
        logits0 = predict(net, stack_states([p0], device), stack_states([b0], device), X, mode=mode)[0]
    plan = plan if plan is not None else Plan.from_daunce(cfg)
    xis, scheds = [], []
    for k in ks:
        sub, xi = plan.subset_and_xi(k, n)
        xis.append(xi)
        scheds.append(batch_order(plan.batch_key(k), sub, cfg.epochs, cfg.batch_size))
    schedule = np.stack(scheds)
    xi_t = torch.as_tensor(np.stack(xis), dtype=torch.float32, device=device)  # [C, n]

    def objective(logits, idx, models):
        C, B, nc = logits.shape
        flat = idx.reshape(-1)
        return obj.classifier_objective(
            variant, logits.reshape(C * B, nc), y[flat], logits0=logits0[flat],
            xi=xi_t[models[:, None], idx].reshape(-1), rho=cfg.rho, gamma=cfg.gamma, first_order=cfg.first_order,
        ).reshape(C, B)

    signal = obj.signal_of(variant)

    def erm_objective(logits, idx, models):
        C, B, nc = logits.shape
        flat = idx.reshape(-1)
        s = obj.signal_value(signal, logits.reshape(C * B, nc), y[flat])
        if obj.is_black_box(variant):
            return obj.perturbed_objective(variant, s, gamma=cfg.gamma).reshape(C, B)
        d = s - obj.signal_value(signal, logits0[flat], y[flat])
        return (cfg.gamma * d if variant == "daunce" else 0.5 * cfg.gamma * d.square()).reshape(C, B)

    p0, b0 = split_state(net, theta_0)
    C = len(ks)
    params = stack_states([p0] * C, device)
    buffers = stack_states([b0] * C, device)
    center = stack_states([p0] * C, device) if cfg.prox > 0 else None
    return train_stacked(net, params, buffers, X, schedule, objective, OptimSpec.from_daunce(cfg, lr),
                         mode=mode, train_mode=False, prox_center=center, prox=cfg.prox,
                         desc=f"{variant} k={ks[0]}..{ks[-1]}", erm_objective=erm_objective,
                         trace_every=cfg.trace_every, trace_out=trace_out)


def fit_from_scratch(
    net_factory: Callable[[], nn.Module],
    X: torch.Tensor,
    y: torch.Tensor,
    subsets: list[np.ndarray],
    keys: list[tuple[int, ...]],
    recipe: TrainConfig,
    *,
    augment: bool = False,
) -> tuple[nn.Module, Stacked, Stacked]:
    """Train one model per (subset, key) from a fresh initialisation with the base recipe.

    The initialisation and data order of each model come from its ``key`` only. Used for
    theta_0 (one model on everything), LDS retrains and removal retrains.
    """
    device = X.device
    states = []
    for key in keys:
        torch.manual_seed(int(np.random.default_rng([*key, 5]).integers(2**62)))
        states.append({k: v.detach().clone() for k, v in net_factory().state_dict().items()})
    net = net_factory().to(device)
    p, b = split_state(net, states[0])
    pn, bn = set(p), set(b)
    params = stack_states([{k: s[k] for k in pn} for s in states], device)
    buffers = stack_states([{k: s[k] for k in bn} for s in states], device)
    sizes = {len(s) for s in subsets}
    if len(sizes) != 1:
        raise ValueError(f"all subsets of a chunk must have the same size, got {sorted(sizes)}")
    schedule = np.stack([batch_order(key, s, recipe.epochs, recipe.batch_size) for key, s in zip(keys, subsets)])

    def objective(logits, idx, models):
        C, B, nc = logits.shape
        return torch.nn.functional.cross_entropy(
            logits.reshape(C * B, nc), y[idx.reshape(-1)], reduction="none",
            label_smoothing=recipe.label_smoothing).reshape(C, B)

    mode = "loop" if has_batchnorm(net) else fit_mode(net, X[:2], train_mode=True, what="retrain")
    params, buffers = train_stacked(net, params, buffers, X, schedule, objective, OptimSpec.from_train(recipe),
                                    mode=mode, train_mode=True,
                                    augment_keys=keys if augment else None, desc="retrain")
    return net, params, buffers


def signals(logits: torch.Tensor, y: torch.Tensor, signal: str) -> torch.Tensor:
    """Per-example loss or margin of stacked logits [C, N, classes] -> [C, N]."""
    C, N, nc = logits.shape
    flat = logits.reshape(C * N, nc)
    yy = y.repeat(C)
    return obj.signal_value(signal, flat, yy).reshape(C, N)
