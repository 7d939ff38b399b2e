"""Model states (safetensors) and the recorded split of an experiment (npz), written atomically."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from .atomic import atomic_path
from .errors import StoreError

__all__ = ["save_state", "load_state", "save_split", "check_split"]



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


def save_split(path: str | os.PathLike, train_ids: np.ndarray, query_ids: np.ndarray, y_train: np.ndarray,
               y_query: np.ndarray, content_hash: str = "") -> None:
    """Record the split an experiment starts from (``.npz``): the example ids, the labels and
    ``content_hash`` (``daunce_core.data.content_hash``) of the data, for :func:`check_split`."""
    arrays = dict(train_ids=train_ids, query_ids=query_ids, y_train=y_train, y_query=y_query)
    if content_hash:
        arrays["content_hash"] = np.array(content_hash)
    with atomic_path(path, suffix=".npz") as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)


def check_split(path: str | os.PathLike, train_ids: np.ndarray, query_ids: np.ndarray, content_hash: str = "",
                source: str = "the dataset") -> None:
    """Refuse a dataset whose example ids differ from the split recorded at ``path`` (``.npz``), or
    whose ``content_hash`` differs from the recorded one (``source`` names the data in the message).

    A split recorded before the hash was (or a caller without one) is checked on its ids alone.
    """
    rec = np.load(path)
    if not (np.array_equal(rec["train_ids"], train_ids) and np.array_equal(rec["query_ids"], query_ids)):
        raise StoreError(f"{path}: the recorded split differs from the dataset the config "
                         "loads now (data settings changed?); delete results of this experiment")
    if content_hash and "content_hash" in rec.files and str(rec["content_hash"]) != content_hash:
        results = Path(path).parent.parent if Path(path).parent.name == "data" else None
        raise StoreError(f"{path}: the data read from {source} changed since this split was recorded (same ids, other "
                         "inputs or labels), so the results so far come from the old data; delete "
                         f"{results or 'the results of this experiment'} and rerun")
