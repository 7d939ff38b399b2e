"""Linear datamodeling score (Appendix B, equations 8-9).

Selection is kept apart from test twice over (issue 12, item 7): the selection masks come from a
mask stream disjoint from the test masks (:func:`masks_for`), and the queries are split (seeded,
:func:`query_split`) into selection queries and test queries. The selection ground truth holds
only the selection queries, the test ground truth only the test queries, so every tuning (DAUNCE's
learning rate, the baselines' knobs) sees neither a test mask nor a test query.

Ground truth: M random subsets of size ceil(alpha n); a model retrained from scratch with the
base recipe on each (several seeds); the margin of every query under each retrain. It is stored
once (``store.write_ground_truth``) and every method is evaluated against the same file.

LDS of a method = mean over queries of the Spearman correlation, across the M subsets, between
the query's measured margin (averaged over seeds) and the method's predicted group effect (the
sum of the scores of the subset's training examples). The 95% confidence interval is a
bootstrap over queries (``scipy.stats.bootstrap``).
"""
from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from scipy import stats

from .config import ExperimentConfig
from .data import Dataset
from .perturb import lds_masks

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

SELECT_OFFSET = 1_000_000  # selection masks come from a stream disjoint from the test masks
QUERY_SPLIT_KEY = 7_919  # key of the query split's stream, apart from the masks' and the retrains'


def masks_for(cfg: ExperimentConfig, split: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(mask_index [M], masks [M, n]) of the ``"test"`` or ``"select"`` split."""
    lc = cfg.lds
    if split == "test":
        M, offset = lc.M, 0
    elif split == "select":
        M, offset = lc.M_select, SELECT_OFFSET
    else:
        raise ValueError(f"unknown LDS split {split!r}; 'test' or 'select'")
    return offset + np.arange(M), lds_masks(lc.seed, M, n, lc.alpha, offset=offset)


def query_split(m: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions (ascending) of the selection and the test queries among ``m``: a seeded random
    choice of ``round(fraction * m)`` selection queries, the rest for test.

    Raises:
        ConfigError: one side would be empty (``lds.select_fraction`` too small or large for m).
    """
    from .settings import ConfigError

    n_select = int(round(fraction * m))
    if not 0 < n_select < m:
        raise ConfigError(f"lds.select_fraction={fraction:g} of {m} queries leaves {n_select} selection and "
                          f"{m - n_select} test queries; both need at least one")
    perm = np.random.default_rng([seed, QUERY_SPLIT_KEY]).permutation(m)
    return np.sort(perm[:n_select]), np.sort(perm[n_select:])


def query_positions(cfg: ExperimentConfig, split: str, m: int) -> np.ndarray:
    """Positions of the queries of LDS split ``"select"`` or ``"test"`` (:func:`query_split`)."""
    if split not in ("select", "test"):
        raise ValueError(f"unknown LDS split {split!r}; 'test' or 'select'")
    sel, test = query_split(m, cfg.lds.select_fraction, cfg.lds.seed)
    return sel if split == "select" else test


def restrict_queries(losses, gt: dict):
    """``losses`` (``store.Losses``) with only the queries the ground truth ``gt`` holds; scoring
    fewer queries gives the same columns (every measure and threshold is per query)."""
    from . import store

    keep = np.isin(losses.query_ids, gt["query_ids"])
    return store.Losses(losses.train, losses.query[:, keep], losses.model_index, losses.train_ids,
                        losses.query_ids[keep], losses.attrs, losses.source, p0_train=losses.p0_train,
                        p0_query=None if losses.p0_query is None else losses.p0_query[keep])


def align_to_ground_truth(scores: np.ndarray, train_ids, query_ids, gt: dict, scores_path="scores",
                          gt_path="ground truth", attrs: dict | None = None) -> tuple[np.ndarray, list[str]]:
    """Dense scores [n, m] put in the order of ``gt``'s training examples and queries.

    The scores may cover more queries than the ground truth (all queries, against the selection or
    the test queries): the others are dropped. Otherwise :func:`daunce_core.store.align_scores`
    joins on ids and refuses examples the scores lack.
    """
    from . import store

    query_ids = np.asarray(query_ids)
    attrs = attrs or {}
    if not (store.is_positional(attrs) or store.is_positional(gt["attrs"] if "attrs" in gt else {})) \
            and len(query_ids) > len(gt["query_ids"]):
        keep = np.isin(query_ids, gt["query_ids"])
        scores, query_ids = scores[:, keep], query_ids[keep]
    meta = {"train_ids": train_ids, "query_ids": query_ids, "attrs": attrs}
    return store.align_scores(scores, meta, gt, scores_path, gt_path)


def retrain_outputs(cfg: ExperimentConfig, ds: Dataset, masks: np.ndarray, mask_index: np.ndarray,
                    device: torch.device) -> np.ndarray:
    """Margins of the queries under models retrained on each mask: [seeds, M, m]."""
    import torch

    from . import ensemble as E
    from .models import build_model
    from .objectives import margin

    X = torch.as_tensor(ds.X_train, device=device)
    y = torch.as_tensor(ds.y_train, device=device)
    Xq = torch.as_tensor(ds.X_query, device=device)
    yq = torch.as_tensor(ds.y_query, device=device)
    factory = lambda: build_model(cfg.model, ds.X_train.shape[1:], ds.num_classes)  # noqa: E731
    out = np.zeros((cfg.lds.seeds, len(masks), ds.m), np.float32)
    for s in range(cfg.lds.seeds):
        subsets = [np.flatnonzero(mk) for mk in masks]
        keys = [(cfg.lds.seed, int(j), s, 7) for j in mask_index]
        net, p, b = E.fit_from_scratch(factory, X, y, subsets, keys, cfg.base, augment=cfg.base.augment)
        logits = E.predict(net, p, b, Xq)  # [M, m, classes]
        out[s] = margin(logits.reshape(-1, logits.shape[-1]), yq.repeat(len(masks))).reshape(
            len(masks), ds.m).cpu().numpy()
    return out


def per_query_lds(scores: np.ndarray, masks: np.ndarray, outputs: np.ndarray) -> np.ndarray:
    """Spearman correlation per query between predicted and measured outputs; [m].

    ``scores`` [n, m], ``masks`` [M, n] bool, ``outputs`` [S, M, m] (or [M, m]). A query whose
    predictions are constant (e.g. all scores thresholded away) gets 0, with a warning.
    """
    actual = outputs.mean(axis=0) if outputs.ndim == 3 else outputs
    predicted = masks.astype(np.float64) @ scores.astype(np.float64)  # [M, m]
    ra = stats.rankdata(actual, axis=0)
    rp = stats.rankdata(predicted, axis=0)
    ra -= ra.mean(axis=0)
    rp -= rp.mean(axis=0)
    denom = np.sqrt((ra**2).sum(0) * (rp**2).sum(0))
    const = denom == 0
    if const.any():
        warnings.warn(f"{int(const.sum())} of {len(denom)} queries have constant predictions or "
                      "outputs; their Spearman correlation counts as 0", RuntimeWarning, stacklevel=2)
    return np.where(const, 0.0, (ra * rp).sum(0) / np.where(const, 1.0, denom))


@dataclass
class LDSResult:
    lds: float
    ci_low: float
    ci_high: float
    n_queries: int


def summarize(per_query: np.ndarray, n_resamples: int = 2000, seed: int = 0) -> LDSResult:
    """Mean over queries with a percentile-bootstrap 95% CI over queries.

    Raises:
        ValueError: no queries, non-finite per-query values, or ``n_resamples`` < 1.
    """
    try:
        whole = int(n_resamples) == n_resamples and n_resamples >= 1
    except (TypeError, ValueError, OverflowError):
        whole = False
    if not whole:
        raise ValueError(f"n_resamples (--bootstrap) must be a whole number >= 1, "
                         f"got {n_resamples!r}")
    per_query = np.asarray(per_query, np.float64)
    if per_query.size == 0:
        raise ValueError("LDS of no queries: the scores and ground truth have m=0 queries")
    if not np.isfinite(per_query).all():
        raise ValueError(f"{int((~np.isfinite(per_query)).sum())} per-query LDS value(s) are NaN "
                         "or infinite; check the scores and ground truth for NaN")
    mean = float(per_query.mean())
    if len(per_query) < 2 or np.allclose(per_query, per_query[0]):
        return LDSResult(mean, mean, mean, len(per_query))
    res = stats.bootstrap((per_query,), np.mean, n_resamples=n_resamples, confidence_level=0.95,
                          method="percentile", rng=np.random.default_rng(seed))
    ci = res.confidence_interval
    return LDSResult(mean, float(ci.low), float(ci.high), len(per_query))


def evaluate(scores: np.ndarray, gt: dict, n_resamples: int = 2000, seed: int = 0) -> tuple[LDSResult, np.ndarray]:
    """LDS of dense scores [n, m] against ground truth ``gt`` (``store.read_ground_truth``).

    Positions are taken as they are: scores read from a file are first put in the ground
    truth's order of ids with ``store.align_scores``. NaN or infinite scores or outputs, and
    fewer than 2 subsets, are refused (a Spearman correlation needs two points).
    """
    if scores.shape != (gt["masks"].shape[1], gt["outputs"].shape[-1]):
        raise ValueError(f"scores of shape {scores.shape} do not match the ground truth "
                         f"({gt['masks'].shape[1]} training examples, {gt['outputs'].shape[-1]} queries)")
    if gt["masks"].shape[0] < 2:
        raise ValueError(f"the ground truth has {gt['masks'].shape[0]} subset(s); the LDS needs "
                         "at least 2 (lds.M in the config)")
    for name, a in (("scores", scores), ("ground-truth outputs", gt["outputs"])):
        if not np.isfinite(a).all():
            raise ValueError(f"{int((~np.isfinite(a)).sum())} {name} are NaN or infinite; "
                             "the LDS of such values is meaningless")
    pq = per_query_lds(scores, gt["masks"], gt["outputs"])
    return summarize(pq, n_resamples, seed), pq


# --- the LDS table: the rows of every evaluation in one csv ----------------------------------------

LDS_COLUMNS = ["method", "measure", "threshold", "lds", "ci_low", "ci_high", "n_queries", "n_masks", "tuned",
               "on_edge"]


def tuning_label(tuning: dict | None) -> tuple[str, str]:
    """(``tuned``, ``on_edge``) columns of the LDS table from a selection record.

    ``tuning`` is DAUNCE's ``selection.json`` or a baseline's ``tuning`` attribute: ``selected``
    (the chosen knob values) and ``on_edge`` (the choice sits at the end of a grid axis, so a
    wider grid might do better). No record: the method was not tuned, both columns empty.
    """
    if not tuning or not tuning.get("selected"):
        return "", ""
    sel = tuning["selected"]
    tuned = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in sel.items())
    return tuned, "true" if tuning.get("on_edge") else "false"


def on_edge(grid: list, best) -> bool:
    """Whether ``best`` is the smallest or largest number of ``grid`` (of two or more numbers);
    ``None`` (a library's heuristic default) is no point of the axis."""
    nums = sorted(v for v in grid if isinstance(v, (int, float)) and not isinstance(v, bool))
    return len(nums) > 1 and best in (nums[0], nums[-1])


def threshold_label(th: dict) -> str:
    """How a table names the thresholding ``lds.threshold``: ``none``, ``hard(q=0.9)``, ``topk(k=..)``."""
    kind = th.get("kind", "none")
    if kind == "none":
        return "none"
    if kind == "topk":
        return f"topk(k={th['k']})"
    return f"{kind}(q={th['quantile']})"


def lds_table(json_paths: list, out_csv) -> list[dict]:
    """Concatenate the rows of LDS evaluations (JSON lists) into one csv, floats to 4 decimals."""
    import csv
    import json
    from pathlib import Path

    from . import store

    rows = []
    for p in json_paths:
        rows.extend(json.loads(Path(p).read_text()))
    with store.atomic_path(out_csv, suffix=".csv") as tmp:
        with open(tmp, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=LDS_COLUMNS)
            w.writeheader()
            for r in rows:
                w.writerow({k: (f"{r[k]:.4f}" if isinstance(r.get(k), float) else r.get(k, ""))
                            for k in LDS_COLUMNS})
    return rows


def read_lds_table(path) -> list[dict]:
    """Rows of a csv written by :func:`lds_table`, with ``lds`` and its CI as floats."""
    import csv

    with open(path) as fh:
        rows = list(csv.DictReader(fh))
    for r in rows:
        for k in ("lds", "ci_low", "ci_high"):
            r[k] = float(r[k])
    return rows
