"""Causal language models with transformers + PEFT: theta_0, LoRA perturbed fits, per-example NLL.

Section 4.2 of the paper: theta_0 is a full fine-tune of a pre-trained causal LM; each perturbed
model k is a LoRA adapter on theta_0 trained on the perturbed objective (Table 1, equation 5);
the attribution signal is each example's loss under each of the K adapters.

Conventions of this module:

* An example is ``{"id", "prompt", "response", ...}`` (see :mod:`daunce_core.textdata`). The model
  sees ``template(prompt) + response + eos``; the labels are the response tokens (and eos) only.
* The per-example loss ``L_i`` is the **mean token NLL over the response tokens** (so long and
  short responses weigh alike); the per-example margin (``daunce_t``) is the mean over response
  tokens of the token margin ``g_y - logsumexp_{c != y} g_c``. Full fine-tuning minimises the
  mean of ``L_i`` over each batch.
* The first-order term is computed in logit space against theta_0's logits, which come from the
  same PEFT model under ``with model.disable_adapter():``, one micro-batch at a time (theta_0's
  logits are never held for the dataset), and only at the response positions.
* Perturbed model ``k`` is bit-reproducible for a fixed seed: its subset and ``xi`` come from
  :func:`daunce_core.perturb.subset_and_xi`, its batch order from
  :func:`daunce_core.perturb.batch_order` keyed ``(seed, k)``, its LoRA initialisation from a
  torch seed derived from ``(seed, k)``; the base weights are frozen and restored after each fit
  (``unload``), so model k is the same whether trained alone or after others in a chunk.
"""
from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from . import objectives, perturb

log = logging.getLogger(__name__)

IGNORE = -100

__all__ = [
    "FinetuneConfig",
    "LoraFitConfig",
    "ModelUnavailable",
    "encode_examples",
    "collate",
    "sequence_signal_terms",
    "sequence_objective",
    "per_example_signal",
    "finetune",
    "perturbed_fit",
    "perturbed_losses",
    "generate",
    "evaluate_answers",
    "load_causal_lm",
    "load_tokenizer",
]


class ModelUnavailable(RuntimeError):
    """A model or tokenizer is neither on disk nor reachable on the Hugging Face hub."""


# --- settings -----------------------------------------------------------------------------------

def _f(default: Any, help: str) -> Any:
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class FinetuneConfig:
    """Full fine-tuning (theta_0 and every removal retrain). Paper: lr 2e-5, batch 64, 1 epoch."""

    lr: float = _f(2e-5, "peak learning rate of AdamW")
    batch_size: int = _f(64, "examples per optimiser step")
    micro_batch_size: int = _f(8, "examples per forward pass (gradient accumulation up to batch_size)")
    epochs: int = _f(1, "passes over the training set")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    warmup_ratio: float = _f(0.03, "share of the steps with a linear warm-up")
    schedule: str = _f("cosine", "'constant', 'linear' or 'cosine' decay after the warm-up")
    max_grad_norm: float = _f(1.0, "gradient clipping (0 = off)")
    max_length: int = _f(1024, "tokens per example (prompt truncated from the left first)")
    gradient_checkpointing: bool = _f(False, "trade compute for activation memory (large models)")


@dataclass
class LoraFitConfig:
    """A LoRA perturbed fit (Appendix C: rank 64, alpha 16, AdamW, 30 steps, batch 64)."""

    variant: str = _f("daunce", "DAUNCE variant (objectives.VARIANTS)")
    lr: float = _f(3e-4, "initial learning rate of AdamW")
    steps: int = _f(30, "optimiser steps per perturbed model")
    batch_size: int = _f(64, "examples per step, drawn from the subset D^k")
    micro_batch_size: int = _f(8, "examples per forward pass")
    rank: int = _f(64, "LoRA rank")
    alpha: float = _f(16.0, "LoRA alpha")
    dropout: float = _f(0.0, "LoRA dropout (0 keeps the fit deterministic)")
    target_modules: Any = _f("all-linear", "modules given adapters: 'all-linear' or a list of names")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    schedule: str = _f("linear", "'constant' or 'linear' decay to zero over the steps")
    ratio: float = _f(0.3, "subset ratio r")
    rho: float = _f(1.0, "perturbation scale (objectives.perturbed_objective)")
    gamma: float = _f(1.0, "loss-term weight (objectives.perturbed_objective)")
    seed: int = _f(0, "perturbation seed; model k uses default_rng([seed, k])")
    max_length: int = _f(1024, "tokens per example")
    eval_batch_size: int = _f(16, "examples per forward pass when recording losses")


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


def _to(batch: dict[str, torch.Tensor], device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def _pad_id(tokenizer) -> int:
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


def sequence_objective(variant: str, logits: torch.Tensor, labels: torch.Tensor, *,
                       logits0: torch.Tensor | None = None, xi: torch.Tensor | None = None,
                       rho: float = 1.0, gamma: float = 1.0) -> torch.Tensor:
    """:func:`objectives.perturbed_objective` of each sequence; [B]."""
    signal = objectives.signal_of(variant)
    if objectives.is_black_box(variant):
        return objectives.perturbed_objective(variant, sequence_signal(signal, logits, labels), gamma=gamma)
    if logits0 is None:
        raise ValueError(f"variant {variant!r} needs theta_0's logits (logits0)")
    s, s0, lin = sequence_signal_terms(signal, logits, logits0, labels)
    return objectives.perturbed_objective(variant, s, s0=s0, lin=lin, xi=xi, rho=rho, gamma=gamma)


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
        batch = _to(collate([encoded[i] for i in idx], pad_id), device)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        out[idx] = sequence_signal(signal, logits, batch["labels"]).cpu().numpy()
    model.train(was_training)
    return out


# --- optimisation -------------------------------------------------------------------------------

def _lr_lambda(schedule: str, total: int, warmup: int = 0):
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


def _micro_batches(idx: np.ndarray, micro: int) -> Iterator[np.ndarray]:
    for lo in range(0, len(idx), micro):
        yield idx[lo: lo + micro]


def _torch_seed(*key: int) -> int:
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
    torch.manual_seed(_torch_seed(seed, 5))
    rng = np.random.default_rng([int(seed), 5])
    bs = min(cfg.batch_size, n)
    steps_per_epoch = math.ceil(n / bs)
    total = steps_per_epoch * cfg.epochs
    if cfg.gradient_checkpointing and hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, _lr_lambda(cfg.schedule, total, int(round(cfg.warmup_ratio * total))))
    model.train()
    losses = []
    bar = tqdm(total=total, desc=desc, leave=False, disable=None)
    for _ in range(cfg.epochs):
        perm = rng.permutation(n)
        for s in range(steps_per_epoch):
            idx = perm[s * bs: (s + 1) * bs]
            opt.zero_grad(set_to_none=True)
            tot = 0.0
            for mb in _micro_batches(idx, cfg.micro_batch_size):
                batch = _to(collate([encoded[i] for i in mb], pad_id), device)
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


def _lora_config(cfg: LoraFitConfig):
    from peft import LoraConfig

    return LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                      target_modules=cfg.target_modules, bias="none", task_type="CAUSAL_LM")


def perturbed_fit(base_model, train_enc: Sequence[dict], k: int, cfg: LoraFitConfig, *, pad_id: int,
                  device=None, eval_sets: Sequence[Sequence[dict]] = ()) -> list[np.ndarray]:
    """Fit perturbed model ``k`` (a fresh LoRA adapter on theta_0) and record its signals.

    Algorithm 1: subset ``D^k`` and ``xi^k`` from ``perturb.subset_and_xi(seed, k, n, ratio)``;
    ``cfg.steps`` AdamW steps of ``cfg.batch_size`` examples drawn from ``D^k`` in the order of
    ``perturb.batch_order((seed, k), ...)``, on the perturbed objective of ``cfg.variant`` with
    theta_0's logits from the same model with its adapter disabled. Then the signal (loss or
    margin) of every example of each of ``eval_sets``.

    ``base_model`` is returned to its original state (adapter removed, weights untouched).
    Returns one float32 array per evaluation set.
    """
    from peft import get_peft_model

    device = device or next(base_model.parameters()).device
    objectives.check_variant(cfg.variant)
    signal = objectives.signal_of(cfg.variant)
    n = len(train_enc)
    subset, xi = perturb.subset_and_xi(cfg.seed, k, n, cfg.ratio)
    bs = min(cfg.batch_size, len(subset))
    per_epoch = len(subset) // bs
    order = perturb.batch_order((cfg.seed, k), subset, math.ceil(cfg.steps / per_epoch), bs)[: cfg.steps]
    xi_t = torch.as_tensor(xi, dtype=torch.float32)

    for p in base_model.parameters():
        p.requires_grad_(False)
    torch.manual_seed(_torch_seed(cfg.seed, k))
    model = get_peft_model(base_model, _lora_config(cfg))
    try:
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg.schedule, cfg.steps))
        model.train()
        for idx in order:
            opt.zero_grad(set_to_none=True)
            for mb in _micro_batches(idx, cfg.micro_batch_size):
                batch = _to(collate([train_enc[i] for i in mb], pad_id), device)
                inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
                logits0 = None
                if not objectives.is_black_box(cfg.variant):
                    with torch.no_grad(), model.disable_adapter():
                        logits0 = model(**inputs).logits
                logits = model(**inputs).logits
                obj = sequence_objective(cfg.variant, logits, batch["labels"], logits0=logits0,
                                         xi=xi_t[torch.as_tensor(mb)].to(device), rho=cfg.rho, gamma=cfg.gamma)
                (obj.sum() / len(idx)).backward()
                del logits, logits0
            opt.step()
            sched.step()
        return [per_example_signal(model, es, pad_id=pad_id, signal=signal,
                                   batch_size=cfg.eval_batch_size, device=device) for es in eval_sets]
    finally:
        model.unload()


def perturbed_losses(base_model, train_enc: Sequence[dict], query_enc: Sequence[dict],
                     ks: Sequence[int], cfg: LoraFitConfig, *, pad_id: int, device=None) -> tuple[np.ndarray, np.ndarray]:
    """Signals of every training and query example under perturbed models ``ks``: ([K, n], [K, m])."""
    from tqdm.auto import tqdm

    tr = np.empty((len(ks), len(train_enc)), np.float32)
    qu = np.empty((len(ks), len(query_enc)), np.float32)
    for row, k in enumerate(tqdm(ks, desc=f"LoRA fits ({cfg.variant}, lr {cfg.lr:g})", disable=None)):
        tr[row], qu[row] = perturbed_fit(base_model, train_enc, int(k), cfg, pad_id=pad_id,
                                         device=device, eval_sets=(train_enc, query_enc))
        if not (np.isfinite(tr[row]).all() and np.isfinite(qu[row]).all()):
            raise FloatingPointError(f"perturbed model k={k} diverged at lr {cfg.lr:g} (non-finite losses)")
    return tr, qu


# --- generation and answer checking -------------------------------------------------------------

@torch.no_grad()
def generate(model, tokenizer, examples: Sequence[dict], *, template: str = "{prompt}",
             max_new_tokens: int = 512, batch_size: int = 16, max_length: int = 1024,
             device=None) -> list[str]:
    """Greedy continuations of each example's prompt (the paper's evaluations are greedy)."""
    device = device or next(model.parameters()).device
    enc = encode_examples(tokenizer, examples, max_length=max_length, template=template, with_response=False)
    pad = _pad_id(tokenizer)
    was_training = model.training
    model.eval()
    out: list[str] = [""] * len(examples)
    order = np.argsort([len(e["input_ids"]) for e in enc], kind="stable")
    for lo in range(0, len(order), batch_size):
        idx = order[lo: lo + batch_size]
        batch = _to(collate([enc[i] for i in idx], pad, left=True), device)
        gen = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad,
                             eos_token_id=tokenizer.eos_token_id)
        new = gen[:, batch["input_ids"].shape[1]:]
        for j, i in enumerate(idx):
            out[i] = tokenizer.decode(new[j], skip_special_tokens=True)
    model.train(was_training)
    return out


def evaluate_answers(model, tokenizer, task: str, examples: Sequence[dict], **gen_kw) -> tuple[np.ndarray, list[str]]:
    """(correct [m] bool, responses) of greedy generation judged by :func:`textdata.check_answer`."""
    from .textdata import check_answer

    responses = generate(model, tokenizer, examples, **gen_kw)
    correct = np.array([check_answer(task, ex, r) for ex, r in zip(examples, responses)], bool)
    return correct, responses


# --- loading ------------------------------------------------------------------------------------

def _offline() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _hint(name: str) -> str:
    return (f"'{name}' is not a local folder and could not be fetched from the Hugging Face hub"
            f"{' (offline: HF_HUB_OFFLINE is set)' if _offline() else ''}; download it where there is "
            f"a network (huggingface-cli download {name} --local-dir <dir>) and set llm.model to <dir>")


def _require_reachable(name_or_path: str, filename: str) -> None:
    """Fail at once, with the one-line hint, for a hub model that is neither local nor cached while
    offline (instead of waiting for the hub client's retries)."""
    if Path(name_or_path).exists() or not _offline():
        return
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(name_or_path, filename)
    except Exception:  # not a valid repo id either
        cached = None
    if not isinstance(cached, str):
        raise ModelUnavailable(_hint(name_or_path))


def load_tokenizer(name_or_path: str):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    _require_reachable(name_or_path, "tokenizer_config.json")
    cls = AutoTokenizer
    cfg_file = Path(name_or_path) / "tokenizer_config.json"
    if cfg_file.exists():
        # A tokenizer trained with `tokenizers` (tinylm) must load as itself: AutoTokenizer would
        # pick the model type's class (e.g. Qwen2Tokenizer), whose pre-tokenizer splits differently.
        if json.loads(cfg_file.read_text()).get("tokenizer_class") in ("TokenizersBackend", "PreTrainedTokenizerFast"):
            cls = PreTrainedTokenizerFast
    try:
        tok = cls.from_pretrained(name_or_path)
    except (OSError, ValueError) as exc:
        raise ModelUnavailable(_hint(name_or_path)) from exc
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(name_or_path: str, *, dtype: str = "float32", device=None):
    """``AutoModelForCausalLM.from_pretrained`` with a one-line error when the weights are unreachable."""
    from transformers import AutoModelForCausalLM

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(dtype)
    if torch_dtype is None:
        raise ValueError(f"llm dtype must be float32, bfloat16 or float16, got {dtype!r}")
    _require_reachable(name_or_path, "config.json")
    try:
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=torch_dtype)
    except (OSError, ValueError) as exc:
        raise ModelUnavailable(_hint(name_or_path)) from exc
    if device is not None:
        model.to(device)
    return model


def config_dict(cfg) -> dict[str, Any]:
    return asdict(cfg)


def from_dict(cls, d: dict[str, Any] | None, where: str):
    """Build a settings dataclass, refusing unknown keys by name."""
    import dataclasses

    d = dict(d or {})
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"unknown key(s) {', '.join(f'{where}.{u}' for u in unknown)}; known: {', '.join(sorted(known))}")
    return cls(**d)


def save_model(model, tokenizer, folder: str | os.PathLike) -> None:
    """``save_pretrained`` of model and tokenizer into ``folder``, atomically (temp folder, rename)."""
    import shutil
    import tempfile

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# --- the experiment of Section 4.2 / Appendix C, one function per workflow step -----------------

TASKS = ("synthetic", "math", "ifeval")
# The paper's data sources per task: (training set, query set).
TASK_DATA = {"math": ("numinamath", "math"), "ifeval": ("autoif", "ifeval")}


@dataclass
class LLMSettings:
    """The ``llm`` section of the config (see the ``llm`` section of ``config/config.yaml`` for every key)."""

    task: str = "synthetic"
    model: str = "tiny"
    dtype: str = "float32"
    template: str = "{prompt}"
    query_target: str = "reference"
    seeds: int = 3
    data: dict = field(default_factory=dict)
    tiny: dict = field(default_factory=dict)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    generation: dict = field(default_factory=lambda: {"max_new_tokens": 512, "batch_size": 16})
    daunce: LoraFitConfig = field(default_factory=LoraFitConfig)
    K: int = 100
    chunk_size: int = 10
    lr_grid: list = field(default_factory=lambda: [1e-3, 3e-4, 1e-4])
    measure: str = "correlation"
    select: dict = field(default_factory=lambda: {"fraction": 0.3, "N": 500})
    logra: dict = field(default_factory=lambda: {"proj_dim": 4096, "damping": None, "hessian": "eFIM",
                                                 "batch_size": 8})
    removal: dict = field(default_factory=lambda: {"N": [500, 1000], "methods": ["daunce", "logra", "random"],
                                                   "seed": 0})

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "LLMSettings":
        """Build from the workflow config (its ``llm`` key), refusing unknown keys by name."""
        d = dict(config.get("llm") or {})
        d.pop("resources", None)  # cluster resources: the workflow's business
        daunce = dict(d.pop("daunce", {}) or {})
        top = {k: daunce.pop(k) for k in ("K", "chunk_size", "lr_grid", "measure") if k in daunce}
        known = {f.name for f in dataclasses_fields(cls)} - {"K", "chunk_size", "lr_grid", "measure"}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown key(s) {', '.join('llm.' + u for u in unknown)}; known: {', '.join(sorted(known))}")
        s = cls(**{k: v for k, v in d.items() if k not in ("finetune",)}, **top)
        s.finetune = from_dict(FinetuneConfig, d.get("finetune"), "llm.finetune")
        s.daunce = from_dict(LoraFitConfig, daunce, "llm.daunce")
        return s.validate()

    def validate(self) -> "LLMSettings":
        if self.task not in TASKS:
            raise ValueError(f"llm.task must be one of {', '.join(TASKS)}, got {self.task!r}")
        if self.query_target not in ("reference", "generated"):
            raise ValueError(f"llm.query_target must be 'reference' or 'generated', got {self.query_target!r}")
        if self.task == "ifeval" and self.query_target == "reference":
            raise ValueError("llm.query_target: IFEval has no reference responses; use 'generated' "
                             "(theta_0's own correct answer is the query's target)")
        if self.model == "tiny" and self.task != "synthetic":
            raise ValueError("llm.model 'tiny' is the miniature's pre-trained toy; the math and ifeval "
                             "tasks need a hub model id or a local model folder")
        if self.K < 2 or self.seeds < 1 or not self.lr_grid:
            raise ValueError("llm.daunce.K must be >= 2, llm.seeds >= 1 and llm.daunce.lr_grid non-empty")
        objectives.check_variant(self.daunce.variant)
        return self

    def lr_tags(self) -> list[str]:
        return [f"{lr:g}" for lr in self.lr_grid]

    def gen_kw(self) -> dict[str, Any]:
        return {"template": self.template, "max_new_tokens": int(self.generation.get("max_new_tokens", 512)),
                "batch_size": int(self.generation.get("batch_size", 16)), "max_length": self.finetune.max_length}


def dataclasses_fields(cls):
    import dataclasses

    return dataclasses.fields(cls)


def prepare_data(s: LLMSettings, train_out, query_out, pretrain_out=None) -> dict[str, int]:
    """Write the training and query sets (and the miniature's pre-training corpus) as jsonl."""
    from . import textdata

    if s.task == "synthetic":
        syn = dict(s.data.get("synthetic", {}))
        pre_n = int(syn.pop("pretrain_n", 4000))
        task = textdata.synthetic_task(**syn)
        train, query = task["train"], task["query"]
        if pretrain_out is not None:
            textdata.write_jsonl(pretrain_out, textdata.pretrain_corpus(pre_n, max_operand=syn.get("max_operand", 9),
                                                                        seed=syn.get("seed", 0)))
    else:
        names = TASK_DATA[s.task]
        spec = {k: dict(s.data.get(k, {})) for k in ("train", "query")}
        train = textdata.load_task(spec["train"].get("name", names[0]), source=spec["train"].get("source"),
                                   n=int(spec["train"].get("n", 0)), seed=int(spec["train"].get("seed", 0)))
        query = textdata.load_task(spec["query"].get("name", names[1]), source=spec["query"].get("source"),
                                   n=int(spec["query"].get("n", 0)), seed=int(spec["query"].get("seed", 0)))
        if pretrain_out is not None:
            textdata.write_jsonl(pretrain_out, [])
    textdata.write_jsonl(train_out, train)
    textdata.write_jsonl(query_out, query)
    return {"n_train": len(train), "n_query": len(query)}


def pretrain_tiny(s: LLMSettings, pretrain_jsonl, texts_jsonl: Sequence, out_dir) -> dict[str, Any]:
    """The miniature's base model: a tokenizer trained on all task text, a tiny LM pre-trained."""
    from . import textdata, tinylm

    t = dict(s.tiny)
    corpus = textdata.read_jsonl(pretrain_jsonl)
    texts = [e["prompt"] + e["response"] for p in [pretrain_jsonl, *texts_jsonl] for e in textdata.read_jsonl(p)]
    tok = tinylm.train_tokenizer(texts, vocab_size=int(t.get("vocab_size", 300)))
    pre = dict(t.get("pretrain", {}))
    model, info = tinylm.pretrain(
        tok, corpus, arch=t.get("arch", "llama"), hidden_size=int(t.get("hidden_size", 64)),
        num_layers=int(t.get("num_layers", 2)), num_heads=int(t.get("num_heads", 4)),
        max_position_embeddings=int(t.get("max_position_embeddings", 64)),
        epochs=int(pre.get("epochs", 15)), batch_size=int(pre.get("batch_size", 64)),
        lr=float(pre.get("lr", 3e-3)), seed=int(pre.get("seed", 0)))
    held = textdata.pretrain_corpus(200, seed=int(pre.get("seed", 0)) + 1000)
    correct, _ = evaluate_answers(model, tok, "synthetic", held, max_new_tokens=4, batch_size=64, max_length=64)
    info["heldout_accuracy"] = float(correct.mean())
    save_model(model, tok, out_dir)
    return info


def _load(path: str, s: LLMSettings, device):
    tok = load_tokenizer(path)
    model = load_causal_lm(path, dtype=s.dtype, device=device)
    return model, tok


def _device(config: dict[str, Any]):
    from .utils import pick_device

    return pick_device(config.get("device", "auto"))


def full_models(s: LLMSettings, base: str, train_jsonl, query_jsonl, theta0_dir, eval_out, queries_out,
                device) -> dict[str, Any]:
    """theta_0 and its seed siblings: full fine-tunes on the whole training set (Appendix C).

    Seed 0 is saved as theta_0. Each seed answers every query greedily; the queries correct in all
    seeds are kept, split into selection and test parts (the selection part judges the LoRA
    learning rate when the grid has several values). The query targets for the losses are the
    reference responses or theta_0's own (correct) generations (``query_target``).
    """
    from . import removal, textdata

    train, query = textdata.read_jsonl(train_jsonl), textdata.read_jsonl(query_jsonl)
    correct, logs, responses0 = [], [], None
    for seed in range(s.seeds):
        model, tok = _load(base, s, device)
        enc = encode_examples(tok, train, max_length=s.finetune.max_length, template=s.template)
        logs.append(finetune(model, enc, s.finetune, pad_id=_pad_id(tok), seed=seed, desc=f"full fine-tune seed {seed}"))
        c, resp = evaluate_answers(model, tok, s.task, query, **s.gen_kw())
        correct.append(c)
        log.info("full-data model, seed %d: %.3f of %d queries correct", seed, c.mean(), len(query))
        if seed == 0:
            save_model(model, tok, theta0_dir)
            responses0 = resp
        del model
    correct = np.stack(correct)
    selected = removal.select_queries(correct)
    frac = float(s.select.get("fraction", 0.3)) if len(s.lr_grid) > 1 else 0.0
    sel_q, test_q = removal.split_queries(selected, frac, int(s.removal.get("seed", 0)))
    ids = np.array([q["id"] for q in query])
    out_q = []
    for q, r in zip(query, responses0):
        q = dict(q)
        q["generated"] = r
        if s.query_target == "generated":
            q["response"] = r
        out_q.append(q)
    textdata.write_jsonl(queries_out, out_q)
    info = {"accuracy": correct.mean(axis=1).tolist(), "correct": correct.astype(int).tolist(),
            "selected": ids[selected].tolist(), "select_queries": ids[sel_q].tolist(),
            "test_queries": ids[test_q].tolist(), "fits": logs, "n_train": len(train)}
    from .store import atomic_path

    with atomic_path(eval_out, suffix=".json.tmp") as tmp:
        Path(tmp).write_text(json.dumps(info, indent=1))
    return info


def daunce_chunk(s: LLMSettings, theta0_dir, train_jsonl, queries_jsonl, lr: float, chunk: int, out_h5,
                 device) -> None:
    """LoRA perturbed fits of chunk ``chunk`` (models ``chunk*chunk_size ..``) at ``lr``; a losses file."""
    import dataclasses as dc

    from . import store, textdata

    train, query = textdata.read_jsonl(train_jsonl), textdata.read_jsonl(queries_jsonl)
    model, tok = _load(str(theta0_dir), s, device)
    cfg = dc.replace(s.daunce, lr=float(lr), max_length=s.finetune.max_length)
    tr_enc = encode_examples(tok, train, max_length=cfg.max_length, template=s.template)
    q_enc = encode_examples(tok, query, max_length=cfg.max_length, template=s.template)
    ks = list(range(chunk * s.chunk_size, min(s.K, (chunk + 1) * s.chunk_size)))
    attrs = {"variant": cfg.variant, "signal": objectives.signal_of(cfg.variant), "seed": cfg.seed,
             "config": {**asdict(cfg), "lr": float(lr)}}
    try:
        tr, qu = perturbed_losses(model, tr_enc, q_enc, ks, cfg, pad_id=_pad_id(tok), device=device)
    except FloatingPointError as exc:
        store.write_diverged(out_h5, attrs, str(exc))
        return
    store.write_losses(out_h5, store.Losses(tr, qu, np.array(ks), np.array([e["id"] for e in train]),
                                            np.array([e["id"] for e in query]), attrs))


def _retrainer(s: LLMSettings, base: str, train: list, queries: list, device):
    """``retrain(keep, seed) -> correct`` for the removal harness: full fine-tune from ``base``."""
    def retrain(keep: np.ndarray, seed: int) -> np.ndarray:
        model, tok = _load(base, s, device)
        enc = encode_examples(tok, [train[i] for i in keep], max_length=s.finetune.max_length, template=s.template)
        finetune(model, enc, s.finetune, pad_id=_pad_id(tok), seed=seed, desc=f"retrain seed {seed}")
        correct, _ = evaluate_answers(model, tok, s.task, queries, **s.gen_kw())
        return correct

    return retrain


def _json(path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def select_lr(s: LLMSettings, losses_paths: Sequence, lrs: Sequence[str], eval_json, base: str, train_jsonl,
              queries_jsonl, out_losses, out_json, device) -> dict[str, Any]:
    """Pick the LoRA learning rate whose scores remove the most *selection* queries' answers.

    For every lr of the grid: rank by summed scores over the selection queries (disjoint from the
    reported test queries), remove the top ``select.N``, retrain with seed 0, count the selection
    queries now wrong. Diverged fits are skipped. With a one-value grid nothing is retrained.
    """
    import shutil

    from . import removal, scoring, store, textdata

    ev = _json(eval_json)
    ok = [(lr, p) for lr, p in zip(lrs, losses_paths) if not store.is_diverged(p)]
    if not ok:
        raise store.StoreError(f"every learning rate of {list(lrs)} diverged; lower llm.daunce.lr_grid")
    results = {}
    if len(ok) > 1 and ev["select_queries"]:
        train, queries = textdata.read_jsonl(train_jsonl), textdata.read_jsonl(queries_jsonl)
        pos = {q["id"]: j for j, q in enumerate(queries)}
        sel_cols = [pos[i] for i in ev["select_queries"]]
        retrain = _retrainer(s, base, train, [queries[j] for j in sel_cols], device)
        N = min(int(s.select.get("N", 500)), len(train) - 1)
        for lr, p in ok:
            L = store.read_losses(p)
            rank = removal.ranking_from_scores(scoring.pairwise_scores(L.train, L.query, s.measure), sel_cols)
            results[lr] = removal.removal_effect(rank, N, [0], retrain)["mean"]
            log.info("lr %s: %.3f of the selection queries wrong after removing %d", lr, results[lr], N)
        best = max(results, key=lambda k: (results[k], -float(k)))
    else:
        best = ok[0][0]
    with store.atomic_path(out_losses, suffix=".h5.tmp") as tmp:
        shutil.copyfile(dict(ok)[best], tmp)
    info = {"lr": best, "criterion": "share of selection queries wrong after removing select.N (seed 0)",
            "results": results, "diverged": [lr for lr in lrs if lr not in dict(ok)]}
    from .store import atomic_path

    with atomic_path(out_json, suffix=".json.tmp") as tmp:
        Path(tmp).write_text(json.dumps(info, indent=1))
    return info


def logra_scores_file(s: LLMSettings, theta0_dir, train_jsonl, queries_jsonl, out, device) -> None:
    """LoGra (dattri) scores of theta_0 in the common scores layout."""
    from . import store, textdata
    from .baselines.logra_llm import logra_scores

    train, query = textdata.read_jsonl(train_jsonl), textdata.read_jsonl(queries_jsonl)
    model, tok = _load(str(theta0_dir), s, device)
    tr = encode_examples(tok, train, max_length=s.finetune.max_length, template=s.template)
    qu = encode_examples(tok, query, max_length=s.finetune.max_length, template=s.template)
    cfg = dict(s.logra)
    S = logra_scores(model, tr, qu, pad_id=_pad_id(tok), proj_dim=int(cfg.get("proj_dim", 4096)),
                     damping=cfg.get("damping"), hessian=cfg.get("hessian", "eFIM"),
                     batch_size=int(cfg.get("batch_size", 8)), device=device)
    store.write_scores(out, train_ids=np.array([e["id"] for e in train]), query_ids=np.array([e["id"] for e in query]),
                       scores=S, attrs={"method": "logra", "measure": "influence", "threshold": "none",
                                        "lambda": 0.0, "proj_dim": int(cfg.get("proj_dim", 4096))})


def removal_job(s: LLMSettings, method: str, N: int, scores_path, base: str, train_jsonl, queries_jsonl,
                eval_json, out, device) -> dict[str, Any]:
    """One point of Figure 2: remove method's top N, retrain for every seed, share of test queries wrong."""
    from . import removal, textdata

    ev = _json(eval_json)
    train, queries = textdata.read_jsonl(train_jsonl), textdata.read_jsonl(queries_jsonl)
    test_ids = ev["test_queries"]
    if method == "random":
        ranking = removal.random_ranking(len(train), int(s.removal.get("seed", 0)))
    else:
        ranking = removal.ranking_from_file(scores_path, test_ids)
    pos = {q["id"]: j for j, q in enumerate(queries)}
    retrain = _retrainer(s, base, train, [queries[pos[i]] for i in test_ids], device)
    res = removal.removal_effect(ranking, int(N), list(range(s.seeds)), retrain)
    removal.write_result(out, res, method=method, queries=len(test_ids), n_train=len(train))
    return res
