"""Most-influential-subset removal (Section 4.2, Appendix C), independent of the method and model.

The recipe of Appendix C:

1. keep the queries answered correctly by the full-data model in **all** seeds
   (:func:`select_queries`);
2. rank the training examples by their scores **summed over those queries**
   (:func:`ranking_from_scores`; a positive score helps the query, so the top of the ranking is
   what supports the correct answers most);
3. for each N of the configured list remove the top N, fine-tune again from the pre-trained model
   with the base recipe, and report the share of the kept queries now answered wrongly, averaged
   over the seeds (:func:`removal_effect`);
4. random removal (:func:`random_ranking`) is the reference line.

The harness never sees a model: ``retrain(keep_indices, seed) -> correct [m] bool`` is passed in,
so the same code serves LLMs, the tiny miniature and any other model. Scores come from any scores
file (:func:`daunce_core.store.dense_scores`), so DAUNCE, LoGra and any other method are ranked
identically.
"""
from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from . import store

log = logging.getLogger(__name__)

__all__ = [
    "select_queries",
    "split_queries",
    "ranking_from_scores",
    "ranking_from_file",
    "random_ranking",
    "removal_effect",
    "write_result",
    "read_results",
    "summarise",
    "write_table",
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


def random_ranking(n: int, seed: int) -> np.ndarray:
    """A uniformly random ranking of ``n`` training examples (the reference line)."""
    return np.random.default_rng([int(seed), 19]).permutation(n)


def removal_effect(
    ranking: np.ndarray,
    N: int,
    seeds: Sequence[int],
    retrain: Callable[[np.ndarray, int], np.ndarray],
) -> dict[str, Any]:
    """Remove the top ``N`` of ``ranking``, retrain once per seed, measure the flipped queries.

    Args:
        ranking: training indices, most influential first.
        N: how many to remove.
        seeds: training seeds (Appendix C: 3).
        retrain: ``retrain(keep, seed) -> correct`` fine-tunes on the kept training indices
            (sorted) with ``seed`` and returns, for each evaluated query (all of them correct
            under the full-data model), whether it is still answered correctly.

    Returns:
        ``{"N", "removed", "wrong": [per seed share], "mean", "std"}``.
    """
    ranking = np.asarray(ranking, np.int64)
    if not 0 <= N < len(ranking):
        raise ValueError(f"cannot remove N={N} of {len(ranking)} training examples")
    removed = ranking[:N]
    keep = np.sort(ranking[N:])
    wrong = []
    for s in seeds:
        correct = np.asarray(retrain(keep, int(s)), bool)
        wrong.append(float(1.0 - correct.mean()) if correct.size else float("nan"))
        log.info("N=%d seed=%d: %.3f of the queries now wrong", N, s, wrong[-1])
    return {"N": int(N), "removed": removed.tolist(), "wrong": wrong,
            "mean": float(np.mean(wrong)), "std": float(np.std(wrong))}


# --- results, table, figure ------------------------------------------------------------------

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


def summarise(results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (method, N) with mean and std over seeds, sorted; N = 0 rows (0 wrong) added."""
    rows = {}
    for r in results:
        rows[(r["method"], r["N"])] = {"method": r["method"], "N": r["N"], "mean": r["mean"],
                                       "std": r["std"], "seeds": len(r["wrong"]),
                                       "queries": r.get("queries", "")}
    for m in {r["method"] for r in results}:
        rows.setdefault((m, 0), {"method": m, "N": 0, "mean": 0.0, "std": 0.0, "seeds": 0, "queries": ""})
    return [rows[k] for k in sorted(rows, key=lambda k: (k[0], k[1]))]


def write_table(rows: Sequence[dict[str, Any]], out) -> None:
    with store.atomic_path(out, suffix=".csv.tmp") as tmp:
        with open(tmp, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=["method", "N", "mean", "std", "seeds", "queries"])
            w.writeheader()
            w.writerows(rows)


_STYLE = {"daunce": ("DAUNCE", "C0", "o"), "logra": ("LoGra", "C1", "s"),
          "random": ("Random", "0.5", "^")}


def plot_removal(rows: Sequence[dict[str, Any]], out, *, title: str = "", n_train: int | None = None,
                 n_queries: int | None = None) -> None:
    """Figure 2: share of the originally solved queries answered wrongly against N removed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.6, 3.4))
    methods = sorted({r["method"] for r in rows}, key=lambda m: (m == "random", m))
    for m in methods:
        rr = sorted((r for r in rows if r["method"] == m), key=lambda r: r["N"])
        label, color, marker = _STYLE.get(m, (m, None, "o"))
        x = np.array([r["N"] for r in rr])
        y = 100 * np.array([r["mean"] for r in rr])
        e = 100 * np.array([r["std"] for r in rr])
        ax.plot(x, y, marker=marker, color=color, label=label, ls="--" if m == "random" else "-")
        ax.fill_between(x, y - e, y + e, color=color, alpha=0.15, lw=0)
    ax.set_xlabel("training examples removed (N)" + (f" of {n_train}" if n_train else ""))
    ax.set_ylabel("queries now answered wrongly (%)")
    if title:
        ax.set_title(title + (f" ({n_queries} queries)" if n_queries else ""), fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(frameon=False)
    with store.atomic_path(out, suffix=Path(out).suffix) as tmp:
        fig.savefig(tmp, format=Path(out).suffix.lstrip(".") or "pdf", bbox_inches="tight")
    plt.close(fig)
