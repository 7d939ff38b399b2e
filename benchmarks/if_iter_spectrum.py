"""The Arnoldi eigenpairs behind if_iter on an experiment's theta_0 (docs/regime.md).

For each ``regularization:proj_dim:max_iter`` it runs the adapter's Arnoldi iteration (dattri's,
as ``baselines.if_iter`` does) on the Hessian of the mean training loss plus ``regularization I``
and prints, and writes as JSON, what decides whether the scores are usable: how many of the kept
eigenvalues are negative, the smallest magnitude, the largest relative residual
``||(H + lambda I) v - theta v|| / |theta|`` and the kept vectors' orthogonality error. With
``--explicit`` the residuals are also recomputed with one Hessian-vector product per eigenpair.

    PYTHONPATH=$PWD python benchmarks/if_iter_spectrum.py --config results/fmnist_mlp_regime/config.yaml \\
        --theta0 results/fmnist_mlp_regime/base/theta_0.safetensors 0.01:200:200 0.01:200:400 \\
        --out docs/regime/tier1/if_iter_spectrum.json

A ``--theta0`` that does not exist is trained there first with the config's base recipe
(``pipeline.train_base``, the base rule's call).
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from daunce_core.baselines.common import load_problem
from daunce_core.baselines.dattri_methods import RITZ_RTOL, _batch_functions, _signed_arnoldi
from daunce_core.config import ExperimentConfig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, required=True, help="an effective config (results/<experiment>/config.yaml)")
    ap.add_argument("--theta0", type=Path, required=True)
    ap.add_argument("--split", type=Path, help="default: data/split.npz beside --config")
    ap.add_argument("--explicit", action="store_true", help="also recompute each residual by an HVP")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path)
    ap.add_argument("settings", nargs="+", help="regularization:proj_dim:max_iter")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from dattri.algorithm import influence_function as F
    from dattri.task import AttributionTask

    cfg = ExperimentConfig.from_dict(yaml.safe_load(args.config.read_text())).validate()
    split = args.split or args.config.parent / "data" / "split.npz"
    if not args.theta0.exists():
        from daunce_core.pipeline import train_base

        train_base(cfg, split, args.theta0, args.theta0.with_suffix(".metrics.json"))
    problem = load_problem(cfg, split, args.theta0, torch.device("cpu"))
    model = copy.deepcopy(problem.model).eval()
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    loss_func, target_func = _batch_functions(model, "margin", problem.ds.X_train.ndim - 1)
    sha = hashlib.sha256(args.theta0.read_bytes()).hexdigest()
    rows = []
    for spec in args.settings:
        lam, k, it = float(spec.split(":")[0]), int(spec.split(":")[1]), int(spec.split(":")[2])
        task = AttributionTask(loss_func=loss_func, model=model, checkpoints=state, target_func=target_func)
        attributor = _signed_arnoldi(F)(task=task, proj_dim=k, max_iter=max(it, k), regularization=lam)
        t = time.perf_counter()
        attributor.cache(problem.loader("train", problem.n))
        row = {"theta0": str(args.theta0), "theta0_sha256": sha[:16],
               "regularization": lam, "proj_dim": k, "max_iter": it, "parameters": problem.num_params(),
               "n_train": problem.n, "arnoldi_seconds": round(time.perf_counter() - t, 1), **attributor.spectra[0],
               "converged_rtol": RITZ_RTOL}
        if args.explicit:
            pr = attributor.projectors[0]
            with torch.no_grad():
                res = [float(torch.linalg.norm(pr.hvp_at_x_func(v) - e * v) / e.abs())
                       for v, e in zip(pr.eigvecs, pr.eigvals)]
            row["explicit_max_relative_residual"] = max(res)
            row["explicit_unconverged"] = int(np.sum(np.array(res) > RITZ_RTOL))
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
