"""Greedy generation and answer checking (the paper's evaluations are greedy, Appendix C)."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from .data import check_answer
from .sequences import collate, encode_examples, pad_id, to_device

__all__ = ["generate", "evaluate_answers"]


@torch.no_grad()
def generate(model, tokenizer, examples: Sequence[dict], *, template: str = "{prompt}",
             max_new_tokens: int = 512, batch_size: int = 16, max_length: int = 1024,
             device=None) -> list[str]:
    """Greedy continuations of each example's prompt."""
    device = device or next(model.parameters()).device
    enc = encode_examples(tokenizer, examples, max_length=max_length, template=template, with_response=False)
    pad = pad_id(tokenizer)
    was_training = model.training
    model.eval()
    out: list[str] = [""] * len(examples)
    order = np.argsort([len(e["input_ids"]) for e in enc], kind="stable")
    for lo in range(0, len(order), batch_size):
        idx = order[lo: lo + batch_size]
        batch = to_device(collate([enc[i] for i in idx], pad, left=True), device)
        gen = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad,
                             eos_token_id=tokenizer.eos_token_id)
        new = gen[:, batch["input_ids"].shape[1]:]
        for j, i in enumerate(idx):
            out[i] = tokenizer.decode(new[j], skip_special_tokens=True)
    model.train(was_training)
    return out


def evaluate_answers(model, tokenizer, task: str, examples: Sequence[dict], **gen_kw) -> tuple[np.ndarray, list[str]]:
    """(correct [m] bool, responses) of greedy generation judged by :func:`daunce_core.lm.data.check_answer`."""
    responses = generate(model, tokenizer, examples, **gen_kw)
    correct = np.array([check_answer(task, ex, r) for ex, r in zip(examples, responses)], bool)
    return correct, responses
