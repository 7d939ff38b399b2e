"""The perturbed objectives of DAUNCE: Table 1 (white-box), Table 2 (black-box), equation (5).

This file is the method. Everything else trains models on these objectives and reads out losses.

Notation (paper, Section 3): ``L_i(theta)`` is the negative log-likelihood of example ``i``,
``f_i(theta) = log p / (1 - p)`` its margin (TRAK), ``g(theta, x_i)`` its logits and
``xi_i^k ~ U(0, 1)`` the perturbation of example ``i`` in perturbed model ``k``.

The first-order term ``grad L_i(theta_0)^T (theta - theta_0)`` is computed in logit space
(equation 5, second line): ``<grad_g L(g(theta_0, x_i)), g(theta, x_i) - g(theta_0, x_i)>``, so no
per-example parameter gradient is ever formed; the logits of ``theta_0`` are all that is needed.

Two knobs scale the perturbation, as in the authors' public code:

* ``rho`` -- the linear term's weight is ``1 + rho * (2 xi - 1)`` in the Hessian form and
  ``rho * (2 xi - 1)`` in the Fisher and TRAK forms. ``rho = 1`` is the paper (``2 xi``).
* ``gamma`` -- multiplies the loss term (``L - L_0``, or its square).

Per-example objectives, averaged over the subset ``D^k`` by the trainer (``s`` is the variant's
signal, ``s_0`` its value under ``theta_0``, ``lin`` the logit-space first-order term):

==============  ============================================  ==========
variant         objective                                     signal
==============  ============================================  ==========
``daunce``      gamma (L - L_0) - (1 + rho (2xi - 1)) lin_L   loss
``daunce_e``    gamma/2 (L - L_0)^2 - rho (2xi - 1) lin_L     loss
``daunce_t``    gamma/2 (f - f_0)^2 - rho (2xi - 1) lin_f     margin
``daunce_m``    gamma (L - L_0) - lin_L - rho lin_~y          loss
``daunce_bb``   gamma L                                       loss
``daunce_e_bb`` gamma/2 L^2                                   loss
``daunce_t_bb`` gamma/2 f^2                                   margin
==============  ============================================  ==========

The black-box forms (Table 2) have no first-order term and no ``xi``: only the subset perturbs.

``daunce_m`` (matched noise; docs/matched_noise.md) replaces ``xi`` by a label drawn from theta_0's
own prediction, ``~y_i^k ~ p(. | x_i, theta_0)``: ``lin_~y = <softmax(g_0) - e_~y, g - g_0>`` has
mean zero and, in logit space, covariance ``diag(p) - p p^T``, the Gauss-Newton matrix's, so the
covariance of the losses tends to the damped Gauss-Newton influence function (not the
empirical-Fisher sandwich of the uniform ``xi``). Here ``rho`` is ``daunce.matched.scale``. No
black-box form: the black-box objectives have no first-order term for a label to enter.

DAUNCE-T's first-order term takes one of two logit gradients (``daunce.first_order``):
``"margin"``, the margin's (Table 1, the default), or ``"cross_entropy"``, the loss's, as the
authors' code does. Since ``grad_g L = -(1 - p) grad_g f``, the second puts TRAK's ``(1 - p_i)``
inside the perturbation (docs/daunce_t_factor.md). The loss-signal variants' term is the loss's
under either name, and the black-box forms have none: the option changes ``daunce_t`` only.

Sign convention, kept everywhere in daunce: a positive attribution score means the training
example helps the query (training on it lowers the query's loss / raises its margin). Covariances
of losses and covariances of margins both have this sign.
"""
from __future__ import annotations

from typing import Literal

import torch

from .config import FIRST_ORDER  # daunce.first_order's choices; the first is the default

WHITE_BOX = ("daunce", "daunce_e", "daunce_t", "daunce_m")
MATCHED = ("daunce_m",)  # the first-order term's label drawn from theta_0 (perturb.matched_labels)
BLACK_BOX = ("daunce_bb", "daunce_e_bb", "daunce_t_bb")
VARIANTS = WHITE_BOX + BLACK_BOX

Signal = Literal["loss", "margin"]


def signal_of(variant: str) -> Signal:
    """The per-example quantity a variant trains on and records: ``"loss"`` or ``"margin"``."""
    check_variant(variant)
    return "margin" if variant.startswith("daunce_t") else "loss"


def check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"unknown DAUNCE variant {variant!r}; choose one of {', '.join(VARIANTS)}")


def is_black_box(variant: str) -> bool:
    return variant in BLACK_BOX


def is_matched(variant: str) -> bool:
    """Whether the variant's noise is a label drawn from theta_0 (``y_noise``), not ``xi``."""
    return variant in MATCHED


# --- per-example signals of a classifier -------------------------------------------------------

def cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-example negative log-likelihood ``L_i = -log softmax(g)_y``; shape [B].

    Written with ``gather`` (not ``F.cross_entropy``) so that it also runs under ``torch.func.vmap``.
    """
    return -torch.log_softmax(logits, dim=-1).gather(-1, y.unsqueeze(-1)).squeeze(-1)


def _onehot(y: torch.Tensor, num_classes: int, dtype: torch.dtype) -> torch.Tensor:
    # comparison instead of F.one_hot, which checks values (data-dependent) and breaks vmap
    return (y.unsqueeze(-1) == torch.arange(num_classes, device=y.device)).to(dtype)


def margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """TRAK's margin ``f = log p_y / (1 - p_y) = g_y - logsumexp_{c != y} g_c``; shape [B]."""
    correct = logits.gather(-1, y.unsqueeze(-1)).squeeze(-1)
    others = logits.masked_fill(_onehot(y, logits.shape[-1], torch.bool), float("-inf"))
    return correct - torch.logsumexp(others, dim=-1)


def signal_value(signal: Signal, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return cross_entropy(logits, y) if signal == "loss" else margin(logits, y)


def signal_logit_grad(signal: Signal, logits0: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Closed-form gradient of the signal with respect to the logits at ``theta_0``; [B, C].

    loss: ``softmax(g) - onehot(y)``; margin: ``onehot(y) - softmax_{c != y}(g)`` (zero at y).
    """
    onehot = _onehot(y, logits0.shape[-1], logits0.dtype)
    if signal == "loss":
        return torch.softmax(logits0, dim=-1) - onehot
    others = logits0.masked_fill(onehot.bool(), float("-inf"))
    return onehot - torch.softmax(others, dim=-1)


def first_order_grad(variant: str, logits0: torch.Tensor, y: torch.Tensor,
                     first_order: str = "margin") -> torch.Tensor:
    """The logit gradient at ``theta_0`` that a white-box variant's first-order term uses; [B, C].

    The variant's own signal's (:func:`signal_logit_grad`), except for ``daunce_t`` with
    ``first_order="cross_entropy"``: the loss's, ``-(1 - p)`` times the margin's.
    """
    if first_order not in FIRST_ORDER:
        raise ValueError(f"first_order must be one of {', '.join(FIRST_ORDER)} (daunce.first_order), "
                         f"got {first_order!r}")
    signal = signal_of(variant)
    if first_order == "cross_entropy":
        signal = "loss"
    return signal_logit_grad(signal, logits0, y)


def first_order_term(logits: torch.Tensor, logits0: torch.Tensor, grad0: torch.Tensor) -> torch.Tensor:
    """``<grad_g s(g_0), g - g_0>`` summed over every axis but the first (equation 5); [B].

    Works for classifier logits [B, C] and sequence logits [B, T, V] alike; ``grad0`` carries any
    token mask or per-token normalisation of the signal.
    """
    return ((logits - logits0) * grad0).flatten(1).sum(-1)


# --- the perturbed objectives -------------------------------------------------------------------

def perturbed_objective(
    variant: str,
    s: torch.Tensor,
    *,
    s0: torch.Tensor | None = None,
    lin: torch.Tensor | None = None,
    xi: torch.Tensor | None = None,
    rho: float = 1.0,
    gamma: float = 1.0,
    lin_noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-example perturbed objective of Table 1 / Table 2 (equation 5); shape [B].

    Args:
        variant: one of :data:`VARIANTS`.
        s: the variant's signal under the model being trained (loss or margin), [B].
        s0: the same signal under ``theta_0`` (white-box variants), [B].
        lin: first-order term ``<grad_g s(g_0), g - g_0>`` from :func:`first_order_term`, [B].
        xi: ``xi_i^k ~ U(0, 1)`` of each example for this model, [B].
        rho: perturbation scale; ``rho = 1`` is the paper.
        gamma: weight of the loss term.
        lin_noise: ``daunce_m`` only (in place of ``xi``): the first-order term with the drawn
            label, ``<softmax(g_0) - e_~y, g - g_0>`` [B].
    """
    check_variant(variant)
    if variant == "daunce_m":
        if s0 is None or lin is None or lin_noise is None:
            raise ValueError("variant 'daunce_m' needs s0, lin and lin_noise (the first-order term with "
                             "theta_0's drawn label)")
        return gamma * (s - s0) - lin - rho * lin_noise
    if variant == "daunce_bb":
        return gamma * s
    if variant in ("daunce_e_bb", "daunce_t_bb"):
        return 0.5 * gamma * s.square()
    if s0 is None or lin is None or xi is None:
        raise ValueError(f"variant {variant!r} needs s0, lin and xi (theta_0's signal, the "
                         "first-order term and the perturbation)")
    sigma = rho * (2.0 * xi - 1.0)
    if variant == "daunce":
        return gamma * (s - s0) - (1.0 + sigma) * lin
    return 0.5 * gamma * (s - s0).square() - sigma * lin


def classifier_objective(
    variant: str,
    logits: torch.Tensor,
    y: torch.Tensor,
    *,
    logits0: torch.Tensor | None = None,
    xi: torch.Tensor | None = None,
    rho: float = 1.0,
    gamma: float = 1.0,
    first_order: str = "margin",
    y_noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`perturbed_objective` for a classifier, from logits; shape [B]. ``first_order``
    picks DAUNCE-T's logit gradient (:func:`first_order_grad`); ``y_noise`` is ``daunce_m``'s
    drawn label of each example (instead of ``xi``)."""
    signal = signal_of(variant)
    s = signal_value(signal, logits, y)
    if is_black_box(variant):
        return perturbed_objective(variant, s, gamma=gamma)
    if logits0 is None:
        raise ValueError(f"variant {variant!r} needs theta_0's logits (logits0)")
    logits0 = logits0.detach()
    s0 = signal_value(signal, logits0, y)
    lin = first_order_term(logits, logits0, first_order_grad(variant, logits0, y, first_order))
    lin_noise = None
    if is_matched(variant):
        if y_noise is None:
            raise ValueError("variant 'daunce_m' needs the labels drawn from theta_0 (y_noise)")
        lin_noise = first_order_term(logits, logits0, signal_logit_grad("loss", logits0, y_noise))
    return perturbed_objective(variant, s, s0=s0, lin=lin, xi=xi, rho=rho, gamma=gamma, lin_noise=lin_noise)
