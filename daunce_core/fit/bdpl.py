"""The fitter for strict black-box access (Section 5): perturbed "model" k is a BDPL prompt.

:class:`BDPLFitter` implements :class:`~.contract.Fitter`: model k is theta_0 with a discrete
prompt learned on ``D^k`` by :class:`daunce_core.blackbox.bdpl.BDPL`, its signals every example's
NLL (or margin) with that prompt in front, read from chat-completion logprobs. An adapter over
:mod:`daunce_core.blackbox`, called by :func:`daunce_core.steps.blackbox.strict_losses`. Caching,
reruns and why ``lr`` is checked, not applied: docs/design.md#daunce_corefitbdplpy-the-strict-black-box-fitter."""
from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..blackbox.bdpl import BDPL, with_prompt
from ..blackbox.client import APIClient
from ..blackbox.config import BDPLConfig, LogprobConfig
from ..blackbox.logprobs import score_many
from ..blackbox.manifest import Manifest
from ..objectives import signal_of
from .contract import Signals
from .endpoint import cached_row, row_key, save_row, signals_of_nll

log = logging.getLogger(__name__)

__all__ = ["BDPLFitter"]


class BDPLFitter:
    """Fits perturbed models as BDPL prompts for theta_0 (see the module docstring).

    Args:
        client: the endpoint (opened by the caller).
        manifest: the step's manifest; its fingerprint holds the BDPL settings and candidates.
        theta0: the model every prompt is learned for and scored with (an endpoint model name).
        candidates: the prompt's n-gram vocabulary (:func:`daunce_core.blackbox.bdpl.candidate_ngrams`).
        train, query: rows with ``id``, ``messages`` and ``target``.
        subsets: ``D^k`` of every model k (indices into ``train``).
        bdpl: the ``blackbox.bdpl`` section; logprobs: the ``blackbox.logprobs`` section.
        variant: the Table 2 variant BDPL minimises.
        seed: seeds model k's prompt learning (``default_rng([seed, k, ...])``).
        work_dir: the step's work folder (``checkpoints/``, ``losses/``).
    """

    def __init__(self, client: APIClient, manifest: Manifest, *, theta0: str, candidates: Sequence[str],
                 train: Sequence[dict], query: Sequence[dict], subsets: Sequence[np.ndarray], bdpl: BDPLConfig,
                 logprobs: LogprobConfig, variant: str = "daunce_bb", seed: int = 0, work_dir: str | Path):
        self.client, self.manifest, self.theta0 = client, manifest, theta0
        self.train, self.query, self.subsets = list(train), list(query), subsets
        self.bdpl, self.lp, self.variant, self.seed = bdpl, logprobs, variant, int(seed)
        self.work = Path(work_dir)
        self.learner = BDPL(client, theta0, candidates, bdpl, logprobs, variant)

    def fit(self, ks: Sequence[int], lr: float) -> Signals:
        """Learn (or adopt) the prompts of models ``ks`` and read every example's loss under each."""
        if lr != self.bdpl.lr:
            raise ValueError(f"BDPLFitter.fit: lr={lr!r} differs from blackbox.bdpl.lr={self.bdpl.lr!r}, which "
                             "keys the manifest's recorded prompts; change blackbox.bdpl.lr instead")
        ks = [int(k) for k in ks]
        rows = self.train + self.query
        L = np.zeros((len(ks), len(rows)))
        prompts = []
        for i, k in enumerate(tqdm(ks, desc="BDPL prompts", unit="model", mininterval=5)):
            e = self.manifest.entry(f"k{k}")
            path = self.work / "losses" / f"k{k}.npz"
            if "prompt" not in e:
                idx, hist = self.learner.fit([self.train[j] for j in self.subsets[k]], self.seed, k,
                                             checkpoint=self.work / "checkpoints" / f"k{k}.pt")
                e = self.manifest.update(f"k{k}", prompt=self.learner.prompt_text(idx),
                                         indices=[int(j) for j in idx], history=hist)
            items = [(with_prompt(r["messages"], e["prompt"], self.bdpl.placement), r["target"]) for r in rows]
            key = row_key(self.theta0, items, self.lp)
            row = cached_row(path, key)
            if row is None:
                sc = score_many(self.client, self.theta0, items, self.lp)
                save_row(path, key, nll=sc.nll, exact=sc.exact, missing=sc.missing)
                row = {"nll": sc.nll}
            L[i] = row["nll"]
            prompts.append(e["prompt"])
        n = len(self.train)
        sig = signals_of_nll(L, self.variant)
        return Signals(train=sig[:, :n], query=sig[:, n:], model_index=np.asarray(ks, np.int64),
                       train_ids=np.array([r["id"] for r in self.train], np.int64),
                       query_ids=np.array([r["id"] for r in self.query], np.int64),
                       signal=signal_of(self.variant), attrs={"prompts": prompts})
