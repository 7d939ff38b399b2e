"""Matched-noise DAUNCE (``daunce_m``, the library calls' default variant) on a finished tier-1 run.

    PYTHONPATH=$PWD python benchmarks/regime_matched.py RESULTS/fmnist_mlp_regime --out DIR [--lrs 0.01 0.003 0.001]

``config/regime/tier1.yaml`` fits the paper's four variants only (docs/regime.md). This script adds
``daunce_m`` to a finished run of it through the workflow's own steps, on that run's data, theta_0
and LDS ground truth, so its row is on equal footing with the run's ``lds.csv``:

* K = 200 (storage-matched to the other DAUNCE rows) perturbed fits through
  :func:`daunce_core.api.fit_losses` at the library's matched-noise settings (scale 0.1, proximal
  damping 0.01, 20 epochs of every example, antithetic pairs, common batch orders; docs/defaults.md),
  one fit per lr of ``--lrs`` (3 settings, within the run's ``baselines.max_settings``);
* the lr chosen on the run's *selection* masks and queries
  (:func:`daunce_core.steps.vision.select_lr`, as every DAUNCE variant of the run);
* scored by covariance and evaluated on the test masks and queries by
  :func:`daunce_core.steps.vision.evaluate_scores` (raw and thresholded, the joint bootstrap with
  the run's seed), then paired with the run's own rows (:func:`daunce_core.lds.paired_rows`).

Writes ``DIR/losses_lr<lr>.h5``, ``selection.json``, ``scores.h5``, ``eval.json`` and
``matched.csv`` (the LDS rows, the selection table and the paired differences against the run's
baselines), and prints ``matched.csv``. Why not in the workflow: the run's ``daunce`` section
holds one lr grid and one set of estimator options for every variant, and matched noise's
differ (docs/regime.md).
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from daunce_core import api, store
from daunce_core import lds as L
from daunce_core.config import ExperimentConfig
from daunce_core.data import load_dataset
from daunce_core.fit.chunks import score_variant
from daunce_core.models import build_model
from daunce_core.steps.vision import evaluate_scores, select_lr

COMPARED = ("trak_k200", "trak_k1000", "trak_k4000", "trak_ens", "logra", "ekfac", "graddot", "tracin", "if_iter",
            "daunce", "daunce_e", "daunce_t", "daunce_t_q")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, help="a finished tier-1 experiment folder (results/fmnist_mlp_regime)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--lrs", type=float, nargs="+", default=[0.01, 0.003, 0.001])
    ap.add_argument("--K", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    run, out = args.run, args.out
    for need in ("config.yaml", "data/split.npz", "base/theta_0.safetensors", "lds/select.h5", "lds/test.h5"):
        if not (run / need).is_file():
            raise SystemExit(f"{run / need}: missing; run the tier-1 workflow first (docs/regime.md)")
    torch.set_num_threads(args.threads)
    cfg = ExperimentConfig.from_dict(yaml.safe_load((run / "config.yaml").read_text()))
    ds = load_dataset(cfg.data)
    split = np.load(run / "data" / "split.npz")
    if not (np.array_equal(ds.train_ids, split["train_ids"]) and np.array_equal(ds.query_ids, split["query_ids"])):
        raise SystemExit(f"{run}/data/split.npz: the data loaded from its config.yaml are not the run's examples")
    net = build_model(cfg.model, ds.X_train.shape[1:], ds.num_classes)
    net.load_state_dict(store.load_state(run / "base" / "theta_0.safetensors", "cpu"))
    net.eval()
    train = (torch.as_tensor(ds.X_train), torch.as_tensor(ds.y_train))
    query = (torch.as_tensor(ds.X_query), torch.as_tensor(ds.y_query))
    out.mkdir(parents=True, exist_ok=True)
    paths, seconds = {}, {}
    for lr in args.lrs:
        paths[lr] = out / f"losses_lr{lr:g}.h5"
        t0 = time.perf_counter()
        if not paths[lr].is_file():
            api.fit_losses(net, None, train, query, variant="daunce_m", K=args.K, lr=lr, device="cpu",
                           train_ids=ds.train_ids, query_ids=ds.query_ids, out=paths[lr])
        seconds[lr] = time.perf_counter() - t0
        print(f"daunce_m lr={lr:g}: {seconds[lr]:.0f} s", flush=True)
    chosen = select_lr(cfg, "daunce_m", paths, run / "lds" / "select.h5", out / "losses.h5", out / "selection.json")
    score_variant("daunce_m", out / "losses.h5", out / "scores.h5", "covariance")
    evaluate_scores(cfg, out / "scores.h5", run / "lds" / "test.h5", "daunce_m", "covariance", out / "eval.json")
    mine = json.loads((out / "eval.json").read_text())
    theirs = [r for p in sorted((run / "lds" / "eval").rglob("*.json")) for r in json.loads(p.read_text())]
    paired = L.paired_rows(mine + theirs, ["daunce_m"], COMPARED)
    selection = json.loads((out / "selection.json").read_text())
    rows = [{"kind": "lds", "method": r["method"], "measure": r["measure"], "threshold": r["threshold"],
             "value": r["lds"], "ci_low": r["ci_low"], "ci_high": r["ci_high"], "note": f"lr {chosen:g}"}
            for r in mine]
    rows += [{"kind": "selection", "method": "daunce_m", "measure": "covariance", "threshold": "none",
              "value": g.get("lds_select"), "ci_low": "", "ci_high": "",
              "note": f"lr {g['lr']:g}" + (" diverged" if g.get("diverged") else "")
              + f", fit {seconds[g['lr']]:.0f} s" + (" (chosen)" if g["lr"] == chosen else "")}
             for g in selection["grid"]]
    rows += [{"kind": "paired", "method": f"daunce_m - {p['versus']}", "measure": p["versus_measure"],
              "threshold": p["threshold"], "value": p["diff"], "ci_low": p["ci_low"], "ci_high": p["ci_high"],
              "note": ""} for p in paired if p["kind"] == "method"]
    with store.atomic_path(out / "matched.csv", suffix=".csv") as tmp:
        with open(tmp, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]))
            w.writeheader()
            for r in rows:
                w.writerow({k: f"{v:.4f}" if isinstance(v, float) else v for k, v in r.items()})
    sys.stdout.write((out / "matched.csv").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
