"""Datasets by name with stable example ids: sklearn's bundled digits and CIFAR-10.

An example's id is its index in the original dataset (digits: ``load_digits`` order; CIFAR-10:
the index in torchvision's train or test split), so every file of every stage can be joined on
ids whatever subset or order a step used.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import DataConfig


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

    @property
    def n(self) -> int:
        return len(self.y_train)

    @property
    def m(self) -> int:
        return len(self.y_query)

    def images(self, X: np.ndarray) -> np.ndarray:
        """Undo the normalisation for display: [N, H, W, C] in [0, 1]."""
        img = X * self.std[None, :, None, None] + self.mean[None, :, None, None]
        return np.clip(img.transpose(0, 2, 3, 1), 0, 1)


def load_dataset(cfg: DataConfig) -> Dataset:
    """Load the dataset named by ``cfg.name`` with its train/query split."""
    if cfg.name == "digits":
        return _digits(cfg)
    if cfg.name == "cifar10":
        return _cifar10(cfg)
    raise DataError(f"data.name: unknown dataset {cfg.name!r}; choose 'digits' or 'cifar10'")


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
                   10, [str(i) for i in range(10)], mean, std)


CIFAR_MEAN = np.array([0.4914, 0.4822, 0.4465], np.float32)
CIFAR_STD = np.array([0.2470, 0.2435, 0.2616], np.float32)


def _cifar10(cfg: DataConfig) -> Dataset:
    import torchvision

    root = Path(cfg.root)
    try:
        train = torchvision.datasets.CIFAR10(root, train=True, download=cfg.download)
        test = torchvision.datasets.CIFAR10(root, train=False, download=cfg.download)
    except Exception as exc:  # URLError, RuntimeError("Dataset not found"), ...
        raise DataError(
            f"CIFAR-10 is not under {root} and could not be downloaded ({type(exc).__name__}: "
            f"{exc}). On a machine with network run the workflow's data rule, or put "
            f"'cifar-10-batches-py' under {root}."
        ) from exc
    n = _take(cfg.n_train, len(train.targets), "n_train")
    m = _take(cfg.n_query, len(test.targets), "n_query")

    def prep(ds, k):
        x = (ds.data[:k].astype(np.float32) / 255.0).transpose(0, 3, 1, 2)
        return (x - CIFAR_MEAN[None, :, None, None]) / CIFAR_STD[None, :, None, None]

    return Dataset(prep(train, n), np.asarray(train.targets[:n], np.int64), np.arange(n, dtype=np.int64),
                   prep(test, m), np.asarray(test.targets[:m], np.int64), np.arange(m, dtype=np.int64),
                   10, list(train.classes), CIFAR_MEAN, CIFAR_STD)
