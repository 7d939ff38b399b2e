"""Gradient dot product, TracIn, LoGra and iterative influence functions through ``dattri``.

* ``graddot``: ``TracInAttributor`` on theta_0 alone with weight 1, unnormalised gradients and the
  identity projection -- ``<grad L_i(theta_0), grad f_q(theta_0)>`` (dattri's Grad-Dot).
* ``tracin``: ``TracInAttributor`` over ``baselines.tracin.checkpoints`` checkpoints of theta_0's
  own training run, each weighted by the mean learning rate of the steps it closes (TracInCP,
  Pruthi et al. 2020). The base rule keeps no checkpoints, so the rule *replays* the base recipe
  (same seed, same data order: the same trajectory) and snapshots the parameters with a
  ``torch.optim`` step hook; the last snapshot must equal theta_0 read from disk, or the rule
  stops (:func:`replay_checkpoints`). For models with BatchNorm the snapshots carry theta_0's final
  BatchNorm statistics (the optimiser does not see buffers).
* ``logra``: ``LoGraAttributor`` (Choe et al., 2024) on every ``Linear`` layer (dattri's default;
  ``Conv2d`` layers too for ResNet-9), each layer's gradient projected to ``rank x rank`` numbers
  (``baselines.logra.rank``; the paper's 128) and preconditioned by the inverse empirical Fisher of
  the projected gradients. dattri fixes LoGra's query function to the cross-entropy, averaged over
  the query batch: the adapter multiplies each query batch back by its size, so ``measurement``
  does not apply to LoGra (recorded in the file's attributes).

* ``if_iter``: the influence function ``g_q^T (H + lambda I)^-1 g_i`` where the exact solve does not
  fit, through dattri's iterative solvers (``baselines.if_iter.solver``): ``IFAttributorArnoldi``
  (the top ``proj_dim`` eigenpairs of the Hessian of the mean training loss from Arnoldi iterations;
  train and query gradients are projected on them and scaled by the inverse eigenvalues: proj_dim
  numbers per example) or ``IFAttributorCG`` (a solve per query batch). dattri 0.3.0's LiSSA fails
  on integer labels inside its vmapped sampling (gather on a float index), so it is not offered.

For graddot, TracIn and if_iter the training function is the per-example cross-entropy and the target is
``baselines.measurement`` in loss-like orientation (:func:`~daunce_core.baselines.query_value`),
so dattri's positive scores mean "helpful" (tested). dattri returns [n_train, n_test]: our layout.

dattri pitfalls handled (docs/facts.md): ``TracInAttributor`` merges its ``projector_kwargs`` into a
module-level dict that leaks into later instances -- the adapter restores it; LoGra writes
``batch_metadata.json`` to the working folder unless given a ``cache_dir`` -- it gets the rule's
scratch folder.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import math
import warnings
from functools import cache, partial
from pathlib import Path

import numpy as np

from .common import BaselinesConfig, Problem, dir_bytes, query_value, train_loss

log = logging.getLogger(__name__)


def _version() -> str:
    from importlib.metadata import version

    return f"dattri {version('dattri')}"


def _functions(model, measurement: str):
    """(loss_func, target_func) in dattri's ``f(params, data)`` form for one unbatched example."""
    from torch.func import functional_call

    def loss_func(params, data):
        x, y = data
        return train_loss(functional_call(model, params, (x.unsqueeze(0),)), y.unsqueeze(0)).sum()

    def target_func(params, data):
        x, y = data
        return query_value(functional_call(model, params, (x.unsqueeze(0),)), y.unsqueeze(0), measurement).sum()

    return loss_func, target_func


@contextlib.contextmanager
def _restored_projector_defaults():
    """dattri's TracInAttributor mutates a module-level dict of projector settings; undo it."""
    from dattri.algorithm import tracin as _tracin

    saved = dict(_tracin.DEFAULT_PROJECTOR_KWARGS)
    try:
        yield
    finally:
        _tracin.DEFAULT_PROJECTOR_KWARGS.clear()
        _tracin.DEFAULT_PROJECTOR_KWARGS.update(saved)


def _tracin(problem: Problem, bcfg: BaselinesConfig, checkpoints: list[dict], weights: list[float]) -> np.ndarray:
    import torch
    from dattri.algorithm.tracin import TracInAttributor
    from dattri.task import AttributionTask

    model = copy.deepcopy(problem.model).eval()
    loss_func, target_func = _functions(model, bcfg.measurement)
    task = AttributionTask(loss_func=loss_func, model=model, checkpoints=checkpoints, target_func=target_func)
    with _restored_projector_defaults():
        attributor = TracInAttributor(task=task, weight_list=torch.tensor(weights, dtype=torch.float32),
                                      normalized_grad=False,
                                      projector_kwargs={"proj_type": "identity", "device": str(problem.device)},
                                      device=str(problem.device))
        attributor.projector_kwargs = dict(attributor.projector_kwargs)
    scores = attributor.attribute(problem.loader("train", bcfg.batch_size), problem.loader("query", bcfg.batch_size))
    return scores.detach().cpu().numpy()


def tracin_self_influence(problem: Problem, bcfg: BaselinesConfig, checkpoints: list[dict] | None = None,
                          weights: list[float] | None = None) -> np.ndarray:
    """Self-influence [n] of Grad-Dot (no ``checkpoints``: theta_0 alone, weight 1) or TracIn:
    ``sum_c w_c |grad loss_i(theta_c)|^2``, one gradient per example and checkpoint -- the diagonal
    of their [n, n] scores with the training set as queries and the training loss as query
    function, without the matrix. By hand (torch.func) because dattri 0.3.0's
    ``TracInAttributor.self_attribute`` disagrees with the diagonal of its own ``attribute`` (by up
    to 15% on the tests' problem)."""
    from torch.func import grad, vmap

    model = copy.deepcopy(problem.model).eval()
    if checkpoints is None:
        checkpoints, weights = [model.state_dict()], [1.0]
    loss_func, _ = _functions(model, "loss")
    per_example = vmap(grad(loss_func), in_dims=(None, 0))  # over the parameters; buffers: the model's
    out = np.zeros(problem.n)
    for state, w in zip(checkpoints, weights):
        model.load_state_dict(state)
        params = {k: v.detach() for k, v in model.named_parameters()}
        start = 0
        for x, y in problem.loader("train", bcfg.batch_size):
            g = per_example(params, (x.to(problem.device), y.to(problem.device)))
            sq = sum(t.detach().flatten(1).double().pow(2).sum(1) for t in g.values())
            out[start:start + len(y)] += w * sq.cpu().numpy()
            start += len(y)
    return out


def graddot_scores(problem: Problem, bcfg: BaselinesConfig, workdir: Path) -> tuple[np.ndarray, dict]:
    state = {k: v.detach().clone() for k, v in problem.model.state_dict().items()}
    scores = _tracin(problem, bcfg, [state], [1.0])
    p = problem.num_params()
    return scores, {
        "library": _version(), "attributor": "TracInAttributor", "checkpoints": 1, "weights": [1.0],
        "normalized_grad": False, "projection": "identity",
        "bytes_per_example": 4 * p, "shared_bytes": 0,
        "storage": f"the full training gradient ({p} float32) per example, or recomputed per query batch",
    }


def _checkpoint_ends(total: int, n_checkpoints: int) -> list[int]:
    if n_checkpoints > total:
        raise ValueError(f"baselines.tracin.checkpoints={n_checkpoints} exceeds the {total} steps of the base recipe")
    return sorted({max(1, round(total * (j + 1) / n_checkpoints)) for j in range(n_checkpoints)})


def base_steps(problem: Problem) -> int:
    """The optimiser steps of theta_0's training (the base recipe on the whole training set)."""
    from ..perturb import batch_order, theta0_key

    cfg = problem.cfg
    key = theta0_key(cfg.base.seed)  # the key the base rule trains theta_0 with
    return int(batch_order(key, np.arange(problem.ds.n), cfg.base.epochs, cfg.base.batch_size).shape[0])


def replay_checkpoints(problem: Problem, n_checkpoints: int,
                       also: tuple[int, ...] = ()) -> tuple[list[dict], list[float], dict]:
    """Re-run the base recipe of theta_0 and snapshot the parameters at evenly spaced steps.

    Returns ``(states, weights, info)``: ``n_checkpoints`` state dicts (the last is the end of
    training), the mean learning rate of the steps each snapshot closes, and the replay's
    agreement with theta_0 on disk. Raises if the replay does not reproduce theta_0.
    ``also``: other checkpoint counts (a tuning grid) snapshotted in the same replay; the replay is
    kept in ``problem.cache``, so each count of the grid costs no second replay.
    """
    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook

    from .. import ensemble as E
    from ..models import model_factory
    from ..perturb import theta0_key

    cfg, ds = problem.cfg, problem.ds
    key = theta0_key(cfg.base.seed)  # the key the base rule trains theta_0 with (base_steps)
    total = base_steps(problem)
    ends = _checkpoint_ends(total, n_checkpoints)
    cached = problem.cache.get("tracin_replay")
    if cached is None or not set(ends) <= set(cached["snaps"]):
        want = sorted(set(ends).union(*(_checkpoint_ends(total, c) for c in also if c <= total)))
        lrs: list[float] = []
        snaps: dict[int, list[torch.Tensor]] = {}

        def hook(optimizer, args, kwargs):
            lrs.append(float(optimizer.param_groups[0]["lr"]))
            if len(lrs) in want:
                snaps[len(lrs)] = [p.detach().clone() for p in optimizer.param_groups[0]["params"]]

        X, y = problem.tensors("train")
        handle = register_optimizer_step_post_hook(hook)
        try:
            net, params, buffers = E.fit_from_scratch(model_factory(cfg.model, ds.X_train.shape[1:], ds.num_classes),
                                                      X, y, [np.arange(ds.n)], [key], cfg.base,
                                                      augment=cfg.base.augment)
        finally:
            handle.remove()
        if len(lrs) != total or set(snaps) != set(want):
            raise RuntimeError(f"tracin: the replay took {len(lrs)} optimiser steps, expected {total}")
        names = list(params)  # the optimiser's parameter order (ensemble.train_stacked keeps it)
        final = snaps[want[-1]]
        if len(final) != len(names) or not all(torch.equal(a, params[k]) for a, k in zip(final, names)):
            raise RuntimeError("tracin: the optimiser's parameters do not match the trained model's; "
                               "ensemble.train_stacked changed how it builds its optimiser")
        del net
        cached = problem.cache["tracin_replay"] = {
            "lrs": lrs, "snaps": snaps, "names": names, "buf": {k: v[0] for k, v in buffers.items()}}
    lrs, snaps, names, buf = cached["lrs"], cached["snaps"], cached["names"], cached["buf"]
    states, weights, start = [], [], 0
    for end in ends:
        states.append({**{k: t[0].detach().clone() for k, t in zip(names, snaps[end])}, **buf})
        weights.append(float(np.mean(lrs[start:end])))
        start = end
    ref = problem.state
    num = math.sqrt(sum(float(((states[-1][k] - ref[k].to(states[-1][k])) ** 2).sum()) for k in names))
    den = math.sqrt(sum(float((ref[k] ** 2).sum()) for k in names))
    rel = num / max(den, 1e-30)
    if rel > 1e-3:
        raise RuntimeError(f"tracin: replaying the base recipe gives parameters {rel:.2e} (relative) away from "
                           "theta_0 on disk; the checkpoints would not lie on theta_0's trajectory -- rerun "
                           "the base rule with the current code and config")
    info = {"steps": total, "checkpoint_steps": ends, "replay_rel_diff": rel,
            "batchnorm_buffers": "final" if buf else "none"}
    log.info("tracin: replayed %d steps; checkpoints after steps %s; lr weights %s; "
             "|replay - theta_0|/|theta_0| = %.1e",
             total, ends, [f"{w:.4g}" for w in weights], rel)
    return states, weights, info


def tracin_scores(problem: Problem, bcfg: BaselinesConfig, workdir: Path) -> tuple[np.ndarray, dict]:
    grid = tuple((bcfg.tune or {}).get("tracin", {}).get("checkpoints", ()))
    states, weights, info = replay_checkpoints(problem, bcfg.tracin.checkpoints, also=grid)
    scores = _tracin(problem, bcfg, states, weights)
    p = problem.num_params()
    C = len(states)
    return scores, {
        "library": _version(), "attributor": "TracInAttributor", "checkpoints": C, "weights": weights,
        "normalized_grad": False, "projection": "identity", **info,
        "bytes_per_example": 4 * p * C, "shared_bytes": 4 * p * C,
        "storage": f"the {C} checkpoints ({p} float32 each); per example {C} training gradients "
                   f"({p} float32 each) if cached, else recomputed per query batch",
    }


def _convs_as_linear(model) -> int:
    """Replace every ``nn.Conv2d`` of ``model`` in place by the same map written as im2col patches
    through an ``nn.Linear`` (LoGra's treatment of a convolution: its per-example gradient is a sum
    over output positions of outer products, like a Linear layer's over tokens). dattri 0.3.0's
    LoGra projects Linear and LayerNorm layers only. Returns the number replaced."""
    from torch import nn

    n = 0
    for name, child in list(model.named_children()):
        if isinstance(child, nn.Conv2d):
            setattr(model, name, _conv_as_linear_class()(child))
            n += 1
        else:
            n += _convs_as_linear(child)
    return n


@cache
def _conv_as_linear_class():
    import torch.nn.functional as F
    from torch import nn

    class ConvAsLinear(nn.Module):
        def __init__(self, conv) -> None:
            super().__init__()
            if conv.groups != 1 or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
                raise ValueError(f"logra: a Conv2d with groups={conv.groups}, padding={conv.padding!r}, "
                                 f"padding_mode={conv.padding_mode!r} has no im2col form here")
            self.kernel_size, self.stride = conv.kernel_size, conv.stride
            self.padding, self.dilation = conv.padding, conv.dilation
            self.linear = nn.Linear(conv.weight[0].numel(), conv.out_channels, bias=conv.bias is not None)
            self.linear.weight.data.copy_(conv.weight.detach().reshape(conv.out_channels, -1))
            if conv.bias is not None:
                self.linear.bias.data.copy_(conv.bias.detach())

        def forward(self, x):
            h = (x.shape[-2] + 2 * self.padding[0] - self.dilation[0] * (self.kernel_size[0] - 1) - 1) \
                // self.stride[0] + 1
            cols = F.unfold(x, self.kernel_size, self.dilation, self.padding, self.stride)  # [B, C k k, L]
            out = self.linear(cols.transpose(1, 2))                                      # [B, L, C_out]
            return out.transpose(1, 2).reshape(x.shape[0], out.shape[-1], h, -1)

    return ConvAsLinear


def logra_scores(problem: Problem, bcfg: BaselinesConfig, workdir: Path) -> tuple[np.ndarray, dict]:
    import torch
    from dattri.algorithm.logra import LoGraAttributor
    from dattri.task import AttributionTask
    from torch import nn

    lc = bcfg.logra
    model = copy.deepcopy(problem.model).eval()
    convs = _convs_as_linear(model)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    layers = [n for n, mod in model.named_modules() if isinstance(mod, nn.Linear)]

    def loss_func(model, batch, device):  # LoGra's signature: a plain forward on the batch
        x, y = batch
        return train_loss(model(x.to(device)), y.to(device)).sum()

    if convs:
        # dattri 0.3.0 sets LoGra's projectors up with a forward on ``batch[0][0]``, one input
        # without its batch axis, which a convolution refuses: give it back its axis
        model.register_forward_pre_hook(lambda _m, args: (args[0].unsqueeze(0), *args[1:])
                                        if args[0].dim() == 3 else None)
    task = AttributionTask(loss_func=loss_func, model=model, checkpoints=state)
    torch.manual_seed(lc.seed)
    attributor = LoGraAttributor(task=task, layer_names=layers, hessian="eFIM", damping=lc.damping,
                                 device=str(problem.device), proj_dim=lc.rank * lc.rank, offload="cpu",
                                 cache_dir=str(workdir))
    train = problem.loader("train", bcfg.batch_size)
    query = problem.loader("query", bcfg.batch_size)
    with warnings.catch_warnings():
        # dattri asks its gradient loaders for pin_memory=True, which warns on a CPU-only machine
        warnings.filterwarnings("ignore", message=r".*pin_memory.*", category=UserWarning)
        attributor.cache(train)
        scores = attributor.attribute(train, query).detach().cpu().numpy()
    # dattri's query gradient is of the batch-mean cross-entropy: undo the 1/batch-size
    sizes = np.concatenate([np.full(len(yb), len(yb), np.float64) for _, yb in query])
    scores = scores * sizes[None, :]
    dims = list(attributor.layer_dims or [])
    per_example = 4 * int(sum(dims))
    return scores, {
        "library": _version(), "attributor": "LoGraAttributor", "rank": lc.rank, "proj_dim_per_layer": lc.rank ** 2,
        "layers": layers, "layer_dims": dims, "hessian": "eFIM", "convolutions_as_im2col_linear": convs,
        "damping": "dattri default (1e-5 x mean eigenvalue)" if lc.damping is None else lc.damping,
        "measurement": "loss (dattri's LoGra fixes the query function to the cross-entropy)",
        "bytes_per_example": per_example,
        "shared_bytes": 4 * int(sum(d * d for d in dims)),
        "disk_bytes": dir_bytes(workdir),
        "storage": f"projected, preconditioned gradient: {len(layers)} layers x {lc.rank}x{lc.rank} float32 "
                   "per example; one eFIM inverse per layer",
    }


def _batch_functions(model, measurement: str, sample_ndim: int):
    """(loss_func, target_func) for dattri's influence functions: an unbatched example (per-example
    gradients under vmap) or a batch (the Hessian of the *mean* training loss)."""
    from torch.func import functional_call

    def call(params, data, f):
        x, y = data
        if x.dim() == sample_ndim:
            x, y = x.unsqueeze(0), y.unsqueeze(0)
        return f(functional_call(model, params, (x,)), y).mean()

    return (lambda params, data: call(params, data, train_loss),
            lambda params, data: call(params, data, lambda out, y: query_value(out, y, measurement)))


# an Arnoldi eigenpair is kept only if it converged: relative residual ||(H + lambda I) v - theta v|| / |theta|
# at most RITZ_RTOL (dattri's own estimate from its Hessenberg matrix) and the kept vectors orthonormal
# to ORTHO_TOL (float32 Arnoldi loses orthogonality once its Krylov space is exhausted: ghost pairs)
RITZ_RTOL = 0.05
ORTHO_TOL = 0.05
# The Arnoldi iteration of the last problem, per (settings other than the damping, checkpoint): a damping
# grid shares the one run at its first damping. Krylov spaces are shift-invariant, K(H + lambda I, v) =
# K(H + lambda0 I, v), so the basis is the same for every damping and the Hessenberg matrix moves by
# lambda - lambda0 on its diagonal: one set of max_iter Hessian-vector products serves the whole grid.
_KRYLOV: dict = {}


def _signed_arnoldi(F):
    """dattri's ``IFAttributorArnoldi`` with the sign of each eigenvalue kept and its eigenpairs checked.

    dattri 0.3.0 scales both the training and the query gradient by ``1/sqrt(theta)``, so any
    negative eigenvalue of ``H + regularization I`` among the top ``proj_dim`` (by magnitude) gives
    NaN scores (its warning about negative eigenvalues lowers ``proj_dim`` but keeps them). The
    Hessian of a trained network's loss is indefinite, and unconverged Ritz values (``max_iter``
    close to ``proj_dim``) are small and of either sign. Here the training side is scaled by
    ``1/sqrt(|theta|)`` and the query side by ``sign(theta)/sqrt(|theta|)``: the scores are
    ``g_i^T V diag(1/theta) V^T g_q``, the inverse of ``H + regularization I`` on its top eigenvectors
    (docs/regime.md). The Arnoldi iteration is dattri's; the eigenpairs are distilled here, as dattri
    does, plus each one's residual, and :data:`RITZ_RTOL` / :data:`ORTHO_TOL` refuse unconverged ones.
    """
    import torch
    from dattri.func.projection import ArnoldiProjector

    class SignedArnoldi(F.IFAttributorArnoldi):
        def cache(self, full_train_dataloader) -> None:
            # dattri's cache, with the projector kept as an object (dattri's keeps it in a closure)
            self.full_train_dataloader = full_train_dataloader
            batches = list(full_train_dataloader)
            data = [torch.cat([b[j] for b in batches]).to(self.device) for j in range(len(batches[0]))]
            self.projectors, self.spectra = [], []
            owner, key = getattr(self, "krylov_key", (None, None))
            shared = owner is not None and self.norm_constant == 1.0
            if not shared or _KRYLOV.get("owner") is not owner:
                _KRYLOV.clear()
            for i in range(len(self.task.get_checkpoints())):
                func = partial(self.task.get_loss_func(layer_name=self.layer_name, ckpt_idx=i),
                               **{self.task.loss_func_data_key: data})
                params, _ = self.task.get_param(i, layer_name=self.layer_name)
                pr = ArnoldiProjector(len(params), self.proj_dim, func, params, max_iter=self.max_iter,
                                      norm_constant=self.norm_constant, tol=self.tol,
                                      regularization=self.regularization, seed=self.seed, device=self.device)
                hit = _KRYLOV.get((key, i)) if shared else None
                if hit is None:
                    # dattri's iteration, at this setting's damping
                    torch.manual_seed(self.seed)
                    v0 = torch.rand(len(params)).to(self.device)
                    with torch.no_grad():
                        appr, basis = pr._arnoldi_iter(pr.hvp_at_x_func, v0, self.max_iter, self.norm_constant,
                                                       self.tol, self.device)
                    hit = (appr.detach(), basis.detach(), self.regularization)
                    if shared:
                        _KRYLOV.update({"owner": owner, (key, i): hit})
                appr, basis, done_at = hit
                if self.regularization != done_at:
                    # H + lambda I has the same Krylov space and basis as H + lambda0 I; its Hessenberg
                    # matrix moves by lambda - lambda0 on the diagonal of the square part (beta_m stays)
                    appr = appr.clone()
                    m = appr.shape[1]
                    appr[:m, :m] += (self.regularization - done_at) * torch.eye(m, dtype=appr.dtype,
                                                                                device=appr.device)
                self.spectra.append(self._distill(pr, appr, basis))
                self.projectors.append(pr)
            self.arnoldi_projectors = self.projectors

        def _distill(self, pr, appr, basis) -> dict:
            """dattri's ``_distill`` (the symmetrised Hessenberg matrix's top ``proj_dim`` eigenpairs
            by magnitude) with each pair's residual ``|beta_m s_m|`` and the kept basis' orthogonality."""
            m = appr.shape[1]
            sq = torch.tril(appr[:-1, :], diagonal=1)
            theta, s = torch.linalg.eigh(0.5 * (sq + sq.T))
            idx = torch.argsort(theta.abs())[-self.proj_dim:]
            theta, s = theta[idx], s[:, idx]
            pr.eigvals, pr.eigvecs = theta, s.T @ basis[:m]
            rel = ((appr[-1, -1].abs() * s[-1].abs()) / theta.abs()).double()
            gram = pr.eigvecs @ pr.eigvecs.T
            ortho = float((gram - torch.eye(len(theta), device=gram.device)).abs().max())
            ev = theta.double().cpu().numpy()
            return {"eigenpairs": int(ev.size), "negative_eigenvalues": int((ev < 0).sum()),
                    "eigenvalue_range": [float(ev.min()), float(ev.max())],
                    "smallest_abs_eigenvalue": float(np.abs(ev).min()),
                    "max_relative_residual": float(rel.max()), "unconverged": int((rel > RITZ_RTOL).sum()),
                    "orthogonality_error": ortho}

        def _project(self, ckpt_idx, rep, signed):
            pr = self.projectors[ckpt_idx]
            scale = 1.0 / torch.sqrt(pr.eigvals.abs())
            if signed:
                scale = scale * torch.sign(pr.eigvals)
            return (rep.to(self.device) @ pr.eigvecs.T * scale.unsqueeze(0)).detach()

        def transform_train_rep(self, ckpt_idx, train_rep):
            return self._project(ckpt_idx, train_rep, signed=False)

        def transform_test_rep(self, ckpt_idx, test_rep):
            return self._project(ckpt_idx, test_rep, signed=True)

    return SignedArnoldi


def if_iter_scores(problem: Problem, bcfg: BaselinesConfig, workdir: Path) -> tuple[np.ndarray, dict]:
    import torch
    from dattri.algorithm import influence_function as F
    from dattri.task import AttributionTask

    ic = bcfg.if_iter
    model = copy.deepcopy(problem.model).eval()
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    loss_func, target_func = _batch_functions(model, bcfg.measurement, problem.ds.X_train.ndim - 1)
    task = AttributionTask(loss_func=loss_func, model=model, checkpoints=state, target_func=target_func)
    dev = str(problem.device)
    torch.manual_seed(ic.seed)
    setting_ = (f"solver={ic.solver}, regularization={ic.regularization:g}, max_iter={ic.max_iter}"
                + (f", proj_dim={ic.proj_dim}" if ic.solver == "arnoldi" else ""))
    if ic.solver == "arnoldi":
        attributor = _signed_arnoldi(F)(task=task, device=dev, proj_dim=ic.proj_dim,
                                        max_iter=max(ic.max_iter, ic.proj_dim), regularization=ic.regularization,
                                        seed=ic.seed)
        # the iteration depends on theta_0, the data and these, not on the damping (_KRYLOV)
        attributor.krylov_key = (problem, (bcfg.measurement, attributor.max_iter, ic.seed))
        per_example, what = 4 * ic.proj_dim, f"the gradient in the top {ic.proj_dim} Hessian eigenvectors"
    elif ic.solver == "cg":
        attributor = F.IFAttributorCG(task=task, device=dev, max_iter=ic.max_iter, regularization=ic.regularization)
        per_example, what = 4 * problem.num_params(), "the full training gradient (a CG solve per query batch)"
    else:
        raise ValueError(f"baselines.if_iter.solver: unknown {ic.solver!r}; choose 'arnoldi' or 'cg'")
    # the whole training set in one batch: dattri's Hessian-vector products then see all of it
    attributor.cache(problem.loader("train", problem.n))
    spectrum = {}
    if ic.solver == "arnoldi":
        spectrum = attributor.spectra[0]
        log.info("if_iter %s: %s", setting_, spectrum)
        if spectrum["unconverged"] or spectrum["orthogonality_error"] > ORTHO_TOL:
            raise ValueError(
                f"if_iter: dattri's arnoldi at {setting_}: {spectrum['unconverged']} of its {spectrum['eigenpairs']} "
                f"eigenpairs have not converged (largest relative residual {spectrum['max_relative_residual']:.3g}, "
                f"orthogonality error {spectrum['orthogonality_error']:.3g}); raise baselines.if_iter.max_iter "
                "(about 2 x proj_dim) or lower baselines.if_iter.proj_dim")
    scores = attributor.attribute(problem.loader("train", bcfg.batch_size), problem.loader("query", bcfg.batch_size))
    scores = scores.detach().cpu().numpy()
    if not np.isfinite(scores).all():
        # CG: dattri 0.3.0 divides 0 by 0 once its Krylov space is exhausted (after an exact solve);
        # Arnoldi: an eigenvalue of 0 (proj_dim close to the number of parameters)
        fix = "baselines.if_iter.max_iter" if ic.solver == "cg" else "baselines.if_iter.proj_dim"
        raise ValueError(f"if_iter: dattri's {ic.solver} gave non-finite scores at {setting_} "
                         f"({problem.num_params()} parameters: its Krylov space ran out); lower {fix}")
    return scores, {
        "library": _version(), "attributor": type(attributor).__name__, "solver": ic.solver,
        "damping": ic.regularization, "proj_dim": ic.proj_dim if ic.solver == "arnoldi" else None,
        "max_iter": ic.max_iter, "curvature": "hessian of the mean training loss", **spectrum,
        "bytes_per_example": per_example, "shared_bytes": 4 * problem.num_params() * (
            ic.proj_dim if ic.solver == "arnoldi" else 0),
        "storage": what,
    }
