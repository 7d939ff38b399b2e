"""DAUNCE's perturbed models as LoRA adapters on a causal LM (Section 4.2, Appendix C).

:class:`LoraFitter` implements the fitter contract (:mod:`daunce_core.fit.contract`): each
perturbed model ``k`` is a fresh LoRA adapter on theta_0 trained on the perturbed objective of
Table 1 (equation 5), its signal every example's mean response-token NLL (or margin for
``daunce_t``); each fit also logs Figure 3's terms. The LLM steps and :mod:`daunce_core.api`
(for :class:`~daunce_core.task.LMTask`) use it. The theta_0 logits, the trace and reproducibility:
docs/design.md#daunce_corefitlmpy-lora-perturbed-fits."""
from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence
from typing import Any

import h5py
import numpy as np
import torch

from .. import objectives, perturb
from ..lm import distributed, sequences
from ..lm.settings import LoraFitConfig
from ..lm.training import lr_lambda, micro_batches, torch_seed, warmup_steps
from .contract import Signals

log = logging.getLogger(__name__)

__all__ = ["LoraFitter", "perturbed_fit", "perturbed_losses", "TRACE_TERMS", "write_trace", "read_trace"]

# The terms of the perturbed objective logged per step (Figure 3).
TRACE_TERMS = ("total", "erm", "first_order")


def _lora_config(cfg: LoraFitConfig):
    from peft import LoraConfig

    return LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                      target_modules=cfg.target_modules, bias="none", task_type="CAUSAL_LM")


def perturbed_fit(base_model, train_enc: Sequence[dict], k: int, cfg: LoraFitConfig, *, pad_id: int,
                  device=None, eval_sets: Sequence[Sequence[dict]] = (),
                  trace: dict[str, np.ndarray] | None = None) -> list[np.ndarray]:
    """Fit perturbed model ``k`` (a fresh LoRA adapter on theta_0) and record its signals.

    Algorithm 1: subset ``D^k`` and ``xi^k`` from ``perturb.subset_and_xi(seed, k, n, ratio)``;
    ``cfg.steps`` AdamW steps of ``cfg.batch_size`` examples drawn from ``D^k`` in the order of
    ``perturb.batch_order((seed, k), ...)``, on the perturbed objective of ``cfg.variant`` with
    theta_0's logits from the same model with its adapter disabled. Then the signal (loss or
    margin) of every example of each of ``eval_sets``. When ``trace`` is a dict it receives, per
    step, the batch mean of each of :data:`TRACE_TERMS` (``total = erm + first_order``), [steps].

    ``base_model`` is returned to its original state (adapter removed, weights untouched).
    Returns one float32 array per evaluation set.
    """
    from peft import get_peft_model

    device = device or next(base_model.parameters()).device
    objectives.check_variant(cfg.variant)
    if objectives.is_matched(cfg.variant):
        raise ValueError("variant daunce_m (labels drawn from theta_0) is implemented for classifiers; "
                         "choose daunce, daunce_e or daunce_t for the LoRA fits")
    signal = objectives.signal_of(cfg.variant)
    n = len(train_enc)
    subset, xi = perturb.subset_and_xi(cfg.seed, k, n, cfg.ratio)
    bs = min(cfg.batch_size, len(subset))
    per_epoch = len(subset) // bs
    order = perturb.batch_order((cfg.seed, k), subset, math.ceil(cfg.steps / per_epoch), bs)[: cfg.steps]
    xi_t = torch.as_tensor(xi, dtype=torch.float32)

    for p in base_model.parameters():
        p.requires_grad_(False)
    torch.manual_seed(torch_seed(cfg.seed, k))
    model = get_peft_model(base_model, _lora_config(cfg))
    try:
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        warm = warmup_steps(cfg.warmup_ratio, cfg.steps)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.schedule, cfg.steps, warm))
        model.train()
        logged = []  # per step: the batch sums of (erm, first_order), kept on the device until the end
        for idx in order:
            sums = torch.zeros(2, device=device)
            opt.zero_grad(set_to_none=True)
            for mb in micro_batches(idx, cfg.micro_batch_size):
                batch = sequences.to_device(sequences.collate([train_enc[i] for i in mb], pad_id), device)
                inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
                logits0 = None
                if not objectives.is_black_box(cfg.variant):
                    with torch.no_grad(), model.disable_adapter():
                        logits0 = model(**inputs).logits
                logits = model(**inputs).logits
                obj, erm, first = sequences.sequence_objective_terms(
                    cfg.variant, logits, batch["labels"], logits0=logits0,
                    xi=xi_t[torch.as_tensor(mb)].to(device), rho=cfg.rho, gamma=cfg.gamma)
                (obj.sum() / len(idx)).backward()
                sums += torch.stack([erm.detach().sum(), first.detach().sum()]) / len(idx)
                del logits, logits0
            opt.step()
            sched.step()
            logged.append(sums)
        if trace is not None:
            erm_s, first_s = torch.stack(logged).double().cpu().numpy().T if logged else (np.zeros(0),) * 2
            trace.update(total=erm_s + first_s, erm=erm_s, first_order=first_s)
        return [sequences.per_example_signal(model, es, pad_id=pad_id, signal=signal,
                                             batch_size=cfg.eval_batch_size, device=device) for es in eval_sets]
    finally:
        model.unload()


class LoraFitter:
    """The fitter contract for LoRA on a causal LM: theta_0, the encoded examples and the fit.

    Args:
        model: theta_0, a ``transformers`` causal LM (its weights are never changed).
        train_enc / query_enc: examples from :func:`daunce_core.lm.sequences.encode_examples`.
        cfg: the LoRA fit; ``fit`` overrides its learning rate.
        pad_id: padding token id.
        train_ids / query_ids: the examples' ids (default ``0..n-1``, ``0..m-1``).
    """

    def __init__(self, model, train_enc: Sequence[dict], query_enc: Sequence[dict], cfg: LoraFitConfig, *,
                 pad_id: int, device=None, train_ids=None, query_ids=None) -> None:
        objectives.check_variant(cfg.variant)
        self.model, self.train_enc, self.query_enc, self.cfg = model, train_enc, query_enc, cfg
        self.pad_id, self.device = pad_id, device
        self.train_ids = np.arange(len(train_enc)) if train_ids is None else np.asarray(train_ids)
        self.query_ids = np.arange(len(query_enc)) if query_ids is None else np.asarray(query_ids)

    @property
    def variant(self) -> str:
        return self.cfg.variant

    def attrs(self, lr: float) -> dict[str, Any]:
        """What a losses file records of the fit (the keys ``store.concat_losses`` guards)."""
        cfg = dataclasses.replace(self.cfg, lr=float(lr))
        return {"variant": cfg.variant, "signal": objectives.signal_of(cfg.variant), "seed": cfg.seed,
                "config": {**dataclasses.asdict(cfg), "lr": float(lr)}}

    def fit(self, ks: Sequence[int], lr: float) -> Signals | None:
        """Fit perturbed models ``ks`` at ``lr``: response signals of train [K, n] and queries [K, m].

        After the first model whose signals are not finite the chunk is lost (it will be recorded
        as diverged), so the remaining models are not fitted and their rows stay NaN.

        Under torchrun the models are split, not sharded (a LoRA fit is small): rank ``r`` fits
        ``ks[r::world]`` on its own device, and rank 0 gathers the rows into the order of ``ks``
        and returns the Signals; the other ranks return None (the fitter contract). Each model
        is the same as in one process (its randomness is keyed by ``(seed, k)``); after a
        divergence each rank stops its own share.
        """
        cfg = dataclasses.replace(self.cfg, lr=float(lr))
        rank, world_size = distributed.world()
        if world_size == 1:
            tr, qu, trace = self._fit_rows(ks, cfg)
        else:
            parts = distributed.gather_rows(self._fit_rows(list(ks)[rank::world_size], cfg))
            if rank != 0:
                return None
            tr = np.full((len(ks), len(self.train_enc)), np.nan, np.float32)
            qu = np.full((len(ks), len(self.query_enc)), np.nan, np.float32)
            trace = {"step": parts[0][2]["step"], **{t: np.full((len(ks), cfg.steps), np.nan) for t in TRACE_TERMS}}
            for r, (tr_r, qu_r, trace_r) in enumerate(parts):
                tr[r::world_size], qu[r::world_size] = tr_r, qu_r
                for t in TRACE_TERMS:
                    trace[t][r::world_size] = trace_r[t]
        return Signals(tr, qu, np.asarray(ks, np.int64), self.train_ids, self.query_ids,
                       signal=objectives.signal_of(cfg.variant), attrs=self.attrs(lr), trace=trace)

    def _fit_rows(self, ks: Sequence[int], cfg: LoraFitConfig):
        """(train [K, n], query [K, m], trace) of models ``ks`` fitted one after the other."""
        from tqdm.auto import tqdm

        tr = np.full((len(ks), len(self.train_enc)), np.nan, np.float32)
        qu = np.full((len(ks), len(self.query_enc)), np.nan, np.float32)
        trace = {"step": np.arange(1, cfg.steps + 1)}
        trace.update({t: np.full((len(ks), cfg.steps), np.nan) for t in TRACE_TERMS})
        for row, k in enumerate(tqdm(ks, desc=f"LoRA fits ({cfg.variant}, lr {cfg.lr:g})", disable=None)):
            terms: dict[str, np.ndarray] = {}
            tr[row], qu[row] = perturbed_fit(self.model, self.train_enc, int(k), cfg, pad_id=self.pad_id,
                                             device=self.device, eval_sets=(self.train_enc, self.query_enc),
                                             trace=terms)
            for t in TRACE_TERMS:
                trace[t][row] = terms[t]
            if not (np.isfinite(tr[row]).all() and np.isfinite(qu[row]).all()):
                log.warning("perturbed model k=%d diverged at lr %g (non-finite losses)", k, cfg.lr)
                break
        return tr, qu, trace


def perturbed_losses(base_model, train_enc: Sequence[dict], query_enc: Sequence[dict], ks: Sequence[int],
                     cfg: LoraFitConfig, *, pad_id: int, device=None) -> tuple[np.ndarray, np.ndarray]:
    """Signals of every training and query example under perturbed models ``ks``: ([K, n], [K, m]).

    Raises:
        FloatingPointError: a model's signals are not finite (the learning rate is too large).
    """
    sig = LoraFitter(base_model, train_enc, query_enc, cfg, pad_id=pad_id, device=device).fit(ks, cfg.lr)
    if sig is None:
        raise RuntimeError("perturbed_losses runs in one process; under torchrun use LoraFitter.fit, whose "
                           "signals rank 0 receives")
    bad = sig.diverged()
    if bad.any():
        raise FloatingPointError(f"perturbed model k={int(sig.model_index[bad][0])} diverged at lr "
                                 f"{cfg.lr:g} (non-finite losses)")
    return sig.train, sig.query


def write_trace(path, signals: Signals) -> None:
    """Add ``signals.trace`` to the losses file ``path`` as a ``trace`` group (``step`` [S],
    ``model_index`` [K] and one [K, S] dataset per term of :data:`TRACE_TERMS`)."""
    if signals.trace is None:
        raise ValueError(f"{path}: these signals carry no trace (a fitter that logs none)")
    with h5py.File(path, "a") as f:
        if "trace" in f:
            del f["trace"]
        g = f.create_group("trace")
        g.create_dataset("model_index", data=np.asarray(signals.model_index, np.int64))
        for key, value in signals.trace.items():
            g.create_dataset(key, data=np.asarray(value))


def read_trace(paths) -> dict[str, np.ndarray]:
    """The per-step terms of one or more losses files (chunks of one setting), stacked along K:
    ``{"step": [S], "model_index": [K], "total"/"erm"/"first_order": [K, S]}``."""
    paths = [paths] if isinstance(paths, (str, bytes)) or hasattr(paths, "__fspath__") else list(paths)
    parts = []
    for p in paths:
        try:
            with h5py.File(p, "r") as f:
                if "trace" not in f:
                    raise KeyError("trace")
                parts.append({k: f["trace"][k][()] for k in f["trace"]})
        except (OSError, KeyError) as exc:
            raise ValueError(f"{p}: no per-step trace in this losses file ({exc}); rerun its "
                             "llm_daunce_chunk rule") from exc
    steps = parts[0]["step"]
    if any(not np.array_equal(q["step"], steps) for q in parts[1:]):
        raise ValueError(f"{paths}: the chunks' traces log different steps; they are not one setting")
    out = {"step": steps, "model_index": np.concatenate([q["model_index"] for q in parts])}
    for t in TRACE_TERMS:
        out[t] = np.concatenate([q[t] for q in parts], axis=0)
    return out
