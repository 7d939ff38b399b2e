"""Write LDS ground truth of your own (retrains you ran elsewhere) in the layout ``daunce lds`` reads.

:func:`write_ground_truth_file` checks every array (``masks`` [M, n], ``outputs`` [S, M, m],
``mask_index`` [M], ``train_ids`` [n], ``query_ids`` [m]) before anything is written and reads the
file back as the LDS step reads it. The layout: docs/inputs.md#your-own-lds-ground-truth."""
from __future__ import annotations

import os
from typing import Any

import numpy as np

from . import store

__all__ = ["write_ground_truth_file"]


class GroundTruthError(ValueError):
    """The arrays given do not make a ground-truth file; the message names the array."""


def _ids(ids: Any, count: int, name: str, axis: str) -> np.ndarray:
    if ids is None:
        return np.arange(count, dtype=np.int64)
    a = np.asarray(ids)
    if a.shape != (count,) or not np.issubdtype(a.dtype, np.integer) or len(np.unique(a)) != count:
        raise GroundTruthError(f"{name} must be {count} distinct integers ({axis}), got shape {a.shape} "
                               f"and dtype {a.dtype}")
    return a.astype(np.int64)


def write_ground_truth_file(path: str | os.PathLike, masks: Any, outputs: Any, *, train_ids: Any = None,
                            query_ids: Any = None, mask_index: Any = None,
                            attrs: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write an LDS ground-truth file from your own retrains, atomically, and read it back.

    Args:
        path: the .h5 file to write (refused when it is one of the inputs a step reads, as any output).
        masks: [M, n] 0/1 or bool: the training examples in each of the M subsets.
        outputs: [M, m] (one seed) or [S, M, m]: the margin of each of the m queries under the model
            retrained on each subset (with each seed); finite numbers.
        train_ids: [n] distinct integer ids of the training examples (default 0..n-1), the ids of the
            scores files you evaluate.
        query_ids: [m] distinct integer ids of the queries (default 0..m-1).
        mask_index: [M] distinct subset numbers (default 0..M-1); give them when the subsets of one
            ground truth are written in several files, to be gathered.
        attrs: extra attributes recorded in the file (how the retrains were made).

    Returns:
        The file as :func:`daunce_core.store.read_ground_truth` reads it.

    Raises:
        GroundTruthError: an array of the wrong shape or type, naming it; nothing is written.
    """
    m_arr = np.asarray(masks)
    if m_arr.ndim != 2 or not (m_arr.dtype == bool or np.isin(m_arr, (0, 1)).all()):
        raise GroundTruthError(f"masks must be a 0/1 array [M subsets, n training examples], got shape "
                               f"{m_arr.shape} and dtype {m_arr.dtype}")
    M, n = m_arr.shape
    out = np.asarray(outputs)
    if out.ndim == 2:
        out = out[None]
    if out.ndim != 3 or out.shape[1] != M or out.dtype.kind not in "biuf":
        raise GroundTruthError(f"outputs must be numbers [M={M}, m] or [seeds, M={M}, m] (one margin per subset "
                               f"and query), got shape {np.shape(outputs)}")
    if not np.isfinite(out).all():
        s, j, q = np.argwhere(~np.isfinite(out))[0]
        raise GroundTruthError(f"outputs[{s}, {j}, {q}] is {out[s, j, q]}; every margin must be finite")
    train = _ids(train_ids, n, "train_ids", "one per column of masks")
    query = _ids(query_ids, out.shape[2], "query_ids", "one per query of outputs")
    index = _ids(mask_index, M, "mask_index", "one per row of masks")
    store.write_ground_truth(path, masks=m_arr.astype(bool), outputs=out.astype(np.float32), train_ids=train,
                             query_ids=query, attrs=attrs, mask_index=index)
    return store.read_ground_truth(path)
