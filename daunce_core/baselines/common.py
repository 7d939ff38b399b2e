"""What every baseline adapter shares: its settings, the problem it is handed, and its output.

* :class:`BaselinesConfig` -- the config's ``baselines`` section, one dataclass per method, built
  by :func:`daunce_core.settings.build` (unknown keys and wrong types refused by name);
* :class:`Problem` / :func:`load_problem` -- theta_0 in its architecture with the data, checked
  against the recorded split;
* :func:`query_value` / :func:`train_loss` -- the query and training functions every gradient
  method differentiates;
* :func:`write_result` -- dense scores in the common layout, refused when transposed or NaN.

It lives apart from ``baselines/__init__.py`` so the adapters import it without importing the
dispatcher that imports them.
"""
from __future__ import annotations

import contextlib
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import store
from ..config import ExperimentConfig
from ..settings import ConfigError, build, json_schema, nested, setting

if TYPE_CHECKING:
    import torch

    from ..data import Dataset


METHODS = ("trak", "ekfac", "logra", "graddot", "tracin", "exact_if")  # Figure 1a's (the default list)
EXTRA = ("trak_ens", "if_iter")  # beyond the paper's: TRAK over an ensemble, IF with an iterative solver
# exact references at exact IF's scale: each DAUNCE variant's Theorem-1 limit and its linearised
# fits (:mod:`.limits`), matched-noise DAUNCE's limit (the damped Gauss-Newton influence function),
# and exact IF scored by correlation (:mod:`.exact`); run only when listed in baselines.methods.
# References for reading DAUNCE's rows (docs/theory.md), not bounds
REFERENCE = ("limit_daunce", "limit_daunce_e", "limit_daunce_t", "limit_daunce_t_q", "limit_bb",
             "lin_daunce", "lin_daunce_e", "lin_daunce_t", "lin_bb", "exact_if_corr", "limit_daunce_m")
ALL_METHODS = METHODS + EXTRA + REFERENCE
TUNABLE = ("trak", "ekfac", "logra", "tracin", "trak_ens", "if_iter")  # knobs tuned by baselines.tune
MEASUREMENTS = ("margin", "loss")
# TRAK at a fixed projection dimension N, beside other sizes in one run: ``trak_k<N>`` is TRAK with
# ``proj_dim = N`` and the rest of ``baselines.trak`` and of ``baselines.tune.trak`` (its proj_dim axis dropped)
TRAK_K = re.compile(r"trak_k([1-9][0-9]*)")


def is_method(name: str) -> bool:
    """Whether ``name`` is a baseline: one of ``ALL_METHODS`` or ``trak_k<N>``."""
    return name in ALL_METHODS or TRAK_K.fullmatch(str(name)) is not None


def base_method(name: str) -> tuple[str, dict[str, Any]]:
    """The method that runs for ``name`` and the knob values its name fixes (``trak_k200`` ->
    ``("trak", {"proj_dim": 200})``)."""
    hit = TRAK_K.fullmatch(str(name))
    return ("trak", {"proj_dim": int(hit.group(1))}) if hit else (name, {})


# --- settings ------------------------------------------------------------------------------------

TRAK_BLOCK_SIZE_HELP = ("columns of the projection that traker's BasicProjector (CPU) generates at a time; it "
                        "regenerates the whole matrix for every batch unless this is >= proj_dim (then it is made "
                        "once: grad_dim x proj_dim floats of memory). 100 is traker's default; the draw differs with "
                        "the block size")


@dataclass
class TrakConfig:
    """``traker.TRAKer`` on theta_0 alone (no ensemble)."""

    proj_dim: int = setting(512, "dimension of TRAK's random projection of the gradients", ge=1)
    seed: int = setting(0, "seed of the projection")
    lambda_reg: float = setting(0.0, "ridge added to X^T X before inversion", ge=0)
    half_precision: bool = setting(False, "float16 gradients (ruins the scores on CPU; keep false there)")
    block_size: int = setting(100, TRAK_BLOCK_SIZE_HELP, ge=1)


@dataclass
class TrakEnsConfig:
    """``traker.TRAKer`` over an ensemble: theta_0 with independently trained models or with
    checkpoints of theta_0's own (replayed) training, TRAK's scores summed over them."""

    models: int = setting(5, "models in the ensemble (theta_0 is the first)", ge=1)
    source: str = setting("seeds", "'seeds': the base recipe from scratch with other seeds; 'checkpoints': "
                                   "evenly spaced checkpoints of theta_0's training (the last is theta_0)",
                          choices=("seeds", "checkpoints"))
    proj_dim: int = setting(512, "dimension of each model's random projection", ge=1)
    seed: int = setting(0, "seed of the projection")
    lambda_reg: float = setting(0.0, "ridge added to X^T X before inversion", ge=0)
    half_precision: bool = setting(False, "float16 gradients (ruins the scores on CPU; keep false there)")
    block_size: int = setting(100, TRAK_BLOCK_SIZE_HELP, ge=1)


@dataclass
class IFIterConfig:
    """Influence functions with an iterative inverse-Hessian solver of ``dattri`` (models too large
    for the exact solve)."""

    solver: str = setting("arnoldi", "'arnoldi' (IFAttributorArnoldi: top proj_dim eigenpairs of the Hessian) "
                                     "or 'cg' (IFAttributorCG)", choices=("arnoldi", "cg"))
    regularization: float = setting(1e-2, "damping added to the Hessian", ge=0)
    proj_dim: int = setting(200, "arnoldi: eigenpairs kept (numbers stored per training example)", ge=1)
    max_iter: int = setting(200, "iterations of the solver (arnoldi: Krylov steps, >= proj_dim)", ge=1)
    seed: int = setting(0, "seed of the solver's start vector / sampling")


@dataclass
class EkfacConfig:
    """``kronfluence`` EK-FAC influence on every supported layer."""

    damping: float | None = setting(None, "damping of the inverse; null: kronfluence's heuristic, "
                                          "0.1 x mean eigenvalue", ge=0)
    empirical_fisher: bool = setting(True, "the paper: \"the empirical Fisher information matrix\"")
    strategy: str = setting("ekfac", "'ekfac', 'kfac', 'diagonal' or 'identity' (= grad-dot)",
                            choices=('ekfac', 'kfac', 'diagonal', 'identity'))


@dataclass
class LograConfig:
    """``dattri.LoGraAttributor``: gradients projected per layer, then an eFIM solve."""

    rank: int = setting(128, "per-side rank r of LoGra's Kronecker projection: r*r numbers per layer", ge=1)
    damping: float | None = setting(None, "damping of the eFIM; null: dattri's default (1e-5 x mean eigenvalue)", ge=0)
    seed: int = setting(0, "seed of the projections")


@dataclass
class TracinConfig:
    """``dattri.TracInAttributor`` over checkpoints of theta_0's own (replayed) run."""

    checkpoints: int = setting(5, "evenly spaced over theta_0's training steps; the last one is theta_0", ge=1)


@dataclass
class ExactIFConfig:
    """Influence functions with the full curvature matrix, solved in float64 (ours)."""

    curvature: str = setting("ggn", "'ggn' (Gauss-Newton = the model's Fisher, PSD) or 'hessian' "
                                    "(full, indefinite)", choices=('ggn', 'hessian'))
    damping_grid: list = setting([1e-3, 1e-2, 1e-1, 1.0], "dampings tried; the best on the LDS "
                                                          "selection masks is kept",
                                                          items=float, ge=0, schema={'minItems': 1})
    max_params: int = setting(20000, "refuse models with more parameters (the matrix is P x P)", ge=1)


@dataclass
class LimitsConfig:
    """The Theorem-1 limits and linearised fits (:mod:`.limits`), one setting shared by all eight."""

    damping_grid: list = setting([1e-4, 1e-3, 1e-2, 1e-1, 1.0], "dampings tried, relative to the "
                                 "mean eigenvalue of each method's curvature; the best limit on the LDS "
                                 "selection masks is kept (and used by its lin_ method)",
                                 items=float, gt=0, why="F has rank <= n: the limits need damping",
                                 schema={'minItems': 1})
    measure: str = setting("correlation", "'correlation' (DAUNCE's measure) or 'covariance' of the limit "
                                          "and of the linearised fits", choices=('correlation', 'covariance'))


# baselines.tune in the workflow's schema: the knobs each method may tune, as lists
# baselines.methods in the workflow's schema: the names, or trak_k<N>
METHODS_SCHEMA = {'items': {'anyOf': [{'type': 'string',
                      'enum': ['trak',
                               'ekfac',
                               'logra',
                               'graddot',
                               'tracin',
                               'exact_if',
                               'trak_ens',
                               'if_iter',
                               'limit_daunce',
                               'limit_daunce_e',
                               'limit_daunce_t',
                               'limit_daunce_t_q',
                               'limit_bb',
                               'lin_daunce',
                               'lin_daunce_e',
                               'lin_daunce_t',
                               'lin_bb',
                               'exact_if_corr',
                               'limit_daunce_m']},
                     {'type': 'string',
                      'pattern': '^trak_k[1-9][0-9]*$',
                      'description': 'TRAK with proj_dim N'}]}}


# The knobs baselines.tune may grid, per method; each grid's items have the knob's own schema.
TUNE_KNOBS = {"trak": (TrakConfig, ("proj_dim", "lambda_reg")), "ekfac": (EkfacConfig, ("damping",)),
              "logra": (LograConfig, ("rank", "damping")), "tracin": (TracinConfig, ("checkpoints",)),
              "trak_ens": (TrakEnsConfig, ("lambda_reg", "proj_dim", "models")),
              "if_iter": (IFIterConfig, ("regularization", "proj_dim"))}


def _tune_schema() -> dict:
    def item(cls, knob):
        return {k: v for k, v in json_schema(cls)["properties"][knob].items() if k not in ("description", "default")}

    return {"additionalProperties": False, "properties": {
        method: {"type": "object", "additionalProperties": False,
                 "properties": {k: {"type": "array", "minItems": 1, "items": item(cls, k)} for k in knobs}}
        for method, (cls, knobs) in TUNE_KNOBS.items()}}


TUNE_SCHEMA = _tune_schema()


@dataclass
class BaselinesConfig:
    """The ``baselines`` section of the config: which methods run, and each one's settings."""

    methods: list = setting(list(METHODS), f"methods to run, from {', '.join(METHODS + EXTRA)}, trak_k<N> (TRAK "
                                           f"with proj_dim N), and the exact references {', '.join(REFERENCE)}",
                                           schema=METHODS_SCHEMA)
    measurement: str = setting("margin", "query function of the gradient methods: 'margin' or 'loss'",
                               choices=MEASUREMENTS)
    batch_size: int = setting(250, "examples per batch handed to the libraries", ge=1)
    trak: TrakConfig = nested(TrakConfig)
    ekfac: EkfacConfig = nested(EkfacConfig)
    logra: LograConfig = nested(LograConfig)
    tracin: TracinConfig = nested(TracinConfig)
    exact_if: ExactIFConfig = nested(ExactIFConfig)
    limits: LimitsConfig = nested(LimitsConfig)
    trak_ens: TrakEnsConfig = nested(TrakEnsConfig)
    if_iter: IFIterConfig = nested(IFIterConfig)
    tune: dict = setting({}, "grids of each method's knobs, {method: {knob: [values]}} (e.g. trak: {proj_dim: "
                             "[...], lambda_reg: [...]}); every combination is scored on the LDS selection masks "
                             "and queries and the best kept. Knobs not listed keep their value above",
                             schema=TUNE_SCHEMA)
    max_settings: int | None = setting(None, "the budget rule: the most settings (grid combinations) one method "
                                             "may try; null: as many as daunce.lr_grid has values, what DAUNCE "
                                             "tries, and a longer grid is thinned to that many, evenly spread "
                                             "(a shorter lr grid never stops another method); a number: a "
                                             "longer grid is refused", ge=1)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> BaselinesConfig:
        """Read the top-level ``baselines`` section of a workflow config (absent: defaults); a null
        ``max_settings`` becomes the size of ``daunce.lr_grid``, and every grid longer than that is
        thinned to it (:func:`thin`; what was thinned is in ``thinned``, one line per grid)."""
        out = build(cls, config.get("baselines") or {}, "baselines")
        out.thinned = []
        if out.max_settings is None:
            from ..config import DaunceConfig

            lr_grid = (config.get("daunce") or {}).get("lr_grid") or DaunceConfig().lr_grid
            out.max_settings = len(lr_grid) if isinstance(lr_grid, list) else len(DaunceConfig().lr_grid)
            out.thinned = out._thin_to_budget()
        return out

    def _thin_to_budget(self) -> list[str]:
        """Thin every grid longer than ``max_settings`` (each tune axis in turn, the longest first,
        until their product fits); one line per thinned grid."""
        budget, notes = self.max_settings, []
        for section in ("exact_if", "limits"):
            grid = getattr(self, section).damping_grid
            if isinstance(grid, list) and len(grid) > budget:
                getattr(self, section).damping_grid = thin(grid, budget)
                notes.append(f"baselines.{section}.damping_grid: {len(grid)} values thinned to "
                             f"{getattr(self, section).damping_grid}")
        for method, axes in list((self.tune or {}).items()):
            if not isinstance(axes, dict) or not all(isinstance(v, list) and v for v in axes.values()):
                continue  # validate() names what is wrong
            sizes = {knob: len(values) for knob, values in axes.items()}
            if math.prod(sizes.values()) <= budget:
                continue
            while math.prod(sizes.values()) > budget:
                longest = max(sizes, key=lambda k: sizes[k])
                sizes[longest] -= 1
            before = math.prod(len(values) for values in axes.values())
            self.tune = {**self.tune, method: {knob: thin(values, sizes[knob]) for knob, values in axes.items()}}
            notes.append(f"baselines.tune.{method}: {before} settings thinned to {self.tune[method]}")
        return [f"{n} (the budget: daunce.lr_grid's {budget} values; baselines.max_settings)" for n in notes]

    def grid(self, method: str) -> list[dict[str, Any]]:
        """The settings ``method`` tries: every combination of ``tune[method]`` (``[{}]``: untuned).
        exact IF tunes its damping itself (``exact_if.damping_grid``)."""
        base, fixed = base_method(method)
        axes = {k: v for k, v in ((self.tune or {}).get(base) or {}).items() if k not in fixed}
        combos: list[dict[str, Any]] = [{}]
        for knob, values in axes.items():
            combos = [{**c, knob: v} for c in combos for v in values]
        return combos

    def with_setting(self, method: str, setting_: dict[str, Any]) -> BaselinesConfig:
        """A copy whose ``method`` section has the knob values of ``setting_``."""
        from dataclasses import replace

        base, fixed = base_method(method)
        setting_ = {**setting_, **fixed}
        return replace(self, **{base: replace(getattr(self, base), **setting_)}) if setting_ else self

    def validate(self) -> BaselinesConfig:
        bad = [m for m in self.methods if not is_method(m)]
        if bad:
            raise ConfigError(f"baselines.methods: unknown {bad}; choose from {', '.join(ALL_METHODS)} "
                              "or trak_k<N> (TRAK with proj_dim N)")
        # each knob's range and choices: its setting (checked by build); the empty grids here
        if not self.exact_if.damping_grid:
            raise ConfigError("baselines.exact_if.damping_grid must be a non-empty list of values >= 0")
        if not self.limits.damping_grid:
            raise ConfigError("baselines.limits.damping_grid must be a non-empty list of values > 0 (F has "
                              "rank <= n: the limits need damping)")
        from dataclasses import fields

        for method, axes in (self.tune or {}).items():
            if method not in TUNABLE:
                raise ConfigError(f"baselines.tune.{method}: not a tunable method; choose from "
                                  f"{', '.join(TUNABLE)} (exact_if: baselines.exact_if.damping_grid)")
            known = {f.name for f in fields(getattr(self, method))}
            for knob, values in (axes or {}).items():
                if knob not in known:
                    raise ConfigError(f"baselines.tune.{method}.{knob}: unknown knob; {method} has "
                                      f"{', '.join(sorted(known))}")
                if not isinstance(values, list) or not values:
                    raise ConfigError(f"baselines.tune.{method}.{knob} must be a non-empty list of values")
        budget = self.max_settings
        # the budget binds the methods that run (a grid of a method left out costs nothing)
        sizes = {m: len(self.grid(m)) for m in self.methods if base_method(m)[0] in TUNABLE}
        if "exact_if" in self.methods or "exact_if_corr" in self.methods:
            sizes["exact_if"] = len(self.exact_if.damping_grid)
        if any(m in REFERENCE and m != "exact_if_corr" for m in self.methods):
            sizes["limits"] = len(self.limits.damping_grid)
        over = {m: k for m, k in sizes.items() if budget is not None and k > budget}
        if over:
            m, k = next(iter(over.items()))
            key = {"exact_if": "baselines.exact_if.damping_grid",
                   "limits": "baselines.limits.damping_grid"}.get(m, f"baselines.tune.{m}")
            raise ConfigError(f"{key}: {k} settings exceed the budget baselines.max_settings={budget} (every "
                              "method tries at most as many settings as DAUNCE's lr grid); shrink the grid")
        return self


def thin(values: list, n: int) -> list:
    """``n`` of ``values`` evenly spread, in their order: the middle one of each of ``n`` equal
    parts (all of them when there are at most ``n``)."""
    if len(values) <= n:
        return list(values)
    return [values[int((i + 0.5) * len(values) / n)] for i in range(n)]


# --- the problem every method sees ---------------------------------------------------------------

@dataclass
class Problem:
    """theta_0, its architecture and the data, as every baseline receives them."""

    cfg: ExperimentConfig
    ds: Dataset
    model: torch.nn.Module  # theta_0 loaded, eval mode, on ``device``
    state: dict  # theta_0's state dict (parameters and buffers) on ``device``
    device: torch.device
    cache: dict = field(default_factory=dict)  # work shared by the settings of a grid (TracIn's replay)

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
    from ..data import load_dataset
    from ..models import build_model
    from ..utils import pick_device

    device = device if device is not None else pick_device(cfg.device)
    ds = load_dataset(cfg.data)
    store.check_split(split_path, ds.train_ids, ds.query_ids, ds.content_hash, ds.source)
    model = build_model(cfg.model, ds.X_train.shape[1:], ds.num_classes).to(device)
    state = store.load_state(theta0_path, device)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:  # other keys or shapes: theta_0 is not of this config's model
        first = str(exc).splitlines()[1].strip() if len(str(exc).splitlines()) > 1 else str(exc)
        raise store.StoreError(f"{theta0_path}: does not fit the model of the config ({cfg.model.arch}, "
                               f"{first}); rerun the base rule") from exc
    model.eval()
    return Problem(cfg, ds, model, state, device)


def query_value(logits: torch.Tensor, y: torch.Tensor, measurement: str) -> torch.Tensor:
    """The query function in its loss-like orientation (lower = better): ``-margin`` or the loss."""
    from ..objectives import cross_entropy, margin

    if measurement == "margin":
        return -margin(logits, y)
    if measurement == "loss":
        return cross_entropy(logits, y)
    raise ValueError(f"unknown measurement {measurement!r}; choose one of {MEASUREMENTS}")


def train_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-example training loss: the cross-entropy theta_0 was trained on."""
    from ..objectives import cross_entropy

    return cross_entropy(logits, y)


def selection_lds(problem: Problem, scores: np.ndarray, gt: dict) -> float:
    """Mean LDS of the raw dense scores [n, m] on the selection ground truth ``gt`` (its masks and
    queries only): the judge of every baseline's tuning, as of DAUNCE's (no thresholding)."""
    from .. import lds as L

    if "query_ids" in gt:
        scores, _ = L.align_to_ground_truth(scores, problem.ds.train_ids, problem.ds.query_ids, gt,
                                            "scores", "the selection ground truth")
    scores = np.asarray(scores, np.float32)
    return float(L.per_query_lds(scores, gt["masks"], gt["outputs"]).mean())


def read_selection(select_gt) -> dict:
    """The selection ground truth (a path or an already read dict), refused unless its split is
    ``select``: no tuning ever sees the test masks."""
    gt = store.read_ground_truth(select_gt) if not isinstance(select_gt, dict) else select_gt
    if gt.get("attrs", {}).get("split") != "select":
        raise store.StoreError(f"{select_gt if not isinstance(select_gt, dict) else 'ground truth'}: not the "
                               "selection split; refusing to tune on test masks")
    return gt


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
