"""Most-influential-subset removal (Section 4.2, Appendix C), independent of the method and model.

Keep the queries every full-data seed answers correctly, rank training examples by their scores
summed over them, remove the top N, retrain, and report the share of kept queries now answered
wrongly, against random removal, with paired seeds and t-intervals (:func:`summarise`). The
harness never sees a model (``retrain(keep_indices, seed)`` is passed in); the LLM steps call it.
The recipe step by step: docs/design.md#daunce_coreremovalpy-most-influential-subset-removal."""
from __future__ import annotations

import csv
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import store

log = logging.getLogger(__name__)

__all__ = [
    "select_queries",
    "split_queries",
    "cap_queries",
    "ranking_from_scores",
    "ranking_from_file",
    "random_ranking",
    "removal_effect",
    "write_result",
    "read_results",
    "summarise",
    "t_interval",
    "NOISE_METHOD",
    "PAIRS",
    "write_table",
    "read_table",
    "plot_removal",
]


def select_queries(correct: np.ndarray) -> np.ndarray:
    """Indices of the queries answered correctly in every seed; ``correct`` is [S, m] bool."""
    correct = np.asarray(correct, bool)
    if correct.ndim != 2:
        raise ValueError(f"correct must be [seeds, queries], got shape {correct.shape}")
    return np.flatnonzero(correct.all(axis=0))


def split_queries(selected: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split the selected queries into (selection, test) parts; ``fraction`` goes to selection.

    The selection part judges hyperparameters (the learning rate); the test part is reported.
    ``fraction = 0`` gives no selection queries. Both parts come back sorted.
    """
    selected = np.asarray(selected, np.int64)
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"selection fraction must be in [0, 1), got {fraction}")
    n_sel = int(round(fraction * len(selected)))
    perm = np.random.default_rng([int(seed), 17]).permutation(len(selected))
    return np.sort(selected[perm[:n_sel]]), np.sort(selected[perm[n_sel:]])


def cap_queries(queries: np.ndarray, cap: int, seed: int) -> np.ndarray:
    """A seeded choice of at most ``cap`` of ``queries`` (``cap = 0``: all), sorted.

    Appendix C evaluates 2,000 MATH and 200 IFEval queries among those the full-data models
    solve; the choice is uniform and depends only on ``seed`` and the candidates.
    """
    queries = np.asarray(queries, np.int64)
    if cap < 0:
        raise ValueError(f"query cap must be >= 0 (0 = all), got {cap}")
    if cap == 0 or len(queries) <= cap:
        return np.sort(queries)
    pick = np.random.default_rng([int(seed), 23]).choice(len(queries), size=int(cap), replace=False)
    return np.sort(queries[pick])


def ranking_from_scores(scores: np.ndarray, query_cols: Sequence[int]) -> np.ndarray:
    """Training indices ordered by summed score over ``query_cols``, most helpful first.

    ``scores`` is [n, m] (positive = helps). Ties keep the training order (stable sort), so a
    ranking is reproducible.
    """
    scores = np.asarray(scores)
    cols = np.asarray(query_cols, np.int64)
    if cols.size == 0:
        raise ValueError("no queries to rank by: none was answered correctly in every seed "
                         "(train theta_0 longer, or check the answer checker)")
    if not np.isfinite(scores[:, cols]).all():
        raise store.StoreError("scores contain NaN or infinite values; cannot rank training examples")
    total = scores[:, cols].astype(np.float64).sum(axis=1)
    return np.argsort(-total, kind="stable")


def ranking_from_file(path, query_ids: Sequence[int], train_ids: Sequence[int] | None = None,
                      train_path="the training set") -> np.ndarray:
    """:func:`ranking_from_scores` of a scores file, selecting queries by their ids.

    With ``train_ids`` (those of ``train_path``), the ranking lists positions in that training
    set: the file's training examples are joined on ids (``store.align_scores``), never taken by
    position.
    """
    dense, meta = store.dense_scores(path)
    if train_ids is not None:
        dense, _ = store.align_scores(dense, meta, {"train_ids": train_ids, "query_ids": meta["query_ids"]},
                                      path, train_path, notify=log.warning)
    pos = {int(q): j for j, q in enumerate(meta["query_ids"])}
    missing = [int(q) for q in query_ids if int(q) not in pos]
    if missing:
        raise store.StoreError(f"{path}: query ids {missing[:10]} are not in the scores file")
    return ranking_from_scores(dense, [pos[int(q)] for q in query_ids])


def random_ranking(n: int, seed: int | Sequence[int]) -> np.ndarray:
    """A uniformly random ranking of ``n`` training examples (the reference line).

    ``seed`` may be a sequence (``(removal seed, retrain seed)``): one ranking per retrain seed.
    """
    key = [int(v) for v in np.atleast_1d(seed)]
    return np.random.default_rng([*key, 19]).permutation(n)


def removal_effect(
    ranking: np.ndarray | Callable[[int], np.ndarray],
    N: int,
    seeds: Sequence[int],
    retrain: Callable[[np.ndarray, int], np.ndarray],
) -> dict[str, Any]:
    """Remove the top ``N`` of ``ranking``, retrain once per seed, measure the flipped queries.

    Args:
        ranking: training indices, most influential first; or ``ranking(seed)``, a ranking per
            retrain seed (random removal draws a fresh one each time).
        N: how many to remove (0: the full data, the retraining noise).
        seeds: training seeds (Appendix C: 3); a result's seeds pair it with the other methods'.
        retrain: ``retrain(keep, seed) -> correct`` fine-tunes on the kept training indices
            (sorted) with ``seed`` and returns, for each evaluated query (all of them correct
            under the full-data model), whether it is still answered correctly.

    Returns:
        ``{"N", "removed", "seeds", "wrong": [per seed share], "mean", "std"}``; ``removed`` is
        one list, or one per seed for a per-seed ranking.
    """
    per_seed = callable(ranking)
    wrong, removed = [], []
    for s in seeds:
        rank = np.asarray(ranking(int(s)) if per_seed else ranking, np.int64)
        if not 0 <= N < len(rank):
            raise ValueError(f"cannot remove N={N} of {len(rank)} training examples")
        removed.append(rank[:N].tolist())
        correct = np.asarray(retrain(np.sort(rank[N:]), int(s)), bool)
        wrong.append(float(1.0 - correct.mean()) if correct.size else float("nan"))
        log.info("N=%d seed=%d: %.3f of the queries now wrong", N, s, wrong[-1])
    return {"N": int(N), "removed": removed if per_seed else (removed[0] if removed else []),
            "seeds": [int(s) for s in seeds], "wrong": wrong,
            "mean": float(np.mean(wrong)), "std": float(np.std(wrong))}


# --- results, table, figure ------------------------------------------------------------------

# The retrain on the full data (N = 0) is one result shared by every method.
NOISE_METHOD = "none"
# The paired differences the table and Figure 2 report (first minus second).
PAIRS = (("daunce", "random"), ("daunce", "logra"))


def write_result(path, result: dict[str, Any], **extra: Any) -> None:
    """Write one removal result (JSON) atomically."""
    with store.atomic_path(path, suffix=".json.tmp") as tmp:
        Path(tmp).write_text(json.dumps({**extra, **result}, indent=1))


def read_results(paths: Sequence) -> list[dict[str, Any]]:
    out = []
    for p in paths:
        try:
            out.append(json.loads(Path(p).read_text()))
        except (OSError, json.JSONDecodeError) as exc:
            raise store.StoreError(f"{p}: not a readable removal result ({exc}); rerun its rule") from exc
    return out


def t_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """Mean and two-sided Student-t confidence interval of ``values``; NaN bounds below 2 values."""
    from scipy import stats

    x = np.asarray(values, np.float64)
    mean = float(x.mean()) if x.size else float("nan")
    if x.size < 2:
        return mean, float("nan"), float("nan")
    half = float(stats.t.ppf(0.5 + level / 2, x.size - 1) * x.std(ddof=1) / np.sqrt(x.size))
    return mean, mean - half, mean + half


def _by_seed(r: dict[str, Any]) -> dict[int, float]:
    return dict(zip(r.get("seeds", range(len(r["wrong"]))), r["wrong"], strict=True))


def _row(kind: str, method: str, N: int, values: Sequence[float], queries: Any, level: float) -> dict[str, Any]:
    mean, lo, hi = t_interval(values, level)
    return {"kind": kind, "method": method, "N": int(N), "mean": mean,
            "std": float(np.std(values)) if len(values) else float("nan"),
            "ci_low": lo, "ci_high": hi, "seeds": len(values), "queries": queries}


def summarise(results: Sequence[dict[str, Any]], *, pairs: Sequence[tuple[str, str]] = PAIRS,
              level: float = 0.95) -> list[dict[str, Any]]:
    """The table of Figure 2: share wrong per (method, N), and paired differences, with t-intervals.

    ``kind = "wrong"`` rows: mean share of the queries now wrong over the seeds, its std and
    ``level`` t-interval. The full-data retrain (method :data:`NOISE_METHOD`, N = 0) gives every
    method its N = 0 row; without it there is no N = 0 row. ``kind = "difference"`` rows
    (method ``"a - b"``): for each pair of ``pairs`` and each N > 0 both were run at, the mean
    over the seeds both share of ``wrong_a(seed) - wrong_b(seed)``, with its t-interval -- the
    pairing removes the seed's share of the retraining noise.
    """
    runs = {(r["method"], int(r["N"])): r for r in results}
    noise = [r for (m, N), r in runs.items() if m == NOISE_METHOD]
    methods = sorted({m for m, _ in runs if m != NOISE_METHOD})
    rows = []
    for (m, N), r in runs.items():
        if m != NOISE_METHOD:
            rows.append(_row("wrong", m, N, r["wrong"], r.get("queries", ""), level))
    for r in noise:
        rows += [_row("wrong", m, 0, r["wrong"], r.get("queries", ""), level) for m in methods]
    for a, b in pairs:
        for N in sorted({N for m, N in runs if m == a and (b, N) in runs and N > 0}):
            wa, wb = _by_seed(runs[(a, N)]), _by_seed(runs[(b, N)])
            common = [s for s in wa if s in wb]
            rows.append(_row("difference", f"{a} - {b}", N, [wa[s] - wb[s] for s in common],
                             runs[(a, N)].get("queries", ""), level))
    return sorted(rows, key=lambda r: (r["kind"] != "wrong", r["method"], r["N"]))


_COLUMNS = ["method", "N", "mean", "std", "seeds", "queries", "ci_low", "ci_high", "kind"]


def write_table(rows: Sequence[dict[str, Any]], out) -> None:
    with store.atomic_path(out, suffix=".csv.tmp") as tmp:
        with open(tmp, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=_COLUMNS, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)


def read_table(path) -> list[dict[str, Any]]:
    """Rows of a table written by :func:`write_table`, numbers as numbers."""
    try:
        with open(path, newline="") as fh:
            rows = list(csv.DictReader(fh))
    except OSError as exc:
        raise store.StoreError(f"{path}: cannot read the removal table ({exc}); rerun rule fig2") from exc
    for r in rows:
        r["N"], r["seeds"] = int(r["N"]), int(r["seeds"])
        for k in ("mean", "std", "ci_low", "ci_high"):
            r[k] = float(r[k])
    return rows


_STYLE = {"daunce": ("DAUNCE", "C0", "o"), "logra": ("LoGra", "C1", "s"),
          "random": ("Random", "0.5", "^"), "daunce - random": ("DAUNCE - random", "C0", "o"),
          "daunce - logra": ("DAUNCE - LoGra", "C1", "s")}


def _band(ax, rr, m, dashed=False, offset=0.0):
    label, color, marker = _STYLE.get(m, (m, None, "o"))
    x = np.array([r["N"] for r in rr], np.float64) + offset
    y = 100 * np.array([r["mean"] for r in rr])
    lo = 100 * np.array([r["ci_low"] for r in rr])
    hi = 100 * np.array([r["ci_high"] for r in rr])
    ax.plot(x, y, marker=marker, color=color, label=label, ls="--" if dashed else "-")
    ax.fill_between(x, lo, hi, color=color, alpha=0.15, lw=0)


def plot_removal(rows: Sequence[dict[str, Any]], out, *, title: str = "", n_train: int | None = None,
                 n_queries: int | None = None) -> None:
    """Figure 2: share of the originally solved queries now wrong against N removed (left), and the
    paired differences DAUNCE - random and DAUNCE - LoGra (right); bands are 95% t-intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    wrong = [r for r in rows if r.get("kind", "wrong") == "wrong"]
    diff = [r for r in rows if r.get("kind") == "difference"]
    fig, axes = plt.subplots(1, 2 if diff else 1, figsize=(9.2 if diff else 4.6, 3.4), squeeze=False)
    ax = axes[0, 0]
    for m in sorted({r["method"] for r in wrong}, key=lambda m: (m == "random", m)):
        _band(ax, sorted((r for r in wrong if r["method"] == m), key=lambda r: r["N"]), m, dashed=m == "random")
    xlabel = "training examples removed (N)" + (f" of {n_train}" if n_train else "")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("queries now answered wrongly (%)")
    if title:
        ax.set_title(title + (f" ({n_queries} queries)" if n_queries else ""), fontsize=10)
    if diff:
        ax2 = axes[0, 1]
        ax2.axhline(0.0, color="0.3", lw=0.8)
        for m in sorted({r["method"] for r in diff}):
            _band(ax2, sorted((r for r in diff if r["method"] == m), key=lambda r: r["N"]), m)
        ax2.set_xlabel(xlabel)
        ax2.set_ylabel("paired difference (percentage points)")
        seeds = max((r["seeds"] for r in diff), default=0)
        ax2.set_title(f"paired over {seeds} retrain seeds (bands: 95% t-intervals)", fontsize=10)
    for a in axes.ravel():
        a.grid(alpha=0.3)
        a.legend(frameon=False)
    with store.atomic_path(out, suffix=Path(out).suffix) as tmp:
        fig.savefig(tmp, format=Path(out).suffix.lstrip(".") or "pdf", bbox_inches="tight")
    plt.close(fig)
