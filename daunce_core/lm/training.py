"""Full fine-tuning of a causal LM (theta_0 and every removal retrain) and the learning-rate
schedules shared with the LoRA perturbed fits (:mod:`daunce_core.fit.lm`).

Full fine-tuning minimises the batch mean of the per-example mean response-token NLL
(:func:`daunce_core.lm.sequences.sequence_signal`), the recipe of Appendix C.
"""
from __future__ import annotations

import math
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from .sequences import collate, sequence_signal, to_device
from .settings import FinetuneConfig

__all__ = ["lr_lambda", "micro_batches", "torch_seed", "finetune"]


def lr_lambda(schedule: str, total: int, warmup: int = 0):
    """The multiplier of step ``step``: linear warm-up, then constant, linear or cosine decay."""
    if schedule not in ("constant", "linear", "cosine"):
        raise ValueError(f"unknown schedule {schedule!r}; choose constant, linear or cosine")

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        frac = (step - warmup) / max(1, total - warmup)
        return max(0.0, 1.0 - frac) if schedule == "linear" else 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))

    return f


def micro_batches(idx: np.ndarray, micro: int) -> Iterator[np.ndarray]:
    for lo in range(0, len(idx), micro):
        yield idx[lo: lo + micro]


def torch_seed(*key: int) -> int:
    """A torch seed derived from ``key`` (e.g. ``(seed, k)``), independent of numpy's streams."""
    return int(np.random.default_rng([*(int(k) for k in key), 3]).integers(2**31 - 1))


def finetune(model, encoded: Sequence[dict], cfg: FinetuneConfig, *, pad_id: int, seed: int,
             device=None, desc: str = "fine-tune") -> dict[str, Any]:
    """Full fine-tuning on ``encoded`` with AdamW: the recipe of theta_0 and every removal retrain.

    Minimises the batch mean of the per-example mean response-token NLL. Data order comes from
    ``default_rng([seed, 5])``; dropout (if the model has any) from ``torch.manual_seed``.
    Returns a small log (steps, final loss).
    """
    from tqdm.auto import tqdm

    device = device or next(model.parameters()).device
    n = len(encoded)
    if n == 0:
        raise ValueError("finetune: the training set is empty")
    torch.manual_seed(torch_seed(seed, 5))
    rng = np.random.default_rng([int(seed), 5])
    bs = min(cfg.batch_size, n)
    steps_per_epoch = math.ceil(n / bs)
    total = steps_per_epoch * cfg.epochs
    if cfg.gradient_checkpointing and hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lr_lambda(cfg.schedule, total, int(round(cfg.warmup_ratio * total))))
    model.train()
    losses = []
    bar = tqdm(total=total, desc=desc, leave=False, disable=None)
    for _ in range(cfg.epochs):
        perm = rng.permutation(n)
        for s in range(steps_per_epoch):
            idx = perm[s * bs: (s + 1) * bs]
            opt.zero_grad(set_to_none=True)
            tot = 0.0
            for mb in micro_batches(idx, cfg.micro_batch_size):
                batch = to_device(collate([encoded[i] for i in mb], pad_id), device)
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                loss = sequence_signal("loss", logits, batch["labels"]).sum() / len(idx)
                loss.backward()
                tot += loss.item()
            if cfg.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            opt.step()
            sched.step()
            losses.append(tot)
            bar.update(1)
    bar.close()
    model.eval()
    return {"steps": total, "final_loss": float(np.mean(losses[-max(1, steps_per_epoch):])),
            "first_loss": float(losses[0])}
