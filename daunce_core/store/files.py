"""Read, write and gather each layout's files: what ``layouts.py``'s table leaves to one layout.

Losses (:class:`Losses`, diverged markers), scores (dense or top-k) and LDS ground truth; every
writer refuses NaN or infinite values and writes atomically, every reader checks the file against
its layout and joins nothing by position.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .atomic import atomic_h5, check_output
from .errors import StoreError
from .layouts import (
    DENSE_SCORES,
    DIVERGED,
    F32_MAX,
    GROUND_TRUTH,
    LOSSES,
    SCORES,
    TOPK_SCORES,
    all_finite,
    check_finite,
    check_numeric,
    gather,
    open_h5,
    read,
    read_attrs,
    reading,
    refuse_nonfinite,
    write,
)

__all__ = ["Losses", "write_losses", "read_losses", "concat_losses", "write_diverged", "is_diverged",
           "refuse_diverged_file", "check_topk", "write_scores", "read_scores", "dense_scores", "write_ground_truth",
           "read_ground_truth", "concat_ground_truth"]


# --- losses ----------------------------------------------------------------------------------

@dataclass
class Losses:
    """Per-example signals of K perturbed models (the content of a losses file)."""

    train: np.ndarray  # [K, n]
    query: np.ndarray  # [K, m]
    model_index: np.ndarray  # [K]
    train_ids: np.ndarray  # [n]
    query_ids: np.ndarray  # [m]
    attrs: dict[str, Any]
    source: str = field(default="", compare=False)  # the file read (named by errors), not stored
    # theta_0's probability of each example's label (optional; DAUNCE-T's (1 - p) factor, TRAK's Q)
    p0_train: np.ndarray | None = None  # [n]
    p0_query: np.ndarray | None = None  # [m]

    @property
    def K(self) -> int:
        return int(self.train.shape[0])

    def arrays(self) -> dict[str, np.ndarray | None]:
        """The datasets of the losses layout, by key."""
        return {a.key: getattr(self, a.key) for a in LOSSES.arrays}

    def validate(self, source: str = "") -> Losses:
        for key in ("train", "query"):
            check_numeric(np.asarray(getattr(self, key)), key, source)
        if self.train.ndim != 2:
            raise StoreError(f"{source}: 'train' has shape {self.train.shape}, expected [K, n]")
        K, n = self.train.shape
        if self.query.ndim != 2 or self.query.shape[0] != K:
            raise StoreError(
                f"{source}: 'train' has K={K} models but 'query' has shape {self.query.shape}"
            )
        if self.model_index.shape != (K,):
            raise StoreError(f"{source}: 'model_index' has shape {self.model_index.shape}, expected ({K},)")
        if self.train_ids.shape != (n,) or self.query_ids.shape != (self.query.shape[1],):
            raise StoreError(f"{source}: example ids do not match the loss matrices")
        check_finite(self.train, self.train_ids, "training", source)
        check_finite(self.query, self.query_ids, "query", source)
        for key, ids in (("p0_train", self.train_ids), ("p0_query", self.query_ids)):
            p0 = getattr(self, key)
            if p0 is not None and (np.shape(p0) != ids.shape or not all_finite(np.asarray(p0, np.float64))):
                raise StoreError(f"{source}: '{key}' has shape {np.shape(p0)} or non-finite values; expected "
                                 f"{ids.shape} probabilities")
        return self


def write_losses(path: str | os.PathLike, losses: Losses) -> None:
    """Validate ``losses`` and write them atomically (refuses NaN/inf, leaves no file then).

    Values beyond the float32 range of the layout are refused rather than stored as inf.
    """
    losses.validate(str(path))
    for key in ("train", "query"):
        a = getattr(losses, key)
        if a.size and a.dtype.itemsize > 4 and (big := float(np.abs(a).max())) > F32_MAX:
            raise StoreError(f"{path}: '{key}' holds values up to {big:.3g}, beyond the float32 of "
                             f"the losses layout (max {F32_MAX:.3g}); rescale the losses")
    with atomic_h5(path) as f:
        write(f, LOSSES, losses.arrays(), losses.attrs)


def refuse_diverged_file(f, path) -> None:
    """Refuse an open file that marks diverged fits (:func:`write_diverged`) where losses are read."""
    if f.attrs.get("diverged", False):
        raise StoreError(f"{path}: the perturbed fits of this file diverged "
                         f"({f.attrs.get('reason', '')}); lower the learning rate")


def read_losses(path: str | os.PathLike) -> Losses:
    """Read and validate a losses file; errors name the file and the offending key."""
    with open_h5(path) as f:
        refuse_diverged_file(f, path)
        with reading(path, LOSSES.name):
            arrays, positional = read(f, LOSSES, path)
            attrs = read_attrs(f)
    if positional:
        attrs["ids"] = "positional"
    return Losses(**arrays, attrs=attrs, source=str(path)).validate(str(path))


def concat_losses(paths: Sequence[str | os.PathLike], out: str | os.PathLike) -> Losses | None:
    """Concatenate chunk files of one setting along K, refusing to mix settings or repeat a k.

    Chunks are joined on ids (:func:`~daunce_core.store.ids.join`): the first chunk's order is
    kept. If any chunk diverged, the output is a diverged marker too (and ``None`` is returned).
    """
    if not paths:
        raise StoreError(f"{out}: no chunk files to gather")
    check_output(out, inputs=paths)
    diverged = [p for p in paths if is_diverged(p)]
    if diverged:
        with open_h5(diverged[0]) as f:
            attrs = read_attrs(f)
        write_diverged(out, {k: v for k, v in attrs.items() if k not in DIVERGED.attrs},
                       f"chunk {diverged[0]}: {attrs.get('reason', '')}")
        return None
    parts = [read_losses(p) for p in paths]
    merged = gather(LOSSES, paths, [{**p.arrays(), "attrs": p.attrs} for p in parts], out, "K")
    merged = Losses(**{a.key: merged[a.key] for a in LOSSES.arrays}, attrs=dict(parts[0].attrs))
    write_losses(out, merged)
    return merged


def write_diverged(path: str | os.PathLike, attrs: dict[str, Any], reason: str) -> None:
    """Record that a perturbed fit diverged (a learning rate too large for the grid search).

    The file has the losses layout's attributes plus ``diverged=True`` and no loss matrices;
    :func:`read_losses` refuses it with a clear message, the learning-rate selection skips it.
    """
    with atomic_h5(path) as f:
        write(f, DIVERGED, {}, attrs, {"diverged": True, "reason": reason})


def is_diverged(path: str | os.PathLike) -> bool:
    with open_h5(path) as f:
        return bool(f.attrs.get("diverged", False))


# --- scores ----------------------------------------------------------------------------------

def check_topk(path, indices: np.ndarray, values: np.ndarray, n: int, m: int,
               query_ids: np.ndarray | None = None) -> None:
    """Shapes agree, every position lies in the training set, and no query's row names a training
    example twice (a repeat would make the dense scores depend on the order of the columns)."""
    if indices.ndim != 2 or indices.shape[0] != m:
        raise StoreError(f"{path}: 'indices' has shape {indices.shape}, expected [m={m}, k]")
    if values.shape != indices.shape:
        raise StoreError(f"{path}: 'values' has shape {values.shape} but 'indices' "
                         f"{indices.shape}; they must match")
    if indices.size and (indices.min() < 0 or indices.max() >= n):
        bad = indices[(indices < 0) | (indices >= n)][0]
        raise StoreError(f"{path}: 'indices' holds position {bad}, outside the {n} training "
                         f"examples (0..{n - 1}); the file is corrupt: rerun the scoring")
    if indices.shape[1] > 1:
        s = np.sort(indices, axis=1)
        rep = s[:, 1:] == s[:, :-1]
        if rep.any():
            row, col = (int(i) for i in np.argwhere(rep)[0])
            query = f"query id {query_ids[row]} (row {row})" if query_ids is not None else f"row {row}"
            raise StoreError(f"{path}: 'indices' names training position {s[row, col]} more than once "
                             f"for {query} ({int(rep.any(axis=1).sum())} row(s) repeat a position); "
                             "each query's top-k lists distinct training examples: rerun the scoring")


def write_scores(
    path: str | os.PathLike,
    *,
    train_ids: np.ndarray,
    query_ids: np.ndarray,
    scores: np.ndarray | None = None,
    indices: np.ndarray | None = None,
    values: np.ndarray | None = None,
    attrs: dict[str, Any] | None = None,
) -> None:
    """Write scores (dense [n, m], or top-k ``indices``/``values`` [m, k]) atomically.

    Scores that are NaN or infinite, or top-k positions outside the training set, are refused.
    """
    n, m = len(train_ids), len(query_ids)
    if scores is not None:
        scores = np.asarray(scores)
        check_numeric(scores, "scores", str(path))
        if scores.shape != (n, m):
            raise StoreError(f"{path}: scores of shape {scores.shape} do not match "
                             f"{n} training and {m} query ids")
        refuse_nonfinite(path, "scores", scores, DENSE_SCORES.hint)
        layout, arrays = DENSE_SCORES, {"scores": scores}
    else:
        if indices is None or values is None:
            raise StoreError(f"{path}: give either dense scores or top-k indices and values")
        indices, values = np.asarray(indices), np.asarray(values)
        check_numeric(values, "values", str(path))
        check_topk(path, indices, values, n, m, np.asarray(query_ids))
        refuse_nonfinite(path, "values", values, TOPK_SCORES.hint)
        layout, arrays = TOPK_SCORES, {"indices": indices, "values": values}
    with atomic_h5(path) as f:
        write(f, layout, {**arrays, "train_ids": train_ids, "query_ids": query_ids}, attrs or {})


def read_scores(path: str | os.PathLike) -> dict[str, Any]:
    """Read a scores file into a dict with ``format``, arrays and ``attrs``.

    Refuses NaN or infinite scores and top-k positions outside the training set. A dense file
    without ids gets positional ids (``attrs["ids"] == "positional"``); a top-k file needs
    ``train_ids`` to know the size of the training set.
    """
    with open_h5(path) as f, reading(path, DENSE_SCORES.name):
        attrs = read_attrs(f)
        fmt = attrs.get("format")
        if fmt not in SCORES:
            raise StoreError(f"{path}: attribute 'format' is {fmt!r}, expected 'dense' or 'topk': "
                             "not a scores file")
        arrays, positional = read(f, SCORES[fmt], path)
    if positional:
        attrs["ids"] = "positional"
    out: dict[str, Any] = {"format": fmt, "attrs": attrs, **arrays}
    if fmt == "dense":
        refuse_nonfinite(path, "scores", out["scores"], DENSE_SCORES.hint)
    else:
        check_topk(path, out["indices"], out["values"], len(out["train_ids"]), out["indices"].shape[0],
                   out["query_ids"])
        refuse_nonfinite(path, "values", out["values"], TOPK_SCORES.hint)
    return out


def dense_scores(path: str | os.PathLike) -> tuple[np.ndarray, dict[str, Any]]:
    """Scores of ``path`` as a dense [n, m] array (top-k files are filled with zeros elsewhere)."""
    s = read_scores(path)
    if s["format"] == "dense":
        return s["scores"], s
    n, m = len(s["train_ids"]), len(s["query_ids"])
    dense = np.zeros((n, m), np.float32)
    cols = np.broadcast_to(np.arange(m)[:, None], s["indices"].shape)
    dense[s["indices"], cols] = s["values"]
    return dense, s


# --- LDS ground truth ------------------------------------------------------------------------

def write_ground_truth(
    path: str | os.PathLike,
    *,
    masks: np.ndarray,
    outputs: np.ndarray,
    train_ids: np.ndarray,
    query_ids: np.ndarray,
    attrs: dict[str, Any] | None = None,
    mask_index: np.ndarray | None = None,
) -> None:
    """Write LDS ground truth: ``masks`` [M, n] and ``outputs`` [S, M, m] margins."""
    if outputs.ndim != 3 or outputs.shape[1] != masks.shape[0]:
        raise StoreError(f"{path}: outputs {outputs.shape} do not match masks {masks.shape}")
    check_finite(outputs.reshape(-1, outputs.shape[-1]), query_ids, "query", str(path),
                 hint=GROUND_TRUTH.hint)
    with atomic_h5(path) as f:
        write(f, GROUND_TRUTH, {
            "masks": masks, "outputs": outputs,
            "mask_index": np.arange(masks.shape[0]) if mask_index is None else mask_index,
            "train_ids": train_ids, "query_ids": query_ids}, attrs or {})


def read_ground_truth(path: str | os.PathLike) -> dict[str, Any]:
    """Read LDS ground truth; refuses NaN/inf outputs and shapes that do not agree."""
    with open_h5(path) as f, reading(path, GROUND_TRUTH.name):
        gt, positional = read(f, GROUND_TRUTH, path)
        masks, outputs = gt["masks"], gt["outputs"]
        if outputs.shape[1] != masks.shape[0]:
            raise StoreError(f"{path}: 'outputs' {outputs.shape} has {outputs.shape[1]} subsets "
                             f"but 'masks' {masks.shape} has {masks.shape[0]}; expected [seeds, M, m]")
        gt["attrs"] = read_attrs(f)
    if positional:
        gt["attrs"]["ids"] = "positional"
    check_finite(outputs.reshape(-1, outputs.shape[-1]), gt["query_ids"], "query", str(path),
                 hint=GROUND_TRUTH.hint)
    return gt


def concat_ground_truth(paths: Sequence[str | os.PathLike], out: str | os.PathLike) -> dict[str, Any]:
    """Gather LDS ground-truth chunks (split along M) into one file, joined on ids."""
    if not paths:
        raise StoreError(f"{out}: no ground-truth chunks to gather")
    check_output(out, inputs=paths)
    parts = [read_ground_truth(p) for p in paths]

    def same_seeds(p, part: dict[str, Any]) -> None:
        if part["outputs"].shape[0] != parts[0]["outputs"].shape[0]:
            raise StoreError(f"{p}: number of seeds differs from {paths[0]}")

    merged = gather(GROUND_TRUTH, paths, parts, out, "M", same_seeds)
    gt = {key: merged[key] for key in ("masks", "outputs", "mask_index", "train_ids", "query_ids", "attrs")}
    write_ground_truth(out, masks=gt["masks"], outputs=gt["outputs"], train_ids=gt["train_ids"],
                       query_ids=gt["query_ids"], attrs=gt["attrs"], mask_index=gt["mask_index"])
    return gt
