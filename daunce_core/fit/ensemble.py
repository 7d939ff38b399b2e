"""The classifier fitter: the K perturbed models of a chunk as one vmapped ensemble.

:class:`EnsembleFitter` implements :class:`~daunce_core.fit.contract.Fitter` on top of
:mod:`daunce_core.ensemble`: the models of a chunk start from theta_0, are trained together on
their variant's perturbed objective (:func:`daunce_core.ensemble.fit_perturbed`), and every
example's loss (or margin, DAUNCE-T) is recorded under each; the vision steps, ``daunce fit``
and :mod:`daunce_core.api` use it. The Figure 3 trace and the one-by-one mode:
docs/design.md#daunce_corefitensemblepy-the-classifier-fitter."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from .. import ensemble as E
from .. import objectives as obj
from ..config import DaunceConfig
from ..models import fit_mode
from ..perturb import Plan
from .contract import Signals

__all__ = ["EnsembleFitter"]


class EnsembleFitter:
    """Fits perturbed copies of a classifier theta_0 (``Fitter`` for ``daunce``, ``daunce_e``,
    ``daunce_t``, matched-noise ``daunce_m`` and the black-box forms ``*_bb`` of Table 2).

    Args:
        net: the architecture; its own weights are not used.
        theta_0: theta_0's state dict (parameters and buffers).
        train: training inputs and labels ``(X [n, ...], y [n])`` on the device of the fit.
        query: query inputs and labels ``(Xq [m, ...], yq [m])`` on the same device.
        variant: the perturbed objective (``objectives.VARIANTS``).
        cfg: epochs, batch size, optimiser, rho, gamma and prox of the perturbed fits, and the
            estimator options ``antithetic``, ``common_batches`` (the default plan),
            ``lr_schedule`` and ``first_order`` (:func:`daunce_core.ensemble.fit_perturbed`).
        train_ids, query_ids: example ids (default: positions).
        plan: the draws of each model (default ``Plan.from_daunce(cfg)``; with
            ``daunce.antithetic`` and ``daunce.common_batches`` off, the paper's independent
            subsets, xi and batch orders keyed by ``(seed, k)``).
        mode: ``"vmap"`` (all models of a chunk per step), ``"loop"`` (one after another) or
            ``"auto"`` (vmap when ``models.can_vmap`` accepts the model, else loop with a notice).
        speed: the trainer's precision, layout and compilation (``ensemble.Speed``; the workflow
            passes ``base``'s; None: fp32, eager).
    """

    def __init__(self, net: nn.Module, theta_0: dict[str, torch.Tensor],
                 train: tuple[torch.Tensor, torch.Tensor], query: tuple[torch.Tensor, torch.Tensor], *,
                 variant: str, cfg: DaunceConfig, train_ids: np.ndarray | None = None,
                 query_ids: np.ndarray | None = None, plan: Plan | None = None, mode: str = "auto",
                 speed: E.Speed | None = None):
        obj.check_variant(variant)
        if mode not in ("vmap", "loop", "auto"):
            raise ValueError(f"mode must be 'vmap', 'loop' or 'auto', got {mode!r}")
        if mode == "auto":
            mode = fit_mode(net, train[0][:2], train_mode=False, what=f"{variant} perturbed fits")
        if not any(p.requires_grad for p in net.parameters()):
            raise ValueError("the model has no parameter with requires_grad=True: nothing to perturb "
                             "(unfreeze the layers DAUNCE should attribute through)")
        cfg = cfg.for_variant(variant)  # daunce_m: its own scale, damping and subset ratio
        self.variant = variant
        self.signal = obj.signal_of(variant)
        self.net, self.theta_0, self.cfg, self.mode, self.speed = net, theta_0, cfg, mode, speed
        self.X, self.y = train
        self.Xq, self.yq = query
        self.plan = plan if plan is not None else Plan.from_daunce(cfg)
        n, m = len(self.y), len(self.yq)
        self.train_ids = np.arange(n) if train_ids is None else np.asarray(train_ids)
        self.query_ids = np.arange(m) if query_ids is None else np.asarray(query_ids)
        device = self.X.device
        p0, b0 = E.split_state(net, theta_0)
        p0s, b0s = E.stack_states([p0], device), E.stack_states([b0], device)
        # theta_0's logits: the first-order term of equation (5) needs nothing else of theta_0
        self.logits0 = E.predict(net, p0s, b0s, self.X, mode=mode)[0]
        logits0_q = E.predict(net, p0s, b0s, self.Xq, mode=mode)[0]
        self.p0_train = _label_probability(self.logits0, self.y)
        self.p0_query = _label_probability(logits0_q, self.yq)

    def fit(self, ks: Sequence[int], lr: float) -> Signals:
        """Fit models ``ks`` at learning rate ``lr``; their signals on every example."""
        ks = [int(k) for k in ks]
        trace = {} if self.cfg.trace_every > 0 else None  # Figure 3: per-term gradient norms
        params, buffers = E.fit_perturbed(self.net, self.theta_0, self.X, self.y, ks, variant=self.variant,
                                          cfg=self.cfg, lr=lr, logits0=self.logits0, mode=self.mode,
                                          plan=self.plan, trace_out=trace, speed=self.speed)
        train = E.signals(E.predict(self.net, params, buffers, self.X, mode=self.mode), self.y,
                          self.signal).cpu().numpy()
        query = E.signals(E.predict(self.net, params, buffers, self.Xq, mode=self.mode), self.yq,
                          self.signal).cpu().numpy()
        return Signals(train=train, query=query, model_index=np.asarray(ks), train_ids=self.train_ids,
                       query_ids=self.query_ids, signal=self.signal,
                       attrs={"variant": self.variant, "signal": self.signal, "seed": self.plan.seed},
                       p0_train=self.p0_train, p0_query=self.p0_query, trace=trace or None)


def _label_probability(logits: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """Softmax probability of each example's label, [N] (DAUNCE-T's ``1 - p`` factor)."""
    return torch.softmax(logits.double(), dim=-1).gather(1, y[:, None].long())[:, 0].cpu().numpy()
