"""The steps of the vision experiments (Section 4.1, Figure 1, Table 3, Figures 5-6) as functions.

Each function is one workflow rule's science: it takes an :class:`ExperimentConfig` and paths,
and writes its outputs atomically. The Snakemake scripts only unpack arguments and call these,
so every step runs (and is tested) without Snakemake. The perturbed fits go through the fitter
contract (:class:`daunce_core.fit.ensemble.EnsembleFitter` and :mod:`daunce_core.fit.chunks`), as
the LLM and black-box fitters do.
"""
from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import numpy as np

from .. import lds as L
from .. import store
from ..config import ExperimentConfig, q_weighted
from ..data import Dataset, load_dataset
from ..fit import chunks
from ..fit.chunks import q_train, score_variant  # noqa: F401  (the steps' names)
from ..perturb import theta0_key
from ..scoring import apply_threshold, pairwise_scores, scored_threshold

# torch and the trainers are imported inside the functions that train: the scoring, LDS and
# figure steps then start in well under a second.

log = logging.getLogger(__name__)


# --- data and theta_0 ----------------------------------------------------------------------------

def prepare_data(cfg: ExperimentConfig, out: str | Path) -> Dataset:
    """Load (downloading if allowed) the dataset and record the example ids of the split."""
    ds = load_dataset(cfg.data)
    store.save_split(out, ds.train_ids, ds.query_ids, ds.y_train, ds.y_query, ds.content_hash)
    log.info("dataset %s: %d training and %d query examples", cfg.data.name, ds.n, ds.m)
    return ds


def load_checked(cfg: ExperimentConfig, split_path: str | Path | None = None) -> Dataset:
    """Load the dataset and check it still matches the recorded split (its example ids and data)."""
    ds = load_dataset(cfg.data)
    if split_path is not None:
        store.check_split(split_path, ds.train_ids, ds.query_ids, ds.content_hash, ds.source)
    return ds


def fit_theta0(cfg: ExperimentConfig, ds: Dataset, device):
    """theta_0: the base recipe on all of ``ds``'s training set from the initialisation and data
    order keyed by :func:`daunce_core.perturb.theta0_key`; (net, params, buffers), stacked [1, ...]."""
    import torch

    from .. import ensemble as E
    from ..models import model_factory

    X = torch.as_tensor(ds.X_train, device=device)
    y = torch.as_tensor(ds.y_train, device=device)
    factory = model_factory(cfg.model, ds.X_train.shape[1:], ds.num_classes)
    return E.fit_from_scratch(factory, X, y, [np.arange(ds.n)], [theta0_key(cfg.base.seed)],
                              cfg.base, augment=cfg.base.augment)


def train_base(cfg: ExperimentConfig, split_path: str | Path, out_state: str | Path, out_metrics: str | Path,
               ds: Dataset | None = None) -> dict:
    """Train theta_0 on the full training set with the base recipe (:func:`fit_theta0`); record its
    accuracy. ``ds``: the data to train on (default: the experiment's, checked against the split)."""
    import torch

    from .. import ensemble as E
    from .. import objectives as obj
    from ..utils import pick_device

    device = pick_device(cfg.device)
    ds = ds if ds is not None else load_checked(cfg, split_path)
    X = torch.as_tensor(ds.X_train, device=device)
    y = torch.as_tensor(ds.y_train, device=device)
    net, p, b = fit_theta0(cfg, ds, device)
    metrics = {}
    for name, Xs, ys in (("train", X, y), ("query", torch.as_tensor(ds.X_query, device=device),
                                            torch.as_tensor(ds.y_query, device=device))):
        logits = E.predict(net, p, b, Xs)[0]
        metrics[f"{name}_accuracy"] = float((logits.argmax(-1) == ys).float().mean())
        metrics[f"{name}_loss"] = float(obj.cross_entropy(logits, ys).mean())
    store.save_state({**E.unstack(p, 0), **E.unstack(b, 0)}, out_state)
    with store.atomic_path(out_metrics, suffix=".json") as tmp:
        tmp.write_text(json.dumps(metrics, indent=2))
    log.info("theta_0: %s", metrics)
    return metrics


# --- perturbed fits ------------------------------------------------------------------------------

def ensemble_fitter(cfg: ExperimentConfig, split_path, theta0_path, variant: str):
    """The classifier fitter of ``variant`` on the experiment's data and theta_0."""
    import torch

    from ..ensemble import Speed
    from ..fit.ensemble import EnsembleFitter
    from ..models import build_model, check_state
    from ..utils import pick_device

    device = pick_device(cfg.device)
    ds = load_checked(cfg, split_path)
    train = (torch.as_tensor(ds.X_train, device=device), torch.as_tensor(ds.y_train, device=device))
    query = (torch.as_tensor(ds.X_query, device=device), torch.as_tensor(ds.y_query, device=device))
    net = build_model(cfg.model, ds.X_train.shape[1:], ds.num_classes).to(device)
    theta0 = check_state(net, store.load_state(theta0_path, device), str(theta0_path))  # keys, shapes, finite
    return EnsembleFitter(net, theta0, train, query, variant=variant,
                          cfg=cfg.daunce, train_ids=ds.train_ids, query_ids=ds.query_ids,
                          speed=Speed.from_train(cfg.base))


def perturbed_chunk(cfg: ExperimentConfig, split_path, theta0_path, variant: str, lrs: list[float], chunk: int,
                    outs: list[str | Path]) -> None:
    """Fit the perturbed models of one chunk, for each learning rate of the grid, and record every
    example's signal (loss, or margin for DAUNCE-T) under each model in ``outs`` (one per lr)."""
    if len(lrs) != len(outs):
        raise ValueError(f"{len(lrs)} learning rates but {len(outs)} output files")
    fitter = ensemble_fitter(cfg, split_path, theta0_path, variant)
    ks = chunks.chunk_models(cfg.daunce.K, cfg.daunce.chunk_size, chunk)
    chunks.run_chunk(fitter, ks, lrs, outs, {"config": losses_config(cfg), "experiment": cfg.experiment})


def losses_config(cfg: ExperimentConfig) -> dict:
    """The ``config`` attribute of the experiment's losses files (:func:`daunce_core.fit.chunks.losses_config`)."""
    return chunks.losses_config(cfg.daunce, data=cfg.data.name, arch=cfg.model.arch)


# --- LDS ground truth ----------------------------------------------------------------------------

def ground_truth_chunk(cfg: ExperimentConfig, split_path, split: str, chunk: int, out: str | Path) -> None:
    """Retrain on one chunk of the masks of ``split``; keep the margins of that split's queries only."""
    from ..utils import pick_device

    device = pick_device(cfg.device)
    ds = load_checked(cfg, split_path)
    mask_index, masks = L.masks_for(cfg, split, ds.n)
    sl = slice(chunk * cfg.lds.chunk_size, (chunk + 1) * cfg.lds.chunk_size)
    if not len(mask_index[sl]):
        raise ValueError(f"LDS chunk {chunk} of split {split!r} is empty")
    outputs = L.retrain_outputs(cfg, ds, masks[sl], mask_index[sl], device)
    q = L.query_positions(cfg, split, ds.m)  # selection queries for "select", test queries for "test"
    store.write_ground_truth(out, masks=masks[sl], outputs=outputs[:, :, q], train_ids=ds.train_ids,
                             query_ids=ds.query_ids[q], mask_index=mask_index[sl],
                             attrs={"split": split, "alpha": cfg.lds.alpha, "experiment": cfg.experiment,
                                    "select_fraction": cfg.lds.select_fraction, "n_queries_all": ds.m})


# --- scoring, learning-rate selection, LDS -------------------------------------------------------

def scores_from_losses(losses: store.Losses, measure: str, variant: str | None = None) -> np.ndarray:
    """Dense scores [n, m] of losses already in memory (the selection and K-curve steps); a
    ``daunce_t_q`` form gets TRAK's Q on the training side (:func:`q_train`)."""
    scores = pairwise_scores(losses.train, losses.query, measure=measure)
    if variant is not None and q_weighted(variant):
        scores *= q_train(losses)[:, None]
    return scores


def select_lr(cfg: ExperimentConfig, variant: str, loss_paths: dict[float, str], gt_select_path,
              out_losses, out_json) -> float:
    """Pick the learning rate with the best LDS on the *selection* masks (never the test masks)."""
    gt = store.read_ground_truth(gt_select_path)
    if gt["attrs"].get("split") != "select":
        raise store.StoreError(f"{gt_select_path}: not the selection split (split="
                               f"{gt['attrs'].get('split')!r}); refusing to select on test masks")

    measure = cfg.daunce.measure_for(variant)  # covariance for daunce_m

    def selection_lds(losses: store.Losses) -> float:
        return selection_score(cfg, losses, gt, measure, gt_select_path, variant)

    return chunks.select_lr(loss_paths, selection_lds, out_losses, out_json,
                            {"variant": variant, "selected_on": "select masks and select queries",
                             "n_select_queries": len(gt["query_ids"]), "n_select_masks": len(gt["masks"]),
                             "measure": measure},
                            key="lds_select", grid_option="daunce.lr_grid")


def selection_score(cfg: ExperimentConfig, losses: store.Losses, gt: dict, measure: str, gt_path="select",
                    variant: str | None = None) -> float:
    """Mean LDS of ``losses``' raw scores on the selection ground truth ``gt``: its masks and its
    queries only. No thresholding: every selection, DAUNCE's and the baselines', uses the raw LDS."""
    sub = L.restrict_queries(losses, gt)
    scores, notices = L.align_to_ground_truth(scores_from_losses(sub, measure, variant), sub.train_ids,
                                              sub.query_ids, gt, getattr(losses, "source", None) or "losses",
                                              gt_path, sub.attrs)
    for notice in notices:
        log.warning("%s", notice)
    return float(L.per_query_lds(scores, gt["masks"], gt["outputs"]).mean())


def evaluate_scores(cfg: ExperimentConfig, scores_path, gt_path, method: str, measure: str, out_json,
                    tuning: dict | None = None) -> dict:
    """LDS of one scores file on the test masks and test queries, raw and thresholded
    (``lds.threshold``), with CIs from one joint bootstrap over masks and queries; each row keeps
    its bootstrap replicates (``replicates``) for the paired differences of
    :func:`daunce_core.lds.paired_table`. ``tuning`` (a selection record: ``selected``, ``on_edge``; default: the scores
    file's ``tuning`` attribute, which the baselines write) labels the rows."""
    scores, meta = store.dense_scores(scores_path)
    if scored_threshold(meta["attrs"])["kind"] != "none":  # its row "none" would not be raw
        raise store.StoreError(f"{scores_path}: its scores were thresholded when scored "
                               f"({scored_threshold(meta['attrs'])}); the LDS table reports raw and "
                               "lds.threshold scores: rescore without a threshold")
    gt = store.read_ground_truth(gt_path)
    if gt["attrs"].get("split") != "test":
        raise store.StoreError(f"{gt_path}: LDS is reported on the test masks only")
    scores, notices = L.align_to_ground_truth(scores, meta["train_ids"], meta["query_ids"], gt, scores_path,
                                              gt_path, meta["attrs"])
    for notice in notices:
        log.warning("%s", notice)
    tuned, on_edge = L.tuning_label(tuning if tuning is not None else meta["attrs"].get("tuning"))
    rows = []
    th = cfg.lds.threshold
    labelled = [("none", scores)]
    if th.get("kind", "none") != "none":
        labelled.append((L.threshold_label(th), apply_threshold(scores, th)))
    results = L.evaluate_many([s for _, s in labelled], gt, n_resamples=cfg.lds.bootstrap, seed=cfg.lds.seed)
    boot = {"resample": "masks and queries", "n_resamples": int(cfg.lds.bootstrap), "seed": int(cfg.lds.seed)}
    for (label, _), (res, _) in zip(labelled, results):
        rows.append({"method": method, "measure": measure, "threshold": label, "lds": res.lds,
                     "ci_low": res.ci_low, "ci_high": res.ci_high, "n_queries": res.n_queries,
                     "n_masks": int(gt["masks"].shape[0]), "tuned": tuned, "on_edge": on_edge,
                     "bootstrap": boot, "replicates": [round(float(v), 6) for v in res.replicates]})
    with store.atomic_path(out_json, suffix=".json") as tmp:
        tmp.write_text(json.dumps(rows, indent=2))
    return {"rows": rows}


def k_curve(cfg: ExperimentConfig, losses_path, gt_path, measure: str, out_csv,
            variant: str | None = None) -> list[dict]:
    """LDS of the first K' perturbed models for each K' in ``daunce.k_curve`` (Figure 6), on the
    test masks and test queries."""
    gt = store.read_ground_truth(gt_path)
    losses = L.restrict_queries(store.read_losses(losses_path), gt)
    rows = []
    for k in sorted(set(int(v) for v in cfg.daunce.k_curve) | {losses.K}):
        if k > losses.K:
            raise ValueError(f"daunce.k_curve asks for K={k} but {losses_path} has only {losses.K} models")
        sub = store.Losses(losses.train[:k], losses.query[:k], losses.model_index[:k], losses.train_ids,
                           losses.query_ids, losses.attrs, p0_train=losses.p0_train)
        s, notices = L.align_to_ground_truth(scores_from_losses(sub, measure, variant), sub.train_ids,
                                             sub.query_ids, gt, losses_path, gt_path, sub.attrs)
        for notice in notices if k == losses.K else ():  # the same join for every prefix: say it once
            log.warning("%s", notice)
        res, _ = L.evaluate(s, gt, n_resamples=cfg.lds.bootstrap, seed=cfg.lds.seed)  # raw, as every LDS
        rows.append({"K": k, "lds": res.lds, "ci_low": res.ci_low, "ci_high": res.ci_high})
    with store.atomic_path(out_csv, suffix=".csv") as tmp:
        with open(tmp, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=["K", "lds", "ci_low", "ci_high"])
            w.writeheader()
            w.writerows(rows)
    return rows
