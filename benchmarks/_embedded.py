"""The embedded default's theta_0 for the benchmarks that time perturbed fits on it.

``config/config.yaml`` read as the workflow reads it, its dataset, and theta_0 trained with the
base recipe (``ensemble.fit_from_scratch``, the same call as rule ``base``), all on ``device``.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import yaml

from daunce_core import ensemble as E
from daunce_core.config import ExperimentConfig
from daunce_core.data import load_dataset
from daunce_core.models import model_factory

ROOT = Path(__file__).resolve().parents[1]


def embedded_theta0(device: torch.device):
    """``(cfg, X, y, net, theta0)`` of the embedded default on ``device``."""
    cfg = ExperimentConfig.from_dict(yaml.safe_load((ROOT / "config" / "config.yaml").read_text())).validate()
    ds = load_dataset(cfg.data)
    X = torch.as_tensor(ds.X_train, device=device)
    y = torch.as_tensor(ds.y_train, device=device)
    factory = model_factory(cfg.model, ds.X_train.shape[1:], ds.num_classes)
    net, p, b = E.fit_from_scratch(factory, X, y, [np.arange(ds.n)], [(0,)], cfg.base)
    return cfg, X, y, net, {**E.unstack(p, 0), **E.unstack(b, 0)}
