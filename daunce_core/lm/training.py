"""Full fine-tuning of a causal LM (theta_0 and every removal retrain) and the learning-rate
schedules shared with the LoRA perturbed fits (:mod:`daunce_core.fit.lm`).

Full fine-tuning minimises the batch mean of the per-example mean response-token NLL
(:func:`daunce_core.lm.sequences.sequence_signal`), the recipe of Appendix C. Under torchrun it
runs with FSDP2 (:mod:`daunce_core.lm.distributed`); alone it runs as a plain PyTorch loop.
"""
from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from . import distributed
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


def warmup_steps(ratio: float, total: int) -> int:
    """Warm-up steps of a LoRA fit: ``ratio`` of ``total``, at least one when ``ratio > 0`` (the
    authors' 3% of 30 steps rounds to one step, not none)."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"warmup_ratio must lie in [0, 1), got {ratio}")
    return max(1, int(round(ratio * total))) if ratio > 0 else 0


def micro_batches(idx: np.ndarray, micro: int) -> Iterator[np.ndarray]:
    for lo in range(0, len(idx), micro):
        yield idx[lo: lo + micro]


def torch_seed(*key: int) -> int:
    """A torch seed derived from ``key`` (e.g. ``(seed, k)``), independent of numpy's streams."""
    return int(np.random.default_rng([*(int(k) for k in key), 3]).integers(2**31 - 1))


def _rank_micro_batches(idx: np.ndarray, micro: int, rank: int, world_size: int):
    """This rank's micro-batches of the global batch ``idx``, padded with ``None`` to the count of
    the fullest rank: FSDP gathers each layer's weights in every forward and backward, so every
    rank must run as many of them as the others."""
    local = distributed.rank_slice(idx, rank, world_size)
    count = math.ceil(math.ceil(len(idx) / world_size) / micro)
    mbs: list = list(micro_batches(local, micro))
    return mbs + [None] * (count - len(mbs))


def finetune(model, encoded: Sequence[dict], cfg: FinetuneConfig, *, pad_id: int, seed: int,
             device=None, desc: str = "fine-tune") -> dict[str, Any]:
    """Full fine-tuning on ``encoded`` with AdamW: the recipe of theta_0 and every removal retrain.

    Minimises the batch mean of the per-example mean response-token NLL. Data order comes from
    ``default_rng([seed, 5])``; dropout (if the model has any) from ``torch.manual_seed``.
    Returns a small log (steps, final loss).

    Under torchrun (a process group of several ranks) the model is sharded with FSDP2 in place
    (:func:`daunce_core.lm.distributed.shard_model`: fp32 master weights, bf16 compute on CUDA)
    and stays sharded; each rank takes a slice of every global batch of ``cfg.batch_size``
    examples. The loss of each example is divided by the *global* batch size and the gradients
    are summed over the ranks (FSDP's divide factor set to 1), so the step is that of one process
    up to the order of floating-point sums, whatever the number of ranks. The objective weighs
    examples, not tokens (each example's loss is already its mean over its response tokens), so
    the global normaliser is the global number of examples, which every rank knows without a
    collective.

    Precision (``cfg.master_weights``, on by default): AdamW updates fp32 weights with fp32
    gradients and states, and the forward and backward compute in bf16 on CUDA, with or without
    torchrun: sharded by FSDP's mixed-precision policy, or in one process the model cast to fp32
    and run under ``torch.autocast(bfloat16)``. A model loaded in bf16 (``llm.dtype: bfloat16``)
    is cast back to bf16 when training ends, as :func:`distributed.unsharded` does after FSDP. The
    reason: at the paper's learning rate (2e-5) most AdamW steps are below the resolution of a
    bf16 weight (8 significant bits) and would be rounded away. ``master_weights: false`` trains
    the loaded dtype as it is (half the memory; one 80 GB GPU cannot hold an 8B model's fp32
    weights, gradients and AdamW states).
    """
    from tqdm.auto import tqdm

    device = device or next(model.parameters()).device
    n = len(encoded)
    if n == 0:
        raise ValueError("finetune: the training set is empty")
    rank, world_size = distributed.world()
    torch.manual_seed(torch_seed(seed, 5))
    rng = np.random.default_rng([int(seed), 5])
    bs = min(cfg.batch_size, n)
    steps_per_epoch = math.ceil(n / bs)
    total = steps_per_epoch * cfg.epochs
    if cfg.gradient_checkpointing and hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable()
    loaded = next(model.parameters()).dtype
    autocast = contextlib.nullcontext
    if world_size > 1:
        from torch.distributed.fsdp import FSDPModule

        distributed.shard_model(model, device, master_weights=cfg.master_weights)
        for m in model.modules():
            if isinstance(m, FSDPModule):
                # sum, not mean, and as a plain SUM collective (gloo has no PREMUL_SUM): the loss
                # already carries the global normaliser
                m.set_gradient_divide_factor(1.0)
                m.set_force_sum_reduction_for_comms(True)
    elif cfg.master_weights:
        if any(p.dtype != torch.float32 for p in model.parameters()):
            model.to(dtype=torch.float32)
        if torch.device(device).type == "cuda":
            autocast = functools.partial(torch.autocast, "cuda", dtype=torch.bfloat16)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lr_lambda(cfg.schedule, total, int(round(cfg.warmup_ratio * total))))
    model.train()
    losses = []
    bar = tqdm(total=total, desc=desc, leave=False, disable=None if rank == 0 else True)
    for _ in range(cfg.epochs):
        perm = rng.permutation(n)
        for s in range(steps_per_epoch):
            idx = perm[s * bs: (s + 1) * bs]
            opt.zero_grad(set_to_none=True)
            tot = 0.0
            if world_size == 1:
                for mb in micro_batches(idx, cfg.micro_batch_size):
                    batch = to_device(collate([encoded[i] for i in mb], pad_id), device)
                    with autocast():
                        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                    loss = sequence_signal("loss", logits.float(), batch["labels"]).sum() / len(idx)
                    loss.backward()
                    tot += loss.item()
            else:
                for mb in _rank_micro_batches(idx, cfg.micro_batch_size, rank, world_size):
                    # a rank with fewer examples runs a zero-weight pass on one example (see above)
                    weight = 1.0 if mb is not None else 0.0
                    batch = to_device(collate([encoded[i] for i in (mb if mb is not None else idx[:1])], pad_id),
                                      device)
                    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                    loss = sequence_signal("loss", logits, batch["labels"]).float().sum() * (weight / len(idx))
                    loss.backward()
                    tot += loss.item()
                tot = float(distributed.all_sum([tot], device)[0])
            if cfg.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            opt.step()
            sched.step()
            losses.append(tot)
            bar.update(1)
    bar.close()
    if world_size == 1 and next(model.parameters()).dtype != loaded:
        model.to(dtype=loaded)  # the master weights' job is done: back to the loaded dtype
    model.eval()
    return {"steps": total, "final_loss": float(np.mean(losses[-max(1, steps_per_epoch):])),
            "first_loss": float(losses[0])}
