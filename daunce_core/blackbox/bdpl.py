"""Strict black-box access (Section 5): each perturbed "model" is a discrete prompt learned by BDPL.

Black-box Discrete Prompt Learning (Diao et al., 2023) learns categorical distributions over
candidate n-grams per prompt position on ``D^k`` alone, from the endpoint's log-probabilities, by
a variance-reduced policy gradient (BDPL, eq. 7) of the Table 2 objective with Adam steps
projected onto the simplex; it checkpoints after every epoch. :class:`daunce_core.fit.bdpl.BDPLFitter`
calls it. The estimator, the steps and resuming:
docs/design.md#daunce_coreblackboxbdplpy-black-box-discrete-prompt-learning."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import re
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from ..objectives import perturbed_objective, signal_of
from ..store import atomic_path
from .client import APIClient
from .config import BDPLConfig, LogprobConfig
from .logprobs import score_target

log = logging.getLogger(__name__)

_WORD = re.compile(r"[A-Za-z][A-Za-z'-]*")


def candidate_ngrams(texts: Sequence[str], size: int, *, max_n: int = 2, min_count: int = 2,
                     exclude: Sequence[str] = ()) -> list[str]:
    """``size`` prompt candidates from ``texts``: unigrams and bigrams ranked by frequency and PMI.

    A unigram scores ``log count``; a bigram ``log count + PMI`` with
    ``PMI = log(c(ab) N / (c(a) c(b)))`` -- frequent words and strongly associated word pairs, as
    BDPL's n-gram vocabulary. Words in ``exclude`` (case-insensitive) never appear.
    """
    bad = {w.lower() for w in exclude}
    uni: Counter = Counter()
    bi: Counter = Counter()
    for t in texts:
        words = [w.lower() for w in _WORD.findall(t)]
        uni.update(w for w in words if w not in bad)
        if max_n >= 2:
            bi.update((a, b) for a, b in zip(words, words[1:]) if a not in bad and b not in bad)
    N = max(1, sum(uni.values()))
    scored: list[tuple[float, str]] = []
    for w, c in uni.items():
        if c >= min_count:
            scored.append((math.log(c), w))
    for (a, b), c in bi.items():
        if c >= min_count:
            scored.append((math.log(c) + math.log(c * N / (uni[a] * uni[b])), f"{a} {b}"))
    scored.sort(key=lambda x: (-x[0], x[1]))
    out = [s for _, s in scored[:size]]
    if len(out) < size:
        raise ValueError(f"only {len(out)} prompt candidates in the training prompts; lower bdpl.search_space")
    return out


def project_simplex(p: torch.Tensor) -> torch.Tensor:
    """Euclidean projection of each row of ``p`` onto the probability simplex (in place)."""
    n = p.shape[-1]
    u, _ = torch.sort(p, dim=-1, descending=True)
    css = u.cumsum(-1) - 1.0
    idx = torch.arange(1, n + 1, dtype=p.dtype, device=p.device)
    cond = u - css / idx > 0
    rho = cond.to(p.dtype).cumsum(-1).argmax(-1, keepdim=True)  # last index where cond holds
    theta = css.gather(-1, rho) / (rho + 1).to(p.dtype)
    p.copy_((p - theta).clamp_min(0.0))
    return p


def argmax_random_ties(p: np.ndarray, rng: np.random.Generator, tol: float = 1e-12) -> np.ndarray:
    """Most likely candidate of each position; ties (e.g. positions never updated) broken at random."""
    out = np.empty(p.shape[0], np.int64)
    for i, row in enumerate(p):
        best = np.flatnonzero(row >= row.max() - tol)
        out[i] = best[rng.integers(best.size)]
    return out


def with_prompt(messages: Sequence[dict], prompt: str, placement: str = "prefix") -> list[dict]:
    """``messages`` with the discrete prompt prepended to the user turn (or as a system message)."""
    msgs = [dict(m) for m in messages]
    if not prompt:
        return msgs
    if placement == "system":
        return [{"role": "system", "content": prompt}] + msgs
    for m in msgs:
        if m["role"] == "user":
            m["content"] = f"{prompt}\n{m['content']}"
            break
    return msgs


def margin_from_nll(nll: np.ndarray | float) -> np.ndarray:
    """TRAK's margin ``log p / (1 - p)`` of a sequence with NLL ``L`` (``p = exp(-L)``), clipped."""
    L = np.maximum(np.asarray(nll, float), 1e-12)
    return -L - np.log(-np.expm1(-L))


class BDPL:
    """Learns the discrete prompt of one perturbed model against a chat completions endpoint.

    ``settings`` is the ``blackbox.bdpl`` section (its ``search_space`` and ``exclude`` shaped
    ``candidates``; the rest drive :meth:`fit`), ``logprobs`` the ``blackbox.logprobs`` section.
    """

    def __init__(self, client: APIClient, model: str, candidates: Sequence[str], settings: BDPLConfig,
                 logprobs: LogprobConfig, variant: str = "daunce_bb"):
        if settings.sample_size < 2:
            raise ValueError("BDPL needs sample_size >= 2")
        self.c, self.model, self.cands = client, model, list(candidates)
        self.s, self.lp, self.variant = settings, logprobs, variant
        self.signal = signal_of(variant)

    def prompt_text(self, idx: Sequence[int]) -> str:
        return " ".join(self.cands[int(i)] for i in idx)

    def nll(self, rows: Sequence[dict], prompts: Sequence[str], pool: ThreadPoolExecutor | None = None) -> np.ndarray:
        """NLL of each row's target under each prompt: [len(prompts), len(rows)] (concurrent requests)."""
        pairs = [(p, r) for p in prompts for r in rows]

        def one(pr: tuple[str, dict]) -> float:
            p, r = pr
            return score_target(self.c, self.model, with_prompt(r["messages"], p, self.s.placement),
                                r["target"], self.lp).nll
        vals = list(pool.map(one, pairs)) if pool is not None else [one(pr) for pr in pairs]
        return np.asarray(vals, float).reshape(len(prompts), len(rows))

    def signal_of_nll(self, nll: np.ndarray) -> np.ndarray:
        return nll if self.signal == "loss" else margin_from_nll(nll)

    def objective(self, nll: np.ndarray) -> float:
        s = torch.as_tensor(self.signal_of_nll(nll), dtype=torch.float64)
        return float(perturbed_objective(self.variant, s).mean())

    def checkpoint_key(self, rows: Sequence[dict], seed: int, k: int) -> str:
        """A hash of what the learning state of model k depends on: the model, the candidates, the
        settings (but ``exclude``, whose effect is in the candidates), the logprob settings (but
        ``concurrency``), the variant, the seed, ``k`` and every row of ``D^k``, in order."""
        settings = {n: v for n, v in dataclasses.asdict(self.s).items() if n != "exclude"}
        lp = {n: v for n, v in dataclasses.asdict(self.lp).items() if n != "concurrency"}
        blob = json.dumps({"model": self.model, "candidates": self.cands, "bdpl": settings, "logprobs": lp,
                           "variant": self.variant, "seed": int(seed), "k": int(k),
                           "rows": [[r["messages"], r["target"]] for r in rows]}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()

    def fit(self, rows: Sequence[dict], seed: int, k: int, checkpoint: Path | None = None,
            progress: Callable[[int], None] | None = None) -> tuple[np.ndarray, list[float]]:
        """Learn the prompt on ``rows`` (= D^k); returns (argmax candidate indices, mean objective per epoch)."""
        s = self.s
        L, N = s.prompt_length, len(self.cands)
        probs = torch.full((L, N), 1.0 / N, dtype=torch.float64)
        probs.requires_grad_(True)
        opt = torch.optim.Adam([probs], lr=s.lr)
        start, history = 0, []
        key = self.checkpoint_key(rows, seed, k)
        if checkpoint is not None and checkpoint.exists():
            ck = torch.load(checkpoint, weights_only=False)
            if ck.get("key") != key:
                log.warning("model %d: %s was written for other rows or settings; learning the prompt afresh "
                            "(it is replaced after the first epoch)", k, checkpoint)
            else:
                with torch.no_grad():
                    probs.copy_(ck["probs"])
                opt.load_state_dict(ck["opt"])
                start, history = int(ck["epoch"]), list(ck["history"])
                log.info("model %d: resuming BDPL after epoch %d", k, start)
        with ThreadPoolExecutor(max_workers=max(1, self.lp.concurrency)) as pool:
            for epoch in range(start, s.epochs):
                rng = np.random.default_rng([int(seed), int(k), 3, epoch])
                order = rng.permutation(len(rows))
                objs = []
                for b in range(0, len(order), s.batch_size):
                    batch = [rows[i] for i in order[b:b + s.batch_size]]
                    P = probs.detach().numpy()
                    # inverse-CDF sampling of every position at once: [I, L]
                    u = rng.random((s.sample_size, L, 1))
                    samples = (P.cumsum(-1)[None] < u).sum(-1).clip(0, N - 1)
                    nll = self.nll(batch, [self.prompt_text(smp) for smp in samples], pool)
                    F = np.array([self.objective(row) for row in nll])
                    grad = torch.zeros_like(probs)
                    adv = (F - F.mean()) / (s.sample_size - 1)
                    rows_idx = torch.arange(L)
                    for smp, a in zip(samples, adv):
                        j = torch.as_tensor(smp)
                        grad[rows_idx, j] += a / probs.detach()[rows_idx, j].clamp_min(1e-12)
                    opt.zero_grad()
                    probs.grad = grad
                    torch.nn.utils.clip_grad_norm_([probs], s.grad_clip)
                    opt.step()
                    with torch.no_grad():
                        project_simplex(probs)
                    objs.append(float(F.mean()))
                    if progress is not None:
                        progress(len(batch))
                history.append(float(np.mean(objs)) if objs else float("nan"))
                if checkpoint is not None:
                    with atomic_path(checkpoint, suffix=".pt.tmp") as tmp:
                        torch.save({"probs": probs.detach().clone(), "opt": opt.state_dict(), "epoch": epoch + 1,
                                    "history": history, "key": key}, tmp)
        return argmax_random_ties(probs.detach().numpy(), np.random.default_rng([int(seed), int(k), 5])), history
