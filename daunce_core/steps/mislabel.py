"""Mislabelled-example detection by self-influence, in dattri's benchmark form (docs/mislabel.md).

A seeded fraction of the training labels is flipped, theta_0 retrained on them, and every method's
self-influence I(z_i, z_i) (DAUNCE: the covariance of an example's signal with itself, its
variance; the baselines, trak_k<N>, trak_ens and if_iter among them: the diagonal of their
adapter's [n, n] scores, :func:`self_influence`) ranks the training examples; the
ROC AUC says how well the flipped ones come first. No method is tuned on the flipped labels. The
rules of ``workflow/rules/mislabel.smk`` call it through ``scripts/``; docs/mislabel.md#what-runs
gives the details."""
from __future__ import annotations

import csv
import dataclasses
import json
import logging
from pathlib import Path

import numpy as np

from .. import store
from ..config import MISLABEL_BASELINES, ExperimentConfig, fit_variant, mislabel_baseline, q_weighted

log = logging.getLogger(__name__)

__all__ = ["flip_labels", "detection_auc", "auc_ci", "rank_auc", "self_influence_daunce", "middle", "daunce_lr",
           "baseline_setting", "self_influence", "train_noisy_base", "daunce_signals", "baseline_self_influence",
           "table"]


# --- the task ------------------------------------------------------------------------------------

def flip_labels(y: np.ndarray, num_classes: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(noisy labels, flipped mask)``: exactly ``int(fraction * n)`` examples (dattri's count),
    drawn without replacement, each given a class drawn uniformly from the *other* classes.
    Keyed by ``seed`` alone: the same seed flips the same examples to the same classes."""
    y = np.asarray(y)
    n = len(y)
    if not 0 < fraction < 1:
        raise ValueError(f"mislabel.fraction must lie in (0, 1), got {fraction}")
    if num_classes < 2:
        raise ValueError(f"flipping labels needs at least 2 classes, got {num_classes}")
    rng = np.random.default_rng([int(seed), 0x6D69736C])  # the stream of this task, apart from others
    idx = rng.choice(n, size=int(fraction * n), replace=False)
    noisy = y.copy()
    noisy[idx] = (y[idx] + rng.integers(1, num_classes, size=len(idx))) % num_classes
    flipped = np.zeros(n, bool)
    flipped[idx] = True
    return noisy, flipped


def detection_auc(scores: np.ndarray, flipped: np.ndarray) -> float:
    """ROC AUC of ranking by ``scores`` (largest first) against the ``flipped`` mask; ties count
    one half (sklearn), dattri's ``mislabel_detection_auc`` on untied scores."""
    from sklearn.metrics import roc_auc_score

    scores, flipped = np.asarray(scores, np.float64), np.asarray(flipped, bool)
    if scores.shape != flipped.shape:
        raise ValueError(f"{scores.shape[0] if scores.ndim else 0} scores for {len(flipped)} examples")
    if not np.isfinite(scores).all():
        raise ValueError(f"{int((~np.isfinite(scores)).sum())} self-influence scores are NaN or infinite")
    if flipped.all() or not flipped.any():
        raise ValueError("the AUC needs flipped and clean examples both")
    return float(roc_auc_score(flipped, scores))


def auc_ci(scores: np.ndarray, flipped: np.ndarray, n_resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Percentile-bootstrap 95% CI of :func:`detection_auc` over the training examples (resampled
    with replacement, scores and labels paired; ``scipy.stats.bootstrap``, vectorised through the
    rank form of the AUC, :func:`rank_auc`)."""
    from scipy import stats

    res = stats.bootstrap((np.asarray(flipped, bool), np.asarray(scores, np.float64)), rank_auc, paired=True,
                          vectorized=True, n_resamples=n_resamples, confidence_level=0.95, method="percentile",
                          rng=np.random.default_rng(seed))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def rank_auc(flipped: np.ndarray, scores: np.ndarray, axis: int = -1) -> np.ndarray:
    """The AUC along ``axis`` by the Mann-Whitney rank sum (ties at their mean rank, as sklearn's
    ``roc_auc_score``): many resamples at once; NaN for a resample without flipped or clean examples."""
    from scipy.stats import rankdata

    f = np.asarray(flipped, np.float64)
    r = rankdata(scores, axis=axis)
    n1 = f.sum(axis=axis)
    n0 = f.shape[axis] - n1
    with np.errstate(invalid="ignore", divide="ignore"):
        out = ((r * f).sum(axis=axis) - n1 * (n1 + 1) / 2) / (n1 * n0)
    return np.where((n1 > 0) & (n0 > 0), out, np.nan)


def self_influence_daunce(train_signals: np.ndarray, variant: str, p0_train: np.ndarray | None = None) -> np.ndarray:
    """DAUNCE's self-influence [n]: each example's signal's covariance with itself across the K
    models (unbiased, as ``scoring.pairwise_scores``: its diagonal with query = train), times
    ``1 - p_i(theta_0)`` for a Q form."""
    s = np.asarray(train_signals, np.float64)
    if s.ndim != 2 or s.shape[0] < 2:
        raise ValueError(f"signals must be [K >= 2, n], got shape {s.shape}")
    out = s.var(axis=0, ddof=1)
    if q_weighted(variant):
        if p0_train is None:
            raise ValueError(f"{variant}: needs theta_0's label probabilities (p0_train)")
        out = out * (1.0 - np.asarray(p0_train, np.float64))
    return out


# --- settings chosen without the flipped labels ----------------------------------------------------

def middle(grid) -> float:
    """The middle value of a grid (sorted; of an even length, the upper of the two middle ones)."""
    values = sorted(float(v) for v in grid)
    if not values:
        raise ValueError("an empty grid has no middle")
    return values[len(values) // 2]


def daunce_lr(cfg: ExperimentConfig, selection_path=None) -> tuple[float, str]:
    """The learning rate of a variant's fits: the LDS selection's choice (its selection.json) or
    the middle of ``daunce.lr_grid``; and how it was chosen."""
    if selection_path is None:
        return middle(cfg.daunce.lr_grid), "middle of daunce.lr_grid"
    doc = json.loads(Path(selection_path).read_text())
    if "selected_lr" not in doc:
        raise store.StoreError(f"{selection_path}: no 'selected_lr'; rerun the select_lr step")
    return float(doc["selected_lr"]), f"LDS selection ({selection_path})"


def baseline_setting(method: str, bcfg, scores_path=None) -> tuple[dict, str]:
    """The knob values of a baseline: the LDS selection's choice (the ``tuning`` record of its
    scores file) or its ``baselines.<method>`` values (exact IF: the middle of its damping grid;
    trak_k<N>: ``baselines.trak``'s with proj_dim N); as a ``BaselinesConfig.with_setting`` dict,
    and how it was chosen."""
    from ..baselines import base_method

    base, fixed = base_method(method)  # trak_k<N>: trak with the proj_dim of its name
    if fixed:
        chosen, how = baseline_setting(base, bcfg, scores_path)
        named = ", ".join(f"{k} {v}" for k, v in fixed.items())
        return {**chosen, **fixed}, f"{how}, {named} from the name {method}"
    if scores_path is not None:
        _, meta = store.dense_scores(scores_path)
        attrs = meta["attrs"]
        tuning = attrs.get("tuning") or {}
        chosen = dict(tuning.get("selected") or {})
        if method == "exact_if":
            if "damping" not in attrs:
                raise store.StoreError(f"{scores_path}: no 'damping' attribute; rerun the baseline_exact_if step")
            chosen = {"damping_grid": [float(attrs["damping"])]}
        return chosen, f"LDS selection ({scores_path})"
    if method == "exact_if":
        return {"damping_grid": [middle(bcfg.exact_if.damping_grid)]}, "middle of baselines.exact_if.damping_grid"
    return {}, f"baselines.{method} values"


# --- the steps -------------------------------------------------------------------------------------

def _noisy(cfg: ExperimentConfig, split_path, flips_path):
    """The experiment's data with the flipped labels of ``flips_path`` (checked against the split)."""
    from .vision import load_checked

    ds = load_checked(cfg, split_path)
    with np.load(flips_path) as f:
        ids, noisy, flipped = f["train_ids"], f["y_noisy"], f["flipped"]
    if not np.array_equal(ids, ds.train_ids):
        raise store.StoreError(f"{flips_path}: its training ids differ from the split's; rerun mislabel_base")
    return dataclasses.replace(ds, y_train=noisy.astype(ds.y_train.dtype)), flipped


def train_noisy_base(cfg: ExperimentConfig, split_path, out_state, out_metrics, out_flips) -> dict:
    """Flip the labels and train theta_0 on them with the base recipe; record the flips and, as a
    reference without attribution, theta_0's loss on each example's (noisy) label."""
    import torch

    from ..models import build_model
    from ..objectives import cross_entropy
    from .vision import load_checked, train_base

    ds = load_checked(cfg, split_path)
    noisy, flipped = flip_labels(ds.y_train, ds.num_classes, cfg.mislabel.fraction, cfg.mislabel.seed)
    metrics = train_base(cfg, split_path, out_state, out_metrics, ds=dataclasses.replace(ds, y_train=noisy))
    net = build_model(cfg.model, ds.X_train.shape[1:], ds.num_classes)
    net.load_state_dict(store.load_state(out_state, "cpu"))
    net.eval()
    with torch.no_grad():
        loss = np.concatenate([cross_entropy(net(torch.as_tensor(ds.X_train[i:i + 500])),
                                             torch.as_tensor(noisy[i:i + 500])).double().numpy()
                               for i in range(0, ds.n, 500)])
    with store.atomic_path(out_flips, suffix=".npz") as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, train_ids=ds.train_ids, y_clean=ds.y_train, y_noisy=noisy, flipped=flipped,
                     theta0_loss=loss)
    log.info("mislabel: %d of %d labels flipped (seed %d)", int(flipped.sum()), ds.n, cfg.mislabel.seed)
    return metrics


def daunce_signals(cfg: ExperimentConfig, split_path, flips_path, theta0_path, variant: str, out,
                   selection_path=None) -> None:
    """Fit the K perturbed models of ``variant`` (of its fit variant for a Q form; daunce's
    settings, one lr chosen as :func:`daunce_lr`) on the noisy data from the noisy theta_0; write
    each training example's signal under each model ([K, n]) and theta_0's label probabilities."""
    import torch

    from ..ensemble import Speed
    from ..fit.chunks import fit_all
    from ..fit.divergence import lr_statistics
    from ..fit.ensemble import EnsembleFitter
    from ..models import build_model, check_state
    from ..utils import pick_device

    lr, how = daunce_lr(cfg, selection_path)
    device = pick_device(cfg.device)
    ds, _ = _noisy(cfg, split_path, flips_path)
    train = (torch.as_tensor(ds.X_train, device=device), torch.as_tensor(ds.y_train, device=device))
    net = build_model(cfg.model, ds.X_train.shape[1:], ds.num_classes).to(device)
    theta0 = check_state(net, store.load_state(theta0_path, device), str(theta0_path))
    dcfg = dataclasses.replace(cfg.daunce, trace_every=0)  # Figure 3's trace: not needed here
    fitter = EnsembleFitter(net, theta0, train, train, variant=fit_variant(variant), cfg=dcfg, train_ids=ds.train_ids,
                            query_ids=ds.train_ids, speed=Speed.from_train(cfg.base))
    # a diverged fit steps down the lr grid: the library's test (fit.divergence.lr_statistics: non-finite or
    # exploded signals, or a training loss grown far beyond theta_0's), which reads no flipped label
    tried = [lr] + sorted((float(v) for v in cfg.daunce.lr_grid if float(v) < lr), reverse=True)
    for lr in tried:
        fits = fit_all(fitter, cfg.daunce.K, cfg.daunce.chunk_size, lr)
        stats = lr_statistics(fits, reliability=False)
        if not stats["diverged"]:
            break
        log.warning("mislabel %s: the fits at lr=%g diverged on the noisy data (%s)", variant, lr, stats["why"])
    else:
        raise ValueError(f"{variant} diverged on the noisy data at lr={tried[0]:g} ({how}) and at every smaller lr of "
                         f"daunce.lr_grid ({stats['why']}); add smaller lrs to daunce.lr_grid")
    if lr != tried[0]:
        gone = ", ".join(f"{v:g}" for v in tried[:tried.index(lr)])
        how = f"{how}; diverged on the noisy data at {gone}: the next smaller lr of daunce.lr_grid"
    signals = fits.train
    with store.atomic_path(out, suffix=".npz") as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, signals=signals.astype(np.float32), p0_train=fits.p0_train, train_ids=ds.train_ids,
                     lr=lr, how=how, variant=fit_variant(variant))
    log.info("mislabel %s: K=%d fits at lr=%g (%s)", variant, len(signals), lr, how)


def _check_baseline(method: str) -> None:
    if not mislabel_baseline(method):
        raise ValueError(f"mislabel: unknown baseline {method!r}; choose from {', '.join(MISLABEL_BASELINES)} "
                         "or trak_k<N> (TRAK with proj_dim N)")


def self_influence(method: str, problem, bcfg, wd) -> np.ndarray:
    """A baseline's self-influence [n] on ``problem`` (theta_0 and its training set): the diagonal
    of its adapter's scores (``baselines.run_baseline``'s, one setting: ``bcfg``'s) with the
    training set as queries and the training loss as query function -- for TRAK (trak_k<N>,
    trak_ens) traker's own margin and out-to-loss weight, for trak_ens summed over its ensemble as
    traker does, for if_iter dattri's solve with its eigenpairs checked. ``wd``: a scratch folder."""
    from ..baselines import _one as run_one
    from ..baselines import check_scores

    _check_baseline(method)
    bcfg = dataclasses.replace(bcfg, measurement="loss", tune={}).with_setting(method, {})  # trak_k<N>: proj_dim N
    if method in ("graddot", "tracin"):  # the diagonal alone: one gradient per example and checkpoint
        from ..baselines.dattri_methods import replay_checkpoints, tracin_self_influence

        if method == "graddot":
            return tracin_self_influence(problem, bcfg)
        states, weights, _ = replay_checkpoints(problem, bcfg.tracin.checkpoints)
        return tracin_self_influence(problem, bcfg, states, weights)
    ds = problem.ds
    problem = dataclasses.replace(problem, ds=dataclasses.replace(ds, X_query=ds.X_train, y_query=ds.y_train,
                                                                  query_ids=ds.train_ids), cache={})
    scores, _ = run_one(method, problem, bcfg, wd, None)
    return np.diag(check_scores(scores, problem.n, problem.n, method)).astype(np.float64)


def baseline_self_influence(method: str, cfg: ExperimentConfig, bcfg, split_path, flips_path, theta0_path, out,
                            scores_path=None) -> None:
    """One baseline's :func:`self_influence` on the noisy data and theta_0, at the setting
    :func:`baseline_setting` chooses."""
    from ..baselines import load_problem, workdir

    _check_baseline(method)
    setting_, how = baseline_setting(method, bcfg, scores_path)
    bcfg = bcfg.with_setting(method, setting_)
    problem = load_problem(cfg, split_path, theta0_path)
    ds, _ = _noisy(cfg, split_path, flips_path)
    problem.ds = ds
    with workdir(out, method) as wd:
        self_scores = self_influence(method, problem, bcfg, wd / "s0")
    with store.atomic_path(out, suffix=".npz") as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, self_influence=self_scores, train_ids=ds.train_ids, how=how,
                     setting=json.dumps(setting_))
    log.info("mislabel %s: self-influence with %s (%s)", method, setting_ or "its section's values", how)


def _self_scores(method: str, path) -> tuple[np.ndarray, np.ndarray, str, str]:
    """(self-influence [n], training ids, the measure, how its setting was chosen) of a step's file."""
    with np.load(path) as f:
        if "signals" in f:
            if fit_variant(method) != str(f["variant"]):
                raise store.StoreError(f"{path}: fits of {f['variant']}, not of {fit_variant(method)}")
            s = self_influence_daunce(f["signals"], method, f["p0_train"])
            return s, f["train_ids"], "covariance", f"lr {float(f['lr']):g} ({f['how']})"
        return f["self_influence"], f["train_ids"], "score", f"{f['setting']} ({f['how']})"


def table(cfg: ExperimentConfig, files: dict[str, str], flips_path, out_csv, out_md, seed: int = 0) -> list[dict]:
    """The AUC of every method's self-influence (files: {method: its file}) with its 95% CI, then
    two references: theta_0's own training loss (``theta0_loss``, no attribution) and a random
    ranking's 0.5; as CSV and markdown."""
    with np.load(flips_path) as f:
        flipped, ids, loss = f["flipped"].astype(bool), f["train_ids"], f["theta0_loss"]
    rows = []
    for method, path in [*files.items(), ("theta0_loss", None)]:
        if path is None:  # the reference without attribution: theta_0's own loss on the noisy label
            s, measure, how = loss, "loss", "no attribution: theta_0's training loss"
        else:
            s, sids, measure, how = _self_scores(method, path)
            if not np.array_equal(sids, ids):
                raise store.StoreError(f"{path}: its training ids differ from {flips_path}'s; rerun its step")
        lo, hi = auc_ci(s, flipped, cfg.mislabel.bootstrap, seed)
        rows.append({"method": method, "measure": measure,
                     "auc": detection_auc(s, flipped), "ci_low": lo, "ci_high": hi, "random": 0.5,
                     "n_train": len(ids), "n_flipped": int(flipped.sum()), "setting": how})
    fields = list(rows[0])
    with store.atomic_path(out_csv, suffix=".csv") as tmp:
        with open(tmp, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=fields)
            w.writeheader()
            w.writerows(rows)
    lines = [f"Mislabelled-example detection ({cfg.experiment}): {rows[0]['n_flipped']} of {rows[0]['n_train']} "
             f"training labels flipped (seed {cfg.mislabel.seed}); ROC AUC of ranking by self-influence, "
             "largest first, with a 95% bootstrap CI over the examples. theta0_loss ranks by theta_0's own "
             "loss on the noisy label (no attribution); a random ranking scores 0.5.", "",
             "| method | self-influence | AUC | 95% CI | setting |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['measure']} | {r['auc']:.3f} | [{r['ci_low']:.3f}, {r['ci_high']:.3f}] "
                     f"| {r['setting']} |")
    lines.append("| random | - | 0.500 | - | - |")
    with store.atomic_path(out_md, suffix=".md") as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    return rows
