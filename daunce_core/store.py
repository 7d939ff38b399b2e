"""HDF5 layouts of daunce: losses, scores and LDS ground truth, joined on ids, written atomically.

Every file is first written to a temporary name beside it (``.<name>.daunce-tmp-<pid>@<host>.*``)
and renamed into place only once it is complete, so a crash, a bad input or a SIGTERM/SIGINT
(with :func:`cleanup_on_signals`) never leaves a half-written file behind and never overwrites a
finished result with a broken one; a temporary left by a SIGKILLed run is removed by the next
write of the same file once its process is gone. One output has one temporary (a writer called on
an enclosing write's temporary writes into it), and an output that is a symbolic link is written
to the link's target. Outputs that would destroy something (an input, a file an HDF5 input reads
through a link, a directory, a device) are refused before any work (:func:`check_output`), and
files are created with the user's umask (0644 under umask 022).

Files are paired on example ids, never on positions (:func:`match_ids`, :func:`join`): the same
ids in another order are reordered with a notice, different ids are refused. A file that carries
no ids at all is read with positional ids 0..n-1 and marked ``attrs["ids"] == "positional"``.
NaN or infinite values are refused wherever they are read.

Layouts (see docs/facts.md):

* losses  -- ``train`` [K, n] and ``query`` [K, m] float32 (the per-example signal of each
  perturbed model: the loss, or the margin for ``daunce_t``), ``model_index`` [K] int64
  (the k of each row; optional, 0..K-1 when absent), ``train_ids`` [n] and ``query_ids`` [m]
  int64 (unique; both or neither, see above), and attributes
  ``variant``, ``signal`` (``"loss"`` or ``"margin"``), ``seed``, ``config`` (JSON),
  ``daunce_version``.
* scores  -- ``format`` attribute ``"dense"``: ``scores`` [n, m] float32; ``format`` ``"topk"``:
  ``indices`` [m, k] int64 (positions into the training set) and ``values`` [m, k] float32,
  best first. Both carry ``train_ids``, ``query_ids`` and attributes ``method``, ``measure``,
  ``threshold``, ``lambda``. Positive scores mean the training example helps the query.
* ground truth (LDS) -- ``masks`` [M, n] bool, ``outputs`` [S, M, m] float32 (margins of the
  queries under the model retrained on each mask, one row per seed).

Numbers may be stored as any float or integer type: float16 (and bfloat16) are read as float32,
wider or integer types as float64; strings, objects, compounds and groups are refused.

This module is longer than the usual 500 lines on purpose: it is the one contract for every file
daunce reads or writes (layouts, joins on ids, safe writes), kept together so that no reader or
writer can bypass a check.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import secrets
import signal
import socket
import stat
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

__all__ = [
    "StoreError",
    "check_output",
    "clean_leftovers",
    "cleanup_on_signals",
    "Terminated",
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
    "match_ids",
    "join",
    "Join",
    "align_scores",
    "align_losses",
    "is_positional",
]

VERSION = "0.1.0"

log = logging.getLogger(__name__)

_F32_MAX = float(np.finfo(np.float32).max)
_I64_MAX = np.iinfo(np.int64).max


class StoreError(ValueError):
    """A file does not have the layout daunce expects; the message names the file and key."""


# --- outputs: refuse what would destroy something, temporaries beside the output -------------

def check_output(path: str | os.PathLike, inputs: Sequence[str | os.PathLike] = ()) -> Path:
    """Refuse an output path that writing would destroy or cannot hold; return it as a Path.

    Refused, with a :class:`StoreError` naming the path: an existing directory, a device, pipe
    or socket (replacing ``/dev/null`` as root would delete it), a path under a regular file,
    and the same file as one of ``inputs`` (also through a symlink, hard link or ``..``).
    Called by every writer of this module and, before any computation, by the CLI commands.
    """
    if not str(path):
        raise StoreError("empty output path: give a file name")
    p = Path(path)
    for folder in p.absolute().parents:
        try:
            st = folder.stat()
        except (FileNotFoundError, NotADirectoryError):
            continue  # created later by mkdir, unless an ancestor is a file (checked next)
        if not stat.S_ISDIR(st.st_mode):
            raise StoreError(f"{path}: cannot be created because {folder} is a file, not a folder; "
                             "choose another output path")
        break
    try:
        st = p.stat()  # follows a symlink: its target is what a reader would lose
    except FileNotFoundError:
        # Not there yet, but "missing/../in.h5" becomes the input once mkdir makes "missing".
        lexical = os.path.normpath(os.path.abspath(p))
        for inp in inputs:
            if lexical in (os.path.normpath(os.path.abspath(inp)), os.path.realpath(inp)):
                raise _overwrites_input(path, inp) from None
        return p
    except NotADirectoryError as exc:
        raise StoreError(f"{path}: a part of this path is a file, not a folder; choose another "
                         "output path") from exc
    if stat.S_ISDIR(st.st_mode):
        raise StoreError(f"{path}: is an existing directory; give a file name inside it "
                         f"(e.g. {p / 'out.h5'})")
    if not stat.S_ISREG(st.st_mode):
        raise StoreError(f"{path}: is a device, pipe or socket, not a regular file; daunce "
                         "replaces its outputs, so choose a regular file path")
    for inp in inputs:
        with contextlib.suppress(OSError):
            if os.path.samefile(p, inp):
                raise _overwrites_input(path, inp)
    for inp in inputs:
        for linked in _linked_files(inp):
            with contextlib.suppress(OSError):
                if os.path.samefile(p, linked):
                    raise StoreError(f"{path}: the input {inp} reads data from this file (an HDF5 "
                                     "external link or virtual dataset); writing it would destroy "
                                     "that data, so choose another output path")
    return p


def _overwrites_input(path, inp) -> StoreError:
    return StoreError(f"{path}: is the input file {inp}; writing it would destroy the input, so "
                      "choose another output path")


def _linked_files(path: str | os.PathLike, _seen: set | None = None) -> list[str]:
    """Files an HDF5 file reads through external links or virtual datasets, transitively.

    A relative name is taken both beside the file that holds the link and from the working
    directory (HDF5 tries both); names that do not exist are left out (nothing to destroy).
    Anything that is not a readable HDF5 file has none.
    """
    seen = set() if _seen is None else _seen
    real = os.path.realpath(path)
    if real in seen or not os.path.isfile(real):
        return []
    seen.add(real)
    try:
        if not h5py.is_hdf5(real):
            return []
        f = h5py.File(real, "r")
    except OSError:
        return []
    names: list[str] = []
    groups: set = set()  # hard links may form cycles: each group is visited once

    def visit(group: h5py.Group) -> None:
        if group.id in groups:
            return
        groups.add(group.id)
        for key in group:
            try:
                link = group.get(key, getlink=True)
            except (OSError, KeyError, RuntimeError):
                continue
            if isinstance(link, h5py.ExternalLink):
                names.append(link.filename)
                continue
            if isinstance(link, h5py.SoftLink):
                continue  # within this file
            try:
                obj = group[key]
            except (OSError, KeyError, RuntimeError):
                continue
            if isinstance(obj, h5py.Group):
                visit(obj)
            elif isinstance(obj, h5py.Dataset) and obj.is_virtual:
                names.extend(src.file_name for src in obj.virtual_sources() if src.file_name != ".")

    with f:
        visit(f)
    out = []
    for name in names:
        candidates = [name] if os.path.isabs(name) else [os.path.join(os.path.dirname(real), name), name]
        for c in candidates:
            if os.path.isfile(c) and os.path.realpath(c) not in {os.path.realpath(o) for o in out}:
                out.append(c)
                out.extend(_linked_files(c, seen))
    return out


_TMP_TAG = ".daunce-tmp-"


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname()) or "host"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def clean_leftovers(path: str | os.PathLike) -> list[Path]:
    """Remove temporaries of ``path`` left by killed runs (SIGKILL, power loss); return them.

    A temporary of ``path`` is any name derived from it by daunce: ``.<name>.daunce-tmp-<pid>@<host>.*``,
    also a temporary of such a temporary (``..<name>.daunce-tmp-A.h5.daunce-tmp-B.h5.tmp``, written
    by earlier versions that nested two atomic writes). Only temporaries whose every writer ran on
    this host and no longer exists are removed; those of a live process (another run writing the
    same file) or of another host (a shared file system) are left alone, and ignored: a write never
    reads them.
    """
    path = Path(path)
    start = re.compile(r"\.+" + re.escape(path.name) + re.escape(_TMP_TAG))
    writer = re.compile(re.escape(_TMP_TAG) + r"(\d+)@([A-Za-z0-9-]+)\.")
    host = _host()
    removed = []
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return removed
    for entry in entries:
        if not start.match(entry.name):
            continue
        writers = writer.findall(entry.name)
        if not writers or any(h != host or int(pid) == os.getpid() or _alive(int(pid))
                              for pid, h in writers):
            continue
        with contextlib.suppress(FileNotFoundError):
            os.unlink(entry.path)
            removed.append(Path(entry.path))
    if removed:
        log.info("%s: removed %d temporary file(s) left by a killed run", path, len(removed))
    return removed


def _new_temp(path: Path, suffix: str) -> Path:
    """Create an empty temporary beside ``path``; mode 0666 minus the umask, like any new file."""
    prefix = f".{path.name}{_TMP_TAG}{os.getpid()}@{_host()}."
    for _ in range(100):
        tmp = path.parent / f"{prefix}{secrets.token_hex(4)}{suffix}"
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return tmp
    raise FileExistsError(f"{path}: could not create a temporary file beside it")


# Temporaries of the atomic writes open in this process: a write into one of them (a writer
# called on the temporary of an enclosing write) goes straight into it, never into a temporary
# of its own, so each output has one temporary, named after it and cleaned by clean_leftovers.
_OPEN_TEMPS: set[str] = set()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only on success.

    ``path`` is checked first (:func:`check_output`) and temporaries of killed runs are cleaned
    (:func:`clean_leftovers`). On any exception, KeyboardInterrupt and SystemExit included, the
    temporary is removed and ``path`` is left untouched. The output gets the temporary's first
    mode (0666 minus the umask) even when the writer replaced the temporary by a file of its own
    (safetensors' ``save_file`` renames a 0600 file onto it).

    A symbolic link at ``path`` is written through: its target gets the new content and the
    link stays (a link replaced by a file would leave its target stale). A ``path`` that is
    itself the temporary of an enclosing ``atomic_path`` of this process is yielded as it is:
    the enclosing write renames (or removes) it, and no temporary of a temporary is made.
    """
    if os.path.abspath(path) in _OPEN_TEMPS:
        yield Path(path)
        return
    if os.path.islink(path):
        path = os.path.realpath(path)
    path = check_output(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_leftovers(path)
    tmp = None
    try:
        tmp = _new_temp(path, ".tmp" if suffix is None else suffix)
        _OPEN_TEMPS.add(os.path.abspath(tmp))
        mode = stat.S_IMODE(os.stat(tmp).st_mode)
        yield tmp
        raise_pending_signal()  # a signal whose exception was swallowed (see cleanup_on_signals)
        now = os.lstat(tmp)
        if stat.S_ISREG(now.st_mode) and stat.S_IMODE(now.st_mode) != mode:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        if tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        raise
    finally:
        if tmp is not None:
            _OPEN_TEMPS.discard(os.path.abspath(tmp))


@contextlib.contextmanager
def atomic_h5(path: str | os.PathLike) -> Iterator[h5py.File]:
    """Open an HDF5 file for writing that appears at ``path`` only once it is closed cleanly."""
    with atomic_path(path, suffix=".h5.tmp") as tmp:
        with h5py.File(tmp, "w") as f:
            yield f


class Terminated(BaseException):
    """Raised in the main thread by :func:`cleanup_on_signals` on SIGTERM (a BaseException, like
    KeyboardInterrupt, so that no ``except Exception`` swallows it)."""

    def __init__(self, signum: int):
        super().__init__(f"terminated by signal {signum}")
        self.signum = signum


@contextlib.contextmanager
def cleanup_on_signals() -> Iterator[None]:
    """Turn SIGTERM (scancel, SLURM time limits, Snakemake) into :class:`Terminated` and SIGINT
    into KeyboardInterrupt, so that open atomic writes remove their temporaries on the way out.

    A second signal while cleaning up gets the default action (the process dies at once). Only
    the main thread can install handlers; elsewhere this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        for s in (signal.SIGTERM, signal.SIGINT):
            signal.signal(s, signal.SIG_DFL)
        _PENDING.append(signum)
        _raise_for(signum)

    def unraisable(u):  # a signal's exception swallowed in a __del__/weakref callback: _PENDING has it
        if not isinstance(u.exc_value, (KeyboardInterrupt, Terminated)):
            previous_hook(u)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    previous_hook, sys.unraisablehook = sys.unraisablehook, unraisable
    try:
        yield
    finally:
        sys.unraisablehook = previous_hook
        _PENDING.clear()
        for s, h in previous.items():
            signal.signal(s, h)


# Signals received by cleanup_on_signals' handler. Python runs a handler between bytecodes of
# whatever frame is current; when that is a weakref callback or a __del__, the exception it
# raises is printed as "Exception ignored" and dropped, and the program would go on to finish
# (and rename its output into place). atomic_path checks this list before renaming, so a
# swallowed signal still leaves no output.
_PENDING: list[int] = []


def _raise_for(signum: int):
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise Terminated(signum)


def raise_pending_signal() -> None:
    """Re-raise a signal whose exception was swallowed since the handler ran (see ``_PENDING``)."""
    if _PENDING:
        _raise_for(_PENDING[0])


def _open(path: str | os.PathLike) -> h5py.File:
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
def _reading(path: str | os.PathLike, what: str) -> Iterator[None]:
    """Turn low-level read failures inside an open file into one StoreError naming it."""
    try:
        yield
    except (OSError, KeyError, RuntimeError) as exc:
        raise StoreError(f"{path}: could not read the {what} ({exc}); the file may be truncated "
                         "-- delete it and rerun the step that writes it") from exc


def _require(f: h5py.File, key: str, ndim: int | None = None) -> h5py.Dataset:
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


def _describe(dt: np.dtype) -> str:
    if h5py.check_string_dtype(dt) is not None or dt.kind in "SU":
        return "strings"
    return {"O": "objects (variable-length data or references)", "c": "complex numbers",
            "V": "compound or opaque records"}.get(dt.kind, f"values of type {dt}")


def _number_dtype(ds: h5py.Dataset) -> np.dtype:
    """The dtype a numeric dataset is read as: float32 up to 4 bytes (float16, bfloat16), float64
    for wider floats and integers, as the in-memory API does; anything else is refused."""
    dt = ds.dtype
    if dt.kind == "f" and h5py.check_string_dtype(dt) is None:
        return np.dtype(np.float32 if dt.itemsize <= 4 else np.float64)
    if dt.kind in "iub":
        return np.dtype(np.float64)
    raise StoreError(f"{ds.file.filename}: dataset '{ds.name.lstrip('/')}' holds {_describe(dt)}, "
                     "expected numbers (float32 or float64)")


def _read_numbers(f: h5py.File, key: str, ndim: int) -> np.ndarray:
    ds = _require(f, key, ndim)
    target = _number_dtype(ds)
    return ds[()] if ds.dtype == target else ds.astype(target)[()]


def _read_ints(f: h5py.File, key: str, length: int | None = None, of: str = "",
               ndim: int = 1) -> np.ndarray:
    ds = _require(f, key, ndim)
    if ds.dtype.kind not in "iu":
        raise StoreError(f"{f.filename}: dataset '{key}' holds {_describe(ds.dtype)}, "
                         "expected integers")
    if length is not None and ds.shape[0] != length:
        raise StoreError(f"{f.filename}: '{key}' has {ds.shape[0]} entries but {of} has {length}; "
                         "they must describe the same examples")
    a = ds[()]
    # uint64 values from 2**63 up would wrap to negative int64 numbers: another id than stored
    if a.dtype.kind == "u" and a.size and (big := a > _I64_MAX).any():
        raise StoreError(f"{f.filename}: dataset '{key}' holds uint64 value {a[big][0]}, beyond the "
                         f"int64 of the layout (max {_I64_MAX}); store values below 2**63")
    return a.astype(np.int64, copy=False)


def _refuse_repeats(path, key: str, ids: np.ndarray) -> None:
    """Refuse ids that repeat, naming ``key`` and the repeated id met first in the file."""
    _, first, counts = np.unique(ids, return_index=True, return_counts=True)
    if (counts > 1).any():
        at = int(first[counts > 1].min())
        raise StoreError(f"{path}: '{key}' repeats id {ids[at]} ({int((ids == ids[at]).sum())} times); "
                         "each example needs its own id")


def _refuse_repeated_index(path, key: str, index: np.ndarray, what: str) -> None:
    """Refuse an index (``model_index``, ``mask_index``) that names one entry twice in a file."""
    values, counts = np.unique(index, return_counts=True)
    if (counts > 1).any():
        raise StoreError(f"{path}: '{key}' repeats {what} {values[counts > 1][0]} "
                         f"({int(counts[counts > 1][0])} times); each must occur once, or it would "
                         "count twice: the file is corrupt or was concatenated by hand")


def _refuse_overlap(paths: Sequence, indices: Sequence[np.ndarray], key: str, what: str, out) -> None:
    """Refuse chunks whose ``key`` ranges overlap (the same entry in two files, or twice in one),
    naming the files and the shared entries, before ``out`` is written."""
    index = np.concatenate(indices)
    values, counts = np.unique(index, return_counts=True)
    if not (counts > 1).any():
        return
    first = values[counts > 1][0]
    holders = [str(paths[i]) for i, part in enumerate(indices) if (part == first).any()]
    if len(holders) == 1:
        _refuse_repeated_index(holders[0], key, indices[[str(p) for p in paths].index(holders[0])], what)
    shared = np.intersect1d(*(indices[[str(p) for p in paths].index(h)] for h in holders[:2]))
    shown = ", ".join(str(v) for v in shared[:8]) + (" ..." if shared.size > 8 else "")
    raise StoreError(f"{out}: chunks {holders[0]} and {holders[1]} overlap: both hold {what} {shown} "
                     f"({shared.size} in all, '{key}'); each must come from one chunk only, or it would "
                     "count twice: gather chunks of disjoint ranges")


def _example_ids(f: h5py.File, n: int, m: int, of_n: str, of_m: str
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
    ids = (_read_ints(f, "train_ids", n, of_n), _read_ints(f, "query_ids", m, of_m))
    for key, a in zip(("train_ids", "query_ids"), ids):
        _refuse_repeats(f.filename, key, a)
    return (*ids, False)


def is_positional(attrs: dict[str, Any]) -> bool:
    """Whether a file's example ids are its positions (it carried no ids when first read)."""
    return attrs.get("ids") == "positional"


def _all_finite(a: np.ndarray) -> bool:
    # A float64 sum of float32 values cannot overflow, and NaN or inf propagate: one pass with
    # no temporary. Only a non-finite sum (or a float64 overflow) needs the elementwise check.
    if a.size == 0 or np.isfinite(a.sum(dtype=np.float64)):
        return True
    return bool(np.isfinite(a).all())


def _refuse_nonfinite(path, key: str, a: np.ndarray, hint: str) -> None:
    if not _all_finite(a):
        bad = ~np.isfinite(a)
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        raise StoreError(f"{path}: dataset '{key}' holds {int(bad.sum())} NaN or infinite "
                         f"value(s), the first at position {first}; {hint}")


def check_finite(values: np.ndarray, ids: np.ndarray, what: str, source: str = "",
                 hint: str = "A perturbed fit diverged: lower the learning rate or check the "
                             "data.") -> None:
    """Raise :class:`StoreError` naming the first example ids whose values are NaN or infinite.

    ``values`` is [K, n]: column ``i`` belongs to example ``ids[i]``.
    """
    if _all_finite(values):
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


def _check_numeric(a: np.ndarray, key: str, source: str) -> None:
    if a.dtype.kind not in "fiub":
        raise StoreError(f"{source}: '{key}' holds {_describe(a.dtype)}, expected numbers")


# --- joining files on example ids ------------------------------------------------------------

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

    def validate(self, source: str = "") -> Losses:
        for key in ("train", "query"):
            _check_numeric(np.asarray(getattr(self, key)), key, source)
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
            if p0 is not None and (np.shape(p0) != ids.shape or not _all_finite(np.asarray(p0, np.float64))):
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
        if a.size and a.dtype.itemsize > 4 and (big := float(np.abs(a).max())) > _F32_MAX:
            raise StoreError(f"{path}: '{key}' holds values up to {big:.3g}, beyond the float32 of "
                             f"the losses layout (max {_F32_MAX:.3g}); rescale the losses")
    with atomic_h5(path) as f:
        chunk_n = max(1, min(losses.train.shape[1], 4096))
        f.create_dataset("train", data=losses.train.astype(np.float32),
                         chunks=(losses.K, chunk_n))
        f.create_dataset("query", data=losses.query.astype(np.float32),
                         chunks=(losses.K, max(1, min(losses.query.shape[1], 4096))))
        f.create_dataset("model_index", data=np.asarray(losses.model_index, np.int64))
        f.create_dataset("train_ids", data=np.asarray(losses.train_ids, np.int64))
        f.create_dataset("query_ids", data=np.asarray(losses.query_ids, np.int64))
        for key in ("p0_train", "p0_query"):  # float64: 1 - p0 stays exact for well-fitted examples
            if getattr(losses, key) is not None:
                f.create_dataset(key, data=np.asarray(getattr(losses, key), np.float64))
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
        with _reading(path, "losses"):
            train = _read_numbers(f, "train", 2)
            query = _read_numbers(f, "query", 2)
            # optional: a file written by another tool may hold only train and query (README)
            model_index = (_read_ints(f, "model_index", train.shape[0], "'train'") if "model_index" in f
                           else np.arange(train.shape[0], dtype=np.int64))
            _refuse_repeated_index(path, "model_index", model_index, "model k")
            train_ids, query_ids, positional = _example_ids(
                f, train.shape[1], query.shape[1], "'train'", "'query'")
            attrs = _attrs(f)
            p0 = {k: _read_numbers(f, k, 1).astype(np.float64) for k in ("p0_train", "p0_query") if k in f}
    if positional:
        attrs["ids"] = "positional"
    return Losses(train, query, model_index, train_ids, query_ids, attrs, str(path), **p0).validate(str(path))


def align_losses(losses: Losses, ref: dict[str, Any], ref_path, *,
                 notify: Callable[[str], Any] | None = None) -> tuple[Losses, list[str]]:
    """``losses`` with their training and query columns in the order of ``ref``'s ids.

    ``ref`` is LDS ground truth or any dict of ``train_ids`` and ``query_ids`` (named by
    ``ref_path``); the same ids in another order are reordered (notices returned and passed to
    ``notify``), different ids are refused naming ``losses.source`` and ``ref_path`` (:func:`join`).
    """
    j = join(losses.source or "the losses", losses.train_ids, losses.query_ids, ref_path,
             ref["train_ids"], ref["query_ids"], positional=is_positional(losses.attrs),
             ref_positional=is_positional(ref.get("attrs", {})))
    if j.train is None and j.query is None:
        return losses, _notify(j.notices, notify)
    aligned = Losses(j.take(losses.train, 1), j.take(losses.query, query_axis=1), losses.model_index,
                     j.take(losses.train_ids, 0), j.take(losses.query_ids, query_axis=0),
                     dict(losses.attrs), losses.source,
                     p0_train=None if losses.p0_train is None else j.take(losses.p0_train, 0),
                     p0_query=None if losses.p0_query is None else j.take(losses.p0_query, query_axis=0))
    return aligned, _notify(j.notices, notify)


_GUARDED_ATTRS = ("variant", "signal", "seed", "config")


def concat_losses(paths: Sequence[str | os.PathLike], out: str | os.PathLike) -> Losses | None:
    """Concatenate chunk files of one setting along K, refusing to mix settings or repeat a k.

    Chunks are joined on ids (:func:`join`): the first chunk's order is kept. If any chunk
    diverged, the output is a diverged marker too (and ``None`` is returned).
    """
    if not paths:
        raise StoreError(f"{out}: no chunk files to gather")
    check_output(out, inputs=paths)
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
        j = join(p, part.train_ids, part.query_ids, paths[0], first.train_ids, first.query_ids,
                 positional=is_positional(part.attrs), ref_positional=is_positional(first.attrs))
        part.train, part.query = j.take(part.train, 1), j.take(part.query, query_axis=1)
        for notice in j.notices:
            log.warning("%s", notice)
    _refuse_overlap(paths, [p.model_index for p in parts], "model_index", "models k", out)
    model_index = np.concatenate([p.model_index for p in parts])
    order = np.argsort(model_index, kind="stable")
    merged = Losses(
        train=np.concatenate([p.train for p in parts])[order],
        query=np.concatenate([p.query for p in parts])[order],
        model_index=model_index[order],
        train_ids=first.train_ids,
        query_ids=first.query_ids,
        attrs=dict(first.attrs),
        p0_train=first.p0_train,  # theta_0's, the same in every chunk
        p0_query=first.p0_query,
    )
    write_losses(out, merged)
    return merged


# --- scores ----------------------------------------------------------------------------------

_SCORES_HINT = "the step that wrote these scores failed: rerun it or check its inputs"


def _check_topk(path, indices: np.ndarray, values: np.ndarray, n: int, m: int,
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
        _check_numeric(scores, "scores", str(path))
        if scores.shape != (n, m):
            raise StoreError(f"{path}: scores of shape {scores.shape} do not match "
                             f"{n} training and {m} query ids")
        _refuse_nonfinite(path, "scores", scores, _SCORES_HINT)
    else:
        if indices is None or values is None:
            raise StoreError(f"{path}: give either dense scores or top-k indices and values")
        indices, values = np.asarray(indices), np.asarray(values)
        _check_numeric(values, "values", str(path))
        _check_topk(path, indices, values, n, m, np.asarray(query_ids))
        _refuse_nonfinite(path, "values", values, _SCORES_HINT)
    with atomic_h5(path) as f:
        if scores is not None:
            f.attrs["format"] = "dense"
            f.create_dataset("scores", data=np.asarray(scores, np.float32))
        else:
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
    """Read a scores file into a dict with ``format``, arrays and ``attrs``.

    Refuses NaN or infinite scores and top-k positions outside the training set. A dense file
    without ids gets positional ids (``attrs["ids"] == "positional"``); a top-k file needs
    ``train_ids`` to know the size of the training set.
    """
    with _open(path) as f, _reading(path, "scores"):
        attrs = _attrs(f)
        fmt = attrs.get("format")
        out: dict[str, Any] = {"format": fmt, "attrs": attrs}
        if fmt == "dense":
            out["scores"] = _read_numbers(f, "scores", 2)
            n, m = out["scores"].shape
            of = ("the rows of 'scores'", "the columns of 'scores'")
        elif fmt == "topk":
            out["indices"] = _read_ints(f, "indices", ndim=2)
            out["values"] = _read_numbers(f, "values", 2)
            if "train_ids" not in f:
                raise StoreError(f"{path}: a top-k scores file needs 'train_ids' (the training "
                                 "set's size and ids); rewrite it with ids")
            n, m = _require(f, "train_ids", 1).shape[0], out["indices"].shape[0]
            of = ("'train_ids'", "the rows of 'indices'")
        else:
            raise StoreError(f"{path}: attribute 'format' is {fmt!r}, expected 'dense' or 'topk': "
                             "not a scores file")
        out["train_ids"], out["query_ids"], positional = _example_ids(f, n, m, *of)
    if positional:
        attrs["ids"] = "positional"
    if fmt == "dense":
        _refuse_nonfinite(path, "scores", out["scores"], _SCORES_HINT)
    else:
        _check_topk(path, out["indices"], out["values"], n, m, out["query_ids"])
        _refuse_nonfinite(path, "values", out["values"], _SCORES_HINT)
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

_GT_HINT = "a retrain of the LDS ground truth diverged: rerun it or lower its learning rate"


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
                 hint=_GT_HINT)
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


def _read_masks(f: h5py.File) -> np.ndarray:
    ds = _require(f, "masks", 2)
    if ds.dtype.kind == "b":
        return ds[()]
    masks = _read_numbers(f, "masks", 2)
    outside = masks[(masks != 0) & (masks != 1)]
    if outside.size:
        raise StoreError(f"{f.filename}: 'masks' holds {float(outside[0]):g}; a mask is 0/1 "
                         "(training example out of / in the subset)")
    return masks.astype(bool)


def read_ground_truth(path: str | os.PathLike) -> dict[str, Any]:
    """Read LDS ground truth; refuses NaN/inf outputs and shapes that do not agree."""
    with _open(path) as f, _reading(path, "LDS ground truth"):
        masks = _read_masks(f)
        outputs = _read_numbers(f, "outputs", 3)
        M, n = masks.shape
        if outputs.shape[1] != M:
            raise StoreError(f"{path}: 'outputs' {outputs.shape} has {outputs.shape[1]} subsets "
                             f"but 'masks' {masks.shape} has {M}; expected [seeds, M, m]")
        mask_index = _read_ints(f, "mask_index", M, "'masks'")
        _refuse_repeated_index(path, "mask_index", mask_index, "subset (mask)")
        train_ids, query_ids, positional = _example_ids(
            f, n, outputs.shape[2], "the columns of 'masks'", "the last axis of 'outputs'")
        attrs = _attrs(f)
    if positional:
        attrs["ids"] = "positional"
    check_finite(outputs.reshape(-1, outputs.shape[-1]), query_ids, "query", str(path),
                 hint=_GT_HINT)
    return {"masks": masks, "outputs": outputs, "mask_index": mask_index,
            "train_ids": train_ids, "query_ids": query_ids, "attrs": attrs}


def concat_ground_truth(paths: Sequence[str | os.PathLike], out: str | os.PathLike) -> dict[str, Any]:
    """Gather LDS ground-truth chunks (split along M) into one file, joined on ids."""
    if not paths:
        raise StoreError(f"{out}: no ground-truth chunks to gather")
    check_output(out, inputs=paths)
    parts = [read_ground_truth(p) for p in paths]
    for p, part in zip(paths[1:], parts[1:]):
        j = join(p, part["train_ids"], part["query_ids"], paths[0], parts[0]["train_ids"],
                 parts[0]["query_ids"], positional=is_positional(part["attrs"]),
                 ref_positional=is_positional(parts[0]["attrs"]))
        part["masks"], part["outputs"] = j.take(part["masks"], 1), j.take(part["outputs"],
                                                                          query_axis=2)
        for notice in j.notices:
            log.warning("%s", notice)
        if part["outputs"].shape[0] != parts[0]["outputs"].shape[0]:
            raise StoreError(f"{p}: number of seeds differs from {paths[0]}")
    _refuse_overlap(paths, [p["mask_index"] for p in parts], "mask_index", "subsets (masks)", out)
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

__all__ += ["save_state", "load_state", "save_split", "check_split"]


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
