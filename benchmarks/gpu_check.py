#!/usr/bin/env python
"""A prepared GPU check: throughput and peak memory of the workflow's own
trainers on one GPU, in at most 8 minutes (``benchmarks/gpu_check.sh`` enforces the limit).

Vision, CIFAR-shaped synthetic data through ``daunce_core.ensemble`` (``benchmarks/bench_retrain.py``):

* ``theta_0``: one full-width ResNet-9 from scratch with the paper's base recipe
  (``fit_from_scratch``, BatchNorm in train mode, augmentation), as the ``base`` rule trains it;
* ``lds_chunk``: a chunk of retrains in one ``fit_from_scratch`` call, as ``lds_chunk`` jobs do
  (vmapped, BatchNorm in train mode included; the record names the mode);
* ``perturbed``: a chunk of ``daunce.chunk_size`` perturbed fits (vmapped, ``fit_perturbed``)
  and its predictions (``predict``), the two steps of ``fit.ensemble.EnsembleFitter.fit``;

On CUDA the trainers run with bf16 autocast and channels-last layout (``base.precision: bf16``,
``base.channels_last: true``; ``--plain`` keeps the config's fp32); each record names its options.
* ``projection``: device-hours of config/paper/cifar10.yaml at these rates (ESTIMATE).

LLM, a randomly initialised ``transformers`` model with the layer shapes of the paper's models
(Llama-3.1-8B: hidden 4096, MLP 14336, 32 heads / 8 KV heads, vocabulary 128,256; Qwen2.5-7B:
hidden 3584, MLP 18944, 28 / 4 heads, vocabulary 152,064; ``--llm llama-2-7b`` adds MLP 11008,
32 / 32 heads) but ``num_hidden_layers`` 1 and 2, bfloat16 weights (``llm.dtype`` of the paper
configs), sequences of ``finetune.max_length`` random tokens, the recipe of the model's paper
config (batch 64, micro-batch 4, gradient checkpointing for full fine-tuning):

* ``lora``: one LoRA perturbed fit, ``daunce_core.fit.lm.perturbed_fit`` (rank 64, all linear
  layers; theta_0's logits from the disabled adapter at every micro-batch);
* ``full``: full fine-tuning, ``daunce_core.lm.training.finetune`` in one process (fp32 master
  weights, gradients and AdamW states with bf16 autocast, ``finetune.master_weights``: the recipe
  of theta_0 and every removal retrain; under torchrun FSDP shards those states over the GPUs);
* ``signals``: per-example losses, ``daunce_core.lm.sequences.per_example_signal`` (2 layers);
* ``generate``: greedy decoding with Hugging Face ``generate`` (the fallback of
  ``daunce_core.lm.generation`` when vLLM is not installed), ``generation.batch_size`` prompts of
  256 random tokens, 128 new tokens each (forced: no early stop). From the 1- and 2-layer times
  the tokens/s of the real depth are PROJECTED (time linear in the layer count); the cost table
  divides Figure 2's generation budget by it.

tokens/s counts every token of the trained (or scored) sequences. Peak memory is CUDA's
allocator high-water mark per measurement, weights included. From the 1- and 2-layer peaks the
per-GPU peak of the real model (32 or 28 layers) is PROJECTED linearly in the layer count
(weights, gradients, optimiser states and saved activations all grow with it): a projection, not
a measurement of a 7-8B job.

Every figure goes to ``--out`` (default benchmarks/out/gpu_check.json, where the cost table is
generated from) after each measurement, so a run cut short keeps what it measured
(``"complete": false``). ``--device cpu --tiny`` runs the same code at toy sizes in seconds (the
test's mode); its figures mean nothing for a GPU and are marked ``"gpu_estimate": false``.
A measurement that runs out of GPU memory is recorded as such and the check goes on.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_retrain as BR  # noqa: E402  (also puts the repository on sys.path)

from daunce_core.lm.settings import LLMSettings  # noqa: E402
from daunce_core.utils import pick_device, set_threads  # noqa: E402

ROOT = BR.ROOT
DEFAULT_OUT = ROOT / "benchmarks" / "out" / "gpu_check.json"
SCHEMA = "daunce-gpu-check/1"

# Layer shapes of the paper's models (their config.json on the Hugging Face hub), typed in: no download.
LLM_SHAPES: dict[str, dict[str, Any]] = {
    "llama-3.1-8b": {"arch": "llama", "layers": 32, "paper_config": "config/paper/llm_ifeval.yaml",
                     "shapes": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                                    num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0,
                                    max_position_embeddings=8192, tie_word_embeddings=False)},
    "qwen2.5-7b": {"arch": "qwen2", "layers": 28, "paper_config": "config/paper/llm_math.yaml",
                   "shapes": dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                                  num_attention_heads=28, num_key_value_heads=4, rope_theta=1000000.0,
                                  max_position_embeddings=8192, tie_word_embeddings=False)},
    "llama-2-7b": {"arch": "llama", "layers": 32, "paper_config": "config/paper/llm_ifeval.yaml",
                   "shapes": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                                  num_attention_heads=32, num_key_value_heads=32, rope_theta=10000.0,
                                  max_position_embeddings=4096, tie_word_embeddings=False)},
}
TINY_SHAPES = dict(vocab_size=512, hidden_size=64, intermediate_size=172, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)
MEASURED_LAYERS = (1, 2)


class Report:
    """The JSON document, rewritten after every measurement."""

    def __init__(self, path: Path, doc: dict[str, Any]):
        self.path, self.doc, self.t0 = path, doc, time.perf_counter()
        self.write()

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def write(self) -> None:
        self.doc["elapsed_s"] = round(self.elapsed(), 1)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.doc, indent=2))
        tmp.replace(self.path)


def guarded(report: Report, budget_s: float, device: torch.device, fn: Callable[[], dict]) -> dict:
    """Run one measurement unless the time budget is spent; out-of-memory or an error is a result, not a crash."""
    if report.elapsed() > budget_s:
        return {"skipped": f"time budget of {budget_s:.0f} s spent"}
    try:
        return fn()
    except torch.cuda.OutOfMemoryError as exc:
        return {"error": "out of memory", "detail": str(exc).splitlines()[0][:200]}
    except Exception as exc:  # one failed measurement is recorded; the others still run
        import traceback
        return {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}",
                "traceback": traceback.format_exc()[-2000:]}
    finally:
        free(device)


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# --- LLM -----------------------------------------------------------------------------------------

def build_lm(arch: str, shapes: dict[str, Any], layers: int, dtype: torch.dtype, device: torch.device):
    """A randomly initialised causal LM, created directly on ``device`` (no CPU initialisation)."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    cfg = {"llama": LlamaConfig, "qwen2": Qwen2Config}[arch](**shapes, num_hidden_layers=layers)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return model.to(device)  # a no-op unless a transformers version ignores the device context


def token_examples(n: int, length: int, vocab: int, seed: int = 0) -> list[dict[str, list[int]]]:
    """Encoded examples as ``lm.sequences.encode_examples`` gives them: the loss on the last 7/8."""
    rng = np.random.default_rng(seed)
    prompt = max(1, length // 8)
    out = []
    for _ in range(n):
        ids = rng.integers(10, vocab, size=length).tolist()
        out.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return out


def measure_lora(model, cfg, length: int, vocab: int, steps: int, device: torch.device) -> dict[str, Any]:
    from daunce_core.fit.lm import perturbed_fit

    enc = token_examples(math.ceil(cfg.batch_size / cfg.ratio) + 1, length, vocab)
    perturbed_fit(model, enc, 0, dataclasses.replace(cfg, steps=1), pad_id=0, device=device)  # warm-up
    BR.reset_peak(device)
    _, t = BR.timed(lambda: perturbed_fit(model, enc, 1, dataclasses.replace(cfg, steps=steps), pad_id=0,
                                          device=device), device)
    tokens = steps * cfg.batch_size * length
    return {"steps": steps, "batch": cfg.batch_size, "micro_batch": cfg.micro_batch_size, "rank": cfg.rank,
            "seq_len": length, "seconds": t, "tokens_per_s": tokens / t, "peak_mb": BR.peak_mb(device)}


def measure_signals(model, batch_size: int, length: int, vocab: int, device: torch.device) -> dict[str, Any]:
    from daunce_core.lm.sequences import per_example_signal

    enc = token_examples(4 * batch_size, length, vocab, seed=2)
    per_example_signal(model, enc[:batch_size], pad_id=0, batch_size=batch_size, device=device)  # warm-up
    BR.reset_peak(device)
    _, t = BR.timed(lambda: per_example_signal(model, enc, pad_id=0, batch_size=batch_size, device=device), device)
    return {"examples": len(enc), "batch": batch_size, "seq_len": length, "seconds": t,
            "tokens_per_s": len(enc) * length / t, "peak_mb": BR.peak_mb(device)}


@torch.no_grad()
def measure_generate(model, batch: int, prompt: int, new: int, vocab: int, device: torch.device) -> dict[str, Any]:
    ids = torch.as_tensor(np.random.default_rng(3).integers(10, vocab, size=(batch, prompt)), device=device)
    mask = torch.ones_like(ids)
    kw = dict(do_sample=False, pad_token_id=0, min_new_tokens=new, max_new_tokens=new)
    was_training = model.training
    model.eval()
    # warm-up at the measured batch and prompt length (a smaller one left the first model's timed
    # call paying CUDA's first-use costs: 1 layer measured slower than 2 on an H200)
    model.generate(input_ids=ids, attention_mask=mask, **{**kw, "min_new_tokens": 2, "max_new_tokens": 2})
    BR.reset_peak(device)
    out, t = BR.timed(lambda: model.generate(input_ids=ids, attention_mask=mask, **kw), device)
    model.train(was_training)
    made = out.shape[1] - prompt
    return {"backend": "hf generate", "batch": batch, "prompt_len": prompt, "new_tokens": made, "seconds": t,
            "tokens_per_s": batch * made / t, "peak_mb": BR.peak_mb(device)}


def project_rate(measured: dict[str, dict], what: str, layers: int) -> float | None:
    """tokens/s at the real depth: the seconds of one measurement are linear in the layer count."""
    try:
        a, b = measured["1"][what], measured["2"][what]
        t1, t2 = a["seconds"], b["seconds"]
    except (KeyError, TypeError):
        return None
    if t2 <= t1:  # two layers no slower than one: fixed costs dominate, no per-layer time to scale
        return None
    t = t2 + (layers - 2) * (t2 - t1)
    return b["batch"] * b["new_tokens"] / t


def measure_full(model, cfg, length: int, vocab: int, steps: int, device: torch.device) -> dict[str, Any]:
    from daunce_core.lm.training import finetune

    enc = token_examples(steps * cfg.batch_size, length, vocab, seed=1)
    one = dataclasses.replace(cfg, epochs=1)
    finetune(model, enc[: cfg.batch_size], one, pad_id=0, seed=0, device=device)  # warm-up: one step
    BR.reset_peak(device)
    _, t = BR.timed(lambda: finetune(model, enc, one, pad_id=0, seed=1, device=device), device)
    return {"steps": steps, "batch": cfg.batch_size, "micro_batch": cfg.micro_batch_size,
            "gradient_checkpointing": cfg.gradient_checkpointing,
            "optimizer": "AdamW, fp32 master weights, bf16 compute" if cfg.master_weights else "AdamW, model dtype",
            "seq_len": length, "seconds": t, "tokens_per_s": steps * cfg.batch_size * length / t,
            "peak_mb": BR.peak_mb(device)}


def project_peak(measured: dict[str, dict], what: str, layers: int) -> float | None:
    """Peak memory of the real depth, linear in the layer count through the 1- and 2-layer peaks."""
    try:
        p1, p2 = measured["1"][what]["peak_mb"], measured["2"][what]["peak_mb"]
    except (KeyError, TypeError):
        return None
    return p2 + (layers - 2) * (p2 - p1)


def check_llm(name: str, args, device: torch.device, report: Report) -> None:
    spec = LLM_SHAPES[name]
    s = LLMSettings.from_config(yaml.safe_load((ROOT / spec["paper_config"]).read_text()))
    ft = s.finetune
    lora = s.daunce.fit_config(s.lr_grid[0], ft.max_length)
    shapes = TINY_SHAPES if args.tiny else spec["shapes"]
    length = 32 if args.tiny else ft.max_length
    if args.tiny:
        ft = dataclasses.replace(ft, batch_size=4, micro_batch_size=2)
        lora = dataclasses.replace(lora, batch_size=4, micro_batch_size=2, rank=4, eval_batch_size=2)
    dtype = getattr(torch, s.dtype)
    entry: dict[str, Any] = {"arch": spec["arch"], "shapes": shapes, "real_layers": spec["layers"],
                             "paper_config": spec["paper_config"], "dtype": s.dtype, "measured": {}}
    report.doc["llm"][name] = entry
    vocab = shapes["vocab_size"]
    gen_batch = 2 if args.tiny else s.generation.batch_size
    for layers in MEASURED_LAYERS:
        got: dict[str, Any] = {}
        entry["measured"][str(layers)] = got
        held: dict[str, Any] = {}  # the LoRA fit's model, scored next (its weights are untouched)

        def lora_fit(layers=layers, got=got, held=held):
            held["model"] = build_lm(spec["arch"], shapes, layers, dtype, device)
            got["params_M"] = sum(p.numel() for p in held["model"].parameters()) / 1e6
            return measure_lora(held["model"], lora, length, vocab, args.llm_steps, device)

        got["lora"] = guarded(report, args.budget_s, device, lora_fit)
        report.write()
        if "model" in held:
            got["generate"] = guarded(report, args.budget_s, device, lambda held=held: measure_generate(
                held["model"], gen_batch, 8 if args.tiny else 256, 4 if args.tiny else 128, vocab, device))
            report.write()
        if layers == MEASURED_LAYERS[-1] and "model" in held:
            got["signals"] = guarded(report, args.budget_s, device, lambda held=held: measure_signals(
                held["model"], lora.eval_batch_size, length, vocab, device))
            report.write()
        held.clear()
        free(device)
        got["full"] = guarded(report, args.budget_s, device, lambda layers=layers: measure_full(
            build_lm(spec["arch"], shapes, layers, dtype, device), ft, length, vocab, args.llm_steps, device))
        report.write()
    entry["projected_peak_mb"] = {w: project_peak(entry["measured"], w, spec["layers"]) for w in ("lora", "full")}
    entry["projected_generate_tokens_per_s"] = project_rate(entry["measured"], "generate", spec["layers"])
    report.write()


# --- vision --------------------------------------------------------------------------------------

def check_vision(args, device: torch.device, report: Report) -> None:
    exp = BR.load_config()
    if args.tiny:
        width, n, n_eval, chunk, pert_models = 0.125, 64, 32, 2, 2
        recipe = dataclasses.replace(exp.base, batch_size=16)
        daunce = dataclasses.replace(exp.daunce, batch_size=16)
    else:
        width, n, n_eval, chunk, pert_models = 1.0, 10_000, 10_000, 4, exp.daunce.chunk_size
        recipe, daunce = exp.base, exp.daunce
    if device.type == "cuda" and not args.plain:
        recipe = dataclasses.replace(recipe, precision="bf16", channels_last=True)
    speed = BR.E.Speed.from_train(recipe)
    v = report.doc["vision"]
    v["theta_0"] = guarded(report, args.budget_s, device,
                           lambda: BR.measure_retrain(device, recipe, width=width, models=1, n=n))
    report.write()
    v["lds_chunk"] = guarded(report, args.budget_s, device,
                             lambda: BR.measure_retrain(device, recipe, width=width, models=chunk, n=n))
    report.write()
    v["perturbed"] = guarded(report, args.budget_s, device, lambda: BR.measure_perturbed(
        device, daunce, width=width, models=pert_models, n=n, n_eval=n_eval, speed=speed))
    ok = all("seconds" in v[k] or "fit_seconds" in v[k] for k in ("theta_0", "lds_chunk", "perturbed"))
    v["projection"] = BR.project(exp, base=v["theta_0"], lds=v["lds_chunk"], perturbed=v["perturbed"]) if ok else None
    report.write()


# --- report ----------------------------------------------------------------------------------------

def git_commit() -> str | None:
    import os
    if os.environ.get("DAUNCE_GIT_COMMIT"):  # a copy of the tree without .git (a lent GPU machine)
        return os.environ["DAUNCE_GIT_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def fmt(r: dict | None, key: str, unit: str) -> str:
    if not r:
        return "-"
    if "error" in r or "skipped" in r:
        return r.get("error") or "skipped"
    return f"{r[key]:,.0f} {unit}" if r.get(key) is not None else "-"


def summary(doc: dict[str, Any]) -> str:
    lines = [f"GPU check on {doc['device']['name']} ({doc['device']['device']}), "
             + ("figures of the GPU" if doc["gpu_estimate"] else "NOT GPU figures (CPU or --tiny)")]
    v = doc["vision"]
    for k in ("theta_0", "lds_chunk"):
        lines.append(f"  ResNet-9 {k:<12s} {fmt(v.get(k), 'images_per_s', 'images/s'):>22s}   "
                     f"per model {fmt(v.get(k), 'images_per_s_per_model', 'images/s'):>18s}   "
                     f"peak {fmt(v.get(k), 'peak_mb', 'MB')}"
                     + (f"   {v[k].get('mode')}, {v[k].get('precision')}" if v.get(k) and "mode" in v[k] else ""))
    p = v.get("perturbed")
    lines.append(f"  ResNet-9 perturbed   {fmt(p, 'fit_images_per_s', 'images/s'):>22s}   "
                 f"predict {fmt(p, 'predict_images_per_s', 'images/s'):>20s}   peak {fmt(p, 'fit_peak_mb', 'MB')}")
    proj = v.get("projection")
    if proj:
        fig = proj["device_hours"].get("Figure 1a (baselines not included)")
        lines.append(f"  Figure 1a projected: {fig:.2f} device-hours (ESTIMATE"
                     + ("" if doc["gpu_estimate"] else "; NOT a GPU estimate") + ")")
    for name, e in doc["llm"].items():
        for layers, got in e["measured"].items():
            for what in ("lora", "full", "signals", "generate"):
                if what in got:
                    rate, peak = fmt(got[what], "tokens_per_s", "tokens/s"), fmt(got[what], "peak_mb", "MB")
                    lines.append(f"  {name} {layers} layer(s) {what:<8s} {rate:>20s}   peak {peak}")
        pk = e.get("projected_peak_mb") or {}
        lines.append(f"  {name} at {e['real_layers']} layers, PROJECTED per-GPU peak: "
                     + ", ".join(f"{w} {v / 1024:.1f} GiB" if v else f"{w} -" for w, v in pk.items())
                     + (f"; generate {e['projected_generate_tokens_per_s']:,.0f} tokens/s"
                        if e.get("projected_generate_tokens_per_s") else ""))
    return "\n".join(lines)


def main(argv=None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu with --tiny")
    ap.add_argument("--tiny", action="store_true", help="toy sizes: the same code in seconds (a CPU test)")
    ap.add_argument("--out", default=str(DEFAULT_OUT), help="the JSON report")
    ap.add_argument("--llm", default="llama-3.1-8b,qwen2.5-7b",
                    help=f"comma-separated layer shapes of: {', '.join(LLM_SHAPES)} ('' for none)")
    ap.add_argument("--llm-steps", type=int, default=2, help="timed optimiser steps per LLM fit")
    ap.add_argument("--no-vision", action="store_true", help="skip the ResNet-9 measurements")
    ap.add_argument("--plain", action="store_true",
                    help="ResNet-9 in the config's fp32 layout on CUDA too (default there: bf16 + channels_last)")
    ap.add_argument("--budget-s", type=float, default=420.0,
                    help="start no measurement after this many seconds (gpu_check.sh kills at 480)")
    ap.add_argument("--threads", type=int, help="torch CPU threads")
    args = ap.parse_args(argv)
    names = [x for x in args.llm.split(",") if x]
    unknown = sorted(set(names) - set(LLM_SHAPES))
    if unknown:
        ap.error(f"--llm: unknown {unknown}; choose from {', '.join(LLM_SHAPES)}")
    set_threads(args.threads)
    device = pick_device(args.device)
    if device.type != "cuda" and not args.tiny:
        ap.error("--device cpu runs the toy sizes only: add --tiny (7B-shaped layers need a GPU)")

    info = BR.device_info(device)
    if device.type == "cuda":
        info["total_memory_mb"] = torch.cuda.get_device_properties(device).total_memory / 2**20
        info["bf16_supported"] = torch.cuda.is_bf16_supported()
    estimate = device.type == "cuda" and not args.tiny
    report = Report(Path(args.out), {
        "schema": SCHEMA, "complete": False, "gpu_estimate": estimate, "tiny": args.tiny,
        "note": None if estimate else BR.NOT_GPU, "git_commit": git_commit(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "device": info, "vision": {}, "llm": {}})
    print(f"GPU check: {info['name']} ({info['device']}), torch {info['torch']}; report {args.out}", flush=True)
    parts = ([("vision", lambda: check_vision(args, device, report))] if not args.no_vision else []) + [
        (name, lambda name=name: check_llm(name, args, device, report)) for name in names]
    for label, run in parts:
        try:
            run()
        except Exception as exc:  # a part that cannot even be set up is recorded; the others still run
            report.doc.setdefault("errors", {})[label] = f"{type(exc).__name__}: {exc}"[:500]
            report.write()
        print(f"{label} done", f"{report.elapsed():.0f} s", flush=True)
    report.doc["complete"] = True
    report.write()
    print(summary(report.doc), flush=True)
    return report.doc


if __name__ == "__main__":
    main()
