"""Atomic outputs: every file daunce writes appears complete or not at all.

A file is written to a temporary beside it and renamed into place only once complete, so a crash,
a bad input or a signal (:func:`cleanup_on_signals`) never leaves a half-written file nor replaces
a finished result; outputs that would destroy something are refused before any work
(:func:`check_output`). Every writer of daunce goes through it. Temporaries,
links, signals and modes: docs/trust.md#signals-and-temporary-files."""
from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import signal
import socket
import stat
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import h5py

from .errors import StoreError

__all__ = ["check_output", "linked_files", "clean_leftovers", "new_temp", "host", "TMP_TAG",
           "atomic_path", "atomic_h5", "Terminated", "cleanup_on_signals", "raise_pending_signal"]

log = logging.getLogger("daunce_core.store")

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
        for linked in linked_files(inp):
            with contextlib.suppress(OSError):
                if os.path.samefile(p, linked):
                    raise StoreError(f"{path}: the input {inp} reads data from this file (an HDF5 "
                                     "external link or virtual dataset); writing it would destroy "
                                     "that data, so choose another output path")
    return p


def _overwrites_input(path, inp) -> StoreError:
    return StoreError(f"{path}: is the input file {inp}; writing it would destroy the input, so "
                      "choose another output path")


def linked_files(path: str | os.PathLike, _seen: set | None = None) -> list[str]:
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
                out.extend(linked_files(c, seen))
    return out


TMP_TAG = ".daunce-tmp-"


def host() -> str:
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
    start = re.compile(r"\.+" + re.escape(path.name) + re.escape(TMP_TAG))
    writer = re.compile(re.escape(TMP_TAG) + r"(\d+)@([A-Za-z0-9-]+)\.")
    this_host = host()
    removed = []
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return removed
    for entry in entries:
        if not start.match(entry.name):
            continue
        writers = writer.findall(entry.name)
        if not writers or any(h != this_host or int(pid) == os.getpid() or _alive(int(pid))
                              for pid, h in writers):
            continue
        with contextlib.suppress(FileNotFoundError):
            os.unlink(entry.path)
            removed.append(Path(entry.path))
    if removed:
        log.info("%s: removed %d temporary file(s) left by a killed run", path, len(removed))
    return removed


def new_temp(path: Path, suffix: str) -> Path:
    """Create an empty temporary beside ``path``; mode 0666 minus the umask, like any new file."""
    prefix = f".{path.name}{TMP_TAG}{os.getpid()}@{host()}."
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
        tmp = new_temp(path, ".tmp" if suffix is None else suffix)
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

