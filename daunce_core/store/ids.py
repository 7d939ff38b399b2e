"""Joins on example ids: files are paired on ids, never on positions.

The same ids in another order are reordered with a notice (:func:`join`); different ids are
refused naming both files. A file that carries no ids is read with positional ids 0..n-1 and
marked ``attrs["ids"] == "positional"`` (:func:`is_positional`).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import StoreError

__all__ = ["match_ids", "Join", "join", "is_positional", "refuse_repeats", "align_scores",
           "align_losses"]


def is_positional(attrs: dict[str, Any]) -> bool:
    """Whether a file's example ids are its positions (it carried no ids when first read)."""
    return attrs.get("ids") == "positional"


def refuse_repeats(path, key: str, ids: np.ndarray) -> None:
    """Refuse ids that repeat, naming ``key`` and the repeated id met first in the file."""
    _, first, counts = np.unique(ids, return_index=True, return_counts=True)
    if (counts > 1).any():
        at = int(first[counts > 1].min())
        raise StoreError(f"{path}: '{key}' repeats id {ids[at]} ({int((ids == ids[at]).sum())} times); "
                         "each example needs its own id")


def match_ids(ids: np.ndarray, ref: np.ndarray, key: str, path, ref_path) -> np.ndarray | None:
    """Positions ``p`` with ``ids[p] == ref``, or ``None`` when ``ids`` already equal ``ref``.

    Refuses (naming both files and ``key``) ids of another length, repeated ids, and sets that
    differ; the same ids in another order are fine: the caller reorders with ``p``.
    """
    ids, ref = np.asarray(ids), np.asarray(ref)
    if ids.shape == ref.shape and np.array_equal(ids, ref):
        return None
    if len(ids) != len(ref):
        raise StoreError(f"{path}: '{key}' holds {len(ids)} ids but {ref_path} holds {len(ref)}; "
                         "the files describe different examples")
    order = np.argsort(ids, kind="stable")
    s = ids[order]
    for arr, where in ((s, path), (np.sort(ref), ref_path)):
        dup = arr[1:][arr[1:] == arr[:-1]]
        if dup.size:
            raise StoreError(f"{where}: '{key}' repeats id {dup[0]}; each example needs its own id")
    pos = np.minimum(np.searchsorted(s, ref), len(s) - 1)
    found = s[pos] == ref
    if not found.all():
        missing = ref[~found]
        raise StoreError(
            f"{path}: '{key}' differ from {ref_path}: {missing.size} of its {len(ref)} ids are "
            f"missing (first: {', '.join(str(i) for i in missing[:5])}); pair files made from the "
            "same examples")
    return order[pos]


@dataclass
class Join:
    """How to reorder one file's examples onto a reference file's (see :func:`join`)."""

    train: np.ndarray | None  # a[train] lists the reference's training examples; None: as is
    query: np.ndarray | None
    notices: list[str] = field(default_factory=list)

    def take(self, a: np.ndarray, train_axis: int | None = None,
             query_axis: int | None = None) -> np.ndarray:
        """``a`` with its training / query axes put in the reference's order."""
        if train_axis is not None and self.train is not None:
            a = np.take(a, self.train, axis=train_axis)
        if query_axis is not None and self.query is not None:
            a = np.take(a, self.query, axis=query_axis)
        return a


def join(path, train_ids, query_ids, ref_path, ref_train_ids, ref_query_ids, *,
         positional: bool = False, ref_positional: bool = False) -> Join:
    """Pair the examples of ``path`` with those of ``ref_path`` on ids, never on positions.

    Equal id sets in another order give the orders to apply and a notice for the user (the
    caller prints or logs ``Join.notices``); different sets raise :class:`StoreError` naming the
    file and key. Files that carry no ids (``positional``) are joined by position, and the notice
    says so.
    """
    notices = []
    if positional and ref_positional:
        notices.append(f"{path} and {ref_path} carry no example ids: joined by position")
    elif positional or ref_positional:
        notices.append(f"{path if positional else ref_path} carries no example ids: its "
                       "positions 0..n-1 are taken as ids")
    orders = {}
    for key, ids, ref in (("train_ids", train_ids, ref_train_ids),
                          ("query_ids", query_ids, ref_query_ids)):
        try:
            orders[key] = match_ids(ids, ref, key, path, ref_path)
        except StoreError as exc:
            raise StoreError(f"{exc}{' (' + notices[0] + ')' if notices else ''}") from None
        if orders[key] is not None:
            notices.append(f"{path}: '{key}' list the examples of {ref_path} in another order; "
                           "reordered to match")
    return Join(orders["train_ids"], orders["query_ids"], notices)


def _notify(notices: list[str], notify: Callable[[str], Any] | None) -> list[str]:
    if notify is not None:
        for notice in notices:
            notify(notice)
    return notices


def align_scores(scores: np.ndarray, meta: dict[str, Any], ref: dict[str, Any], scores_path,
                 ref_path, *, notify: Callable[[str], Any] | None = None
                 ) -> tuple[np.ndarray, list[str]]:
    """Dense scores [n, m] (with ``meta`` from :func:`dense_scores`) put in the order of
    ``ref``'s ``train_ids`` and ``query_ids``; returns them and the notices of :func:`join`.

    ``ref`` is LDS ground truth (:func:`read_ground_truth`) or any dict of the two id arrays (a
    dataset's, with ``ref_path`` naming where they come from). Each notice is also passed to
    ``notify`` (e.g. ``log.warning``) when given: steps note a reordering, the CLI prints it.
    """
    j = join(scores_path, meta["train_ids"], meta["query_ids"], ref_path, ref["train_ids"],
             ref["query_ids"], positional=is_positional(meta["attrs"]),
             ref_positional=is_positional(ref.get("attrs", {})))
    return j.take(scores, 0, 1), _notify(j.notices, notify)


def align_losses(losses, ref: dict[str, Any], ref_path, *,
                 notify: Callable[[str], Any] | None = None) -> tuple[Any, list[str]]:
    """``losses`` (a :class:`~daunce_core.store.files.Losses`) with their training and query
    columns in the order of ``ref``'s ids.

    ``ref`` is LDS ground truth or any dict of ``train_ids`` and ``query_ids`` (named by
    ``ref_path``); the same ids in another order are reordered (notices returned and passed to
    ``notify``), different ids are refused naming ``losses.source`` and ``ref_path`` (:func:`join`).
    """
    j = join(losses.source or "the losses", losses.train_ids, losses.query_ids, ref_path,
             ref["train_ids"], ref["query_ids"], positional=is_positional(losses.attrs),
             ref_positional=is_positional(ref.get("attrs", {})))
    if j.train is None and j.query is None:
        return losses, _notify(j.notices, notify)
    aligned = dataclasses.replace(
        losses, train=j.take(losses.train, 1), query=j.take(losses.query, query_axis=1),
        train_ids=j.take(losses.train_ids, 0), query_ids=j.take(losses.query_ids, query_axis=0),
        attrs=dict(losses.attrs),
        p0_train=None if losses.p0_train is None else j.take(losses.p0_train, 0),
        p0_query=None if losses.p0_query is None else j.take(losses.p0_query, query_axis=0))
    return aligned, _notify(j.notices, notify)

