"""The steps of the vision experiments (Section 4.1, Figure 1, Table 3, Figures 5-6) as functions.

Each function is one workflow rule's science: it takes an :class:`ExperimentConfig` and paths,
and writes its outputs atomically. The Snakemake scripts only unpack arguments and call these,
so every step runs (and is tested) without Snakemake.
"""
from __future__ import annotations

import csv
import json
import logging
import math
import shutil
from pathlib import Path

from typing import TYPE_CHECKING

import numpy as np

from . import lds as L
from . import store
from .config import ExperimentConfig
from .data import Dataset, load_dataset

if TYPE_CHECKING:
    import torch

# torch and the trainers are imported inside the functions that train: the scoring, LDS and
# figure steps then start in well under a second.

log = logging.getLogger(__name__)


# --- data and theta_0 ----------------------------------------------------------------------------

def prepare_data(cfg: ExperimentConfig, out: str | Path) -> Dataset:
    """Load (downloading if allowed) the dataset and record the example ids of the split."""
    ds = load_dataset(cfg.data)
    with store.atomic_path(out, suffix=".npz") as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, train_ids=ds.train_ids, query_ids=ds.query_ids,
                     y_train=ds.y_train, y_query=ds.y_query)
    log.info("dataset %s: %d training and %d query examples", cfg.data.name, ds.n, ds.m)
    return ds


def load_checked(cfg: ExperimentConfig, split_path: str | Path | None = None) -> Dataset:
    """Load the dataset and check it still matches the recorded split (ids and labels)."""
    ds = load_dataset(cfg.data)
    if split_path is not None:
        rec = np.load(split_path)
        if not (np.array_equal(rec["train_ids"], ds.train_ids) and np.array_equal(rec["query_ids"], ds.query_ids)):
            raise store.StoreError(f"{split_path}: the recorded split differs from the dataset the config "
                                   "loads now (data settings changed?); delete results of this experiment")
    return ds


def _factory(cfg: ExperimentConfig, ds: Dataset):
    from .models import build_model

    return lambda: build_model(cfg.model, ds.X_train.shape[1:], ds.num_classes)


def save_state(state: dict[str, "torch.Tensor"], path: str | Path) -> None:
    from safetensors.torch import save_file

    with store.atomic_path(path, suffix=".safetensors") as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(tmp))


def load_state(path: str | Path, device) -> dict[str, "torch.Tensor"]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device=str(device))
    except Exception as exc:
        raise store.StoreError(f"{path}: cannot read theta_0 ({exc}); rerun the base rule") from exc


def train_base(cfg: ExperimentConfig, split_path: str | Path, out_state: str | Path, out_metrics: str | Path) -> dict:
    """Train theta_0 on the full training set with the base recipe; record its accuracy."""
    import torch

    from . import ensemble as E
    from . import objectives as obj
    from .utils import pick_device

    device = pick_device(cfg.device)
    ds = load_checked(cfg, split_path)
    X = torch.as_tensor(ds.X_train, device=device)
    y = torch.as_tensor(ds.y_train, device=device)
    net, p, b = E.fit_from_scratch(_factory(cfg, ds), X, y, [np.arange(ds.n)], [(cfg.base.seed, 0, 0, 11)],
                                   cfg.base, augment=cfg.base.augment)
    metrics = {}
    for name, Xs, ys in (("train", X, y), ("query", torch.as_tensor(ds.X_query, device=device),
                                            torch.as_tensor(ds.y_query, device=device))):
        logits = E.predict(net, p, b, Xs)[0]
        metrics[f"{name}_accuracy"] = float((logits.argmax(-1) == ys).float().mean())
        metrics[f"{name}_loss"] = float(obj.cross_entropy(logits, ys).mean())
    save_state({**E.unstack(p, 0), **E.unstack(b, 0)}, out_state)
    with store.atomic_path(out_metrics, suffix=".json") as tmp:
        tmp.write_text(json.dumps(metrics, indent=2))
    log.info("theta_0: %s", metrics)
    return metrics


# --- perturbed fits ------------------------------------------------------------------------------

def chunk_models(K: int, chunk_size: int, chunk: int) -> list[int]:
    """The model indices k of chunk ``chunk``."""
    ks = list(range(chunk * chunk_size, min(K, (chunk + 1) * chunk_size)))
    if not ks:
        raise ValueError(f"chunk {chunk} is empty for K={K} and chunk_size={chunk_size}")
    return ks


def n_chunks(total: int, chunk_size: int) -> int:
    return max(1, math.ceil(total / chunk_size))


def perturbed_chunk(cfg: ExperimentConfig, split_path, theta0_path, variant: str, lrs: list[float], chunk: int,
                    outs: list[str | Path]) -> None:
    """Fit the perturbed models of one chunk, for each learning rate of the grid, and record every
    example's signal (loss, or margin for DAUNCE-T) under each model in ``outs`` (one per lr)."""
    import torch

    from . import ensemble as E
    from . import objectives as obj
    from .utils import pick_device

    if len(lrs) != len(outs):
        raise ValueError(f"{len(lrs)} learning rates but {len(outs)} output files")
    device = pick_device(cfg.device)
    ds = load_checked(cfg, split_path)
    X = torch.as_tensor(ds.X_train, device=device)
    y = torch.as_tensor(ds.y_train, device=device)
    Xq = torch.as_tensor(ds.X_query, device=device)
    yq = torch.as_tensor(ds.y_query, device=device)
    net = _factory(cfg, ds)().to(device)
    theta_0 = load_state(theta0_path, device)
    p0, b0 = E.split_state(net, theta_0)
    logits0 = E.predict(net, E.stack_states([p0], device), E.stack_states([b0], device), X)[0]
    ks = chunk_models(cfg.daunce.K, cfg.daunce.chunk_size, chunk)
    signal = obj.signal_of(variant)
    for lr, out in zip(lrs, outs):
        params, buffers = E.fit_perturbed(net, theta_0, X, y, ks, variant=variant, cfg=cfg.daunce, lr=lr,
                                          logits0=logits0)
        train_sig = E.signals(E.predict(net, params, buffers, X), y, signal).cpu().numpy()
        query_sig = E.signals(E.predict(net, params, buffers, Xq), yq, signal).cpu().numpy()
        attrs = {"variant": variant, "signal": signal, "seed": cfg.daunce.seed, "lr": lr,
                 "config": _daunce_attrs(cfg), "experiment": cfg.experiment}
        bad = ~(np.isfinite(train_sig).all(1) & np.isfinite(query_sig).all(1))
        if bad.any():
            # an expected outcome of a grid search: record it, the selection skips this lr
            reason = (f"{int(bad.sum())} of {len(ks)} models non-finite at lr={lr:g} "
                      f"(first k={ks[int(np.argmax(bad))]})")
            log.warning("%s %s", variant, reason)
            store.write_diverged(out, attrs, reason)
            continue
        store.write_losses(out, store.Losses(train_sig, query_sig, np.asarray(ks), ds.train_ids, ds.query_ids,
                                             attrs=attrs))


def _daunce_attrs(cfg: ExperimentConfig) -> dict:
    d = cfg.daunce
    return {"ratio": d.ratio, "epochs": d.epochs, "batch_size": d.batch_size, "optimizer": d.optimizer,
            "rho": d.rho, "gamma": d.gamma, "prox": d.prox, "data": cfg.data.name, "arch": cfg.model.arch}


# --- LDS ground truth ----------------------------------------------------------------------------

def ground_truth_chunk(cfg: ExperimentConfig, split_path, split: str, chunk: int, out: str | Path) -> None:
    from .utils import pick_device

    device = pick_device(cfg.device)
    ds = load_checked(cfg, split_path)
    mask_index, masks = L.masks_for(cfg, split, ds.n)
    sl = slice(chunk * cfg.lds.chunk_size, (chunk + 1) * cfg.lds.chunk_size)
    if not len(mask_index[sl]):
        raise ValueError(f"LDS chunk {chunk} of split {split!r} is empty")
    outputs = L.retrain_outputs(cfg, ds, masks[sl], mask_index[sl], device)
    store.write_ground_truth(out, masks=masks[sl], outputs=outputs, train_ids=ds.train_ids,
                             query_ids=ds.query_ids, mask_index=mask_index[sl],
                             attrs={"split": split, "alpha": cfg.lds.alpha, "experiment": cfg.experiment})


# --- scoring, learning-rate selection, LDS -------------------------------------------------------

def scores_from_losses(losses: store.Losses, measure: str) -> np.ndarray:
    from .scoring import pairwise_scores

    return pairwise_scores(losses.train, losses.query, measure=measure)


def thresholded(scores: np.ndarray, threshold: dict) -> np.ndarray:
    """Apply the configured score thresholding (``lds.threshold``) to dense scores [n, m]."""
    from .scoring import quantile_lambda, threshold_scores

    kind = threshold.get("kind", "none")
    if kind == "none":
        return scores
    if kind == "topk":
        return threshold_scores(scores, "topk", k=int(threshold["k"]))
    return threshold_scores(scores, kind, lam=quantile_lambda(scores, float(threshold["quantile"])))


def select_lr(cfg: ExperimentConfig, variant: str, loss_paths: dict[float, str], gt_select_path,
              out_losses, out_json) -> float:
    """Pick the learning rate with the best LDS on the *selection* masks (never the test masks)."""
    gt = store.read_ground_truth(gt_select_path)
    if gt["attrs"].get("split") != "select":
        raise store.StoreError(f"{gt_select_path}: not the selection split (split="
                               f"{gt['attrs'].get('split')!r}); refusing to select on test masks")
    table = []
    for lr, path in sorted(loss_paths.items()):
        if store.is_diverged(path):
            table.append({"lr": lr, "lds_select": None, "diverged": True})
            log.info("%s lr=%g: diverged, skipped", variant, lr)
            continue
        losses = store.read_losses(path)
        scores = thresholded(scores_from_losses(losses, cfg.daunce.select_measure), cfg.lds.threshold)
        res, _ = L.evaluate(scores, gt, n_resamples=200)
        table.append({"lr": lr, "lds_select": res.lds})
        log.info("%s lr=%g: selection LDS %.4f", variant, lr, res.lds)
    ok = [r for r in table if r["lds_select"] is not None]
    if not ok:
        raise ValueError(f"{variant}: every learning rate of the grid diverged "
                         f"({sorted(loss_paths)}); add smaller values to daunce.lr_grid")
    best = max(ok, key=lambda r: r["lds_select"])
    with store.atomic_path(out_losses, suffix=".h5") as tmp:
        shutil.copyfile(loss_paths[best["lr"]], tmp)
    with store.atomic_path(out_json, suffix=".json") as tmp:
        tmp.write_text(json.dumps({"variant": variant, "selected_lr": best["lr"], "grid": table,
                                   "selected_on": "select masks", "measure": cfg.daunce.select_measure},
                                  indent=2))
    return best["lr"]


def score_losses(losses_path, out, measure: str, method: str | None = None) -> None:
    """Dense scores of a losses file (the embedded scale; large runs use scoring.score_file)."""
    losses = store.read_losses(losses_path)
    scores = scores_from_losses(losses, measure)
    store.write_scores(out, scores=scores, train_ids=losses.train_ids, query_ids=losses.query_ids,
                       attrs={"method": method or losses.attrs.get("variant", "?"), "measure": measure,
                              "threshold": "none", "K": losses.K})


def evaluate_scores(cfg: ExperimentConfig, scores_path, gt_path, method: str, measure: str, out_json) -> dict:
    """LDS of one scores file, raw and thresholded, with bootstrap CIs."""
    scores, meta = store.dense_scores(scores_path)
    gt = store.read_ground_truth(gt_path)
    if gt["attrs"].get("split") != "test":
        raise store.StoreError(f"{gt_path}: LDS is reported on the test masks only")
    if not np.array_equal(meta["train_ids"], gt["train_ids"]) or not np.array_equal(meta["query_ids"], gt["query_ids"]):
        raise store.StoreError(f"{scores_path}: example ids differ from the ground truth {gt_path}")
    rows = []
    th = cfg.lds.threshold
    for label, s in (("none", scores), (_threshold_label(th), thresholded(scores, th))):
        res, pq = L.evaluate(s, gt, n_resamples=cfg.lds.bootstrap, seed=cfg.lds.seed)
        rows.append({"method": method, "measure": measure, "threshold": label, "lds": res.lds,
                     "ci_low": res.ci_low, "ci_high": res.ci_high, "n_queries": res.n_queries,
                     "n_masks": int(gt["masks"].shape[0])})
    with store.atomic_path(out_json, suffix=".json") as tmp:
        tmp.write_text(json.dumps(rows, indent=2))
    return {"rows": rows}


def _threshold_label(th: dict) -> str:
    kind = th.get("kind", "none")
    if kind == "none":
        return "none"
    if kind == "topk":
        return f"topk(k={th['k']})"
    return f"{kind}(q={th['quantile']})"


LDS_COLUMNS = ["method", "measure", "threshold", "lds", "ci_low", "ci_high", "n_queries", "n_masks"]


def lds_table(json_paths: list[str], out_csv) -> list[dict]:
    rows = []
    for p in json_paths:
        rows.extend(json.loads(Path(p).read_text()))
    with store.atomic_path(out_csv, suffix=".csv") as tmp:
        with open(tmp, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=LDS_COLUMNS)
            w.writeheader()
            for r in rows:
                w.writerow({k: (f"{r[k]:.4f}" if isinstance(r[k], float) else r[k]) for k in LDS_COLUMNS})
    return rows


def read_lds_table(path) -> list[dict]:
    with open(path) as fh:
        rows = list(csv.DictReader(fh))
    for r in rows:
        for k in ("lds", "ci_low", "ci_high"):
            r[k] = float(r[k])
    return rows


def k_curve(cfg: ExperimentConfig, losses_path, gt_path, measure: str, out_csv) -> list[dict]:
    """LDS of the first K' perturbed models for each K' in ``daunce.k_curve`` (Figure 6)."""
    losses = store.read_losses(losses_path)
    gt = store.read_ground_truth(gt_path)
    rows = []
    for k in sorted(set(int(v) for v in cfg.daunce.k_curve) | {losses.K}):
        if k > losses.K:
            raise ValueError(f"daunce.k_curve asks for K={k} but {losses_path} has only {losses.K} models")
        sub = store.Losses(losses.train[:k], losses.query[:k], losses.model_index[:k], losses.train_ids,
                           losses.query_ids, losses.attrs)
        s = thresholded(scores_from_losses(sub, measure), cfg.lds.threshold)
        res, _ = L.evaluate(s, gt, n_resamples=cfg.lds.bootstrap, seed=cfg.lds.seed)
        rows.append({"K": k, "lds": res.lds, "ci_low": res.ci_low, "ci_high": res.ci_high})
    with store.atomic_path(out_csv, suffix=".csv") as tmp:
        with open(tmp, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=["K", "lds", "ci_low", "ci_high"])
            w.writeheader()
            w.writerows(rows)
    return rows
