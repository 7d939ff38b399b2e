"""Linear datamodeling score (Appendix B, equations 8-9).

LDS = mean over queries of the Spearman correlation, across M random subsets, between the query's
margin under models retrained on each subset and the sum of the method's scores over the subset;
selection masks and queries are kept apart from the test ones, and :func:`bootstrap_means` gives a
percentile CI over masks and queries. The ground-truth and LDS rules and ``daunce lds`` call it.
The ground truth, the selection split and the bootstrap:
docs/design.md#daunce_coreldspy-the-linear-datamodeling-score."""
from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

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
    actual, predicted = predictions(scores, masks, outputs)
    const = (np.ptp(actual, axis=0) == 0) | (np.ptp(predicted, axis=0) == 0)
    if const.any():
        warnings.warn(f"{int(const.sum())} of {len(const)} queries have constant predictions or "
                      "outputs; their Spearman correlation counts as 0", RuntimeWarning, stacklevel=2)
    return per_query_lds_arrays(predicted, actual)


def predictions(scores: np.ndarray, masks: np.ndarray, outputs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(measured outputs averaged over seeds, predicted group effects), both [M, m] float64."""
    actual = outputs.mean(axis=0) if outputs.ndim == 3 else outputs
    return np.asarray(actual, np.float64), masks.astype(np.float64) @ scores.astype(np.float64)


@dataclass
class LDSResult:
    lds: float
    ci_low: float
    ci_high: float
    n_queries: int
    replicates: np.ndarray | None = None  # bootstrap replicates of the mean (None: query-only CI)


BATCH = 250  # bootstrap replicates drawn at once


def _ranks_of_draw(order, new_group, counts, out):  # pragma: no cover - compiled
    """Average ranks (into ``out`` [M]) of the M masks in one resample of one query: mask j drawn
    ``counts[j]`` times fills that many tied positions, so a group of equal values gets
    (draws of smaller values) + (draws in the group + 1) / 2."""
    M = order.shape[0]
    before = 0.0
    k = 0
    while k < M:
        e = k + 1
        while e < M and not new_group[e]:
            e += 1
        total = 0.0
        for t in range(k, e):
            total += counts[order[t]]
        rank = before + (total + 1.0) / 2.0
        for t in range(k, e):
            out[order[t]] = rank
        before += total
        k = e


def _spearman_draws(order_a, new_a, order_p, new_p, counts):  # pragma: no cover - compiled
    B, M = counts.shape
    m = order_a.shape[0]
    out = np.zeros((B, m))
    ra = np.empty(M)
    rp = np.empty(M)
    mid = (M + 1) / 2.0  # the mean rank of any M draws
    for b in range(B):
        c = counts[b]
        for q in range(m):
            _ranks_of_draw(order_a[q], new_a[q], c, ra)
            _ranks_of_draw(order_p[q], new_p[q], c, rp)
            num = 0.0
            sa = 0.0
            sp = 0.0
            for j in range(M):
                if c[j]:
                    da = ra[j] - mid
                    dp = rp[j] - mid
                    num += c[j] * da * dp
                    sa += c[j] * da * da
                    sp += c[j] * dp * dp
            if sa > 0 and sp > 0:
                out[b, q] = num / np.sqrt(sa * sp)
    return out


def _kernel():
    """``_spearman_draws`` compiled by numba (from its on-disk cache after the first run), on first
    use: jobs that import this module but never bootstrap do not pay for importing numba."""
    global _ranks_of_draw, _spearman_draws
    if not hasattr(_spearman_draws, "py_func"):
        from numba import njit

        _ranks_of_draw = njit(cache=True)(_ranks_of_draw)  # compiled first: the kernel calls it
        _spearman_draws = njit(cache=True)(_spearman_draws)
    return _spearman_draws


def _sorted_groups(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per column of ``values`` [M, m]: the sorting order and where a new group of equal values
    starts in it (both [m, M], one query per row)."""
    order = np.argsort(values, axis=0, kind="stable")
    v = np.take_along_axis(values, order, axis=0)
    new = np.ones(v.shape, np.bool_)
    new[1:] = v[1:] != v[:-1]
    return np.ascontiguousarray(order.T), np.ascontiguousarray(new.T)


def resampled_spearman(predicted: np.ndarray, actual: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Per-query Spearman correlation ([B, m]) of ``predicted`` and ``actual`` ([M, m]) on the masks
    of each resample (``counts`` [B, M]: how often each mask is drawn; each row sums to M): the
    Pearson correlation of ``scipy.stats.rankdata``'s average ranks of the resampled columns,
    computed from the counts without building or sorting the resampled columns (each column is
    sorted once; tests/test_lds.py checks the equality with scipy). Written by hand (Numba)
    because re-ranking every resample with rankdata costs about 100x more. A query constant on
    a resample's masks gets 0, as in :func:`per_query_lds`."""
    oa, na = _sorted_groups(np.asarray(actual, np.float64))
    op, npg = _sorted_groups(np.asarray(predicted, np.float64))
    return _kernel()(oa, na, op, npg, np.ascontiguousarray(counts, dtype=np.float64))


def bootstrap_draws(M: int, m: int, n_resamples: int, seed: int, masks: bool = True):
    """Batches of (mask counts [b, M], query counts [b, m]) of the joint bootstrap: each replicate
    draws M masks and m queries with replacement (``masks=False``: every mask once, the
    query-only bootstrap). Determined by (M, m, n_resamples, seed) alone, so every method
    evaluated on one ground truth gets the same replicates (paired)."""
    rng = np.random.default_rng([seed, M, m])
    for b0 in range(0, n_resamples, BATCH):
        b = min(BATCH, n_resamples - b0)
        mk = rng.integers(0, M, size=(b, M))
        qi = rng.integers(0, m, size=(b, m))
        mc = np.stack([np.bincount(r, minlength=M) for r in mk]) if masks else np.ones((b, M), np.int64)
        qc = np.stack([np.bincount(r, minlength=m) for r in qi])
        yield mc, qc


def bootstrap_means(predicted, actual: np.ndarray, n_resamples: int, seed: int = 0,
                    masks: bool = True) -> np.ndarray:
    """Bootstrap replicates ([n_resamples], or [len(predicted), n_resamples] for a list) of the
    LDS (mean over queries of the per-query Spearman correlation) from predictions and measured
    outputs ([M, m] each), resampling masks and queries together (:func:`bootstrap_draws`). Every
    prediction of a list gets the same draws (paired)."""
    many = isinstance(predicted, (list, tuple))
    preds = list(predicted) if many else [predicted]
    M, m = actual.shape
    out: list[list[np.ndarray]] = [[] for _ in preds]
    fixed = None if masks else [per_query_lds_arrays(p, actual)[None] for p in preds]
    for mc, qc in bootstrap_draws(M, m, n_resamples, seed, masks=masks):
        for i, p in enumerate(preds):
            rho = resampled_spearman(p, actual, mc) if masks else fixed[i]
            out[i].append((rho * qc).sum(1) / m)
    reps = [np.concatenate(o) for o in out]
    return np.stack(reps) if many else reps[0]


def per_query_lds_arrays(predicted: np.ndarray, actual: np.ndarray) -> np.ndarray:
    """Per-query Spearman correlation of predictions and outputs ([M, m] each); constant -> 0."""
    from scipy import stats

    ra = stats.rankdata(actual, axis=0)
    rp = stats.rankdata(predicted, axis=0)
    ra -= ra.mean(axis=0)
    rp -= rp.mean(axis=0)
    denom = np.sqrt((ra**2).sum(0) * (rp**2).sum(0))
    const = denom == 0
    return np.where(const, 0.0, (ra * rp).sum(0) / np.where(const, 1.0, denom))


def percentile_ci(replicates: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    lo, hi = np.percentile(replicates, [50 * (1 - level), 50 * (1 + level)])
    return float(lo), float(hi)


def paired_difference(point_a: float, replicates_a, point_b: float, replicates_b) -> dict:
    """LDS(a) - LDS(b) with the 95% percentile CI of the paired replicates (the same bootstrap
    draws of masks and queries for both: :func:`bootstrap_draws`)."""
    ra, rb = np.asarray(replicates_a, np.float64), np.asarray(replicates_b, np.float64)
    if ra.shape != rb.shape or ra.size == 0:
        raise ValueError(f"paired difference needs replicates of the same draws; got {ra.shape} and {rb.shape}")
    lo, hi = percentile_ci(ra - rb)
    return {"diff": float(point_a - point_b), "ci_low": lo, "ci_high": hi}


def _check_resamples(n_resamples) -> int:
    try:
        whole = int(n_resamples) == n_resamples and n_resamples >= 1
    except (TypeError, ValueError, OverflowError):
        whole = False
    if not whole:
        raise ValueError(f"n_resamples (--bootstrap) must be a whole number >= 1, "
                         f"got {n_resamples!r}")
    return int(n_resamples)


def summarize(per_query: np.ndarray, n_resamples: int = 2000, seed: int = 0) -> LDSResult:
    """Mean over queries with a percentile-bootstrap 95% CI over queries only (the masks held
    fixed); :func:`evaluate` resamples the masks too.

    Raises:
        ValueError: no queries, non-finite per-query values, or ``n_resamples`` < 1.
    """
    n_resamples = _check_resamples(n_resamples)
    per_query = np.asarray(per_query, np.float64)
    if per_query.size == 0:
        raise ValueError("LDS of no queries: the scores and ground truth have m=0 queries")
    if not np.isfinite(per_query).all():
        raise ValueError(f"{int((~np.isfinite(per_query)).sum())} per-query LDS value(s) are NaN "
                         "or infinite; check the scores and ground truth for NaN")
    mean = float(per_query.mean())
    if len(per_query) < 2 or np.allclose(per_query, per_query[0]):
        return LDSResult(mean, mean, mean, len(per_query))
    from scipy import stats

    res = stats.bootstrap((per_query,), np.mean, n_resamples=n_resamples, confidence_level=0.95,
                          method="percentile", rng=np.random.default_rng(seed))
    ci = res.confidence_interval
    return LDSResult(mean, float(ci.low), float(ci.high), len(per_query))


def evaluate(scores: np.ndarray, gt: dict, n_resamples: int = 2000, seed: int = 0,
             resample: str = "joint") -> tuple[LDSResult, np.ndarray]:
    """LDS of dense scores [n, m] against ground truth ``gt`` (``store.read_ground_truth``), with
    a 95% percentile-bootstrap CI over masks and queries jointly (``resample="joint"``; its
    replicates in ``LDSResult.replicates``) or over queries only (``"queries"``).

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
    if resample not in ("joint", "queries"):
        raise ValueError(f"unknown resample {resample!r}; 'joint' (masks and queries) or 'queries'")
    pq = per_query_lds(scores, gt["masks"], gt["outputs"])
    if resample == "queries":
        return summarize(pq, n_resamples, seed), pq
    n_resamples = _check_resamples(n_resamples)
    if pq.size == 0:
        raise ValueError("LDS of no queries: the scores and ground truth have m=0 queries")
    actual, predicted = predictions(scores, gt["masks"], gt["outputs"])
    reps = bootstrap_means(predicted, actual, n_resamples, seed)
    lo, hi = percentile_ci(reps)
    return LDSResult(float(pq.mean()), lo, hi, len(pq), reps), pq


def evaluate_many(scores_list: list[np.ndarray], gt: dict, n_resamples: int = 2000,
                  seed: int = 0) -> list[tuple[LDSResult, np.ndarray]]:
    """:func:`evaluate` (joint bootstrap) of several score matrices on one ground truth: the same
    draws for all (paired)."""
    for s in scores_list:  # the checks of evaluate, on a single draw
        evaluate(s, gt, n_resamples=1, seed=seed)
    n_resamples = _check_resamples(n_resamples)
    actual = None
    preds, pqs = [], []
    for s in scores_list:
        actual, p = predictions(s, gt["masks"], gt["outputs"])
        preds.append(p)
        pqs.append(per_query_lds(s, gt["masks"], gt["outputs"]))
    reps = bootstrap_means(preds, actual, n_resamples, seed)
    return [(LDSResult(float(pq.mean()), *percentile_ci(r), len(pq), r), pq) for pq, r in zip(pqs, reps)]


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


# --- paired differences: the comparisons the README draws -----------------------------------------

PAIRED_COLUMNS = ["kind", "method", "measure", "versus", "versus_measure", "threshold", "diff", "ci_low", "ci_high",
                  "n_resamples"]
COMPARED = ("trak", "ekfac", "logra", "graddot", "exact_if")  # what each DAUNCE row is set against


def _same_draws(a: dict, b: dict, where: str) -> None:
    if a.get("bootstrap") != b.get("bootstrap") or a.get("n_queries") != b.get("n_queries") \
            or a.get("n_masks") != b.get("n_masks"):
        raise ValueError(f"{where}: the two rows were not bootstrapped with the same draws "
                         f"({a.get('bootstrap')}, {b.get('bootstrap')}); rerun their lds_eval jobs")


def paired_rows(rows: list[dict], daunce_methods: list[str], compared=COMPARED) -> list[dict]:
    """Paired differences, each with the 95% CI of its paired bootstrap replicates
    (:func:`paired_difference`; rows from :func:`daunce_core.steps.vision.evaluate_scores`):

    * ``threshold``: thresholded minus raw, for every (method, measure) -- what thresholding
      changes, per method;
    * ``method``: each DAUNCE row (every measure) minus each method of ``compared`` that was run,
      at the raw scores and at the thresholded ones.
    """
    out = []
    keyed = {(r["method"], r["measure"], r["threshold"]): r for r in rows if r.get("replicates") is not None}

    def row(kind, a, b):
        _same_draws(a, b, f"{a['method']}/{a['measure']} vs {b['method']}/{b['measure']}")
        d = paired_difference(a["lds"], a["replicates"], b["lds"], b["replicates"])
        return {"kind": kind, "method": a["method"], "measure": a["measure"], "versus": b["method"],
                "versus_measure": b["measure"], "threshold": a["threshold"] if kind == "method" else
                f"{a['threshold']} - none", **d, "n_resamples": len(a["replicates"])}

    for (method, measure, th), r in keyed.items():
        if th != "none" and (method, measure, "none") in keyed:
            out.append(row("threshold", r, keyed[(method, measure, "none")]))
    for (method, _measure, th), r in keyed.items():
        if method not in daunce_methods:
            continue
        for other in compared:
            b = keyed.get((other, "score", th))
            if b is not None:
                out.append(row("method", r, b))
    return out


def paired_table(json_paths: list, out_csv, daunce_methods: list[str], compared=COMPARED) -> list[dict]:
    """:func:`paired_rows` of the LDS evaluations (JSON lists) written to one csv, 4 decimals."""
    import csv
    import json
    from pathlib import Path

    from . import store

    rows = []
    for p in json_paths:
        rows.extend(json.loads(Path(p).read_text()))
    out = paired_rows(rows, daunce_methods, compared)
    with store.atomic_path(out_csv, suffix=".csv") as tmp:
        with open(tmp, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=PAIRED_COLUMNS)
            w.writeheader()
            for r in out:
                w.writerow({k: (f"{r[k]:.4f}" if isinstance(r[k], float) else r[k]) for k in PAIRED_COLUMNS})
    return out
