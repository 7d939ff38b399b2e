"""Per-example token-level NLL of a given target, from a chat completions endpoint's logprobs.

The chat completions API has no teacher forcing, so :func:`score_target` walks one greedy reply
against the target: exact while the reply follows the target, the divergence token's logprob (or,
when it is missing from ``top_logprobs``, the bound ``min(p_N, 1 - sum p)``) at the first
difference, nothing after it -- a lower bound dominated by the token where a wrong reply's loss
concentrates. The black-box fitters call it for every example and model. The steps, the bound and
the reply budget: docs/design.md#daunce_coreblackboxlogprobspy-a-targets-nll-from-logprobs."""
from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from .client import APIClient
from .config import LogprobConfig

log = logging.getLogger(__name__)

# a reply cut off while still following the target is asked again with twice the budget, at most
# this many times: budget_for() already allows ~1 token per 2 bytes, so two doublings cover any BPE
MAX_BUDGET_DOUBLINGS = 2


@dataclass
class TargetScore:
    nll: float  # estimate of -log p(target | conversation), natural log
    n_tokens: int  # target tokens whose logprob was read
    exact: bool  # the greedy reply reproduced the whole target: nll is the teacher-forced value
    missing: bool  # the divergence token was not among the top logprobs (bound used)
    complete: bool  # every byte of the target was scored


def _bytes_of(entry: Any) -> bytes:
    b = entry.get("bytes") if isinstance(entry, dict) else getattr(entry, "bytes", None)
    if b is not None:
        return bytes(b)
    tok = entry.get("token") if isinstance(entry, dict) else entry.token
    return (tok or "").encode("utf-8")


def _lp(entry: Any) -> float:
    return float(entry["logprob"] if isinstance(entry, dict) else entry.logprob)


def _top(entry: Any) -> list:
    t = entry.get("top_logprobs") if isinstance(entry, dict) else getattr(entry, "top_logprobs", None)
    return list(t or [])


def missing_logprob(top: Sequence[Any], floor: float) -> float:
    """Upper bound on the logprob of a token absent from ``top``: ``log min(p_N, 1 - sum p)``."""
    if not top:
        return floor
    p = [math.exp(_lp(t)) for t in top]
    bound = min(min(p), max(0.0, 1.0 - sum(p)))
    return max(math.log(bound), floor) if bound > 0 else floor


def walk_target(content: Sequence[Any], target: str, floor: float) -> tuple[TargetScore, bool]:
    """Score ``target`` against a reply's logprob entries (steps 1-3 of the logprobs section of docs/design.md).

    Returns the score and whether the reply ran out while still following the target (the caller
    may ask again with a longer budget).
    """
    tgt = target.encode("utf-8")
    pos, nll, n = 0, 0.0, 0
    if not tgt:
        return TargetScore(0.0, 0, True, False, True), False
    for entry in content:
        piece, rest = _bytes_of(entry), tgt[pos:]
        if piece and rest.startswith(piece):
            nll -= _lp(entry)
            pos += len(piece)
            n += 1
            if pos == len(tgt):
                return TargetScore(nll, n, True, False, True), False
            continue
        cands = [(_lp(a), _bytes_of(a)) for a in _top(entry)]
        cands = [(lp, b) for lp, b in cands if b and rest.startswith(b)]
        if cands:
            lp, b = max(cands, key=lambda c: c[0])
            pos += len(b)
            return TargetScore(nll - lp, n + 1, False, False, pos == len(tgt)), False
        return TargetScore(nll - missing_logprob(_top(entry), floor), n + 1, False, True, False), False
    return TargetScore(nll, n, False, False, False), True


def budget_for(target: str, extra: int) -> int:
    """Reply tokens to ask for: generous for any BPE (about one token per 2 bytes) plus ``extra``."""
    return max(1, math.ceil(len(target.encode("utf-8")) / 2) + extra)


def score_target(client: APIClient, model: str, messages: Sequence[dict], target: str,
                 settings: LogprobConfig | None = None) -> TargetScore:
    """NLL of ``target`` as the assistant reply to ``messages`` under ``model`` (one request, usually)."""
    s = settings or LogprobConfig()
    budget = budget_for(target, s.extra_tokens)
    for _ in range(MAX_BUDGET_DOUBLINGS + 1):
        kw: dict[str, Any] = dict(model=model, messages=list(messages), temperature=0, logprobs=True,
                                  top_logprobs=s.top_logprobs, max_completion_tokens=budget, n=1)
        if s.seed is not None:
            kw["seed"] = s.seed
        resp = client.chat(**kw)
        choice = resp.choices[0]
        content = (choice.logprobs.content if choice.logprobs is not None else None) or []
        score, ran_out = walk_target(content, target, s.missing_floor)
        if not ran_out:
            return score
        if choice.finish_reason != "length":  # the reply ended before the target did
            return TargetScore(score.nll - s.missing_floor, score.n_tokens + 1, False, True, False)
        budget *= 2
    return score


@dataclass
class ScoredSet:
    nll: np.ndarray  # [N] float64
    exact: np.ndarray  # [N] bool
    missing: np.ndarray  # [N] bool

    def summary(self) -> dict:
        return {"n": int(self.nll.size), "exact": int(self.exact.sum()), "missing": int(self.missing.sum())}


def score_many(client: APIClient, model: str, items: Sequence[tuple[Sequence[dict], str]],
               settings: LogprobConfig | None = None,
               progress: Callable[[int], None] | None = None) -> ScoredSet:
    """:func:`score_target` over ``(messages, target)`` pairs, ``settings.concurrency`` at a time."""
    s = settings or LogprobConfig()
    N = len(items)
    nll, exact, missing = np.zeros(N), np.zeros(N, bool), np.zeros(N, bool)
    lock = threading.Lock()

    def one(i: int) -> None:
        sc = score_target(client, model, items[i][0], items[i][1], s)
        nll[i], exact[i], missing[i] = sc.nll, sc.exact, sc.missing
        if progress is not None:
            with lock:
                progress(1)

    if s.concurrency <= 1:
        for i in range(N):
            one(i)
    else:
        with ThreadPoolExecutor(max_workers=s.concurrency) as ex:
            for f in [ex.submit(one, i) for i in range(N)]:
                f.result()
    return ScoredSet(nll, exact, missing)
