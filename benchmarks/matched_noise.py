"""Matched-noise DAUNCE (``daunce_m``) on the embedded default: its settings and its K-curve.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/matched_noise.py tune    # selection masks only
    PYTHONPATH=$PWD .venv/bin/python benchmarks/matched_noise.py kcurve  # K = 1000 once, prefixes

Reads a run of the workflow's data, theta_0 and LDS ground-truth steps on ``config/config.yaml``
(``snakemake -c2 results/digits_mlp/lds/select.h5 results/digits_mlp/lds/test.h5``), and, if
present, exact IF's and its reference's scores (``results/digits_mlp/scores/exact_if/score.h5``,
``.../limit_daunce_m/score.h5``).

* ``tune``: every combination of ``--lrs``, ``--scales``, ``--proxes`` and ``--ratios`` at
  ``--K`` models, each scored by its raw LDS (no thresholding) on the **selection** masks and
  queries with covariance; one csv row each (``--out``, default docs/matched_noise_tune.csv).
* ``kcurve``: the chosen setting (``--lr --scale --prox --ratio``) fitted once at K = 1000 (models
  keyed by (seed, k): a prefix of K' models is what a run with K = K' fits), then the prefixes
  K' in ``--ks`` scored with covariance and correlation; raw LDS on the selection and on the test
  masks (``--out``, default docs/matched_noise_kcurve.csv), with exact IF's test LDS beside it.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import itertools
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from daunce_core import lds as L
from daunce_core import store
from daunce_core.config import ExperimentConfig
from daunce_core.fit import chunks
from daunce_core.scoring import pairwise_scores
from daunce_core.steps.vision import ensemble_fitter

ROOT = Path(__file__).resolve().parents[1]


def load(results: Path, configfile: Path):
    cfg = ExperimentConfig.from_dict(yaml.safe_load(configfile.read_text())).validate()
    run = results / cfg.experiment
    gts = {s: store.read_ground_truth(run / "lds" / f"{s}.h5") for s in ("select", "test")}
    return cfg, run, gts


def raw_lds(signals, gt: dict, measure: str, K: int | None = None) -> float:
    """Mean per-query LDS of the first K models' scores, no thresholding, on ``gt``'s queries."""
    keep = np.isin(signals.query_ids, gt["query_ids"])
    tr, qu = signals.train[:K], signals.query[:K, keep]
    scores = pairwise_scores(tr, qu, measure=measure)
    scores, _ = L.align_to_ground_truth(scores, signals.train_ids, signals.query_ids[keep], gt)
    return float(L.evaluate(scores, gt, n_resamples=200)[0].lds)


def fit(cfg, run: Path, K: int, lr: float, scale: float, prox: float, ratio: float, epochs: int | None):
    d = dataclasses.replace(cfg.daunce, matched_scale=scale, matched_prox=prox, matched_ratio=ratio,
                            matched_epochs=epochs or cfg.daunce.matched_epochs, trace_every=0)
    cfg = dataclasses.replace(cfg, daunce=d)
    fitter = ensemble_fitter(cfg, run / "data" / "split.npz", run / "base" / "theta_0.safetensors", "daunce_m")
    t0 = time.perf_counter()
    sig = chunks.fit_all(fitter, K, min(K, 200), lr)
    return sig, time.perf_counter() - t0


def reference_lds(run: Path, gt: dict, method: str) -> float | None:
    path = run / "scores" / method / "score.h5"
    if not path.exists():
        return None
    scores, meta = store.dense_scores(path)
    scores, _ = L.align_to_ground_truth(scores, meta["train_ids"], meta["query_ids"], gt, path)
    return float(L.evaluate(scores, gt, n_resamples=200)[0].lds)


def write(rows: list[dict], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with store.atomic_path(out, suffix=".csv") as tmp, open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {out}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=("tune", "kcurve"))
    ap.add_argument("--configfile", type=Path, default=ROOT / "config" / "config.yaml")
    ap.add_argument("--results", type=Path, default=ROOT / "results")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--K", type=int, default=200, help="tune: models per setting")
    ap.add_argument("--epochs", type=int, help="perturbed epochs (default: daunce.matched_epochs)")
    ap.add_argument("--lrs", type=float, nargs="+", default=[0.3, 0.1, 0.03])
    ap.add_argument("--scales", type=float, nargs="+", default=[0.1, 1.0])
    ap.add_argument("--proxes", type=float, nargs="+", default=[1e-3, 1e-2, 1e-1])
    ap.add_argument("--ratios", type=float, nargs="+", default=[1.0, 0.3])
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--scale", type=float, default=0.1)
    ap.add_argument("--prox", type=float, default=1e-2)
    ap.add_argument("--ratio", type=float, default=1.0)
    ap.add_argument("--ks", type=int, nargs="+", default=[50, 100, 200, 500, 1000])
    a = ap.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    cfg, run, gts = load(a.results, a.configfile)
    epochs = a.epochs or cfg.daunce.matched_epochs
    rows = []
    if a.what == "tune":
        for lr, scale, prox, ratio in itertools.product(a.lrs, a.scales, a.proxes, a.ratios):
            sig, secs = fit(cfg, run, a.K, lr, scale, prox, ratio, epochs)
            ok = bool(np.isfinite(sig.train).all() and np.isfinite(sig.query).all())
            v = raw_lds(sig, gts["select"], "covariance") if ok else float("nan")
            rows.append({"K": a.K, "epochs": epochs, "lr": lr, "scale": scale, "prox": prox, "ratio": ratio,
                         "lds_select_cov_raw": round(v, 4), "fit_seconds": round(secs, 1)})
            print(rows[-1], flush=True)
        write(rows, a.out or ROOT / "docs" / "matched_noise_tune.csv")
        return
    sig, secs = fit(cfg, run, max(a.ks), a.lr, a.scale, a.prox, a.ratio, epochs)
    ref = {m: reference_lds(run, gts["test"], m) for m in ("exact_if", "limit_daunce_m")}
    for K in a.ks:
        row = {"K": K, "epochs": epochs, "lr": a.lr, "scale": a.scale, "prox": a.prox, "ratio": a.ratio}
        for split, measure in itertools.product(("select", "test"), ("covariance", "correlation")):
            row[f"lds_{split}_{measure[:3]}_raw"] = round(raw_lds(sig, gts[split], measure, K), 4)
        row.update({f"{m}_test_raw": None if v is None else round(v, 4) for m, v in ref.items()})
        row["fit_seconds_K1000"] = round(secs, 1)
        rows.append(row)
        print(row, flush=True)
    write(rows, a.out or ROOT / "docs" / "matched_noise_kcurve.csv")


if __name__ == "__main__":
    main()
