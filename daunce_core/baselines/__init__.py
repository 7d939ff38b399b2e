"""The baselines of Figure 1a, each through its authors' library, on DAUNCE's theta_0.

One entry point, :func:`run_baseline`, fits one method on the experiment's theta_0 and writes its
scores in the common dense layout (``store.write_scores``, [n, m], positive = the training
example helps the query), so LDS, figures and removal never know which method made them.

==========  ==========================================================  ======================
method      what runs                                                   module
==========  ==========================================================  ======================
trak        ``traker.TRAKer``, one model (no ensemble), margin output     :mod:`.trak`
ekfac       ``kronfluence`` EK-FAC on every supported layer                :mod:`.kronfluence_ekfac`
logra       ``dattri.LoGraAttributor`` (rank x rank per layer, eFIM)      :mod:`.dattri_methods`
graddot     ``dattri.TracInAttributor`` at theta_0, unit weight           :mod:`.dattri_methods`
tracin      ``dattri.TracInAttributor`` over checkpoints of theta_0's run  :mod:`.dattri_methods`
exact_if    full Hessian (or Gauss-Newton) solve in float64, ours          :mod:`.exact`
==========  ==========================================================  ======================

The *training* function of every gradient method is the per-example cross-entropy that theta_0
was trained on; the *query* function is ``baselines.measurement``: the margin
``log p / (1 - p)`` by default (the output the LDS ground truth measures, and what TRAK and
kronfluence's CIFAR example use), or the loss. Libraries are handed the measurement in its
"loss-like" orientation (``-margin``), so their native positive score means "helpful"; each
adapter's sign and orientation is tested against an independent computation
(``tests/test_baselines.py``).

Settings (config key ``baselines``) are read by :class:`BaselinesConfig`; unknown keys are refused
by name.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np

from .. import store
from ..config import ConfigError, ExperimentConfig

if TYPE_CHECKING:
    import torch

    from ..data import Dataset

log = logging.getLogger(__name__)

METHODS = ("trak", "ekfac", "logra", "graddot", "tracin", "exact_if")
MEASUREMENTS = ("margin", "loss")


# --- settings ------------------------------------------------------------------------------------

@dataclass
class TrakConfig:
    proj_dim: int = 512
    seed: int = 0
    lambda_reg: float = 0.0
    half_precision: bool = False


@dataclass
class EkfacConfig:
    damping: float | None = None  # None: kronfluence's heuristic, 0.1 x mean eigenvalue
    empirical_fisher: bool = True  # the paper: "the empirical Fisher information matrix"
    strategy: str = "ekfac"


@dataclass
class LograConfig:
    rank: int = 128  # per-side rank r of LoGra's Kronecker projection: r*r numbers per layer
    damping: float | None = None  # None: dattri's default (1e-5 x mean eigenvalue)
    seed: int = 0


@dataclass
class TracinConfig:
    checkpoints: int = 5  # evenly spaced over theta_0's training steps; the last one is theta_0


@dataclass
class ExactIFConfig:
    curvature: str = "ggn"  # "ggn" (Gauss-Newton = the model's Fisher, PSD) or "hessian" (full, indefinite)
    damping_grid: list = field(default_factory=lambda: [1e-3, 1e-2, 1e-1, 1.0])
    max_params: int = 20000


@dataclass
class BaselinesConfig:
    methods: list = field(default_factory=lambda: list(METHODS))
    measurement: str = "margin"
    batch_size: int = 250
    trak: TrakConfig = field(default_factory=TrakConfig)
    ekfac: EkfacConfig = field(default_factory=EkfacConfig)
    logra: LograConfig = field(default_factory=LograConfig)
    tracin: TracinConfig = field(default_factory=TracinConfig)
    exact_if: ExactIFConfig = field(default_factory=ExactIFConfig)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "BaselinesConfig":
        """Read the top-level ``baselines`` section of a workflow config (absent: defaults)."""
        raw = config.get("baselines") or {}
        return _build(cls, raw, "baselines").validate()

    def validate(self) -> "BaselinesConfig":
        bad = [m for m in self.methods if m not in METHODS]
        if bad:
            raise ConfigError(f"baselines.methods: unknown {bad}; choose from {', '.join(METHODS)}")
        if self.measurement not in MEASUREMENTS:
            raise ConfigError(f"baselines.measurement must be one of {MEASUREMENTS}, got {self.measurement!r}")
        if self.trak.proj_dim < 1 or self.logra.rank < 1 or self.tracin.checkpoints < 1 or self.batch_size < 1:
            raise ConfigError("baselines: trak.proj_dim, logra.rank, tracin.checkpoints and batch_size must be >= 1")
        if self.exact_if.curvature not in ("hessian", "ggn"):
            raise ConfigError(f"baselines.exact_if.curvature must be 'hessian' or 'ggn', "
                              f"got {self.exact_if.curvature!r}")
        if not self.exact_if.damping_grid or any(d < 0 for d in self.exact_if.damping_grid):
            raise ConfigError("baselines.exact_if.damping_grid must be a non-empty list of values >= 0")
        if self.ekfac.strategy not in ("ekfac", "kfac", "diagonal", "identity"):
            raise ConfigError(f"baselines.ekfac.strategy: unknown {self.ekfac.strategy!r}")
        return self


def _build(cls: type, raw: Any, where: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a mapping, got {type(raw).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(f'{where}.{u}' for u in unknown)}; "
                          f"known: {', '.join(sorted(fields))}")
    kwargs = {}
    for name, value in raw.items():
        f = fields[name]
        sub = f.default_factory if f.default_factory is not dataclasses.MISSING else None
        kwargs[name] = _build(sub, value, f"{where}.{name}") if dataclasses.is_dataclass(sub) else value
    return cls(**kwargs)


# --- the problem every method sees ---------------------------------------------------------------

@dataclass
class Problem:
    """theta_0, its architecture and the data, as every baseline receives them."""

    cfg: ExperimentConfig
    ds: "Dataset"
    model: "torch.nn.Module"  # theta_0 loaded, eval mode, on ``device``
    state: dict  # theta_0's state dict (parameters and buffers) on ``device``
    device: "torch.device"

    @property
    def n(self) -> int:
        return self.ds.n

    @property
    def m(self) -> int:
        return self.ds.m

    def tensors(self, split: str, dtype=None):
        import torch

        X = self.ds.X_train if split == "train" else self.ds.X_query
        y = self.ds.y_train if split == "train" else self.ds.y_query
        return (torch.as_tensor(X, device=self.device, dtype=dtype or torch.float32),
                torch.as_tensor(y, device=self.device))

    def loader(self, split: str, batch_size: int):
        """A non-shuffled DataLoader of ``(x, y)`` pairs (the form every library takes)."""
        import torch

        X, y = self.tensors(split)
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=batch_size,
                                           shuffle=False)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


def load_problem(cfg: ExperimentConfig, split_path, theta0_path, device=None) -> Problem:
    """Load the data (checked against the recorded split) and theta_0 into its architecture."""
    from ..pipeline import _factory, load_checked, load_state
    from ..utils import pick_device

    device = device if device is not None else pick_device(cfg.device)
    ds = load_checked(cfg, split_path)
    model = _factory(cfg, ds)().to(device)
    state = load_state(theta0_path, device)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:  # other keys or shapes: theta_0 is not of this config's model
        first = str(exc).splitlines()[1].strip() if len(str(exc).splitlines()) > 1 else str(exc)
        raise store.StoreError(f"{theta0_path}: does not fit the model of the config ({cfg.model.arch}, "
                               f"{first}); rerun the base rule") from exc
    model.eval()
    return Problem(cfg, ds, model, state, device)


def query_value(logits: "torch.Tensor", y: "torch.Tensor", measurement: str) -> "torch.Tensor":
    """The query function in its loss-like orientation (lower = better): ``-margin`` or the loss."""
    from ..objectives import cross_entropy, margin

    if measurement == "margin":
        return -margin(logits, y)
    if measurement == "loss":
        return cross_entropy(logits, y)
    raise ValueError(f"unknown measurement {measurement!r}; choose one of {MEASUREMENTS}")


def train_loss(logits: "torch.Tensor", y: "torch.Tensor") -> "torch.Tensor":
    """Per-example training loss: the cross-entropy theta_0 was trained on."""
    from ..objectives import cross_entropy

    return cross_entropy(logits, y)


# --- output --------------------------------------------------------------------------------------

def check_scores(scores: np.ndarray, n: int, m: int, method: str) -> np.ndarray:
    """Scores as float32 [n, m]; refuse wrong shapes (a transposed library output) and NaNs."""
    scores = np.asarray(scores, dtype=np.float32)
    if scores.shape != (n, m):
        raise ValueError(f"{method}: scores have shape {scores.shape}, expected [n={n}, m={m}] "
                         "(training examples x queries); the adapter's orientation is wrong")
    bad = ~np.isfinite(scores)
    if bad.any():
        cols = np.flatnonzero(bad.any(0))
        raise ValueError(f"{method}: {int(bad.sum())} scores are NaN or infinite (queries {cols[:10].tolist()}"
                         f"...); check the damping / regularisation settings of baselines.{method}")
    return scores


def write_result(out, scores: np.ndarray, problem: Problem, method: str, attrs: dict[str, Any]) -> None:
    """Write dense scores with the method's settings and storage figures as attributes."""
    scores = check_scores(scores, problem.n, problem.m, method)
    store.write_scores(out, scores=scores, train_ids=problem.ds.train_ids, query_ids=problem.ds.query_ids,
                       attrs={"method": method, "measure": "score", "threshold": "none", **attrs})


@contextlib.contextmanager
def workdir(near: str | os.PathLike, method: str) -> Iterator[Path]:
    """A scratch folder beside ``near`` for a library's own files, removed afterwards."""
    parent = Path(near).parent
    parent.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=f".{method}-work-", dir=parent))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def dir_bytes(path: str | os.PathLike) -> int:
    """Bytes of the regular files under ``path`` (what a library wrote to disk)."""
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.path.getsize(os.path.join(root, f))
    return total


# --- dispatch ------------------------------------------------------------------------------------

def run_baseline(method: str, cfg: ExperimentConfig, bcfg: BaselinesConfig, split_path, theta0_path, out,
                 select_gt=None) -> dict[str, Any]:
    """Fit ``method`` on theta_0 and write its dense scores to ``out``; returns the attributes.

    ``select_gt``: the LDS *selection* ground truth, used only by ``exact_if`` to pick its damping
    (never the test masks).
    """
    if method not in METHODS:
        raise ValueError(f"unknown baseline {method!r}; choose one of {', '.join(METHODS)}")
    t0 = time.perf_counter()
    problem = load_problem(cfg, split_path, theta0_path)
    log.info("%s on theta_0 (%d parameters): %d training examples, %d queries, measurement=%s",
             method, problem.num_params(), problem.n, problem.m, bcfg.measurement)
    if method == "trak":
        from .trak import trak_scores

        with workdir(out, method) as wd:
            scores, attrs = trak_scores(problem, bcfg, wd)
    elif method == "ekfac":
        from .kronfluence_ekfac import ekfac_scores

        with workdir(out, method) as wd:
            scores, attrs = ekfac_scores(problem, bcfg, wd)
    elif method in ("graddot", "tracin", "logra"):
        from . import dattri_methods as D

        with workdir(out, method) as wd:
            scores, attrs = getattr(D, f"{method}_scores")(problem, bcfg, wd)
    else:
        from .exact import exact_if_scores

        scores, attrs = exact_if_scores(problem, bcfg, select_gt=select_gt)
    attrs = {"measurement": bcfg.measurement, **attrs, "seconds_in_process": time.perf_counter() - t0}
    write_result(out, scores, problem, method, attrs)
    log.info("%s: wrote %s (%s)", method, out, json.dumps({k: v for k, v in attrs.items()
                                                            if not isinstance(v, (list, dict))}))
    return attrs
