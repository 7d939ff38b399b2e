"""Is K large enough? Monte Carlo standard errors and split-K reliability of DAUNCE scores.

Both need only the losses file (no retraining): the standard error of each score by the delta
method over the K models (streamed block by block like the scores), and the split-K
reliability ``R_K = c rho_h / (1 + (c - 1) rho_h)`` (Spearman-Brown, c = K/h) from two disjoint
halves of h models. ``daunce score --reliability`` (:mod:`daunce_core.cli`) calls them. Derivation:
docs/theory.md#is-k-large-enough-standard-errors-and-split-k-reliability-diagnosticspy."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import h5py
import numpy as np

from . import store

__all__ = [
    "score_se",
    "spearman_brown",
    "models_needed",
    "split_reliability",
    "Diagnostics",
    "diagnose",
    "diagnose_file",
    "score_file_with_diagnostics",
]

MEASURES = ("correlation", "covariance")
# Standard errors kept for the quantiles of the summary: all of them up to this many, else an
# even stride through every block (the quantiles of a million values are exact to ~0.1%).
_SE_SAMPLE = 2**20
# float64 [b, m] temporaries alive at once in a block (scores, SE, moments, two halves per split).
_TEMPS = 8


# --- arithmetic -----------------------------------------------------------------------------

def spearman_brown(rho, factor):
    """Reliability of a score from ``factor`` times as many models as one of reliability ``rho``.

    R = factor * rho / (1 + (factor - 1) * rho) (Spearman-Brown); works on arrays.
    """
    rho = np.asarray(rho, np.float64)
    return factor * rho / (1.0 + (factor - 1.0) * rho)


def models_needed(rho_half, half: int, target: float = 0.9):
    """Models needed for reliability ``target``, from the reliability ``rho_half`` of ``half``
    models (Spearman-Brown inverted); ``inf`` where ``rho_half`` <= 0, never below 1."""
    if not 0.0 < target < 1.0:
        raise ValueError(f"target reliability must lie in (0, 1), got {target!r}")
    rho = np.asarray(rho_half, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        k = half * target * (1.0 - rho) / (rho * (1.0 - target))
    k = np.where(rho > 0, np.maximum(k, 1.0), np.inf)
    return k if k.ndim else float(k)


# --- the per-block kernels --------------------------------------------------------------------

def _check(train, query, measure: str) -> int:
    if measure not in MEASURES:
        raise ValueError(f"measure must be one of {MEASURES}, got {measure!r}")
    if train.ndim != 2 or query.ndim != 2:
        raise ValueError(f"losses must be [K, n] and [K, m] arrays, got shapes {train.shape} and "
                         f"{query.shape}")
    K = train.shape[0]
    if query.shape[0] != K:
        raise ValueError(f"'train' has K={K} models but 'query' has K={query.shape[0]}; both must "
                         "come from the same K perturbed models")
    if K < 4:
        raise ValueError(f"diagnostics need at least K=4 perturbed models (two halves of 2), "
                         f"got K={K}")
    return K


def _standardise(x: np.ndarray, measure: str) -> np.ndarray:
    """Centre the columns of ``x`` [K, b] (float64); for correlation also divide by the 1/K
    standard deviation (zero-variance columns become 0, as their scores are 0)."""
    z = np.asarray(x, np.float64)
    z = z - z.mean(axis=0)
    if measure == "correlation":
        sd = np.sqrt((z * z).mean(axis=0))
        z = np.divide(z, sd, out=np.zeros_like(z), where=sd > 0)
    return z


class _Query:
    """The query side of the moments, computed once: y, y^2, y^3 and m04 ([K, m] and [m])."""

    def __init__(self, query: np.ndarray, measure: str):
        self.y = _standardise(query, measure)
        self.y2 = self.y * self.y
        self.y3 = self.y2 * self.y
        self.m04 = (self.y2 * self.y2).mean(axis=0)


def _scores_and_se(x: np.ndarray, q: _Query, measure: str) -> tuple[np.ndarray, np.ndarray]:
    """Scores and their standard errors [b, m] of a standardised training block ``x`` [K, b]."""
    K = x.shape[0]
    x2 = x * x
    m11 = x.T @ q.y / K
    m22 = x2.T @ q.y2 / K
    if measure == "correlation":
        m31 = (x2 * x).T @ q.y / K
        m13 = x.T @ q.y3 / K
        m40 = (x2 * x2).mean(axis=0)
        r2 = m11 * m11
        if2 = m22 * (1.0 + r2 / 2) + (r2 / 4) * (m40[:, None] + q.m04[None, :]) - m11 * (m31 + m13)
        scale, score = 1.0, m11
    else:
        if2 = m22 - m11 * m11
        scale, score = K / (K - 1), m11 * (K / (K - 1))
    se = scale * np.sqrt(np.maximum(if2, 0.0) / (K - 1))  # rounding can leave -1e-17
    return score, se


def score_se(train, query, measure: str = "correlation") -> np.ndarray:
    """Monte Carlo standard error [n, m] of each score of :func:`scoring.pairwise_scores`.

    Args:
        train: losses [K, n] of the training examples under the K perturbed models.
        query: losses [K, m] of the queries under the same models.
        measure: ``"correlation"`` or ``"covariance"``, as the scores.

    Returns:
        float64 [n, m]: sqrt(sum_k IF_k^2 / (K (K - 1))), the delta-method standard error (module
        docstring); 0 for examples whose losses never moved.
    """
    train, query = np.asarray(train), np.asarray(query)
    _check(train, query, measure)
    return _scores_and_se(_standardise(train, measure), _Query(query, measure), measure)[1]


def _halves(K: int, splits: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """``splits`` halvings of the K models into two disjoint sets of K // 2: first the prefix
    [0, h) against [h, 2h), then random permutations (numpy's generator seeded with ``seed``)."""
    if int(splits) != splits or splits < 1:
        raise ValueError(f"splits must be a whole number >= 1, got {splits!r}")
    h = K // 2
    rng = np.random.default_rng(seed)
    orders = [np.arange(K)] + [rng.permutation(K) for _ in range(int(splits) - 1)]
    return [(np.sort(p[:h]), np.sort(p[h:2 * h])) for p in orders]


class _PearsonSums:
    """Per-query sums that give the Pearson correlation of two score columns, block by block."""

    def __init__(self, m: int):
        self.n = 0
        self.s = np.zeros((5, m))  # sum a, sum b, sum a^2, sum b^2, sum ab

    def add(self, a: np.ndarray, b: np.ndarray) -> None:
        self.n += a.shape[0]
        self.s += np.stack([a.sum(0), b.sum(0), (a * a).sum(0), (b * b).sum(0), (a * b).sum(0)])

    def corr(self) -> np.ndarray:
        sa, sb, saa, sbb, sab = self.s
        n = self.n
        cov = sab - sa * sb / n
        var = (saa - sa * sa / n) * (sbb - sb * sb / n)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(var > 0, cov / np.sqrt(np.maximum(var, 1e-300)), 0.0)


def split_reliability(train, query, measure: str = "correlation", splits: int = 1,
                      seed: int = 0) -> np.ndarray:
    """Per-query split-half reliability [m] of the scores (Pearson across training examples of
    the scores from two disjoint halves of K // 2 models; mean over ``splits`` halvings)."""
    train, query = np.asarray(train), np.asarray(query)
    _check(train, query, measure)
    return diagnose(train, query, measure, splits=splits, seed=seed, se=False).half_reliability


# --- the streaming pass -----------------------------------------------------------------------

@dataclass
class Diagnostics:
    """What :func:`diagnose` measured; ``attrs()`` is the summary stored in a scores file."""

    measure: str
    K: int
    half: int                       # models in each half
    splits: int
    target: float                   # reliability the ``K_needed`` aims at
    half_reliability: np.ndarray    # [m], per query, mean over splits
    se_quantiles: dict = field(default_factory=dict)   # {"q10", "q50", "q90"} of all SEs
    share_significant: float = math.nan                # share of scores with |score| > 2 SE
    n_scores: int = 0

    @property
    def reliability(self) -> np.ndarray:
        """Per-query reliability of the scores from all K models (Spearman-Brown), [m]."""
        return spearman_brown(self.half_reliability, self.K / self.half)

    @property
    def mean_half(self) -> float:
        return float(np.mean(self.half_reliability))

    @property
    def mean_reliability(self) -> float:
        return float(np.mean(self.reliability))

    @property
    def K_needed(self) -> float:
        """Models for reliability ``target`` on the average query (from the mean half reliability)."""
        return models_needed(self.mean_half, self.half, self.target)

    def attrs(self) -> dict:
        rel = self.reliability
        return {"measure": self.measure, "K": self.K, "half": self.half, "splits": self.splits,
                "half_reliability": self.mean_half, "reliability": self.mean_reliability,
                "reliability_q10": float(np.quantile(rel, 0.1)),
                "reliability_q90": float(np.quantile(rel, 0.9)),
                "target": self.target, "K_needed": _finite_or_none(self.K_needed),
                "se_q10": self.se_quantiles.get("q10"), "se_median": self.se_quantiles.get("q50"),
                "se_q90": self.se_quantiles.get("q90"),
                "share_above_2se": self.share_significant, "n_scores": self.n_scores}

    def report(self) -> str:
        """A compact block of text for the command line."""
        a = self.attrs()
        lines = [f"reliability of the scores (K={self.K}, {self.measure}; halves of {self.half} "
                 f"models, {self.splits} split{'s' if self.splits > 1 else ''}):"]
        if a["se_median"] is not None:
            lines.append(f"  Monte Carlo SE of a score: median {a['se_median']:.3g} (10%-90% "
                         f"{a['se_q10']:.3g}-{a['se_q90']:.3g}); |score| > 2 SE for "
                         f"{100 * a['share_above_2se']:.1f}% of {self.n_scores} scores")
        lines.append(f"  split-half reliability {a['half_reliability']:.3f} -> all K={self.K} "
                     f"(Spearman-Brown) {a['reliability']:.3f} (queries 10%-90% "
                     f"{a['reliability_q10']:.3f}-{a['reliability_q90']:.3f})")
        if self.half < 10:  # a correlation across 2-5 models is nearly +-1 whatever the signal
            lines.append(f"  caution: halves of {self.half} models are too few for a stable "
                         "estimate; use K >= 20")
        need = a["K_needed"]
        lines.append(f"  K for reliability {self.target:g}: "
                     + (f"{math.ceil(need)}" if need is not None else
                        "unbounded (the halves do not agree)"))
        return "\n".join(lines)


def _finite_or_none(v: float):
    return float(v) if math.isfinite(v) else None


def _block_size(K: int, m: int, memory_gb: float) -> int:
    from .scoring import _check_memory

    per_column = 8 * (_TEMPS * m + 4 * K)
    return max(1, int(_check_memory(memory_gb) * 2**30 // per_column))


def diagnose(train, query, measure: str = "correlation", *, splits: int = 1, seed: int = 0,
             target: float = 0.9, se: bool = True, memory_gb: float = 1.0, se_sink=None,
             ) -> Diagnostics:
    """Standard errors and split-K reliability of the scores of losses ``train`` [K, n] and
    ``query`` [K, m], streamed over blocks of training examples.

    ``train`` may be anything sliced as ``train[:, lo:hi]`` (an array, a memmap, an h5py
    dataset). With ``se``, ``se_sink(lo, hi, scores, se)`` (if given) receives each block's
    scores and standard errors [hi - lo, m]. ``memory_gb`` bounds the float64 temporaries.
    """
    query = np.asarray(query)
    K, n = train.shape
    m = query.shape[1]
    _check(np.empty((K, 0)), query, measure)
    models_needed(0.5, 1, target)  # refuses a bad target before the work
    halves = _halves(K, splits, seed)
    h = len(halves[0][0])
    q_all = _Query(query, measure) if se else None
    q_halves = [(_standardise(query[a], measure), _standardise(query[b], measure))
                for a, b in halves]
    sums = [_PearsonSums(m) for _ in halves]
    stride = max(1, math.ceil(n * m / _SE_SAMPLE))
    sample, significant = [], 0
    block = _block_size(K, m, memory_gb)
    for lo in range(0, n, block):
        hi = min(n, lo + block)
        x = np.asarray(train[:, lo:hi], np.float64)
        if not np.isfinite(x).all():
            raise store.StoreError(f"training losses {lo}..{hi - 1} hold NaN or infinite values; "
                                   "score the file first (daunce score) to find them")
        for (a, b), (ya, yb), acc in zip(halves, q_halves, sums):
            acc.add(_standardise(x[a], measure).T @ ya, _standardise(x[b], measure).T @ yb)
        if se:
            s, e = _scores_and_se(_standardise(x, measure), q_all, measure)
            significant += int((np.abs(s) > 2 * e).sum())
            sample.append(e.ravel()[::stride])
            if se_sink is not None:
                se_sink(lo, hi, s, e)
    diag = Diagnostics(measure, K, h, len(halves), target,
                       np.mean([acc.corr() for acc in sums], axis=0))
    if se:
        sample = np.concatenate(sample)
        diag.se_quantiles = {f"q{int(100 * p)}": float(np.quantile(sample, p)) for p in (0.1, 0.5, 0.9)}
        diag.share_significant = significant / (n * m)
        diag.n_scores = n * m
    return diag


# --- files ------------------------------------------------------------------------------------

def diagnose_file(losses_path, measure: str = "correlation", *, splits: int = 1, seed: int = 0,
                  target: float = 0.9, memory_gb: float = 1.0, se_sink=None) -> Diagnostics:
    """:func:`diagnose` on a losses file, reading the training losses block by block."""
    with store.open_h5(losses_path) as f, store.reading(losses_path, store.LOSSES.name):
        ds = store.require(f, "train", 2)
        store.number_dtype(ds)
        query = store.read_numbers(f, "query", 2)
        if query.shape[0] != ds.shape[0]:
            raise store.StoreError(f"{losses_path}: 'train' has K={ds.shape[0]} models but 'query' "
                                   f"has K={query.shape[0]}")
        return diagnose(ds, query, measure, splits=splits, seed=seed, target=target,
                        memory_gb=memory_gb, se_sink=se_sink)


def score_file_with_diagnostics(losses_path, out_path, *, measure: str = "correlation",
                                splits: int = 1, seed: int = 0, target: float = 0.9,
                                **score_kwargs) -> tuple[str, Diagnostics]:
    """:func:`scoring.score_file`, plus the diagnostics stored in the same (atomic) scores file.

    The scores file is exactly what ``score_file`` writes, with in addition the attribute
    ``diagnostics`` (JSON: :meth:`Diagnostics.attrs`) and the group ``diagnostics`` holding
    ``se`` (the standard error of each raw score, laid out as the scores: [n, m] when dense,
    [m, k] beside ``values`` when top-k), ``reliability`` and ``half_reliability`` [m].

    Args:
        losses_path, out_path: as ``score_file``.
        measure: ``"correlation"`` or ``"covariance"``.
        splits, seed: halvings of the K models (:func:`diagnose`).
        target: reliability for which ``K_needed`` is given.
        **score_kwargs: the other arguments of ``score_file`` (``topk``, ``threshold``,
            ``lam``, ``memory_gb``, ``threads``).

    Returns:
        (``str(out_path)``, the :class:`Diagnostics`).
    """
    from .scoring import score_file

    store.check_output(out_path, inputs=[losses_path])
    with store.atomic_path(out_path, suffix=".h5") as tmp:
        # validates the losses; writes into this temporary (store.atomic_path), none of its own
        score_file(losses_path, tmp, measure=measure, **score_kwargs)
        with h5py.File(tmp, "r+") as out:
            g = out.create_group("diagnostics")
            if out.attrs["format"] == "dense":
                n, m = out["scores"].shape
                se_ds = g.create_dataset("se", shape=(n, m), dtype=np.float32)

                def sink(lo, hi, s, e):
                    se_ds[lo:hi] = e
            else:
                idx = out["indices"][()]  # [m, k] positions
                se_topk = np.zeros(idx.shape, np.float32)
                cols = np.broadcast_to(np.arange(idx.shape[0])[:, None], idx.shape)

                def sink(lo, hi, s, e):
                    hit = (idx >= lo) & (idx < hi)
                    se_topk[hit] = e[idx[hit] - lo, cols[hit]]
            diag = diagnose_file(losses_path, measure, splits=splits, seed=seed, target=target,
                                 memory_gb=float(score_kwargs.get("memory_gb", 4.0)),
                                 se_sink=sink)
            if out.attrs["format"] != "dense":
                g.create_dataset("se", data=se_topk)
            g.create_dataset("reliability", data=diag.reliability)
            g.create_dataset("half_reliability", data=diag.half_reliability)
            out.attrs["diagnostics"] = json.dumps(diag.attrs())
    return str(out_path), diag
