"""The fitter for API-based black-box access (Section 5): perturbed model k is a fine-tuning job.

:class:`APIFitter` implements :class:`~.contract.Fitter` for a closed model behind an
OpenAI-compatible endpoint: for each ``k`` one fine-tuning job of theta_0 on ``D^k``
(:func:`daunce_core.blackbox.finetune.run_finetunes`), then every example's NLL under it from
chat-completion logprobs. An adapter over :mod:`daunce_core.blackbox`, called by
:func:`daunce_core.steps.blackbox.api_losses`. Why ``lr`` is checked, not applied, and how losses
are cached: docs/design.md#daunce_corefitendpointpy-the-api-based-fitter."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from ..blackbox.bdpl import margin_from_nll
from ..blackbox.client import APIClient
from ..blackbox.config import FinetuneConfig, LogprobConfig
from ..blackbox.finetune import FinetuneSpec, run_finetunes
from ..blackbox.logprobs import score_many
from ..blackbox.manifest import Manifest
from ..objectives import signal_of
from ..store import atomic_path
from .contract import Signals

log = logging.getLogger(__name__)

__all__ = ["APIFitter", "configured_lr", "cached_row", "save_row", "row_key", "job_seed"]


def configured_lr(hyperparameters: dict) -> float:
    """The ``learning_rate_multiplier`` of ``hyperparameters`` as ``fit``'s ``lr`` (NaN: ``"auto"``)."""
    mult = hyperparameters.get("learning_rate_multiplier", "auto")
    return float("nan") if mult == "auto" else float(mult)


def job_seed(seed: int, k: int) -> int:
    """The seed sent with model k's fine-tuning job (stream 4 of ``default_rng([seed, k, .])``)."""
    return int(np.random.default_rng([seed, k, 4]).integers(2**31 - 1))


def row_key(model: str, items: Sequence[tuple[Sequence[dict], str]], logprobs: LogprobConfig) -> str:
    """The cache key of one model's losses: ``model``, every ``(messages, target)`` it scores, in
    order, and the logprob settings that shape a score (all but ``concurrency``).

    The rows are hashed, not named: a changed row (same count, same training set, same model)
    must miss the cache, and the hash is what a cached file can be compared with.
    """
    settings = {k: v for k, v in dataclasses.asdict(logprobs).items() if k != "concurrency"}
    blob = json.dumps({"model": model, "items": [[list(m), t] for m, t in items], "logprobs": settings},
                      sort_keys=True)
    return f"{model} sha256:{hashlib.sha256(blob.encode()).hexdigest()}"


def cached_row(path: Path, key: str) -> dict | None:
    """Model k's cached losses, if they were read for ``key`` (:func:`row_key`)."""
    if not path.exists():
        return None
    z = np.load(path, allow_pickle=False)
    if str(z["key"]) != key:
        return None
    return {k: z[k] for k in z.files}


def save_row(path: Path, key: str, **arrays: np.ndarray) -> None:
    with atomic_path(path, suffix=".npz.tmp") as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, key=np.array(key), **arrays)


def signals_of_nll(L: np.ndarray, variant: str) -> np.ndarray:
    """The Table 2 signal of NLL rows: the NLL itself, or DAUNCE-T's margin."""
    return L if signal_of(variant) == "loss" else margin_from_nll(L)


class APIFitter:
    """Fits perturbed models by fine-tuning jobs of theta_0 on ``D^k`` (see the module docstring).

    Args:
        client: the endpoint (opened by the caller, which also owns its lifetime).
        manifest: the step's manifest; its fingerprint holds ``hyperparameters``.
        theta0: the fine-tuned theta_0 every job starts from (an endpoint model name).
        train, query: rows with ``id``, ``messages`` (the prompt) and ``target`` (the reply).
        training_examples: model k trains on ``training_examples[i]`` for ``i`` in ``subsets[k]``.
        subsets: ``D^k`` of every model k (indices into ``train``).
        hyperparameters: of each job (batch size, multiplier, epochs).
        finetune: the ``blackbox.finetune`` section (concurrency, polling, attempts).
        logprobs: the ``blackbox.logprobs`` section.
        variant: a Table 2 variant (the API trains on the plain NLL: ``daunce_bb``).
        seed: seeds the jobs (:func:`job_seed`).
        work_dir: the step's work folder (per-model loss cache under ``losses/``).
    """

    def __init__(self, client: APIClient, manifest: Manifest, *, theta0: str, train: Sequence[dict],
                 query: Sequence[dict], training_examples: Sequence[dict], subsets: Sequence[np.ndarray],
                 hyperparameters: dict, finetune: FinetuneConfig, logprobs: LogprobConfig,
                 variant: str = "daunce_bb", seed: int = 0, work_dir: str | Path):
        self.client, self.manifest, self.theta0 = client, manifest, theta0
        self.train, self.query = list(train), list(query)
        self.examples, self.subsets = training_examples, subsets
        self.hp, self.ft, self.lp = dict(hyperparameters), finetune, logprobs
        self.variant, self.seed, self.work = variant, int(seed), Path(work_dir)

    def spec(self, k: int) -> FinetuneSpec:
        return FinetuneSpec(f"k{k}", self.theta0, [self.examples[i] for i in self.subsets[k]], self.hp,
                            seed=job_seed(self.seed, k))

    def _check_lr(self, lr: float) -> None:
        want = configured_lr(self.hp)
        if not (math.isnan(want) and math.isnan(lr) or want == lr):
            raise ValueError(
                f"APIFitter.fit: lr={lr!r} differs from the configured learning_rate_multiplier "
                f"{self.hp.get('learning_rate_multiplier', 'auto')!r}; an API job's rate is fixed by "
                "blackbox.finetune.hyperparameters (the manifest's fingerprint), so change it there")

    def fit(self, ks: Sequence[int], lr: float) -> Signals:
        """Fine-tune models ``ks`` (jobs run ``finetune.max_active`` at a time) and read the losses."""
        self._check_lr(lr)
        ks = [int(k) for k in ks]
        rows = self.train + self.query
        with tqdm(total=len(ks), desc="fine-tunes", unit="model", mininterval=5) as bar:
            last = [0]

            def progress(done: int, total: int) -> None:
                bar.update(done - last[0])
                last[0] = done

            fitted = run_finetunes(self.client, self.manifest, [self.spec(k) for k in ks], self.ft,
                                   on_progress=progress)
        L = np.zeros((len(ks), len(rows)))
        n_exact = n_missing = 0
        items = [(r["messages"], r["target"]) for r in rows]
        for i, k in enumerate(tqdm(ks, desc="losses", unit="model", mininterval=5)):
            mk = fitted[f"k{k}"]
            path = self.work / "losses" / f"k{k}.npz"
            key = row_key(mk, items, self.lp)
            row: Any = cached_row(path, key)
            if row is None:
                sc = score_many(self.client, mk, items, self.lp)
                save_row(path, key, nll=sc.nll, exact=sc.exact, missing=sc.missing)
                row = {"nll": sc.nll, "exact": sc.exact, "missing": sc.missing}
            L[i] = row["nll"]
            n_exact += int(row["exact"].sum())
            n_missing += int(row["missing"].sum())
        log.info("API losses: %d of %d targets reproduced exactly by greedy decoding, %d scored with the "
                 "missing-token bound", n_exact, L.size, n_missing)
        n = len(self.train)
        sig = signals_of_nll(L, self.variant)
        return Signals(train=sig[:, :n], query=sig[:, n:], model_index=np.asarray(ks, np.int64),
                       train_ids=np.array([r["id"] for r in self.train], np.int64),
                       query_ids=np.array([r["id"] for r in self.query], np.int64),
                       signal=signal_of(self.variant),
                       attrs={"n_exact": n_exact, "n_missing": n_missing, "models": [fitted[f"k{k}"] for k in ks]})
