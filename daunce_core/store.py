"""HDF5 layouts of daunce: losses, scores and LDS ground truth, all written atomically.

Every file is first written to a temporary name in the destination folder and renamed into
place only once it is complete, so a crash or a bad input never leaves a half-written file
behind and never overwrites a finished result with a broken one.

Layouts (see DESIGN.md):

* losses  -- ``train`` [K, n] and ``query`` [K, m] float32 (the per-example signal of each
  perturbed model: the loss, or the margin for ``daunce_t``), ``model_index`` [K] int64
  (the k of each row), ``train_ids`` [n] and ``query_ids`` [m] int64, and attributes
  ``variant``, ``signal`` (``"loss"`` or ``"margin"``), ``seed``, ``config`` (JSON),
  ``daunce_version``.
* scores  -- ``format`` attribute ``"dense"``: ``scores`` [n, m] float32; ``format`` ``"topk"``:
  ``indices`` [m, k] int64 (positions into the training set) and ``values`` [m, k] float32,
  best first. Both carry ``train_ids``, ``query_ids`` and attributes ``method``, ``measure``,
  ``threshold``, ``lambda``. Positive scores mean the training example helps the query.
* ground truth (LDS) -- ``masks`` [M, n] bool, ``outputs`` [S, M, m] float32 (margins of the
  queries under the model retrained on each mask, one row per seed).
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import h5py
import numpy as np

__all__ = [
    "StoreError",
    "atomic_path",
    "atomic_h5",
    "Losses",
    "write_losses",
    "read_losses",
    "concat_losses",
    "write_scores",
    "read_scores",
    "write_ground_truth",
    "read_ground_truth",
    "check_finite",
]

VERSION = "0.1.0"


class StoreError(ValueError):
    """A file does not have the layout daunce expects; the message names the file and key."""


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only on success.

    On any exception the temporary file is removed and ``path`` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(
        prefix=f".{path.name}.", suffix=suffix if suffix is not None else ".tmp", dir=path.parent
    )
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


@contextlib.contextmanager
def atomic_h5(path: str | os.PathLike) -> Iterator[h5py.File]:
    """Open an HDF5 file for writing that appears at ``path`` only once it is closed cleanly."""
    with atomic_path(path, suffix=".h5.tmp") as tmp:
        with h5py.File(tmp, "w") as f:
            yield f


def _open(path: str | os.PathLike) -> h5py.File:
    path = Path(path)
    if not path.exists():
        raise StoreError(f"{path}: no such file")
    try:
        return h5py.File(path, "r")
    except OSError as exc:  # truncated or not HDF5 at all
        raise StoreError(
            f"{path}: not a readable HDF5 file ({exc}); it may be truncated -- delete it and "
            "rerun the step that writes it"
        ) from exc


def _require(f: h5py.File, key: str, ndim: int | None = None) -> h5py.Dataset:
    if key not in f:
        raise StoreError(f"{f.filename}: missing dataset '{key}' (has: {sorted(f.keys())})")
    ds = f[key]
    if ndim is not None and ds.ndim != ndim:
        raise StoreError(f"{f.filename}: dataset '{key}' has {ds.ndim} dimensions, expected {ndim}")
    return ds


def check_finite(values: np.ndarray, ids: np.ndarray, what: str, source: str = "") -> None:
    """Raise :class:`StoreError` naming the first example ids whose values are NaN or infinite.

    ``values`` is [K, n]: column ``i`` belongs to example ``ids[i]``.
    """
    bad_cols = np.flatnonzero(~np.isfinite(values).all(axis=0))
    if bad_cols.size:
        shown = ", ".join(str(ids[c]) for c in bad_cols[:10])
        more = f" (and {bad_cols.size - 10} more)" if bad_cols.size > 10 else ""
        where = f"{source}: " if source else ""
        raise StoreError(
            f"{where}{bad_cols.size} {what} example(s) have NaN or infinite values, first ids: "
            f"{shown}{more}. A perturbed fit diverged: lower the learning rate or check the data."
        )


@dataclass
class Losses:
    """Per-example signals of K perturbed models (the content of a losses file)."""

    train: np.ndarray  # [K, n]
    query: np.ndarray  # [K, m]
    model_index: np.ndarray  # [K]
    train_ids: np.ndarray  # [n]
    query_ids: np.ndarray  # [m]
    attrs: dict[str, Any]

    @property
    def K(self) -> int:
        return int(self.train.shape[0])

    def validate(self, source: str = "") -> "Losses":
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
        return self


def write_losses(path: str | os.PathLike, losses: Losses) -> None:
    """Validate ``losses`` and write them atomically (refuses NaN/inf, leaves no file then)."""
    losses.validate(str(path))
    with atomic_h5(path) as f:
        chunk_n = max(1, min(losses.train.shape[1], 4096))
        f.create_dataset("train", data=losses.train.astype(np.float32),
                         chunks=(losses.K, chunk_n))
        f.create_dataset("query", data=losses.query.astype(np.float32),
                         chunks=(losses.K, max(1, min(losses.query.shape[1], 4096))))
        f.create_dataset("model_index", data=np.asarray(losses.model_index, np.int64))
        f.create_dataset("train_ids", data=np.asarray(losses.train_ids, np.int64))
        f.create_dataset("query_ids", data=np.asarray(losses.query_ids, np.int64))
        for key, value in losses.attrs.items():
            f.attrs[key] = json.dumps(value) if isinstance(value, (dict, list)) else value
        f.attrs["daunce_version"] = VERSION


def _attrs(f: h5py.File) -> dict[str, Any]:
    out = {}
    for key, value in f.attrs.items():
        if isinstance(value, bytes):
            value = value.decode()
        if isinstance(value, np.generic):
            value = value.item()
        if isinstance(value, str) and value[:1] in "{[":
            with contextlib.suppress(json.JSONDecodeError):
                value = json.loads(value)
        out[key] = value
    return out


def read_losses(path: str | os.PathLike) -> Losses:
    """Read and validate a losses file; errors name the file and the offending key."""
    with _open(path) as f:
        if f.attrs.get("diverged", False):
            raise StoreError(f"{path}: the perturbed fits of this file diverged "
                             f"({f.attrs.get('reason', '')}); lower the learning rate")
        try:
            train = _require(f, "train", 2)[()]
            query = _require(f, "query", 2)[()]
            model_index = _require(f, "model_index", 1)[()]
            train_ids = _require(f, "train_ids", 1)[()]
            query_ids = _require(f, "query_ids", 1)[()]
        except (OSError, KeyError) as exc:
            raise StoreError(f"{path}: could not read the losses ({exc}); the file may be truncated") from exc
        attrs = _attrs(f)
    return Losses(train, query, model_index, train_ids, query_ids, attrs).validate(str(path))


_GUARDED_ATTRS = ("variant", "signal", "seed", "config")


def concat_losses(paths: Sequence[str | os.PathLike], out: str | os.PathLike) -> Losses | None:
    """Concatenate chunk files of one setting along K, refusing to mix settings or repeat a k.

    If any chunk diverged, the output is a diverged marker too (and ``None`` is returned).
    """
    if not paths:
        raise StoreError(f"{out}: no chunk files to gather")
    diverged = [p for p in paths if is_diverged(p)]
    if diverged:
        with _open(diverged[0]) as f:
            attrs = _attrs(f)
        write_diverged(out, {k: v for k, v in attrs.items() if k not in ("diverged", "reason")},
                       f"chunk {diverged[0]}: {attrs.get('reason', '')}")
        return None
    parts = [read_losses(p) for p in paths]
    first = parts[0]
    for p, part in zip(paths[1:], parts[1:]):
        for key in _GUARDED_ATTRS:
            if part.attrs.get(key) != first.attrs.get(key):
                raise StoreError(
                    f"{p}: attribute '{key}' differs from {paths[0]} "
                    f"({part.attrs.get(key)!r} vs {first.attrs.get(key)!r}); "
                    "these chunks come from different settings and cannot be combined"
                )
        for key in ("train_ids", "query_ids"):
            if not np.array_equal(getattr(part, key), getattr(first, key)):
                raise StoreError(f"{p}: '{key}' differ from {paths[0]}")
    model_index = np.concatenate([p.model_index for p in parts])
    if np.unique(model_index).size != model_index.size:
        raise StoreError(f"{out}: the chunks repeat some model indices k; each k must occur once")
    order = np.argsort(model_index, kind="stable")
    merged = Losses(
        train=np.concatenate([p.train for p in parts])[order],
        query=np.concatenate([p.query for p in parts])[order],
        model_index=model_index[order],
        train_ids=first.train_ids,
        query_ids=first.query_ids,
        attrs=dict(first.attrs),
    )
    write_losses(out, merged)
    return merged


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
    """Write scores (dense [n, m], or top-k ``indices``/``values`` [m, k]) atomically."""
    with atomic_h5(path) as f:
        if scores is not None:
            if scores.shape != (len(train_ids), len(query_ids)):
                raise StoreError(f"{path}: scores of shape {scores.shape} do not match "
                                 f"{len(train_ids)} training and {len(query_ids)} query ids")
            f.attrs["format"] = "dense"
            f.create_dataset("scores", data=np.asarray(scores, np.float32))
        else:
            if indices is None or values is None:
                raise StoreError(f"{path}: give either dense scores or top-k indices and values")
            f.attrs["format"] = "topk"
            f.create_dataset("indices", data=np.asarray(indices, np.int64))
            f.create_dataset("values", data=np.asarray(values, np.float32))
        f.create_dataset("train_ids", data=np.asarray(train_ids, np.int64))
        f.create_dataset("query_ids", data=np.asarray(query_ids, np.int64))
        for key, value in (attrs or {}).items():
            f.attrs[key] = json.dumps(value) if isinstance(value, (dict, list)) else (
                "none" if value is None else value)
        f.attrs["daunce_version"] = VERSION


def read_scores(path: str | os.PathLike) -> dict[str, Any]:
    """Read a scores file into a dict with ``format``, arrays and ``attrs``."""
    with _open(path) as f:
        attrs = _attrs(f)
        fmt = attrs.get("format")
        out: dict[str, Any] = {"format": fmt, "attrs": attrs,
                               "train_ids": _require(f, "train_ids", 1)[()],
                               "query_ids": _require(f, "query_ids", 1)[()]}
        if fmt == "dense":
            out["scores"] = _require(f, "scores", 2)[()]
        elif fmt == "topk":
            out["indices"] = _require(f, "indices", 2)[()]
            out["values"] = _require(f, "values", 2)[()]
        else:
            raise StoreError(f"{path}: attribute 'format' is {fmt!r}, expected 'dense' or 'topk'")
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
    check_finite(outputs.reshape(-1, outputs.shape[-1]), query_ids, "query", str(path))
    with atomic_h5(path) as f:
        f.create_dataset("masks", data=np.asarray(masks, bool))
        f.create_dataset("outputs", data=np.asarray(outputs, np.float32))
        f.create_dataset("mask_index", data=np.asarray(
            np.arange(masks.shape[0]) if mask_index is None else mask_index, np.int64))
        f.create_dataset("train_ids", data=np.asarray(train_ids, np.int64))
        f.create_dataset("query_ids", data=np.asarray(query_ids, np.int64))
        for key, value in (attrs or {}).items():
            f.attrs[key] = json.dumps(value) if isinstance(value, (dict, list)) else value
        f.attrs["daunce_version"] = VERSION


def read_ground_truth(path: str | os.PathLike) -> dict[str, Any]:
    with _open(path) as f:
        return {
            "masks": _require(f, "masks", 2)[()],
            "outputs": _require(f, "outputs", 3)[()],
            "mask_index": _require(f, "mask_index", 1)[()],
            "train_ids": _require(f, "train_ids", 1)[()],
            "query_ids": _require(f, "query_ids", 1)[()],
            "attrs": _attrs(f),
        }


def concat_ground_truth(paths: Sequence[str | os.PathLike], out: str | os.PathLike) -> dict[str, Any]:
    """Gather LDS ground-truth chunks (split along M) into one file."""
    parts = [read_ground_truth(p) for p in paths]
    if not parts:
        raise StoreError(f"{out}: no ground-truth chunks to gather")
    for p, part in zip(paths[1:], parts[1:]):
        if not np.array_equal(part["train_ids"], parts[0]["train_ids"]) or not np.array_equal(
                part["query_ids"], parts[0]["query_ids"]):
            raise StoreError(f"{p}: example ids differ from {paths[0]}")
        if part["outputs"].shape[0] != parts[0]["outputs"].shape[0]:
            raise StoreError(f"{p}: number of seeds differs from {paths[0]}")
    mask_index = np.concatenate([p["mask_index"] for p in parts])
    order = np.argsort(mask_index, kind="stable")
    gt = {
        "masks": np.concatenate([p["masks"] for p in parts])[order],
        "outputs": np.concatenate([p["outputs"] for p in parts], axis=1)[:, order],
        "mask_index": mask_index[order],
        "train_ids": parts[0]["train_ids"],
        "query_ids": parts[0]["query_ids"],
        "attrs": parts[0]["attrs"],
    }
    write_ground_truth(out, masks=gt["masks"], outputs=gt["outputs"], train_ids=gt["train_ids"],
                       query_ids=gt["query_ids"], attrs=gt["attrs"], mask_index=gt["mask_index"])
    return gt


def write_diverged(path: str | os.PathLike, attrs: dict[str, Any], reason: str) -> None:
    """Record that a perturbed fit diverged (a learning rate too large for the grid search).

    The file has the losses layout's attributes plus ``diverged=True`` and no loss matrices;
    :func:`read_losses` refuses it with a clear message, the learning-rate selection skips it.
    """
    with atomic_h5(path) as f:
        for key, value in attrs.items():
            f.attrs[key] = json.dumps(value) if isinstance(value, (dict, list)) else value
        f.attrs["diverged"] = True
        f.attrs["reason"] = reason
        f.attrs["daunce_version"] = VERSION


def is_diverged(path: str | os.PathLike) -> bool:
    with _open(path) as f:
        return bool(f.attrs.get("diverged", False))


# --- model states (safetensors) and the recorded split (npz) ------------------------------------

__all__ += ["save_state", "load_state", "check_split"]


def save_state(state: dict[str, Any], path: str | os.PathLike) -> None:
    """Write a state dict of tensors (theta_0) as safetensors, atomically."""
    from safetensors.torch import save_file

    with atomic_path(path, suffix=".safetensors") as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(tmp))


def load_state(path: str | os.PathLike, device) -> dict[str, Any]:
    """Read a state dict written by :func:`save_state` onto ``device``."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device=str(device))
    except Exception as exc:
        raise StoreError(f"{path}: cannot read theta_0 ({exc}); rerun the base rule") from exc


def check_split(path: str | os.PathLike, train_ids: np.ndarray, query_ids: np.ndarray) -> None:
    """Refuse a dataset whose example ids differ from the split recorded at ``path`` (``.npz``)."""
    rec = np.load(path)
    if not (np.array_equal(rec["train_ids"], train_ids) and np.array_equal(rec["query_ids"], query_ids)):
        raise StoreError(f"{path}: the recorded split differs from the dataset the config "
                         "loads now (data settings changed?); delete results of this experiment")
