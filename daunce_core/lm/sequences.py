"""Sequences of a causal LM: templates, encoding, batches, and each example's signal in logit space.

Conventions (Section 4.2 of the paper):

* An example is ``{"id", "prompt", "response", ...}`` (see :mod:`daunce_core.lm.data`). The model
  sees ``template(prompt) + response + eos``; the labels are the response tokens (and eos) only.
* The per-example loss ``L_i`` is the **mean token NLL over the response tokens** (so long and
  short responses weigh alike); the per-example margin (``daunce_t``) is the mean over response
  tokens of the token margin ``g_y - logsumexp_{c != y} g_c``.
* The first-order term of the perturbed objective (equation 5, second line) is computed in logit
  space against theta_0's logits, only at the response positions: no per-example parameter
  gradient is ever formed.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .. import objectives

IGNORE = -100

__all__ = [
    "IGNORE",
    "apply_template",
    "encode_examples",
    "collate",
    "to_device",
    "pad_id",
    "sequence_signal",
    "sequence_signal_terms",
    "sequence_objective_terms",
    "sequence_objective",
    "per_example_signal",
]


# --- tokenisation and batches -----------------------------------------------------------------

def apply_template(template: str, prompt: str) -> str:
    """``template`` with ``{prompt}`` replaced (plain replacement: LaTeX braces stay as they are)."""
    return template.replace("{prompt}", prompt) if template else prompt


def encode_examples(tokenizer, examples: Sequence[dict], *, max_length: int = 1024,
                    template: str = "{prompt}", response_key: str = "response",
                    with_response: bool = True) -> list[dict[str, list[int]]]:
    """Token ids and labels of each example; labels are ``-100`` except on response tokens + eos.

    ``with_response=False`` encodes the prompt alone (for generation). Long examples keep the end
    of the prompt and the start of the response (at least half of ``max_length`` for the response).
    """
    out = []
    eos = tokenizer.eos_token_id
    for ex in examples:
        p = tokenizer(apply_template(template, ex["prompt"]), add_special_tokens=True)["input_ids"]
        if not with_response:
            out.append({"input_ids": p[-max_length:], "labels": [IGNORE] * len(p[-max_length:])})
            continue
        r = tokenizer(ex[response_key], add_special_tokens=False)["input_ids"]
        if eos is not None:
            r = r + [eos]
        if len(p) + len(r) > max_length:
            keep_r = min(len(r), max(max_length // 2, max_length - len(p)))
            r = r[:keep_r]
            p = p[-(max_length - len(r)):] if max_length > len(r) else []
        out.append({"input_ids": p + r, "labels": [IGNORE] * len(p) + r})
    return out


def collate(items: Sequence[dict[str, list[int]]], pad_id: int, *, left: bool = False) -> dict[str, torch.Tensor]:
    """Pad to the longest item (right by default, left for generation); labels padded with -100."""
    T = max(len(it["input_ids"]) for it in items)
    ids = torch.full((len(items), T), pad_id, dtype=torch.long)
    att = torch.zeros((len(items), T), dtype=torch.long)
    lab = torch.full((len(items), T), IGNORE, dtype=torch.long)
    for b, it in enumerate(items):
        L = len(it["input_ids"])
        sl = slice(T - L, T) if left else slice(0, L)
        ids[b, sl] = torch.tensor(it["input_ids"])
        att[b, sl] = 1
        lab[b, sl] = torch.tensor(it["labels"])
    return {"input_ids": ids, "attention_mask": att, "labels": lab}


def to_device(batch: dict[str, torch.Tensor], device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def pad_id(tokenizer) -> int:
    """The tokenizer's padding id (its eos when it has no padding token)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


# --- the sequence signals and the perturbed objective -----------------------------------------

def _response_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(batch index, position, target, per-example token count) of every response token.

    Position ``t`` holds the logits that predict ``labels[t + 1]``.
    """
    tgt = labels[:, 1:]
    mask = tgt != IGNORE
    b_idx, t_idx = mask.nonzero(as_tuple=True)
    counts = mask.sum(1)
    if (counts == 0).any():
        bad = (counts == 0).nonzero().flatten().tolist()
        raise ValueError(f"examples at batch positions {bad} have no response tokens (empty "
                         "response, or truncated away: raise max_length)")
    return b_idx, t_idx, tgt[b_idx, t_idx], counts


def _per_example(values: torch.Tensor, b_idx: torch.Tensor, B: int, weight: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(B, dtype=values.dtype, device=values.device)
    return out.index_add(0, b_idx, values * weight)


def sequence_signal(signal: str, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-example signal of sequence logits [B, T, V]: mean token NLL (or margin) over the response; [B]."""
    b_idx, t_idx, y, counts = _response_positions(labels)
    tok = objectives.signal_value(signal, logits[b_idx, t_idx].float(), y)
    return _per_example(tok, b_idx, labels.shape[0], 1.0 / counts[b_idx].to(tok.dtype))


def sequence_signal_terms(signal: str, logits: torch.Tensor, logits0: torch.Tensor,
                          labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(s, s0, lin)`` of each sequence: its signal under theta, under theta_0, and the
    first-order term ``<grad_g s(g_0), g - g_0>`` (equation 5) over the response positions; [B] each.

    ``grad0`` carries the per-example normalisation ``1 / (response tokens)`` so that ``lin`` is
    the directional derivative of the *mean* token signal.
    """
    b_idx, t_idx, y, counts = _response_positions(labels)
    B = labels.shape[0]
    w = 1.0 / counts[b_idx].float()
    g = logits[b_idx, t_idx].float()
    g0 = logits0[b_idx, t_idx].float().detach()
    s = _per_example(objectives.signal_value(signal, g, y), b_idx, B, w)
    s0 = _per_example(objectives.signal_value(signal, g0, y), b_idx, B, w)
    grad0 = objectives.signal_logit_grad(signal, g0, y) * w[:, None]
    lin = torch.zeros(B, dtype=g.dtype, device=g.device).index_add(
        0, b_idx, objectives.first_order_term(g, g0, grad0))
    return s, s0, lin


def sequence_objective_terms(variant: str, logits: torch.Tensor, labels: torch.Tensor, *,
                             logits0: torch.Tensor | None = None, xi: torch.Tensor | None = None,
                             rho: float = 1.0, gamma: float = 1.0
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(objective, erm, first_order)`` of each sequence; [B] each (Figure 3's terms).

    ``objective`` is :func:`objectives.perturbed_objective` (Table 1 / Table 2), what is minimised.
    ``erm`` is the empirical-risk term: ``gamma * L_i(theta)`` for ``daunce`` (the loss itself, as
    Figure 3 plots it), ``gamma / 2 * (s - s0)^2`` for the squared variants, the whole objective
    for the black-box variants. ``first_order`` is the perturbation term, ``-(1 + sigma) * lin``
    (``-2 xi <grad L_i(theta_0), theta - theta_0>`` at rho = 1) for ``daunce``, ``-sigma * lin``
    for the squared variants, 0 for the black-box ones. ``erm + first_order`` equals the objective
    up to the constant ``-gamma * s0`` of ``daunce``, which does not change the gradient.
    """
    signal = objectives.signal_of(variant)
    if objectives.is_black_box(variant):
        obj = objectives.perturbed_objective(variant, sequence_signal(signal, logits, labels), gamma=gamma)
        return obj, obj, torch.zeros_like(obj)
    if logits0 is None:
        raise ValueError(f"variant {variant!r} needs theta_0's logits (logits0)")
    s, s0, lin = sequence_signal_terms(signal, logits, logits0, labels)
    obj = objectives.perturbed_objective(variant, s, s0=s0, lin=lin, xi=xi, rho=rho, gamma=gamma)
    sigma = rho * (2.0 * xi - 1.0)
    if variant == "daunce":
        return obj, gamma * s, -(1.0 + sigma) * lin
    return obj, 0.5 * gamma * (s - s0).square(), -sigma * lin


def sequence_objective(variant: str, logits: torch.Tensor, labels: torch.Tensor, *,
                       logits0: torch.Tensor | None = None, xi: torch.Tensor | None = None,
                       rho: float = 1.0, gamma: float = 1.0) -> torch.Tensor:
    """:func:`objectives.perturbed_objective` (Table 1 / Table 2) of each sequence; [B]."""
    return sequence_objective_terms(variant, logits, labels, logits0=logits0, xi=xi, rho=rho, gamma=gamma)[0]


@torch.no_grad()
def per_example_signal(model, encoded: Sequence[dict], *, pad_id: int, signal: str = "loss",
                       batch_size: int = 16, device=None, desc: str | None = None) -> np.ndarray:
    """Per-example mean token NLL (or margin) over the response tokens; float32 [n]."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = np.empty(len(encoded), np.float32)
    order = np.argsort([len(e["input_ids"]) for e in encoded], kind="stable")  # less padding
    for lo in range(0, len(order), batch_size):
        idx = order[lo: lo + batch_size]
        batch = to_device(collate([encoded[i] for i in idx], pad_id), device)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        out[idx] = sequence_signal(signal, logits, batch["labels"]).cpu().numpy()
    model.train(was_training)
    return out
