"""Greedy generation and answer checking (the paper's evaluations are greedy, Appendix C).

Figure 2 generates long chains of thought for dozens of models; :func:`generation_backend` picks
vLLM for that when it is installed and the model is on CUDA, Hugging Face ``generate`` otherwise.
vLLM is imported only on that branch, so it stays an optional dependency.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .data import check_answer
from .sequences import collate, encode_examples, pad_id, to_device

__all__ = ["generation_backend", "generate", "evaluate_answers"]


def generation_backend(device) -> str:
    """``"vllm"`` when vLLM is importable and ``device`` is CUDA, else ``"hf"`` (``model.generate``)."""
    import importlib.util

    if torch.device(device).type == "cuda" and importlib.util.find_spec("vllm") is not None:
        return "vllm"
    return "hf"


def _generate_vllm(model, tokenizer, enc: Sequence[dict], *, max_new_tokens: int) -> list[str]:
    """Greedy continuations with vLLM, from a copy of ``model`` saved to a temporary folder (vLLM
    loads weights itself); the prompts are the same token ids as the Hugging Face path's."""
    import tempfile

    from vllm import LLM, SamplingParams  # optional: only on a CUDA host with vLLM installed

    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        llm = LLM(model=tmp, dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
                  gpu_memory_utilization=0.4)
        params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens)
        outs = llm.generate([{"prompt_token_ids": e["input_ids"]} for e in enc], params)
        del llm
    return [o.outputs[0].text for o in outs]


@torch.no_grad()
def generate(model, tokenizer, examples: Sequence[dict], *, template: str = "{prompt}",
             max_new_tokens: int = 512, batch_size: int = 16, max_length: int = 1024,
             device=None) -> list[str]:
    """Greedy continuations of each example's prompt (vLLM or ``model.generate``: :func:`generation_backend`)."""
    device = device or next(model.parameters()).device
    enc = encode_examples(tokenizer, examples, max_length=max_length, template=template, with_response=False)
    if generation_backend(device) == "vllm":
        return _generate_vllm(model, tokenizer, enc, max_new_tokens=max_new_tokens)
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
