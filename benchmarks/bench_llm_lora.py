"""Throughput and peak memory of one LoRA perturbed fit (Appendix C) on a Qwen2.5-0.5B-shaped model.

A randomly initialised model with Qwen2.5-0.5B's configuration (24 layers, hidden 896, 14 heads /
2 KV heads, MLP 4864, vocabulary 151,936, tied embeddings), LoRA rank 64 / alpha 16 on every
Linear layer, 30 AdamW steps of batch 64 on the DAUNCE objective with theta_0's logits from the
disabled adapter, random token sequences (prompt 192 + response 320 tokens). Prints tokens/s
(forward tokens of the trained model) and the peak memory. No download: the shapes are typed in.

    python benchmarks/bench_llm_lora.py                 # the real shapes (GPU)
    python benchmarks/bench_llm_lora.py --small         # a few-second CPU smoke run
"""
from __future__ import annotations

import argparse
import json
import resource
import time

import numpy as np
import torch

from daunce_core.fit import lm as fit_lm
from daunce_core.lm import settings
from daunce_core.utils import pick_device

QWEN25_05B = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                  num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                  rope_theta=1e6, tie_word_embeddings=True)
SMALL = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="tiny shapes and lengths for a CPU smoke run")
    ap.add_argument("--steps", type=int, default=None, help="optimiser steps (30 = Appendix C)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--micro-batch-size", type=int, default=None)
    ap.add_argument("--prompt-len", type=int, default=None)
    ap.add_argument("--response-len", type=int, default=None)
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--dtype", default=None, help="float32 or bfloat16 (default: bfloat16 on GPU)")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args(argv)

    from transformers import AutoModelForCausalLM, Qwen2Config

    device = pick_device(args.device)
    small = args.small
    steps = args.steps or (3 if small else 30)
    P = args.prompt_len or (16 if small else 192)
    R = args.response_len or (16 if small else 320)
    micro = args.micro_batch_size or (16 if small else 8)
    dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    torch.manual_seed(0)
    cfg = Qwen2Config(**(SMALL if small else QWEN25_05B))
    model = AutoModelForCausalLM.from_config(cfg, dtype=getattr(torch, dtype)).to(device)
    n = max(args.batch_size * 4, 64)
    rng = np.random.default_rng(0)
    enc = []
    for _ in range(n):
        ids = rng.integers(10, cfg.vocab_size, size=P + R).tolist()
        enc.append({"input_ids": ids, "labels": [-100] * P + ids[P:]})
    fit = settings.LoraFitConfig(variant="daunce", lr=3e-4, steps=steps, batch_size=args.batch_size,
                            micro_batch_size=micro, rank=args.rank, alpha=16, ratio=1.0, seed=0,
                            eval_batch_size=micro)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fit_lm.perturbed_fit(model, enc, 0, fit, pad_id=0, device=device, eval_sets=())
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    tokens = steps * args.batch_size * (P + R)
    peak = (torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
    out = {"device": str(device), "dtype": dtype, "shapes": "small" if small else "Qwen2.5-0.5B",
           "params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 1), "steps": steps,
           "batch": args.batch_size, "seq_len": P + R, "seconds": round(dt, 2),
           "tokens_per_s": round(tokens / dt, 1),
           ("peak_gpu_GiB" if device.type == "cuda" else "peak_rss_GiB"): round(peak, 2)}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
