"""Datasets by name with stable example ids.

``data.name`` chooses the source (``digits``, ``cifar10``, ``fashion_mnist``, any
``torchvision.datasets`` class, ``imagefolder`` or ``npz``; ``data.root`` says where it lies) and
:func:`load_dataset` returns float32 images or features with their labels and ids. An example's id never
changes (its index in the original dataset, an npz file's ids, or an image folder's manifest), so
every file of every stage joins on ids. Sources, ids and image handling:
docs/inputs.md#how-daunce_coredatapy-reads-each-source."""
from __future__ import annotations

import csv
import hashlib
import inspect
import itertools
import logging
import socket
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .config import DATASETS_HELP, DataConfig, torchvision_dataset

log = logging.getLogger(__name__)

MANIFEST_NAME = "daunce_manifest.csv"
I64_MAX = np.iinfo(np.int64).max
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm")
_GRAY_MODES = {"1", "L", "LA", "I", "I;16", "F"}


class DataError(RuntimeError):
    """A dataset cannot be loaded (missing, offline); the message says what to do."""


@dataclass
class Dataset:
    """Training and query sets as float32 arrays [N, C, H, W] with integer labels and ids."""

    X_train: np.ndarray
    y_train: np.ndarray
    train_ids: np.ndarray
    X_query: np.ndarray
    y_query: np.ndarray
    query_ids: np.ndarray
    num_classes: int
    classes: list[str]
    mean: np.ndarray  # per-channel normalisation, to show images again
    std: np.ndarray
    content_hash: str = ""  # of the data as read (see content_hash); "" when unknown
    source: str = "the dataset"  # what was read, for messages: the file, folder or dataset name

    @property
    def n(self) -> int:
        return len(self.y_train)

    @property
    def m(self) -> int:
        return len(self.y_query)

    @property
    def tabular(self) -> bool:
        """Whether the inputs are feature vectors [N, d] rather than images [N, C, H, W]."""
        return self.X_train.ndim == 2

    def images(self, X: np.ndarray) -> np.ndarray:
        """Undo the normalisation for display: [N, H, W, C] in [0, 1]; feature vectors [N, d] as
        one-row images [N, 1, d, 1] of their features scaled to [0, 1] by the training range."""
        if X.ndim == 2:
            raw = X * self.std[None, :] + self.mean[None, :]
            lo, hi = (self.X_train * self.std + self.mean).min(), (self.X_train * self.std + self.mean).max()
            return np.clip((raw - lo) / (hi - lo if hi > lo else 1.0), 0, 1)[:, None, :, None]
        img = X * self.std[None, :, None, None] + self.mean[None, :, None, None]
        return np.clip(img.transpose(0, 2, 3, 1), 0, 1)


def content_hash(X_train: np.ndarray, y_train: np.ndarray, X_query: np.ndarray, y_query: np.ndarray) -> str:
    """SHA-256 of the inputs as read (before the per-channel normalisation, whose float reductions
    might round otherwise elsewhere) and labels, with their dtypes and shapes.

    The workflow records it in the split (``store.save_split``), so that data replaced under the
    same ids are refused instead of paired with results computed on the old ones.
    """
    h = hashlib.sha256()
    for a in (X_train, y_train, X_query, y_query):
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape};".encode())
        h.update(a.data)
    return "sha256:" + h.hexdigest()


def load_dataset(cfg: DataConfig) -> Dataset:
    """Load the dataset named by ``cfg.name`` with its train/query split."""
    if cfg.name == "digits":
        return _digits(cfg)
    if cfg.name in ("cifar10", "CIFAR10"):
        return _cifar10(cfg)
    if cfg.name == "fashion_mnist":
        return _fashion_mnist(cfg)
    if cfg.name == "imagefolder":
        return _image_folder(cfg)
    if cfg.name == "npz":
        return _npz(cfg)
    tv_class = torchvision_dataset(cfg.name)
    if tv_class is not None:
        return _torchvision(cfg, tv_class)
    raise DataError(f"data.name: unknown dataset {cfg.name!r}; choose {DATASETS_HELP}")


def _take(n_req: int, available: int, what: str) -> int:
    if n_req < 0 or n_req > available:
        raise DataError(f"data.{what}={n_req} but only {available} examples are available")
    return n_req or available


def _digits(cfg: DataConfig) -> Dataset:
    from sklearn.datasets import load_digits

    d = load_digits()
    X = (d.images.astype(np.float32) / 16.0)[:, None]  # [1797, 1, 8, 8] in [0, 1]
    y = d.target.astype(np.int64)
    order = np.random.default_rng(cfg.split_seed).permutation(len(y))
    n = _take(cfg.n_train, len(y), "n_train")
    m = _take(cfg.n_query, len(y) - n, "n_query")
    tr, qu = order[:n], order[n:n + m]
    mean, std = np.array([X[tr].mean()], np.float32), np.array([X[tr].std()], np.float32)
    norm = lambda a: (a - mean[None, :, None, None]) / std[None, :, None, None]  # noqa: E731
    return Dataset(norm(X[tr]), y[tr], tr.astype(np.int64), norm(X[qu]), y[qu], qu.astype(np.int64),
                   10, [str(i) for i in range(10)], mean, std, content_hash(X[tr], y[tr], X[qu], y[qu]),
                   "sklearn's digits")


CIFAR_MEAN = np.array([0.4914, 0.4822, 0.4465], np.float32)
CIFAR_STD = np.array([0.2470, 0.2435, 0.2616], np.float32)


def _cifar10(cfg: DataConfig) -> Dataset:
    import torchvision

    root = Path(cfg.root)
    try:
        with network_timeout():
            train = torchvision.datasets.CIFAR10(root, train=True, download=cfg.download)
            test = torchvision.datasets.CIFAR10(root, train=False, download=cfg.download)
    except Exception as exc:  # URLError, RuntimeError("Dataset not found"), ...
        raise _not_downloaded("CIFAR-10", root, exc, f"'cifar-10-batches-py' under {root}") from exc
    n = _take(cfg.n_train, len(train.targets), "n_train")
    m = _take(cfg.n_query, len(test.targets), "n_query")

    def prep(ds, k):
        x = (ds.data[:k].astype(np.float32) / 255.0).transpose(0, 3, 1, 2)
        return (x - CIFAR_MEAN[None, :, None, None]) / CIFAR_STD[None, :, None, None]

    y_tr, y_q = np.asarray(train.targets[:n], np.int64), np.asarray(test.targets[:m], np.int64)
    return Dataset(prep(train, n), y_tr, np.arange(n, dtype=np.int64), prep(test, m), y_q, np.arange(m, dtype=np.int64),
                   10, list(train.classes), CIFAR_MEAN, CIFAR_STD,
                   content_hash(train.data[:n], y_tr, test.data[:m], y_q), f"CIFAR-10 under {root}")


FASHION_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte")


def _fashion_mnist(cfg: DataConfig) -> Dataset:
    """Fashion-MNIST offline: torchvision's reader on a gunzipped copy of ``data.idx_dir``'s files
    (torchvision reads only uncompressed idx files from ``ROOT/FashionMNIST/raw``; the copy is made
    once, atomically, and never downloads)."""
    import gzip
    import shutil

    import torchvision

    src = Path(cfg.idx_dir)
    missing = [f for f in FASHION_FILES if not (src / f"{f}.gz").is_file()]
    if missing:
        raise DataError(f"data.idx_dir: {src / (missing[0] + '.gz')} is missing; install Debian's package "
                        "(apt-get install dataset-fashion-mnist) or set data.idx_dir to the folder of its idx "
                        ".gz files")
    raw = Path(cfg.root) / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for f in FASHION_FILES:
        dst, gz = raw / f, src / f"{f}.gz"
        if dst.is_file() and dst.stat().st_mtime >= gz.stat().st_mtime:
            continue
        tmp = raw / f".{f}.tmp"
        with gzip.open(gz, "rb") as fin, open(tmp, "wb") as fout:
            shutil.copyfileobj(fin, fout)
        tmp.replace(dst)
    try:
        train, test = (torchvision.datasets.FashionMNIST(str(cfg.root), train=t, download=False) for t in (True, False))
    except Exception as exc:  # a truncated or foreign idx file
        raise DataError(f"data.idx_dir: the idx files of {src} do not read as Fashion-MNIST "
                        f"({type(exc).__name__}: {_one_line(exc)})") from exc
    n = _take(cfg.n_train, len(train.targets), "n_train")
    m = _take(cfg.n_query, len(test.targets), "n_query")
    p = int(cfg.pad)

    def prep(ds, k):
        x = ds.data[:k].numpy().astype(np.float32)[:, None] / 255.0
        return np.pad(x, ((0, 0), (0, 0), (p, p), (p, p))) if p else x

    y_tr, y_q = train.targets[:n].numpy().astype(np.int64), test.targets[:m].numpy().astype(np.int64)
    return _normalised(prep(train, n), y_tr, np.arange(n), prep(test, m), y_q, np.arange(m), list(train.classes),
                       f"Fashion-MNIST from {src}")


# --- sources beyond the paper's: torchvision classes, image folders, arrays ----------------------

def _one_line(exc: BaseException, limit: int = 300) -> str:
    """An exception's message on one line (torchvision's download errors span several)."""
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[:limit] + " ..."


NETWORK_TIMEOUT_S = 60.0  # a download's socket gives up after this long without an answer


@contextmanager
def network_timeout(seconds: float | None = None) -> Iterator[None]:
    """Every socket opened inside waits at most ``seconds`` (default :data:`NETWORK_TIMEOUT_S`) for
    an answer: libraries that download with ``urlopen`` and no timeout (torchvision, nltk) would
    otherwise hang without a message when the network does not answer."""
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(NETWORK_TIMEOUT_S if seconds is None else seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(old)


def _not_downloaded(name: str, root: Path, exc: BaseException, put: str) -> DataError:
    """The error for a torchvision dataset neither under ``root`` nor downloadable; ``put`` says
    which files to put where."""
    return DataError(f"{name} is not under {root} and could not be downloaded ({type(exc).__name__}: "
                     f"{_one_line(exc)}; with data.download: true each network read waits at most "
                     f"{NETWORK_TIMEOUT_S:g} s). On a machine with network run the workflow's data rule, or put "
                     f"{put} and set data.download: false.")


def _image_size(cfg: DataConfig) -> tuple[int, int] | None:
    size = cfg.image_size
    if size is None or size == 0 or size == []:
        return None
    if isinstance(size, int) and size > 0:
        return size, size
    if isinstance(size, (list, tuple)) and len(size) == 2 and all(isinstance(s, int) and s > 0 for s in size):
        return int(size[0]), int(size[1])
    raise DataError(f"data.image_size: expected a positive integer S or [H, W], got {size!r}")


def _pixels(items: Any, size: tuple[int, int] | None, what: str) -> np.ndarray:
    """Images as float32 [N, C, H, W] in [0, 1] from (name, PIL image) pairs.

    One channel when every image is grayscale, else RGB for all (grayscale ones repeated), as
    ``ImageFolder``'s loader would; images of different sizes need ``size`` [H, W].
    """
    from PIL import Image

    arrays: list[np.ndarray] = []
    first: tuple[str, tuple[int, int]] | None = None
    for name, img in items:
        img = img.convert("L" if img.mode in _GRAY_MODES else "RGB")
        if size is not None and img.size != (size[1], size[0]):
            img = img.resize((size[1], size[0]), Image.BILINEAR)
        if first is None:
            first = (name, img.size)
        elif img.size != first[1]:
            (w0, h0), (w1, h1) = first[1], img.size
            raise DataError(f"{what}: {first[0]} is {h0}x{w0} (HxW) but {name} is {h1}x{w1}; "
                            "set data.image_size: [H, W] to resize them all")
        a = np.asarray(img, dtype=np.uint8)
        arrays.append(a[None] if a.ndim == 2 else a.transpose(2, 0, 1))
    if not arrays:
        raise DataError(f"{what}: no images to load")
    if any(a.shape[0] == 3 for a in arrays):
        arrays = [np.repeat(a, 3, axis=0) if a.shape[0] == 1 else a for a in arrays]
    return np.stack(arrays).astype(np.float32) / np.float32(255.0)


def _normalised(X_tr: np.ndarray, y_tr: np.ndarray, ids_tr: np.ndarray, X_q: np.ndarray, y_q: np.ndarray,
                ids_q: np.ndarray, classes: Sequence[str], source: str) -> Dataset:
    """A Dataset whose inputs are normalised per channel (per feature for tabular [N, d] data) by
    the training examples' statistics; ``source`` names what was read (the file or folder) in
    messages."""
    axes = (0,) if X_tr.ndim == 2 else (0, 2, 3)
    mean = X_tr.mean(axis=axes, dtype=np.float64).astype(np.float32)
    std = X_tr.std(axis=axes, dtype=np.float64).astype(np.float32)
    std = np.where(std > 0, std, np.float32(1.0)).astype(np.float32)  # a constant channel stays finite
    shape = (1, -1) + (1,) * (X_tr.ndim - 2)

    def norm(a: np.ndarray) -> np.ndarray:
        return ((a - mean.reshape(shape)) / std.reshape(shape)).astype(np.float32)

    y_tr, y_q = y_tr.astype(np.int64), y_q.astype(np.int64)
    present = np.unique(y_tr)
    if len(classes) < 2 or len(present) < 2:
        only = classes[int(present[0])] if len(present) and int(present[0]) < len(classes) else "?"
        raise DataError(f"{source}: the training examples all have one class ({only!r}; {len(classes)} class(es) "
                        "in all); a classifier needs at least two classes to learn and to attribute")
    return Dataset(norm(X_tr), y_tr, ids_tr.astype(np.int64), norm(X_q), y_q, ids_q.astype(np.int64), len(classes),
                   list(classes), mean, std, content_hash(X_tr, y_tr, X_q, y_q), source)


def _torchvision(cfg: DataConfig, cls: type) -> Dataset:
    """A torchvision dataset class: its train split for training, its test split for the queries."""
    name = cls.__name__
    params = inspect.signature(cls.__init__).parameters
    if "train" in params:
        split_kw = [{"train": True}, {"train": False}]
    elif "split" in params:
        split_kw = [{"split": "train"}, {"split": "test"}]
    else:
        raise DataError(f"data.name: torchvision.datasets.{name} takes neither train= nor split=; "
                        "load it with data.name 'imagefolder' or 'npz'")
    extra = {"download": bool(cfg.download)} if "download" in params else {}
    root = Path(cfg.root)
    try:
        with network_timeout():
            train, test = (cls(str(root), **kw, **extra) for kw in split_kw)
    except (TypeError, ValueError) as exc:  # a required argument, a split the class lacks
        raise DataError(f"data.name: torchvision.datasets.{name} does not load with {split_kw[0]}/{split_kw[1]} "
                        f"({type(exc).__name__}: {_one_line(exc)}); use data.name 'imagefolder' or 'npz'") from exc
    except Exception as exc:  # URLError, RuntimeError("Dataset not found"), ...
        raise _not_downloaded(name, root, exc, f"torchvision's files of {name} under {root} "
                                               f"(see torchvision.datasets.{name})") from exc
    n = _take(cfg.n_train, len(train), "n_train")
    m = _take(cfg.n_query, len(test), "n_query")
    labels: list[list[int]] = [[], []]

    def items(ds: Any, k: int, s: int, split: str):
        for i in range(k):
            img, target = ds[i]
            t = np.asarray(target)
            if t.ndim != 0 or not np.issubdtype(t.dtype, np.integer):
                raise DataError(f"data.name: {name} gives targets like {target!r}; only class labels are supported")
            if not hasattr(img, "convert"):
                raise DataError(f"data.name: {name} gives {type(img).__name__} inputs, not PIL images")
            labels[s].append(int(target))
            yield f"{name} {split}[{i}]", img

    X = _pixels(itertools.chain(items(train, n, 0, "train"), items(test, m, 1, "test")), _image_size(cfg),
                f"data.name {name}")
    y_tr, y_q = np.asarray(labels[0], np.int64), np.asarray(labels[1], np.int64)
    classes = [str(c) for c in getattr(train, "classes", None) or []]
    if not classes:
        classes = [str(i) for i in range(int(max(y_tr.max(), y_q.max(initial=0))) + 1)]
    _check_labels({"train": y_tr, "test": y_q}, len(classes), f"data.name {name}")
    return _normalised(X[:n], y_tr, np.arange(n), X[n:], y_q, np.arange(m), classes, f"{name} under {root}")


def _check_labels(labels: dict[str, np.ndarray], num_classes: int, where: str) -> None:
    for split, y in labels.items():
        bad = (y < 0) | (y >= num_classes)
        if bad.any():
            raise DataError(f"{where}: {split} label {int(y[bad][0])} is out of range [0, {num_classes}) "
                            f"(row {int(np.flatnonzero(bad)[0])})")


def _scan_classes(root: Path, base: str) -> list[str]:
    """Relative paths (posix) of the images under ``root/base/<class>/``, sorted."""
    top = root / base if base else root
    stray = sorted(p.name for p in top.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if stray:
        raise DataError(f"data.root: {top / stray[0]} lies directly in {top}; the 'imagefolder' layout is "
                        f"{top}/<class>/<image>")
    found = []
    for cdir in sorted(d for d in top.iterdir() if d.is_dir() and not d.name.startswith(".")):
        for f in sorted(cdir.rglob("*")):
            rel = f.relative_to(root)
            if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file() and not any(p.startswith(".") for p in rel.parts):
                found.append(rel.as_posix())
    if not found:
        raise DataError(f"data.root: no images in sub-folders of {top}; the 'imagefolder' layout is "
                        f"{top}/<class>/<image> with suffix {', '.join(IMAGE_SUFFIXES)}")
    return found


def _read_manifest(path: Path) -> dict[str, int]:
    """The ids of the manifest ``path`` by relative path ({} when it does not exist), every row
    checked: one line naming the file and line for a bad one."""
    ids: dict[str, int] = {}
    if not path.exists():
        return ids
    try:
        with open(path, newline="") as fh:
            rows = list(csv.reader(fh))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"data.manifest: cannot read {path} ({_one_line(exc)})") from exc
    if not rows or rows[0] != ["id", "path"]:
        raise DataError(f"data.manifest: {path} does not start with the header 'id,path'; "
                        "move it away to write a new one (ids may change)")
    taken: set[int] = set()
    for ln, row in enumerate(rows[1:], start=2):
        if len(row) != 2 or not row[0].lstrip("-").isdigit():
            raise DataError(f"data.manifest: {path}:{ln}: expected 'id,path', got {','.join(row)!r}")
        i = int(row[0])
        if i > I64_MAX:
            raise DataError(f"data.manifest: {path}:{ln}: id {i} is beyond int64 (max {I64_MAX}); "
                            "ids must be below 2**63")
        if i in taken or row[1] in ids or i < 0:
            raise DataError(f"data.manifest: {path}:{ln}: id {i} or path {row[1]!r} is negative or listed twice")
        taken.add(i)
        ids[row[1]] = i
    return ids


def _assign_ids(ids: dict[str, int], found: list[str], path: Path) -> tuple[dict[str, int], list[str]]:
    """``ids`` with the ``found`` paths it lacks appended (sorted, after the largest id), and those
    new paths. Entries are never removed: a file that comes back gets its old id, and no id is
    reused."""
    new = [rel for rel in found if rel not in ids]
    start = max(ids.values(), default=-1) + 1
    if new and start + len(new) - 1 > I64_MAX:
        raise DataError(f"data.manifest: {path}: its largest id {start - 1} leaves no int64 id for "
                        f"{len(new)} new file(s) (e.g. {new[0]}); renumber the manifest (ids change) or "
                        "point data.manifest to a new file")
    out = dict(ids)
    out.update({rel: start + j for j, rel in enumerate(new)})
    return out, new


def _write_manifest(path: Path, ids: dict[str, int], new: list[str]) -> None:
    """Write the manifest atomically (jobs that meet the same new files at once write the same file)."""
    from .store import atomic_path

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path, suffix=".csv.tmp") as tmp, open(tmp, "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["id", "path"])
            writer.writerows((i, rel) for rel, i in sorted(ids.items(), key=lambda kv: kv[1]))
    except OSError as exc:
        raise DataError(f"data.manifest: cannot write {path} ({exc}); "
                        "set data.manifest to a writable file") from exc
    if new and len(ids) > len(new):
        log.info("%s: %d new file(s) got ids %d..%d", path, len(new), ids[new[0]], ids[new[-1]])


def _open_image(path: Path):
    from PIL import Image

    try:
        with Image.open(path) as img:
            img.load()
            return img.copy()
    except Image.DecompressionBombError as exc:  # not an OSError: Pillow's guard against huge images
        raise DataError(f"{path}: the image has more pixels than Pillow reads safely "
                        f"({_one_line(exc)}); shrink it or remove it from the folder") from exc
    except (OSError, SyntaxError, ValueError) as exc:  # UnidentifiedImageError is an OSError
        raise DataError(f"{path}: cannot read the image ({_one_line(exc)})") from exc


def _image_folder(cfg: DataConfig) -> Dataset:
    """``data.root`` in the ImageFolder layout, ids from its manifest (docs/inputs.md)."""
    root = Path(cfg.root)
    if not root.is_dir():
        raise DataError(f"data.root: {root} is not a folder; data.name 'imagefolder' reads {root}/<class>/<image> "
                        f"(or {root}/train/<class>/... with {root}/test/<class>/...)")
    query_dir = next((d for d in ("test", "val") if (root / d).is_dir()), None)
    split_layout = (root / "train").is_dir() and query_dir is not None
    found = [rel for base in (("train", query_dir) if split_layout else ("",)) for rel in _scan_classes(root, base)]
    # the manifest is never written into the image folder (input data): data.manifest names it
    # (the workflow's default: results/<experiment>/data/manifest.csv); without one, ids come from
    # a manifest already in the folder (read only) and the sorted paths, kept in memory
    legacy = root / MANIFEST_NAME
    manifest = Path(cfg.manifest) if cfg.manifest else None
    source = manifest if manifest is not None and manifest.exists() else legacy
    known = _read_manifest(source)
    if manifest is not None and source == legacy and known:
        log.info("%s: ids taken over from %s (read only)", manifest, legacy)
    ids, new = _assign_ids(known, found, manifest or legacy)
    if manifest is None and new:
        log.warning("data.root %s: %d file(s) without an id manifest got ids from their sorted paths; set "
                    "data.manifest to a file outside the folder to keep ids when files are added", root, len(new))
    entries = sorted(ids.items(), key=lambda kv: kv[1])
    present = set(found)
    gone = [rel for rel, _ in entries if rel not in present]
    if gone:
        log.warning("%s: %d listed file(s) are gone (e.g. %s); their ids stay unused", manifest or source,
                    len(gone), gone[0])
    # listed paths of this layout (a manifest may outlive a reorganised folder); entries whose
    # files are gone still count, so no class is ever renumbered
    if split_layout:
        listed = [rel for rel, _ in entries if rel.startswith(("train/", f"{query_dir}/")) and rel.count("/") >= 2]
    else:
        listed = [rel for rel, _ in entries if "/" in rel]

    def class_of(rel: str) -> str:
        return rel.split("/")[1 if split_layout else 0]

    classes = list(dict.fromkeys(class_of(rel) for rel in listed))
    label = {c: i for i, c in enumerate(classes)}
    live = [(rel, i) for rel, i in entries if rel in present]

    if split_layout:
        tr = [e for e in live if e[0].startswith("train/")]
        qu = [e for e in live if e[0].startswith(f"{query_dir}/")]
        tr, qu = tr[:_take(cfg.n_train, len(tr), "n_train")], qu[:_take(cfg.n_query, len(qu), "n_query")]
    else:
        order = np.random.default_rng(cfg.split_seed).permutation(len(live))
        n = _take(cfg.n_train, len(live), "n_train")
        m = _take(cfg.n_query, len(live) - n, "n_query")
        tr, qu = [live[j] for j in order[:n]], [live[j] for j in order[n:n + m]]
    X = _pixels(((rel, _open_image(root / rel)) for rel, _ in tr + qu), _image_size(cfg), f"data.root {root}")
    y = np.array([label[class_of(rel)] for rel, _ in tr + qu], np.int64)
    ids = np.array([i for _, i in tr + qu], np.int64)
    n = len(tr)
    out = _normalised(X[:n], y[:n], ids[:n], X[n:], y[n:], ids[n:], classes, f"the image folder {root}")
    if manifest is not None and (new or not manifest.exists()):  # only once every image read
        _write_manifest(manifest, dict(entries), new)
    return out


NPZ_ARRAYS = ("X_train", "y_train", "X_query", "y_query")


def _npz(cfg: DataConfig) -> Dataset:
    """Arrays of the ``.npz`` file ``data.root`` (docs/inputs.md)."""
    path = Path(cfg.root)
    if not path.is_file():
        raise DataError(f"data.root: {path} is not a file; data.name 'npz' reads {', '.join(NPZ_ARRAYS)} "
                        "from the .npz file data.root names")
    try:
        z = dict(np.load(path, allow_pickle=False))
    except Exception as exc:  # zipfile.BadZipFile, ValueError (pickled objects), OSError
        raise DataError(f"{path}: cannot read as .npz ({type(exc).__name__}: {_one_line(exc)})") from exc
    missing = [k for k in NPZ_ARRAYS if k not in z]
    if missing:
        raise DataError(f"{path}: missing array(s) {', '.join(missing)}; data.name 'npz' needs "
                        f"{', '.join(NPZ_ARRAYS)} (optional: train_ids, query_ids, classes)")
    X, y, ids = {}, {}, {}
    transposed = []
    for split in ("train", "query"):
        x = z[f"X_{split}"]
        if x.ndim == 3:
            x = x[:, None]  # grayscale [n, H, W]
        if x.ndim not in (2, 4) or x.dtype.kind not in "biuf":  # complex would lose its imaginary part
            raise DataError(f"{path}: X_{split} has shape {z[f'X_{split}'].shape} and dtype {x.dtype}; "
                            "expected numbers of shape [n, C, H, W] (channels first), [n, H, W] (grayscale) "
                            "or [n, d] (feature vectors)")
        if not len(x):
            what = "training examples" if split == "train" else "query examples (the LDS is measured on them)"
            raise DataError(f"{path}: X_{split} has no rows; daunce needs {what}")
        if x.ndim == 4 and x.shape[3] in (1, 3) and x.shape[1] > 4 and x.shape[2] > 4:
            # channels first, this would be more than 4 channels of images 1 or 3 pixels wide
            x = x.transpose(0, 3, 1, 2)
            transposed.append(f"X_{split}")
        with np.errstate(over="ignore"):  # values beyond float32 become inf, refused below
            X[split] = x.astype(np.float32) / np.float32(255.0) if x.dtype == np.uint8 else x.astype(np.float32)
        lab = z[f"y_{split}"]
        if lab.ndim != 1 or len(lab) != len(x):
            raise DataError(f"{path}: y_{split} has shape {lab.shape} but X_{split} has {len(x)} rows; "
                            f"expected y_{split} of shape [{len(x)}]")
        if not (np.issubdtype(lab.dtype, np.integer) or (np.issubdtype(lab.dtype, np.floating)
                                                          and np.all(np.mod(lab, 1) == 0))):
            raise DataError(f"{path}: y_{split} holds {lab.dtype} values; expected integer class labels")
        y[split] = lab.astype(np.int64)
        given = z.get(f"{split}_ids")
        # uint64 values from 2**63 up would wrap to negative int64 ids (as store refuses them)
        if given is not None and given.dtype.kind == "u" and given.size and (big := given > I64_MAX).any():
            raise DataError(f"{path}: {split}_ids holds uint64 value {given[big][0]}, beyond int64 "
                            f"(max {I64_MAX}); store ids below 2**63")
        if given is None:
            ids[split] = np.arange(len(x), dtype=np.int64)
        elif given.shape != (len(x),) or not np.issubdtype(given.dtype, np.integer) or len(np.unique(given)) != len(x):
            raise DataError(f"{path}: {split}_ids must be {len(x)} distinct integers (one per row of X_{split}), "
                            f"got shape {given.shape} and dtype {given.dtype}")
        else:
            ids[split] = given.astype(np.int64)
    if transposed:
        log.warning("%s: %s of shape [n, %s] read as channels last ([n, H, W, C]) and transposed to "
                    "[n, C, H, W]; store [n, C, H, W] to silence this", path, " and ".join(transposed),
                    ", ".join(map(str, z[transposed[0]].shape[1:])))
    if X["train"].shape[1:] != X["query"].shape[1:]:
        raise DataError(f"{path}: X_train examples have shape {X['train'].shape[1:]} but X_query's have "
                        f"{X['query'].shape[1:]}; they must match")
    if "classes" in z:
        classes = [str(c) for c in np.asarray(z["classes"]).ravel()]
    else:
        classes = [str(i) for i in range(int(max(y["train"].max(initial=0), y["query"].max(initial=0))) + 1)]
    _check_labels({"y_train": y["train"], "y_query": y["query"]}, len(classes), str(path))
    n = _take(cfg.n_train, len(y["train"]), "n_train")
    m = _take(cfg.n_query, len(y["query"]), "n_query")
    for split, k in (("train", n), ("query", m)):
        # one NaN would make every example NaN through the per-channel normalisation
        bad = ~np.isfinite(X[split][:k]).all(axis=tuple(range(1, X[split].ndim)))
        if bad.any():
            raise DataError(f"{path}: X_{split} row {int(np.flatnonzero(bad)[0])} holds a NaN or infinite value "
                            "(or one beyond float32's range); fix or drop that row")
    return _normalised(X["train"][:n], y["train"][:n], ids["train"][:n], X["query"][:m], y["query"][:m],
                       ids["query"][:m], classes, str(path))
