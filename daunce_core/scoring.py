"""Scoring engine: DAUNCE scores from the per-example losses of K perturbed models.

The score of training example ``i`` for query ``j`` is the covariance (paper eq. 6, with the
unbiased 1/(K-1)) or the Pearson correlation (the paper's default) across the K models of their
losses (or margins, for ``daunce_t``); positive means the training example helps the query. Each
block of standardised loss columns against the queries is one float32 GEMM, streamed from memory or
an HDF5 losses file, with optional thresholding or top-k folded in per tile. :func:`score_file` is
what ``daunce score``, the workflow and every fitter call. How the blocks, threads, checks and
thresholds work: docs/design.md#daunce_corescoringpy-the-scoring-engine."""
from __future__ import annotations

import math
import os
import queue
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait

import h5py
import numpy as np
from numba import njit
from threadpoolctl import threadpool_limits
from tqdm.auto import tqdm

from . import store

__all__ = [
    "MEASURES",
    "THRESHOLDS",
    "pairwise_scores",
    "threshold_scores",
    "quantile_lambda",
    "topk_scores",
    "score_file",
    "plan_blocks",
]

MEASURES = ("correlation", "covariance")
THRESHOLDS = ("none", "soft", "hard", "topk")
_KIND = {"none": 0, "soft": 1, "hard": 2}

# Training examples per streamed block when memory allows. Large enough that per-block Python
# overhead is negligible and a query tile's GEMM runs at full BLAS speed.
DEFAULT_BLOCK = 4096
# Queries per tile: a 128 x 4096 float32 tile is 2 MiB, one core's L2 on the benchmark machine,
# so the top-k kernel reads the scores from cache right after the GEMM wrote them.
_QUERY_TILE = 128
# Float64 temporaries of pairwise_scores (a standardised block and its product) stay below this.
_DENSE_TEMP_BYTES = 64 * 2**20
# Fixed allowance, outside the blocks, for the interpreter, numpy, numba and h5py themselves.
_RUNTIME_BYTES = 256 * 2**20
# Columns standardised together (their float64 sums stay in L1 while the K rows stream by).
_STAT_CHUNK = 512
# Scores per step of the top-k scan: a vectorised count of those beating the query's current
# k-th best; only chunks with a hit are inspected one by one (rare after the first blocks).
_SCAN_CHUNK = 64
# Finite inputs only (checked first), so NaN-free maths is safe; not 'ninf': -inf is a sentinel.
_FAST = {"nnan", "nsz", "arcp", "contract", "afn", "reassoc"}
_F32_MAX = float(np.finfo(np.float32).max)


def default_threads() -> int:
    """Cores this process may run on (the scorer starts one worker per core)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


# --- kernels ---------------------------------------------------------------------------------

@njit(nogil=True, cache=True)
def _standardise_kernel(x, out, correlation):  # pragma: no cover - compiled
    """Centre each column of ``x`` [K, b] and scale it; return (zero-variance, non-finite) counts.

    Correlation: divide by the column's norm (zero-variance columns become 0). Covariance:
    divide by sqrt(K-1), so a dot product of two columns is the unbiased covariance (eq. 6).
    Statistics are accumulated in float64 whatever the input dtype. ``x`` and ``out`` must be
    C-contiguous: the loops run along contiguous row pieces so that they vectorise.
    """
    K, b = x.shape
    zero = 0
    bad = 0
    cov_scale = 1.0 / math.sqrt(K - 1) if K > 1 else 0.0
    mean_buf = np.empty(_STAT_CHUNK)
    scale_buf = np.empty(_STAT_CHUNK)
    for lo in range(0, b, _STAT_CHUNK):
        w = min(b, lo + _STAT_CHUNK) - lo
        mean = mean_buf[:w]
        scale = scale_buf[:w]
        mean[:] = 0.0
        scale[:] = 0.0
        for k in range(K):
            row = x[k, lo:lo + w]
            for i in range(w):
                mean[i] += row[i]
        for i in range(w):
            mean[i] /= K
        for k in range(K):
            row = x[k, lo:lo + w]
            for i in range(w):
                d = row[i] - mean[i]
                scale[i] += d * d
        for i in range(w):  # sum of squares -> scale
            if not math.isfinite(scale[i]):
                bad += 1
                scale[i] = 0.0
            elif scale[i] > 0.0:
                scale[i] = 1.0 / math.sqrt(scale[i]) if correlation else cov_scale
            else:
                zero += 1
                scale[i] = 0.0
        for k in range(K):
            row = x[k, lo:lo + w]
            dst = out[k, lo:lo + w]
            for i in range(w):
                dst[i] = (row[i] - mean[i]) * scale[i]
    return zero, bad


@njit(inline="always")
def _transform(v, kind, lam):  # pragma: no cover - compiled
    """Soft (kind 1) or hard (kind 2) thresholding of one float32 score, written to vectorise."""
    zero = np.float32(0.0)
    if kind == 1:
        return max(v - lam, zero) + min(v + lam, zero)
    if kind == 2:
        return v if abs(v) > lam else zero
    return v


@njit(inline="always")
def _sift_down(hv, hi, v, idx):  # pragma: no cover - compiled
    """Replace the root of the min-heap (``hv`` values, ``hi`` indices) by (v, idx)."""
    k = hv.shape[0]
    pos = 0
    while True:
        child = 2 * pos + 1
        if child >= k:
            break
        if child + 1 < k and hv[child + 1] < hv[child]:
            child += 1
        if hv[child] >= v:
            break
        hv[pos] = hv[child]
        hi[pos] = hi[child]
        pos = child
    hv[pos] = v
    hi[pos] = idx


@njit(inline="always")
def _scan(row, c0, c1, kind, lam, thr, offset, hv, hi):  # pragma: no cover - compiled
    for i in range(c0, c1):
        v = _transform(row[i], kind, lam)
        if v > thr:
            _sift_down(hv, hi, v, offset + i)
            thr = hv[0]
    return thr


@njit(nogil=True, fastmath=_FAST, cache=True)
def _fold_topk(S, offset, kind, lam, hv_all, hi_all):  # pragma: no cover - compiled
    """Fold the score tile ``S`` [q, b] (queries x training examples) into running top-k heaps.

    ``hv_all``/``hi_all`` [q, k] are min-heaps (root = the query's current k-th best) of
    thresholded scores and training positions; column ``i`` of the tile is position
    ``offset + i``. Ties keep the earlier training example.
    """
    m, width = S.shape
    nfull = width // _SCAN_CHUNK
    for j in range(m):
        hv = hv_all[j]
        hi = hi_all[j]
        lj = lam[j]
        row = S[j]
        thr = hv[0]
        for c in range(nfull):
            c0 = c * _SCAN_CHUNK
            hits = 0
            # One loop per kind, so that each is a branch-free vectorised count.
            if kind == 1:
                for i in range(_SCAN_CHUNK):
                    hits += _transform(row[c0 + i], 1, lj) > thr
            elif kind == 2:
                for i in range(_SCAN_CHUNK):
                    hits += _transform(row[c0 + i], 2, lj) > thr
            else:
                for i in range(_SCAN_CHUNK):
                    hits += row[c0 + i] > thr
            if hits:
                thr = _scan(row, c0, c0 + _SCAN_CHUNK, kind, lj, thr, offset, hv, hi)
        _scan(row, nfull * _SCAN_CHUNK, width, kind, lj, thr, offset, hv, hi)


@njit(nogil=True, fastmath=_FAST, cache=True)
def _threshold_inplace(S, kind, lam):  # pragma: no cover - compiled
    """Soft- or hard-threshold the examples-x-queries tile ``S`` [b, m] in place, ``lam`` [m]."""
    b, m = S.shape
    for i in range(b):
        for j in range(m):
            S[i, j] = _transform(S[i, j], kind, lam[j])


# --- standardisation -------------------------------------------------------------------------

def _check_measure(measure: str) -> None:
    if measure not in MEASURES:
        raise ValueError(f"measure must be one of {MEASURES}, got {measure!r}")


# The largest memory budget taken (GiB): 1 PiB, beyond any machine; a larger number (1e308) would
# overflow the byte counts computed from it.
MAX_MEMORY_GB = 2.0**20


def _check_memory(memory_gb) -> float:
    try:
        gb = float(memory_gb)
    except (TypeError, ValueError, OverflowError):
        gb = math.nan
    if not (math.isfinite(gb) and 0 < gb <= MAX_MEMORY_GB):
        raise ValueError(f"memory_gb (--memory-gb) must be a finite number of GiB above 0 and at most "
                         f"{MAX_MEMORY_GB:.0f} (1 PiB), got {memory_gb!r}")
    return gb


def _max_norm(z: np.ndarray) -> float:
    """Largest column norm of a standardised block, in float64: it bounds every dot product."""
    return float(np.sqrt(np.einsum("kb,kb->b", z, z, dtype=np.float64).max())) if z.size else 0.0


def _guard_overflow(query_norm: float, z: np.ndarray, source: str) -> None:
    """Refuse covariance scores that float32 cannot hold (Cauchy-Schwarz bound of the block)."""
    bound = query_norm * _max_norm(z)
    if not bound <= _F32_MAX:  # also true for inf and NaN
        where = f"{source}: " if source else ""
        raise ValueError(f"{where}covariance scores could reach {bound:.3g}, beyond float32 "
                         f"(max {_F32_MAX:.3g}): the losses are too large; rescale them or use "
                         "the correlation measure (--measure correlation)")


def _standardise(x: np.ndarray, measure: str, out: np.ndarray, ids: np.ndarray | None,
                 what: str, source: str = "") -> int:
    """Standardise ``x`` [K, b] into ``out``, refusing NaN/inf (naming ids); count zero variance."""
    x = np.ascontiguousarray(x)  # a column block of a [K, n] array is a strided view
    n_zero, n_bad = _standardise_kernel(x, out, measure == "correlation")
    if n_bad:
        ids = np.arange(x.shape[1]) if ids is None else ids
        store.check_finite(np.asarray(x), ids, what, source)
        raise ValueError(f"{source + ': ' if source else ''}{n_bad} {what} example(s) have losses "
                         "too large to square in float64; rescale them")
    return int(n_zero)


def _standardised(x: np.ndarray, measure: str, dtype, ids=None, what="",
                  source="") -> tuple[np.ndarray, int]:
    out = np.empty(x.shape, dtype)
    return out, _standardise(x, measure, out, ids, what, source)


def _warn_zero(n_train: int, n_query: int, measure: str) -> None:
    if measure == "correlation" and (n_train or n_query):
        warnings.warn(
            f"{n_train} training and {n_query} query example(s) have zero variance across the K "
            "models (their loss never moved); their correlation with everything is set to 0",
            RuntimeWarning, stacklevel=3)


def _as_2d(a, name: str) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype.kind not in "fiub" and a.dtype.name != "bfloat16":
        raise ValueError(f"{name} holds {store.describe_dtype(a.dtype)}, expected numbers (losses)")
    if a.ndim != 2:
        raise ValueError(f"{name} must be a [K, {'n' if name == 'train' else 'm'}] array, "
                         f"got shape {a.shape}")
    if a.dtype not in (np.float32, np.float64):  # ints, float16, longdouble: kernels take these two
        a = a.astype(np.float32 if a.dtype == np.float16 else np.float64)
    return a


def _check_shapes(train: np.ndarray, query: np.ndarray, source: str = "") -> int:
    where = f"{source}: " if source else ""
    if train.shape[0] != query.shape[0]:
        raise ValueError(
            f"{where}'train' has K={train.shape[0]} models but 'query' has K={query.shape[0]}; "
            "both must come from the same K perturbed models")
    K = train.shape[0]
    if K < 2:
        raise ValueError(f"{where}scores need at least K=2 perturbed models, got K={K}")
    return K


# --- dense scores and thresholding -----------------------------------------------------------

def pairwise_scores(train, query, measure: str = "correlation") -> np.ndarray:
    """Dense DAUNCE scores I(x_i, x_j) between every training example and every query.

    Args:
        train: losses [K, n] of the n training examples under the K perturbed models.
        query: losses [K, m] of the m queries under the same K models (same row order).
        measure: ``"covariance"`` (paper eq. 6, unbiased 1/(K-1)) or ``"correlation"``
            (Pearson across the K models, the paper's default).

    Returns:
        float32 [n, m]; positive means the training example helps the query. Computed in
        float64 and rounded once. Zero-variance examples get correlation 0 (one warning).

    Raises:
        ValueError: K differs between ``train`` and ``query`` or K < 2, non-numeric losses,
            or covariance scores beyond float32.
        store.StoreError: NaN or infinite losses (names the first offending positions).
    """
    _check_measure(measure)
    train, query = _as_2d(train, "train"), _as_2d(query, "query")
    K = _check_shapes(train, query)
    n, m = train.shape[1], query.shape[1]
    zq, zero_q = _standardised(query, measure, np.float64, what="query")
    qnorm = _max_norm(zq) if measure == "covariance" else None
    out = np.empty((n, m), np.float32)
    block = max(1, min(n, _DENSE_TEMP_BYTES // (8 * max(K, m))))
    zbuf = np.empty(K * block)
    zero_t = 0
    for lo in range(0, n, block):
        hi = min(n, lo + block)
        zt = zbuf[:K * (hi - lo)].reshape(K, hi - lo)
        zero_t += _standardise(train[:, lo:hi], measure, zt, np.arange(lo, hi), "training")
        if qnorm is not None:
            _guard_overflow(qnorm, zt, "")
        out[lo:hi] = zt.T @ zq
    _warn_zero(zero_t, zero_q, measure)
    return out


def _lam_vector(lam, m: int) -> np.ndarray:
    lam_v = np.asarray(lam, np.float64)
    if lam_v.ndim == 0:
        lam_v = np.full(m, float(lam_v))
    if lam_v.shape != (m,):
        raise ValueError(f"lambda must be a float or one value per query ({m}), "
                         f"got shape {lam_v.shape}")
    if not np.all(np.isfinite(lam_v)) or np.any(lam_v < 0):
        raise ValueError("lambda must be finite and non-negative")
    return lam_v


def threshold_scores(scores, kind: str = "none", lam=0.0, k: int | None = None) -> np.ndarray:
    """Threshold dense scores [n, m] per query (column); returns a new array.

    Args:
        scores: [n, m] scores (training examples x queries).
        kind: ``"none"``; ``"soft"`` sign(s)*max(|s|-lam, 0); ``"hard"`` s*(|s|>lam);
            ``"topk"`` keep the k largest scores of each query, zero the rest.
        lam: threshold for soft/hard, a float or one value per query [m] (see
            :func:`quantile_lambda`).
        k: number kept per query for ``"topk"``.
    """
    s = np.array(scores, copy=True)
    if s.ndim != 2:
        raise ValueError(f"scores must be [n, m], got shape {s.shape}")
    if not np.issubdtype(s.dtype, np.floating):
        s = s.astype(np.float64)
    n, m = s.shape
    if kind == "none":
        return s
    if kind in ("soft", "hard"):
        lam_v = _lam_vector(lam, m)[None, :]  # compared in float64, as defined
        if kind == "soft":
            return (np.sign(s) * np.maximum(np.abs(s) - lam_v, 0)).astype(s.dtype)
        return np.where(np.abs(s) > lam_v, s, 0).astype(s.dtype)
    if kind == "topk":
        if k is None or int(k) < 1:
            raise ValueError("threshold 'topk' needs k >= 1")
        k = int(k)
        if k >= n:
            return s
        keep = np.argpartition(-s, k - 1, axis=0)[:k]
        out = np.zeros_like(s)
        cols = np.arange(m)[None, :]
        out[keep, cols] = s[keep, cols]
        return out
    raise ValueError(f"threshold kind must be one of {THRESHOLDS}, got {kind!r}")


def quantile_lambda(scores, q: float) -> np.ndarray:
    """Per-query lambda [m]: the q-quantile of |scores[:, j]|, so thresholds are scale-free.

    With ``q = 0.9``, hard thresholding keeps the 10% largest-magnitude scores of each query,
    whatever the method's scale (covariance, correlation, gradient dot products).
    """
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile q must be in [0, 1], got {q}")
    s = np.asarray(scores)
    if s.ndim != 2:
        raise ValueError(f"scores must be [n, m], got shape {s.shape}")
    return np.quantile(np.abs(s), q, axis=0)




# --- streaming: blocks of training examples against all queries -----------------------------

def plan_blocks(K: int, n: int, m: int, memory_gb: float, *, k: int | None = None,
                threads: int | None = None, raw_itemsize: int = 4) -> int:
    """Width of the training blocks that keeps the scorer's peak memory within ``memory_gb``.

    ``memory_gb`` covers a fixed allowance for the interpreter and libraries
    (``_RUNTIME_BYTES``), the standardised queries (K*m float32) and, for top-k output (``k``
    given), the running top-k of each query (m*k values and positions, one copy per worker when
    there are too few queries to share out); then, per block column, the raw losses (K values
    of ``raw_itemsize`` bytes: 8 for a float64 file) and two standardised copies (K float32
    each: the next block is prepared while this one is scored)
    and the score tiles: one ``_QUERY_TILE`` rows high per worker for top-k, all m queries for
    dense output. n x m never enters. Losses already in memory (``topk_scores``) are not counted.

    Raises:
        ValueError: ``memory_gb`` is not a finite positive number, or the budget cannot hold
            even a narrow block; the message gives the minimum.
    """
    memory_gb = _check_memory(memory_gb)
    threads = threads or default_threads()
    fixed = _RUNTIME_BYTES + 4 * K * m
    per_col = (raw_itemsize + 8) * K
    if k:
        fixed += 12 * m * k * _lanes(m, threads)
        per_col += 4 * threads * min(m, _QUERY_TILE)
    else:
        per_col += 4 * m
    budget = int(memory_gb * 2**30)
    need = fixed + per_col * min(n, 64)
    if budget < need:
        raise ValueError(
            f"memory_gb={memory_gb} is too small for K={K} and m={m} queries"
            f"{f' with top-{k}' if k else ' (dense)'}: the scorer needs at least "
            f"{need / 2**30:.2f} GiB")
    return int(max(1, min(n, DEFAULT_BLOCK, (budget - fixed) // per_col)))


def _lanes(m: int, threads: int) -> int:
    """Independent top-k copies: one, unless there are too few query tiles to keep all busy."""
    return 1 if -(-m // _QUERY_TILE) >= 2 * threads else threads


def _align(block: int, chunk: int | None, n: int) -> int:
    """Round ``block`` down to whole HDF5 chunks (each chunk then read exactly once)."""
    if chunk and block >= chunk and n > block:
        return block - block % chunk
    return block


def _validate_k(k, n: int) -> int:
    if n < 1:
        raise ValueError("top-k of an empty training set: the losses have n=0 examples")
    if k is None or int(k) < 1:
        raise ValueError(f"top-k needs k >= 1, got {k!r}")
    return min(int(k), n)


class _TopKScorer:
    """Running top-k per query, fed one standardised training block [K, b] at a time.

    Work for a block is split into tasks (a range of queries, and when there are few queries a
    share of the block's columns, "lanes", each with its own top-k copy merged at the end);
    each task loops over query tiles: single-threaded GEMM, then the top-k kernel on the tile
    while it is in cache. Tasks of one block never touch the same heap rows.
    """

    def __init__(self, zq: np.ndarray, k: int, kind: str, lam, block: int, threads: int):
        if kind not in _KIND:
            raise ValueError(f"threshold for top-k must be one of {tuple(_KIND)}, got {kind!r}")
        K, m = zq.shape
        self.zqT = np.ascontiguousarray(zq.T)
        self.kind = _KIND[kind]
        self.lam = _lam_vector(lam if kind != "none" else 0.0, m).astype(np.float32)
        self.lanes = _lanes(m, threads)
        self.values = np.full((self.lanes, m, k), -np.inf, np.float32)
        self.indices = np.full((self.lanes, m, k), -1, np.int64)
        n_tiles = -(-m // _QUERY_TILE)
        n_ranges = min(n_tiles, max(1, (4 * threads) // self.lanes))
        cuts = np.linspace(0, n_tiles, n_ranges + 1).round().astype(int) * _QUERY_TILE
        self.qranges = [(int(a), int(min(b, m))) for a, b in zip(cuts[:-1], cuts[1:]) if a < m]
        self.free: queue.SimpleQueue = queue.SimpleQueue()
        for _ in range(threads):
            self.free.put(np.empty(min(m, _QUERY_TILE) * block, np.float32))
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="daunce-score")

    def submit(self, z: np.ndarray, offset: int) -> list:
        """Start scoring block ``z`` [K, b] (training positions ``offset``...); return futures."""
        cols = np.linspace(0, z.shape[1], self.lanes + 1).round().astype(int)
        return [self.pool.submit(self._task, z, offset, lane, int(cols[lane]), int(cols[lane + 1]),
                                 q0, q1)
                for lane in range(self.lanes) if cols[lane] < cols[lane + 1]
                for q0, q1 in self.qranges]

    def _task(self, z, offset, lane, c0, c1, q0, q1):
        buf = self.free.get()
        try:
            zb = z[:, c0:c1]
            w = c1 - c0
            for t0 in range(q0, q1, _QUERY_TILE):
                t1 = min(q1, t0 + _QUERY_TILE)
                tile = buf[:(t1 - t0) * w].reshape(t1 - t0, w)
                np.matmul(self.zqT[t0:t1], zb, out=tile)
                _fold_topk(tile, offset + c0, self.kind, self.lam[t0:t1],
                           self.values[lane, t0:t1], self.indices[lane, t0:t1])
        finally:
            self.free.put(buf)

    def close(self) -> None:
        # On an interruption (SIGTERM, Ctrl-C) queued tiles are dropped, running ones finish.
        self.pool.shutdown(wait=True, cancel_futures=True)

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """``indices`` [m, k] int64 and ``values`` [m, k] float32, best first; ties: lower index."""
        lanes, m, k = self.values.shape
        vals = self.values.transpose(1, 0, 2).reshape(m, lanes * k)
        idx = self.indices.transpose(1, 0, 2).reshape(m, lanes * k)
        order = np.lexsort((idx, -vals), axis=-1)[:, :k]
        return np.take_along_axis(idx, order, 1), np.take_along_axis(vals, order, 1)


def _stream_topk(read: Callable[[int, int], np.ndarray], n: int, zq: np.ndarray, measure: str,
                 k: int, kind: str, lam, block: int, threads: int, ids: np.ndarray,
                 source: str = "") -> tuple[np.ndarray, np.ndarray, int]:
    """Top-k of every query over the training set read block by block by ``read(lo, hi)``.

    Returns (indices, values, number of zero-variance training examples). The main thread
    reads and standardises block t+1 while the workers score block t.
    """
    K = zq.shape[0]
    zbufs = [np.empty(K * block, np.float32) for _ in range(2)]
    zero = 0
    qnorm = _max_norm(zq) if measure == "covariance" else None

    def prepare(t: int) -> np.ndarray:
        nonlocal zero
        lo, hi = t * block, min(n, (t + 1) * block)
        z = zbufs[t % 2][:K * (hi - lo)].reshape(K, hi - lo)
        zero += _standardise(read(lo, hi), measure, z, ids[lo:hi], "training", source)
        if qnorm is not None:
            _guard_overflow(qnorm, z, source)
        return z

    n_blocks = -(-n // block)
    scorer = _TopKScorer(zq, k, kind, lam, block, threads)
    bar = tqdm(total=n, desc="scoring", unit="ex", unit_scale=True, leave=False, mininterval=2.0,
               disable=None)
    try:
        with threadpool_limits(limits=1, user_api="blas"):
            z = prepare(0)
            for t in range(n_blocks):
                futures = scorer.submit(z, t * block)
                try:
                    if t + 1 < n_blocks:
                        z = prepare(t + 1)
                finally:
                    wait(futures)  # the workers still read this block's buffer
                for f in futures:
                    f.result()
                bar.update(min(n, (t + 1) * block) - t * block)
    finally:
        scorer.close()
        bar.close()
    indices, values = scorer.result()
    return indices, values, zero


def topk_scores(train, query, k: int, measure: str = "correlation", threshold: str = "none",
                lam=0.0, memory_gb: float = 4.0, *,
                threads: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Top-k training examples of each query, without ever holding the n x m scores.

    Streams blocks of ``train`` against all queries (float32 GEMM on float64-standardised
    losses; scores agree with :func:`pairwise_scores` to ~1e-6 of their scale), thresholds
    every score (``threshold`` ``"none"``, ``"soft"`` or ``"hard"`` with ``lam``) and keeps the
    k largest per query.

    Args:
        train: losses [K, n] (float32 or float64; a view or memmap is fine: read by blocks).
        query: losses [K, m] from the same K models.
        k: examples kept per query (clipped to n).
        measure: ``"correlation"`` or ``"covariance"`` (see :func:`pairwise_scores`).
        threshold, lam: as :func:`threshold_scores`; ``lam`` a float or one value per query.
        memory_gb: bound on the scorer's working memory (see :func:`plan_blocks`).
        threads: worker threads (default: the cores this process may use).

    Returns:
        ``indices`` [m, k] int64 positions 0..n-1 into the training set and ``values`` [m, k]
        float32 thresholded scores, best (largest) first; ties keep the smaller position.
    """
    _check_measure(measure)
    train, query = _as_2d(train, "train"), _as_2d(query, "query")
    K = _check_shapes(train, query)
    n, m = train.shape[1], query.shape[1]
    k = _validate_k(k, n)
    threads = threads or default_threads()
    zq, zero_q = _standardised(query, measure, np.float32, what="query")
    block = plan_blocks(K, n, m, memory_gb, k=k, threads=threads)
    indices, values, zero_t = _stream_topk(lambda lo, hi: train[:, lo:hi], n, zq, measure, k,
                                           threshold, lam, block, threads, np.arange(n))
    _warn_zero(zero_t, zero_q, measure)
    return indices, values


def _h5_reader(ds: h5py.Dataset, block: int, dtype=np.float32) -> Callable[[int, int], np.ndarray]:
    """Blocks of columns of ``ds``, converted by HDF5 to ``dtype`` (float64 keeps huge values)."""
    buf = np.empty(ds.shape[0] * block, dtype)

    def read(lo: int, hi: int) -> np.ndarray:
        out = buf[:ds.shape[0] * (hi - lo)].reshape(ds.shape[0], hi - lo)
        ds.read_direct(out, np.s_[:, lo:hi])
        return out

    return read


def _open_losses(f: h5py.File, src: str):
    """Datasets and ids of an open losses file, checked without reading the losses."""
    store.refuse_diverged_file(f, src)
    ds = store.require(f, "train", 2)
    qds = store.require(f, "query", 2)
    for d in (ds, qds):  # strings, objects and records are refused before anything is read
        store.number_dtype(d)
    K, n = ds.shape
    m = qds.shape[1]
    if qds.shape[0] != K:
        raise store.StoreError(
            f"{src}: 'train' has K={K} models but 'query' has K={qds.shape[0]}; both must come "
            "from the same K perturbed models")
    if K < 2:
        raise store.StoreError(f"{src}: scores need at least K=2 perturbed models, got K={K}")
    train_ids, query_ids, positional = store.example_ids(f, n, m, store.LOSSES.words("n"), store.LOSSES.words("m"))
    return ds, qds, train_ids, query_ids, positional


def score_file(losses_path, out_path, *, measure: str = "correlation", topk: int | None = None,
               threshold: str = "none", lam=0.0, memory_gb: float = 4.0,
               threads: int | None = None, attrs: dict | None = None) -> str:
    """Score a losses file into a scores file, streaming the training losses from disk.

    The output is dense (``scores`` [n, m]) unless ``topk`` is given (or ``threshold`` is
    ``"topk"``, with ``topk`` 100 by default): then top-k per query (``indices``, ``values``
    [m, k], best first). Dense scores that do not fit ``memory_gb`` are refused, never
    replaced by top-k. ``threshold`` ``"soft"``/``"hard"`` with ``lam`` is applied to every
    score before top-k selection; ``"topk"`` means top-k output (read back with
    ``store.dense_scores`` it equals ``threshold_scores(scores, "topk", k=topk)``). The file is
    written atomically: after any error (NaN/inf losses, mismatched K, an interruption) no
    output appears. Losses of any float or integer type are read (float16 as float32); a file
    without ids gets positional ids, and its scores are marked so (``ids="positional"``).

    Args:
        losses_path: HDF5 losses file (``train`` [K, n], ``query`` [K, m], ids; see daunce_core/store/).
        out_path: scores file to write; refused before any work if it is the losses file, a
            directory, a device or under a file (``store.check_output``).
        measure: ``"correlation"`` (default) or ``"covariance"``.
        topk: examples kept per query; forces top-k output.
        threshold: ``"none"``, ``"soft"``, ``"hard"`` or ``"topk"``.
        lam: threshold for soft/hard, a float or one value per query [m].
        memory_gb: peak working memory of the scorer, whatever n and m (see
            :func:`plan_blocks`); a finite number above 0.
        threads: worker threads (default: the cores this process may use).
        attrs: extra attributes recorded in the scores file, written with it (atomically), e.g.
            the library call's lr and its rule's table (``daunce_core.api.scores``).

    Returns:
        ``str(out_path)``.

    Raises:
        store.StoreError: a bad output path, missing datasets, non-numeric data, mismatched K
            or ids, NaN/inf losses (naming the first offending example ids).
        ValueError: bad arguments, dense scores larger than ``memory_gb`` (the message gives
            both sizes and the two ways out), or ``memory_gb`` too small for the queries and
            top-k.
    """
    store.check_output(out_path, inputs=[losses_path])
    _check_measure(measure)
    memory_gb = _check_memory(memory_gb)
    if threshold not in THRESHOLDS:
        raise ValueError(f"threshold must be one of {THRESHOLDS}, got {threshold!r}")
    if threshold == "topk" and topk is None:
        topk = 100
    threads = threads or default_threads()
    src = str(losses_path)
    with store.open_h5(losses_path) as f:
        ds, qds, train_ids, query_ids, positional = _open_losses(f, src)
        K, n = ds.shape
        m = qds.shape[1]
        if topk is None and 4 * n * m > memory_gb * 2**30:
            raise ValueError(
                f"{src}: dense scores of {n} x {m} need {4 * n * m / 2**30:.3g} GiB but "
                f"memory_gb (--memory-gb) is {memory_gb:g} GiB; keep the N best training "
                f"examples per query with topk=N (--topk N), or raise memory_gb to at least "
                f"{4 * n * m / 2**30:.3g}")
        kind = "none" if threshold == "topk" else threshold
        lam_v = _lam_vector(lam if kind != "none" else 0.0, m)
        raw = store.number_dtype(ds)
        zq, zero_q = _standardised(store.read_numbers(f, "query", 2), measure, np.float32,
                                   query_ids, "query", src)
        method = f.attrs.get("variant", "daunce")
        extra = dict(attrs or {})  # the caller's, recorded after the scorer's own
        attrs = {"method": method.decode() if isinstance(method, bytes) else str(method),
                 "measure": measure, "threshold": threshold, "K": K,
                 "lambda": (0.0 if kind == "none" else float(lam_v[0]) if np.ndim(lam) == 0
                            else lam_v.tolist()),
                 "zero_variance_query": zero_q}
        if positional:
            attrs["ids"] = "positional"
        attrs.update(extra)
        chunk = ds.chunks[1] if ds.chunks else None
        if topk is None:
            block = _align(plan_blocks(K, n, m, memory_gb, threads=threads,
                                       raw_itemsize=raw.itemsize), chunk, n)
            zero_t = _write_dense(ds, zq, measure, kind, lam_v, block, train_ids, query_ids,
                                  attrs, out_path, src, raw)
        else:
            k = _validate_k(topk, n)
            block = _align(plan_blocks(K, n, m, memory_gb, k=k, threads=threads,
                                       raw_itemsize=raw.itemsize), chunk, n)
            indices, values, zero_t = _stream_topk(_h5_reader(ds, block, raw), n, zq, measure, k,
                                                   kind, lam_v, block, threads, train_ids, src)
            attrs.update(k=k, zero_variance_train=zero_t)
            store.write_scores(out_path, train_ids=train_ids, query_ids=query_ids,
                               indices=indices, values=values, attrs=attrs)
    _warn_zero(zero_t, zero_q, measure)
    return str(out_path)


def _write_dense(ds, zq, measure, kind, lam_v, block, train_ids, query_ids, attrs, out_path,
                 src, raw=np.float32) -> int:
    """Dense scores [n, m], block by block into the output file (same layout as write_scores)."""
    K, n = ds.shape
    m = zq.shape[1]
    read = _h5_reader(ds, block, raw)
    qnorm = _max_norm(zq) if measure == "covariance" else None
    zbuf = np.empty(K * block, np.float32)
    sbuf = np.empty(block * m, np.float32)
    lam32 = lam_v.astype(np.float32)
    zero = 0
    with store.atomic_h5(out_path) as out:
        store.layouts.begin(out, store.DENSE_SCORES)
        sds = store.layouts.create(out, store.DENSE_SCORES, "scores", shape=(n, m))
        for lo in tqdm(range(0, n, block), desc="scoring", leave=False, mininterval=2.0,
                       disable=None):
            hi = min(n, lo + block)
            z = zbuf[:K * (hi - lo)].reshape(K, hi - lo)
            zero += _standardise(read(lo, hi), measure, z, train_ids[lo:hi], "training", src)
            if qnorm is not None:
                _guard_overflow(qnorm, z, src)
            tile = sbuf[:(hi - lo) * m].reshape(hi - lo, m)
            np.matmul(z.T, zq, out=tile)
            if kind != "none":
                _threshold_inplace(tile, _KIND[kind], lam32)
            sds[lo:hi] = tile
        for key, ids in (("train_ids", train_ids), ("query_ids", query_ids)):
            store.layouts.create(out, store.DENSE_SCORES, key, ids)
        store.layouts.finish(out, store.DENSE_SCORES, attrs, {"zero_variance_train": zero})
    return zero


# --- the configured thresholding (``lds.threshold``), for every method alike --------------------

__all__ += ["apply_threshold", "scored_threshold", "check_threshold_once"]


def scored_threshold(attrs: dict) -> dict:
    """The thresholding a scores file's scores already carry (its ``threshold`` and ``lambda``
    attributes, written by :func:`score_file`): ``{"kind": "none"}`` for raw scores (and for a
    file that records none)."""
    kind = str(attrs.get("threshold", "none"))
    if kind in ("soft", "hard"):
        return {"kind": kind, "lambda": attrs.get("lambda")}
    if kind == "topk":
        return {"kind": kind, "k": attrs.get("k")}
    return {"kind": kind}


def check_threshold_once(attrs: dict, path, kind: str, option: str = "--threshold") -> None:
    """Refuse thresholding again scores that were thresholded when scored (soft or hard): the
    result would carry two thresholds while a report names one. ``topk`` of a top-k file keeps
    its best scores, which is the same as thresholding the raw scores once, and is allowed."""
    done = scored_threshold(attrs)
    if kind != "none" and done["kind"] in ("soft", "hard"):
        raise ValueError(f"{path}: its scores were already {done['kind']}-thresholded when scored "
                         f"(lambda={done['lambda']}); {option} {kind} would apply a second threshold. "
                         f"Rescore without --threshold, or use {option} none")


def apply_threshold(scores: np.ndarray, threshold: dict) -> np.ndarray:
    """Apply a config's ``lds.threshold`` (``{"kind": none|soft|hard|topk, "quantile" | "k"}``) to
    dense scores [n, m]; soft/hard use the per-query ``quantile`` of |scores| as lambda."""
    kind = threshold.get("kind", "none")
    if kind == "none":
        return scores
    if kind == "topk":
        return threshold_scores(scores, "topk", k=int(threshold["k"]))
    return threshold_scores(scores, kind, lam=quantile_lambda(scores, float(threshold["quantile"])))
