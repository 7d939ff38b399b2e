"""Train a whole chunk of small models at once: perturbed fits (Algorithm 1) and retrains.

The C models of a chunk are stacked along a leading axis and trained together with
``torch.func.vmap`` over ``functional_call`` (BatchNorm's running statistics included), or one by
one with the same schedule (``mode="loop"``) when a model cannot be vmapped; model k's trajectory is
the same in any chunk. :func:`train_stacked` serves the classifier fitter, theta_0 and the LDS
retrains. BatchNorm, the loop fallback and the speed options:
docs/design.md#daunce_coreensemblepy-training-a-chunk-of-models-at-once."""
from __future__ import annotations

import contextlib
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
from .models import fit_mode
from .perturb import Plan, batch_order

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
    """(trained, fixed) entries of ``state``: the parameters with ``requires_grad``, and the
    buffers with the frozen parameters (``requires_grad=False``), which no fit ever changes."""
    pnames = {n for n, p in net.named_parameters() if p.requires_grad}
    return ({k: v for k, v in state.items() if k in pnames},
            {k: v for k, v in state.items() if k not in pnames})


@dataclass(frozen=True)
class Speed:
    """How the trainer uses the device; all off = fp32, contiguous layout, eager (the default).

    ``precision="bf16"``: forward under ``torch.autocast(dtype=bfloat16)`` (convolutions and
    matmuls in bf16; BatchNorm statistics, the loss and the fp32 master weights and optimiser
    states stay fp32). ``channels_last``: every model's images and 4-d convolution weights are
    laid out NHWC. ``compile``: the vmapped forward goes through ``torch.compile``.
    """

    precision: str = "fp32"
    channels_last: bool = False
    compile: bool = False

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)} (base.precision), "
                             f"got {self.precision!r}")

    @classmethod
    def from_train(cls, t: TrainConfig) -> Speed:
        return cls(t.precision, t.channels_last, t.compile)

    def autocast(self, device: torch.device):
        if self.precision == "bf16":
            return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()


PRECISIONS = ("fp32", "bf16")


def _channels_last(t: torch.Tensor) -> torch.Tensor:
    """Stacked [C, N, ch, H, W] (images or conv weights) with each model's [N, ch, H, W] NHWC."""
    return t.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3) if t.dim() == 5 else t


def augment_draws(gen: np.random.Generator, n: int, pad: int = 2) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One model's augmentation draws for a batch of ``n``: flips [n] bool, row and column
    offsets [n] in [0, 2 pad], taken from ``gen`` in this order (the stream of every model)."""
    flip = gen.random(n) < 0.5
    dy = gen.integers(0, 2 * pad + 1, n)
    dx = gen.integers(0, 2 * pad + 1, n)
    return flip, dy, dx


def shift_and_flip(x: torch.Tensor, flip: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, pad: int = 2,
                   padding: str = "reflect") -> torch.Tensor:
    """Flip images [N, C, H, W] where ``flip``, then crop H x W at offsets (dy, dx) of the image
    padded by ``pad`` pixels (``padding``: ``"reflect"``, or ``"constant"`` = zeros as
    torchvision's ``RandomCrop(padding=pad)``). Pure torch: runs where ``x`` lives."""
    N, _, H, W = x.shape
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    xp = torch.nn.functional.pad(x, (pad, pad, pad, pad), mode=padding)
    rows = (dy[:, None] + torch.arange(H, device=x.device))[:, :, None]  # [N, H, 1]
    cols = (dx[:, None] + torch.arange(W, device=x.device))[:, None, :]  # [N, 1, W]
    n_idx = torch.arange(N, device=x.device)[:, None, None]
    return xp.permute(0, 2, 3, 1)[n_idx, rows, cols].permute(0, 3, 1, 2).contiguous()


def augment_batch(x: torch.Tensor, gen: np.random.Generator, pad: int = 2,
                  padding: str = "reflect") -> torch.Tensor:
    """Random horizontal flips and translations by up to ``pad`` pixels of images [N, C, H, W]."""
    flip, dy, dx = (torch.as_tensor(a, device=x.device) for a in augment_draws(gen, len(x), pad))
    return shift_and_flip(x, flip, dy, dx, pad, padding)


def _augment_plan(gens: list[np.random.Generator], steps: int, B: int, pad: int,
                  device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every step's augmentation draws of c models, on the device in one copy per trainer call:
    flips [steps, c B] bool and offsets [steps, c B] int16. Model i draws step after step from its
    own stream ``gens[i]``, so the draws are those of drawing at each step. One copy instead of one
    per step: a copy from pageable host memory waits for the device to finish its queued work, so
    a copy per step would stall the GPU while the host queues the next step."""
    draws = [[augment_draws(g, B, pad) for _ in range(steps)] for g in gens]  # [c][steps] of (flip, dy, dx)
    return tuple(torch.as_tensor(np.stack([np.concatenate([d[t][i] for d in draws]) for t in range(steps)])
                                 .astype(bool if i == 0 else np.int16), device=device)
                 for i in range(3))


def _augment_step(xb: torch.Tensor, plan: tuple[torch.Tensor, ...], step: int, pad: int, padding: str) -> torch.Tensor:
    """Augment one step's images [c, B, ...] of c models with the step's row of :func:`_augment_plan`:
    one batched crop serves every model."""
    c, B = xb.shape[:2]
    flip, dy, dx = (t[step] for t in plan)
    return shift_and_flip(xb.reshape(c * B, *xb.shape[2:]), flip, dy, dx, pad, padding).reshape(xb.shape)


@contextlib.contextmanager
def affine_eval_batchnorm(net: nn.Module, *, cast_train: bool = True):
    """BatchNorm modules in eval mode computed as their affine map, ``(x - mean) / sqrt(var + eps)
    * weight + bias`` in fp32, cast back to the input's dtype, for the duration.

    Under ``vmap`` with per-model statistics, cuDNN's ``batch_norm`` refuses the batched layout
    (CUDNN_STATUS_NOT_SUPPORTED) and CUDA's own kernel refuses a bf16 input with fp32 statistics
    in the backward pass (both seen on an H200, ``benchmarks/gpu_check.sh``); the elementwise map
    has neither limit. Modules in train mode keep their own forward, on an input cast to their
    statistics' dtype if ``cast_train`` (the same kernel refused bf16 with fp32 statistics in train
    mode too); channels-last inputs are left as they are (cuDNN's NHWC kernel takes them, and
    vmap cannot query a cast channels-last tensor's layout).
    """
    mods = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    def affine(m, own):
        def forward(x):
            if m.training or m.running_mean is None:
                if cast_train and m.running_mean is not None and x.dtype != m.running_mean.dtype:
                    return own(x.to(m.running_mean.dtype)).to(x.dtype)  # bf16 input, fp32 statistics
                return own(x)
            shape = (1, -1) + (1,) * (x.dim() - 2)
            y = (x.float() - m.running_mean.reshape(shape)) * torch.rsqrt(m.running_var.reshape(shape) + m.eps)
            if m.weight is not None:
                y = y * m.weight.reshape(shape) + m.bias.reshape(shape)
            return y.to(x.dtype)
        return forward

    own = [vars(m).get("forward") for m in mods]  # an instance's own forward, if it has one
    for m in mods:
        m.forward = affine(m, m.forward)
    try:
        yield net
    finally:
        for m, f in zip(mods, own):
            if f is None:
                del m.forward  # back to the class's forward
            else:
                m.forward = f


def forward_with_state(net: nn.Module, params: dict, buffers: dict, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """``net``'s output on ``x`` with ``params`` and ``buffers``, and the buffers after the call.

    BatchNorm in train mode updates its running statistics in place (nn.BatchNorm's own momentum
    update, unbiased variance, ``num_batches_tracked``); it gets copies, so the inputs stay as
    they were and the new state is returned. Under ``vmap`` the copies are per-model (batched)
    tensors, which in-place updates may write (unlike unbatched ones, the reason
    ``torch.func.replace_all_batch_norm_modules_`` drops the running statistics altogether).
    """
    state = {k: v.clone() for k, v in buffers.items()}
    return functional_call(net, (params, state), (x,)), state


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
    augment_pad: int = 2,
    augment_padding: str = "reflect",
    desc: str = "train",
    erm_objective: Objective | None = None,
    trace_every: int = 0,
    trace_out: dict | None = None,
    speed: Speed | None = None,
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
        train_mode: put the network in train mode (BatchNorm: batch statistics, and the running
            statistics are carried from step to step and returned; :func:`forward_with_state`).
        prox_center, prox: optional pull ``prox/2 ||theta - theta_0||^2`` towards ``prox_center``.
        augment_keys: per-model keys of the augmentation random streams (None: no augmentation).
        augment_pad, augment_padding: translations by up to ``augment_pad`` pixels of the image
            padded by reflection or zeros (``"constant"``); see :func:`shift_and_flip`.
        erm_objective, trace_every, trace_out: Figure 3's log. Every ``trace_every`` steps (and at
            the last) each model's gradient norm of the full objective, of its ERM term
            (``erm_objective``, same signature as ``objective``) and of the rest (the first-order
            term) go into ``trace_out``: ``step`` [S] (1-based optimiser steps) and ``total``,
            ``erm``, ``first_order`` [C, S]. Cost: one extra backward pass per logged step (the
            first-order gradient is the difference of the two, by linearity).
        speed: precision, memory layout and compilation (:class:`Speed`; None: all off).
    Returns:
        The trained (params, buffers), detached.
    """
    C, steps, _ = schedule.shape
    device = X.device
    speed = speed or Speed()
    groups = [list(range(C))] if mode == "vmap" else [[c] for c in range(C)]
    out_p: dict[str, list[torch.Tensor]] = {k: [] for k in params}
    out_b: dict[str, list[torch.Tensor]] = {k: [] for k in buffers}
    net.train(train_mode)
    stateful = train_mode and bool(buffers)  # BatchNorm's running statistics change

    def fmodel(p, b, x):
        with affine_eval_batchnorm(net, cast_train=not speed.channels_last):
            if stateful:
                return forward_with_state(net, p, b, x)
            return functional_call(net, (p, b), (x,)), b

    if mode == "vmap":
        forward = vmap(fmodel, in_dims=(0, 0, 0))
    else:
        def forward(p, b, x):
            out, state = fmodel({k: v[0] for k, v in p.items()}, {k: v[0] for k, v in b.items()}, x[0])
            return out.unsqueeze(0), {k: v.unsqueeze(0) for k, v in state.items()}
    if speed.compile:
        forward = torch.compile(forward)
    bar = tqdm(total=steps * len(groups), desc=desc, leave=False, mininterval=2.0)
    tracing = trace_out is not None and erm_objective is not None and trace_every > 0
    traced_steps = [t for t in range(steps) if t % trace_every == 0 or t == steps - 1] if tracing else []
    norms: dict[str, list[np.ndarray]] = {t: [] for t in ("total", "erm", "first_order")}
    for group in groups:
        g = torch.as_tensor(group, device=device)
        sched = torch.as_tensor(schedule[group], device=device)  # [c, steps, B], on the device once
        p = {k: v[group].detach().clone() for k, v in params.items()}
        if speed.channels_last:
            p = {k: _channels_last(v) for k, v in p.items()}
        p = {k: v.requires_grad_(True) for k, v in p.items()}
        b = {k: v[group].detach().clone() for k, v in buffers.items()}
        center = {k: v[group].detach() for k, v in prox_center.items()} if prox_center else None
        plan = (_augment_plan([np.random.default_rng([*augment_keys[c], 3]) for c in group], steps,
                              schedule.shape[2], augment_pad, device) if augment_keys else None)
        now: dict = {}  # this step's indices, logits, inputs and new buffers
        c = len(group)

        def values(step, p=p, g=g, sched=sched, plan=plan, now=now):
            idx = sched[:, step].contiguous()  # [c, B]
            xb = X[idx]  # [c, B, ...]
            if plan is not None:
                xb = _augment_step(xb, plan, step, augment_pad, augment_padding)
            if speed.channels_last:
                xb = _channels_last(xb)
            with speed.autocast(device):
                logits, now["b"] = forward(p, now["b"], xb)
            now["logits"], now["idx"] = logits.float(), idx
            now["inputs"] = {"xb": xb} if getattr(objective, "takes_inputs", False) else {}
            return objective(now["logits"], idx, g, **now["inputs"])

        def trace(step, p=p, g=g, center=center, c=c, now=now):
            if not (tracing and step in traced_steps):
                return None
            # model c's row of each gradient is the gradient of model c's own objective
            g_erm = torch.autograd.grad(erm_objective(now["logits"], now["idx"], g, **now["inputs"]).mean(dim=1).sum(),
                                        list(p.values()), retain_graph=True)

            def after_backward():
                g_obj = [p[k].grad - (prox * (p[k] - center[k]) if center is not None and prox > 0 else 0.0)
                         for k in p]
                _log_norms(norms, g_obj, g_erm, c)
            return after_backward

        def stepped(step, now=now):
            now["b"] = {k: v.detach() for k, v in now["b"].items()}
            bar.update(1)

        now["b"] = b
        optimise(p, steps, spec, values, prox=prox, center=center, desc=desc, before_backward=trace,
                 after_step=stepped)
        b = now["b"]
        for k in p:
            out_p[k].append(p[k].detach().contiguous())
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


def optimise(p: Stacked, steps: int, spec: OptimSpec, values: Callable[[int], torch.Tensor], *, prox: float = 0.0,
             center: dict[str, torch.Tensor] | None = None, desc: str = "train",
             before_backward: Callable[[int], Callable[[], None] | None] | None = None,
             after_step: Callable[[int], None] | None = None) -> None:
    """The optimiser loop every perturbed fit and retrain shares: at each step, minimise the batch
    mean of ``values(step)`` ([C, B], one row per stacked model) summed over the models, plus
    ``prox/2 ||p - center||^2``; ``spec``'s optimiser and schedule update ``p`` in place. A
    non-finite objective (checked every 50 steps and at the last) stops the loop with a warning.
    ``before_backward(step)`` may return a function called after the backward pass (Figure 3's
    log); ``after_step(step)`` runs after each update."""
    opt, lr_sched = _optimizer(list(p.values()), spec, steps)
    for step in range(steps):
        loss = values(step).mean(dim=1).sum()
        if center is not None and prox > 0:
            loss = loss + 0.5 * prox * sum(((p[k] - center[k]) ** 2).sum() for k in p)
        after_backward = before_backward(step) if before_backward is not None else None
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if after_backward is not None:
            after_backward()
        opt.step()
        lr_sched.step()
        if after_step is not None:
            after_step(step)
        if (step % 50 == 0 or step == steps - 1) and not math.isfinite(loss.item()):
            log.warning("%s: non-finite objective at step %d; the models diverged", desc, step)
            break


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
    with affine_eval_batchnorm(net):
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
    speed: Speed | None = None,
) -> tuple[Stacked, Stacked]:
    """Algorithm 1, steps 2-4, for perturbed models ``ks`` trained together from ``theta_0``.

    BatchNorm follows ``cfg.batchnorm``: ``eval`` keeps theta_0's statistics, ``train`` (the
    authors' code) normalises by each minibatch's statistics and carries the running statistics,
    which the returned buffers then hold (and ``predict`` uses). ``cfg.augment`` applies the
    authors' ``RandomCrop(32, padding=4)`` and horizontal flips (zero padding, i.e. the mean pixel
    of the normalised data), drawn from model k's stream keyed by ``plan.batch_key(k)``.
    ``speed``: the trainer's precision, layout and compilation (:class:`Speed`; the workflow
    passes ``base``'s).

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
    (:func:`daunce_core.objectives.first_order_grad`). ``daunce_m`` draws each model's labels from
    theta_0's probabilities (``plan.matched_labels``) and fits with ``cfg.for_variant``'s settings.
    """
    obj.check_variant(variant)
    cfg = cfg.for_variant(variant)  # daunce_m: its own scale, damping and subset ratio
    n = len(y)
    device = X.device
    if logits0 is None:
        p0, b0 = split_state(net, theta_0)
        logits0 = predict(net, stack_states([p0], device), stack_states([b0], device), X, mode=mode)[0]
    plan = plan if plan is not None else Plan.from_daunce(cfg)
    matched = obj.is_matched(variant)
    if matched and cfg.augment:
        raise ValueError("daunce_m draws each example's label from theta_0's prediction on its stored input; "
                         "set daunce.augment: false for it")
    probs0 = torch.softmax(logits0.double(), -1).cpu().numpy() if matched else None
    xis, scheds, labels = [], [], []
    for k in ks:
        sub, xi = plan.subset_and_xi(k, n)
        xis.append(xi)
        scheds.append(batch_order(plan.batch_key(k), sub, cfg.epochs, cfg.batch_size))
        if matched:
            labels.append(plan.matched_labels(k, probs0))
    schedule = np.stack(scheds)
    xi_t = torch.as_tensor(np.stack(xis), dtype=torch.float32, device=device)  # [C, n]
    y_noise = torch.as_tensor(np.stack(labels), device=device) if matched else None  # [C, n] daunce_m's labels

    p0, b0 = split_state(net, theta_0)
    # With augmentation, the first-order term needs theta_0's logits on the same augmented images
    # (g0 of equation 5 is theta_0's output on the input the model sees; the authors' code
    # recomputes it every step): one extra forward of theta_0, eval mode, no gradient.
    recompute = cfg.augment and not obj.is_black_box(variant)

    def theta0_logits(idx, xb=None):
        if not recompute or xb is None:
            return logits0[idx.reshape(-1)]
        C, B = idx.shape
        was_training = net.training
        net.eval()
        try:
            with torch.no_grad():
                return functional_call(net, (p0, b0), (xb.reshape(C * B, *xb.shape[2:]),)).float()
        finally:
            net.train(was_training)

    def objective(logits, idx, models, xb=None):
        C, B, nc = logits.shape
        flat = idx.reshape(-1)
        return obj.classifier_objective(
            variant, logits.reshape(C * B, nc), y[flat], logits0=theta0_logits(idx, xb),
            xi=xi_t[models[:, None], idx].reshape(-1), rho=cfg.rho, gamma=cfg.gamma, first_order=cfg.first_order,
            y_noise=None if y_noise is None else y_noise[models[:, None], idx].reshape(-1),
        ).reshape(C, B)

    signal = obj.signal_of(variant)

    def erm_objective(logits, idx, models, xb=None):
        C, B, nc = logits.shape
        flat = idx.reshape(-1)
        s = obj.signal_value(signal, logits.reshape(C * B, nc), y[flat])
        if obj.is_black_box(variant):
            return obj.perturbed_objective(variant, s, gamma=cfg.gamma).reshape(C, B)
        d = s - obj.signal_value(signal, theta0_logits(idx, xb), y[flat])
        return (cfg.gamma * d if variant in ("daunce", "daunce_m") else 0.5 * cfg.gamma * d.square()).reshape(C, B)

    objective.takes_inputs = erm_objective.takes_inputs = recompute
    C = len(ks)
    params = stack_states([p0] * C, device)
    buffers = stack_states([b0] * C, device)
    center = stack_states([p0] * C, device) if cfg.prox > 0 else None
    if cfg.batchnorm not in BATCHNORM_MODES:
        raise ValueError(f"daunce.batchnorm must be one of {', '.join(BATCHNORM_MODES)}, got {cfg.batchnorm!r}")
    train_mode = cfg.batchnorm == "train"
    if train_mode and mode == "vmap":  # train mode may add random ops (dropout) that vmap refuses
        mode = fit_mode(net, X[:2], train_mode=True, what=f"{variant} perturbed fits (daunce.batchnorm: train)")
    return train_stacked(net, params, buffers, X, schedule, objective, OptimSpec.from_daunce(cfg, lr),
                         mode=mode, train_mode=train_mode, prox_center=center, prox=cfg.prox,
                         augment_keys=[plan.batch_key(k) for k in ks] if cfg.augment else None,
                         augment_pad=4, augment_padding="constant",
                         desc=f"{variant} k={ks[0]}..{ks[-1]}", erm_objective=erm_objective,
                         trace_every=cfg.trace_every, trace_out=trace_out, speed=speed)


BATCHNORM_MODES = ("eval", "train")


def fit_from_scratch(
    net_factory: Callable[[], nn.Module],
    X: torch.Tensor,
    y: torch.Tensor,
    subsets: list[np.ndarray],
    keys: list[tuple[int, ...]],
    recipe: TrainConfig,
    *,
    augment: bool = False,
    mode: str = "auto",
) -> tuple[nn.Module, Stacked, Stacked]:
    """Train one model per (subset, key) from a fresh initialisation with the base recipe.

    The initialisation and data order of each model come from its ``key`` only. Used for
    theta_0 (one model on everything), LDS retrains and removal retrains. ``mode``: ``"auto"``
    (vmap, BatchNorm in train mode included, unless ``models.can_vmap`` refuses the model: then
    one by one with a notice), ``"vmap"`` or ``"loop"``. ``recipe``'s precision, channels_last
    and compile set the trainer's :class:`Speed`.
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

    if mode not in ("auto", "vmap", "loop"):
        raise ValueError(f"mode must be 'auto', 'vmap' or 'loop', got {mode!r}")
    if mode == "auto":
        mode = fit_mode(net, X[:2], train_mode=True, what="retrain")
    params, buffers = train_stacked(net, params, buffers, X, schedule, objective, OptimSpec.from_train(recipe),
                                    mode=mode, train_mode=True, augment_keys=keys if augment else None,
                                    desc="retrain", speed=Speed.from_train(recipe))
    return net, params, buffers


def signals(logits: torch.Tensor, y: torch.Tensor, signal: str) -> torch.Tensor:
    """Per-example loss or margin of stacked logits [C, N, classes] -> [C, N]."""
    C, N, nc = logits.shape
    flat = logits.reshape(C * N, nc)
    yy = y.repeat(C)
    return obj.signal_value(signal, flat, yy).reshape(C, N)
