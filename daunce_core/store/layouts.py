"""The HDF5 layouts of daunce as one table, and the reader, writer and gatherer that walk it.

Each layout (:data:`LOSSES`, :data:`DENSE_SCORES`, :data:`TOPK_SCORES`, :data:`GROUND_TRUTH`,
:data:`DIVERGED`) lists its datasets in the order they are written: the stored dtype, the named
sizes of each axis, how the dataset is read back, whether it may be absent, and the attributes
the writers record. :func:`write`, :func:`read` and :func:`gather` do the same work for every
layout from that table; ``files.py`` adds what is particular to one layout. Numbers may be stored
as any float or integer type: float16 (and bfloat16) are read as float32, wider or integer types
as float64; strings, objects, compounds and groups are refused. The layouts are described for
users in docs/trust.md and in the README.
"""
from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from .errors import StoreError
from .ids import is_positional, join, refuse_repeats

__all__ = ["VERSION", "Array", "Layout", "LOSSES", "DENSE_SCORES", "TOPK_SCORES", "GROUND_TRUTH",
           "DIVERGED", "write", "begin", "create", "finish", "read", "gather", "open_h5", "reading",
           "require", "describe_dtype", "number_dtype", "read_numbers", "read_ints", "read_attrs",
           "example_ids", "all_finite", "check_finite", "refuse_nonfinite", "check_numeric",
           "refuse_repeated_index", "refuse_overlap", "F32_MAX", "I64_MAX"]

VERSION = "0.1.0"

log = logging.getLogger("daunce_core.store")

F32_MAX = float(np.finfo(np.float32).max)
I64_MAX = np.iinfo(np.int64).max


# --- the table ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Array:
    """One dataset of a layout.

    ``dims`` names the size of each axis (``n`` training examples, ``m`` queries, ``K`` models,
    ``M`` subsets, ``S`` seeds, ``k`` kept per query); ``read`` is how it is read back:
    ``"numbers"`` (float32, or float64 for wider types), ``"float64"``, ``"ints"`` (int64) or
    ``"mask"`` (bool, or numbers that are all 0/1). ``ids`` marks ``train_ids``/``query_ids``
    (both or neither; positional ids 0..n-1 when neither). ``default`` fills an absent optional
    dataset (``"arange"``: 0..size-1). ``unique`` names what each entry is when no entry may
    repeat (``many`` names several, for overlapping chunks); ``chunked`` stores it in chunks of
    (all rows, up to 4096 columns).
    """

    key: str
    dtype: type
    dims: tuple[str, ...]
    read: str = "numbers"
    required: bool = True
    ids: bool = False
    default: str | None = None
    unique: str = ""  # one entry, in words ("model k"); then `many`, several ("models k")
    many: str = ""
    chunked: bool = False
    missing: str = ""  # what to do when this required dataset is absent (else the generic message)


@dataclass(frozen=True)
class Layout:
    """A file layout: its datasets in write order, attributes, and how errors name its sizes."""

    name: str  # as errors say it: "could not read the <name>"
    arrays: tuple[Array, ...]
    attrs: tuple[str, ...] = ()  # the attributes its writers record (besides daunce_version)
    fixed: dict[str, Any] = field(default_factory=dict)  # attributes written first (the format)
    sizes: dict[str, tuple[str, int, str]] = field(default_factory=dict)  # size -> (key, axis, words)
    none: str | None = None  # how a None attribute is stored (None: refused by h5py)
    guarded: tuple[str, ...] = ()  # attributes chunks of one file must share
    hint: str = ""  # what to do about NaN or infinite values

    def array(self, key: str) -> Array:
        return next(a for a in self.arrays if a.key == key)

    def words(self, size: str) -> str:
        """How an error names ``size`` (e.g. ``"'train'"``, ``"the rows of 'scores'"``)."""
        return self.sizes[size][2]


_IDS = (Array("train_ids", np.int64, ("n",), "ints", ids=True),
        Array("query_ids", np.int64, ("m",), "ints", ids=True))

LOSSES = Layout(
    "losses",
    (Array("train", np.float32, ("K", "n"), chunked=True),
     Array("query", np.float32, ("K", "m"), chunked=True),
     # optional: a file written by another tool may hold only train and query (README)
     Array("model_index", np.int64, ("K",), "ints", required=False, default="arange", unique="model k",
           many="models k"),
     *_IDS,
     # theta_0's probability of each label; float64: 1 - p0 stays exact for well-fitted examples
     Array("p0_train", np.float64, ("n",), "float64", required=False),
     Array("p0_query", np.float64, ("m",), "float64", required=False)),
    attrs=("variant", "signal", "seed", "config"),
    sizes={"K": ("train", 0, "'train'"), "n": ("train", 1, "'train'"), "m": ("query", 1, "'query'")},
    guarded=("variant", "signal", "seed", "config"),
    hint="A perturbed fit diverged: lower the learning rate or check the data.",
)

_SCORES_HINT = "the step that wrote these scores failed: rerun it or check its inputs"
_SCORES_ATTRS = ("method", "measure", "threshold", "lambda")

DENSE_SCORES = Layout(
    "scores", (Array("scores", np.float32, ("n", "m")), *_IDS), attrs=_SCORES_ATTRS,
    fixed={"format": "dense"}, none="none", hint=_SCORES_HINT,
    sizes={"n": ("scores", 0, "the rows of 'scores'"), "m": ("scores", 1, "the columns of 'scores'")},
)

TOPK_SCORES = Layout(
    "scores",
    (Array("indices", np.int64, ("m", "k"), "ints"),  # positions into the training set, best first
     Array("values", np.float32, ("m", "k")),
     Array("train_ids", np.int64, ("n",), "ints", ids=True,
           missing="a top-k scores file needs 'train_ids' (the training set's size and ids); "
                   "rewrite it with ids"),
     _IDS[1]),
    attrs=_SCORES_ATTRS, fixed={"format": "topk"}, none="none", hint=_SCORES_HINT,
    sizes={"n": ("train_ids", 0, "'train_ids'"), "m": ("indices", 0, "the rows of 'indices'")},
)

GROUND_TRUTH = Layout(
    "LDS ground truth",
    (Array("masks", np.bool_, ("M", "n"), "mask"),
     Array("outputs", np.float32, ("S", "M", "m")),  # margins of the queries, one row per seed
     Array("mask_index", np.int64, ("M",), "ints", unique="subset (mask)", many="subsets (masks)"),
     *_IDS),
    sizes={"M": ("masks", 0, "'masks'"), "n": ("masks", 1, "the columns of 'masks'"),
           "m": ("outputs", 2, "the last axis of 'outputs'")},
    hint="a retrain of the LDS ground truth diverged: rerun it or lower its learning rate",
)

DIVERGED = Layout("diverged fits", (), attrs=("diverged", "reason"))  # plus the losses' attributes

SCORES = {"dense": DENSE_SCORES, "topk": TOPK_SCORES}


# --- writing -----------------------------------------------------------------------------------

def begin(f: h5py.File, layout: Layout) -> None:
    """Write the attributes that come first (a scores file's ``format``)."""
    for key, value in layout.fixed.items():
        f.attrs[key] = value


def create(f: h5py.File, layout: Layout, key: str, data=None, shape=None) -> h5py.Dataset:
    """Create dataset ``key`` with the layout's dtype and chunks, from ``data`` or empty of ``shape``."""
    a = layout.array(key)
    if data is not None:
        data = np.asarray(data, a.dtype)
        shape = data.shape
    chunks = (shape[0], max(1, min(shape[1], 4096))) if a.chunked else None
    return f.create_dataset(key, data=data, shape=None if data is not None else shape,
                            dtype=None if data is not None else a.dtype, chunks=chunks)


def finish(f: h5py.File, layout: Layout, *attrs: dict[str, Any]) -> None:
    """Write the attributes (dicts and lists as JSON) and ``daunce_version``."""
    for part in attrs:
        for key, value in part.items():
            if isinstance(value, (dict, list)):
                value = json.dumps(value)
            elif value is None and layout.none is not None:
                value = layout.none
            f.attrs[key] = value
    f.attrs["daunce_version"] = VERSION


def write(f: h5py.File, layout: Layout, arrays: dict[str, Any], *attrs: dict[str, Any]) -> None:
    """Write ``arrays`` (an absent or None optional dataset is left out) and ``attrs`` into ``f``."""
    begin(f, layout)
    for a in layout.arrays:
        if arrays.get(a.key) is not None:
            create(f, layout, a.key, arrays[a.key])
    finish(f, layout, *attrs)


# --- reading -----------------------------------------------------------------------------------

def open_h5(path) -> h5py.File:
    """Open an HDF5 file for reading; a missing, non-regular or unreadable file is refused."""
    path = Path(path)
    if not path.exists():
        raise StoreError(f"{path}: no such file")
    if path.is_dir():
        raise StoreError(f"{path}: is a directory, expected an HDF5 file")
    if not path.is_file():  # opening a pipe would block forever
        raise StoreError(f"{path}: is a device, pipe or socket, expected an HDF5 file")
    try:
        return h5py.File(path, "r")
    except OSError as exc:  # truncated or not HDF5 at all
        raise StoreError(
            f"{path}: not a readable HDF5 file ({exc}); it may be truncated -- delete it and "
            "rerun the step that writes it"
        ) from exc


@contextlib.contextmanager
def reading(path, what: str) -> Iterator[None]:
    """Turn low-level read failures inside an open file into one StoreError naming it."""
    try:
        yield
    except (OSError, KeyError, RuntimeError) as exc:
        raise StoreError(f"{path}: could not read the {what} ({exc}); the file may be truncated "
                         "-- delete it and rerun the step that writes it") from exc


def require(f: h5py.File, key: str, ndim: int | None = None) -> h5py.Dataset:
    """Dataset ``key`` of ``f``, refused when absent, a group, without shape or of another ndim."""
    if key not in f:
        raise StoreError(f"{f.filename}: missing dataset '{key}' (has: {sorted(f.keys())})")
    ds = f[key]
    if not isinstance(ds, h5py.Dataset):
        raise StoreError(f"{f.filename}: '{key}' is a group, expected a dataset")
    if ds.shape is None:
        raise StoreError(f"{f.filename}: dataset '{key}' is empty (no shape), expected an array")
    if ndim is not None and ds.ndim != ndim:
        raise StoreError(f"{f.filename}: dataset '{key}' has {ds.ndim} dimensions, expected {ndim}")
    return ds


def describe_dtype(dt: np.dtype) -> str:
    """What a non-numeric dtype holds, in words for an error message."""
    if h5py.check_string_dtype(dt) is not None or dt.kind in "SU":
        return "strings"
    return {"O": "objects (variable-length data or references)", "c": "complex numbers",
            "V": "compound or opaque records"}.get(dt.kind, f"values of type {dt}")


def number_dtype(ds: h5py.Dataset) -> np.dtype:
    """The dtype a numeric dataset is read as: float32 up to 4 bytes (float16, bfloat16), float64
    for wider floats and integers, as the in-memory API does; anything else is refused."""
    dt = ds.dtype
    if dt.kind == "f" and h5py.check_string_dtype(dt) is None:
        return np.dtype(np.float32 if dt.itemsize <= 4 else np.float64)
    if dt.kind in "iub":
        return np.dtype(np.float64)
    raise StoreError(f"{ds.file.filename}: dataset '{ds.name.lstrip('/')}' holds {describe_dtype(dt)}, "
                     "expected numbers (float32 or float64)")


def read_numbers(f: h5py.File, key: str, ndim: int) -> np.ndarray:
    ds = require(f, key, ndim)
    target = number_dtype(ds)
    return ds[()] if ds.dtype == target else ds.astype(target)[()]


def read_ints(f: h5py.File, key: str, length: int | None = None, of: str = "",
              ndim: int = 1) -> np.ndarray:
    """Integer dataset ``key`` as int64; ``length`` entries (as many as ``of`` has) if given."""
    ds = require(f, key, ndim)
    if ds.dtype.kind not in "iu":
        raise StoreError(f"{f.filename}: dataset '{key}' holds {describe_dtype(ds.dtype)}, "
                         "expected integers")
    if length is not None and ds.shape[0] != length:
        raise StoreError(f"{f.filename}: '{key}' has {ds.shape[0]} entries but {of} has {length}; "
                         "they must describe the same examples")
    a = ds[()]
    # uint64 values from 2**63 up would wrap to negative int64 numbers: another id than stored
    if a.dtype.kind == "u" and a.size and (big := a > I64_MAX).any():
        raise StoreError(f"{f.filename}: dataset '{key}' holds uint64 value {a[big][0]}, beyond the "
                         f"int64 of the layout (max {I64_MAX}); store values below 2**63")
    return a.astype(np.int64, copy=False)


def _read_mask(f: h5py.File, key: str) -> np.ndarray:
    ds = require(f, key, 2)
    if ds.dtype.kind == "b":
        return ds[()]
    masks = read_numbers(f, key, 2)
    outside = masks[(masks != 0) & (masks != 1)]
    if outside.size:
        raise StoreError(f"{f.filename}: '{key}' holds {float(outside[0]):g}; a mask is 0/1 "
                         "(training example out of / in the subset)")
    return masks.astype(bool)


def read_attrs(f: h5py.File) -> dict[str, Any]:
    """The file's attributes as Python values (bytes decoded, JSON strings parsed)."""
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


def example_ids(f: h5py.File, n: int, m: int, of_n: str, of_m: str
                ) -> tuple[np.ndarray, np.ndarray, bool]:
    """(train_ids, query_ids, positional): a file with neither id dataset gets 0..n-1, 0..m-1.

    Repeated ids are refused here, where they are read, not only when two files are joined.
    """
    has = {key: key in f for key in ("train_ids", "query_ids")}
    if not any(has.values()):
        return np.arange(n, dtype=np.int64), np.arange(m, dtype=np.int64), True
    if not all(has.values()):
        present, missing = sorted(has, key=lambda k: not has[k])
        raise StoreError(f"{f.filename}: has '{present}' but no '{missing}'; store both id "
                         "datasets, or neither for positional ids 0..n-1")
    ids = (read_ints(f, "train_ids", n, of_n), read_ints(f, "query_ids", m, of_m))
    for key, a in zip(("train_ids", "query_ids"), ids):
        refuse_repeats(f.filename, key, a)
    return (*ids, False)


def read(f: h5py.File, layout: Layout, path) -> tuple[dict[str, np.ndarray], bool]:
    """Every dataset of ``layout`` in ``f`` (absent optional ones left out or defaulted), with the
    example ids; returns them and whether the ids are positional. Call inside :func:`reading`.

    Checked here, from the table: presence, ndim, numeric or integer dtype, the length of integer
    datasets against the sizes already read, repeated entries. Agreement between the shapes of
    numeric datasets is each layout's own check (``files.py``).
    """
    out: dict[str, np.ndarray] = {}

    def size(name: str) -> int:
        key, axis, _ = layout.sizes[name]
        return out[key].shape[axis] if key in out else require(f, key, len(layout.array(key).dims)).shape[axis]

    positional = False
    for a in layout.arrays:
        if a.ids:
            if a.missing and a.key not in f:
                raise StoreError(f"{path}: {a.missing}")
            if a.key == "query_ids":  # the last of the two: both are read together
                out["train_ids"], out["query_ids"], positional = example_ids(
                    f, size("n"), size("m"), layout.words("n"), layout.words("m"))
            continue
        if a.key not in f and not a.required:
            if a.default == "arange":
                out[a.key] = np.arange(size(a.dims[0]), dtype=np.int64)
            continue
        if a.read == "ints":
            bound = a.dims[0] in layout.sizes and layout.sizes[a.dims[0]][0] != a.key
            out[a.key] = read_ints(f, a.key, size(a.dims[0]) if bound else None,
                                   layout.words(a.dims[0]) if bound else "", ndim=len(a.dims))
        elif a.read == "mask":
            out[a.key] = _read_mask(f, a.key)
        else:
            out[a.key] = read_numbers(f, a.key, len(a.dims))
            if a.read == "float64":
                out[a.key] = out[a.key].astype(np.float64)
        if a.unique:
            refuse_repeated_index(path, a.key, out[a.key], a.unique)
    return out, positional


# --- values ------------------------------------------------------------------------------------

def all_finite(a: np.ndarray) -> bool:
    # A float64 sum of float32 values cannot overflow, and NaN or inf propagate: one pass with
    # no temporary. Only a non-finite sum (or a float64 overflow) needs the elementwise check.
    if a.size == 0 or np.isfinite(a.sum(dtype=np.float64)):
        return True
    return bool(np.isfinite(a).all())


def refuse_nonfinite(path, key: str, a: np.ndarray, hint: str) -> None:
    """Refuse NaN or infinite values of dataset ``key``, naming the first position."""
    if not all_finite(a):
        bad = ~np.isfinite(a)
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        raise StoreError(f"{path}: dataset '{key}' holds {int(bad.sum())} NaN or infinite "
                         f"value(s), the first at position {first}; {hint}")


def check_finite(values: np.ndarray, ids: np.ndarray, what: str, source: str = "",
                 hint: str = LOSSES.hint) -> None:
    """Raise :class:`StoreError` naming the first example ids whose values are NaN or infinite.

    ``values`` is [K, n]: column ``i`` belongs to example ``ids[i]``.
    """
    if all_finite(values):
        return
    bad_cols = np.flatnonzero(~np.isfinite(values).all(axis=0))
    if bad_cols.size:
        shown = ", ".join(str(ids[c]) for c in bad_cols[:10])
        more = f" (and {bad_cols.size - 10} more)" if bad_cols.size > 10 else ""
        where = f"{source}: " if source else ""
        raise StoreError(
            f"{where}{bad_cols.size} {what} example(s) have NaN or infinite values, first ids: "
            f"{shown}{more}. {hint}"
        )


def check_numeric(a: np.ndarray, key: str, source: str) -> None:
    if a.dtype.kind not in "fiub":
        raise StoreError(f"{source}: '{key}' holds {describe_dtype(a.dtype)}, expected numbers")


def refuse_repeated_index(path, key: str, index: np.ndarray, what: str) -> None:
    """Refuse an index (``model_index``, ``mask_index``) that names one entry twice in a file."""
    values, counts = np.unique(index, return_counts=True)
    if (counts > 1).any():
        raise StoreError(f"{path}: '{key}' repeats {what} {values[counts > 1][0]} "
                         f"({int(counts[counts > 1][0])} times); each must occur once, or it would "
                         "count twice: the file is corrupt or was concatenated by hand")


def refuse_overlap(paths: Sequence, indices: Sequence[np.ndarray], key: str, what: str, out) -> None:
    """Refuse chunks whose ``key`` ranges overlap (the same entry in two files, or twice in one),
    naming the files and the shared entries, before ``out`` is written."""
    index = np.concatenate(indices)
    values, counts = np.unique(index, return_counts=True)
    if not (counts > 1).any():
        return
    first = values[counts > 1][0]
    holders = [str(paths[i]) for i, part in enumerate(indices) if (part == first).any()]
    if len(holders) == 1:
        refuse_repeated_index(holders[0], key, indices[[str(p) for p in paths].index(holders[0])], what)
    shared = np.intersect1d(*(indices[[str(p) for p in paths].index(h)] for h in holders[:2]))
    shown = ", ".join(str(v) for v in shared[:8]) + (" ..." if shared.size > 8 else "")
    raise StoreError(f"{out}: chunks {holders[0]} and {holders[1]} overlap: both hold {what} {shown} "
                     f"({shared.size} in all, '{key}'); each must come from one chunk only, or it would "
                     "count twice: gather chunks of disjoint ranges")


# --- gathering chunks ----------------------------------------------------------------------------

def gather(layout: Layout, paths: Sequence, parts: Sequence[dict[str, Any]], out, index: str,
           check: Callable[[Any, dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Concatenate chunk files of ``layout`` along the size ``index`` (``K``: models, ``M``:
    subsets), joined on ids in the first chunk's order and sorted by the index dataset.

    ``parts`` are the chunks as read (arrays, ``train_ids``, ``query_ids``, ``attrs``); the
    datasets with an ``index`` axis are concatenated, the others taken from the first chunk.
    Chunks that differ in a guarded attribute are refused before the join, ``check(path, part)``
    runs after it.
    """
    first = parts[0]
    stacked = [a for a in layout.arrays if index in a.dims]
    key = next(a.key for a in stacked if a.unique)
    for p, part in zip(paths[1:], parts[1:]):
        for attr in layout.guarded:
            if part["attrs"].get(attr) != first["attrs"].get(attr):
                raise StoreError(
                    f"{p}: attribute '{attr}' differs from {paths[0]} "
                    f"({part['attrs'].get(attr)!r} vs {first['attrs'].get(attr)!r}); "
                    "these chunks come from different settings and cannot be combined"
                )
        j = join(p, part["train_ids"], part["query_ids"], paths[0], first["train_ids"],
                 first["query_ids"], positional=is_positional(part["attrs"]),
                 ref_positional=is_positional(first["attrs"]))
        for a in stacked:
            if a.key != key:
                part[a.key] = j.take(part[a.key], a.dims.index("n") if "n" in a.dims else None,
                                     a.dims.index("m") if "m" in a.dims else None)
        for notice in j.notices:
            log.warning("%s", notice)
        if check is not None:
            check(p, part)
    refuse_overlap(paths, [p[key] for p in parts], key, layout.array(key).many, out)
    order = np.argsort(np.concatenate([p[key] for p in parts]), kind="stable")
    merged = {a.key: np.concatenate([p[a.key] for p in parts], axis=a.dims.index(index)).take(
        order, axis=a.dims.index(index)) for a in stacked}
    return {**{k: v for k, v in first.items() if k not in merged}, **merged}
