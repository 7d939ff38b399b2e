"""Batched perturbed fits against the same fits one by one (issue: goal >= 10x batched).

    .venv/bin/python benchmarks/bench_ensemble.py [--K 100] [--threads 2] [--device auto]

Trains the K perturbed models of the embedded default (digits, MLP, config/config.yaml's daunce
settings, variant ``daunce``) twice in the same run: as one vmapped chunk of K, and one model after
another (``mode="loop"``: plain forward/backward of one model per step, the same schedule,
objective, optimiser and per-model randomness, so the same models). Prints wall times, the
speed-up, and the largest difference between the two sets of losses.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from daunce_core import ensemble as E
from daunce_core.config import ExperimentConfig
from daunce_core.data import load_dataset
from daunce_core.models import build_model
from daunce_core.utils import pick_device, set_threads

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--K", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--variant", default="daunce")
    args = ap.parse_args()
    set_threads(args.threads)
    cfg = ExperimentConfig.from_dict(yaml.safe_load((ROOT / "config" / "config.yaml").read_text())).validate()
    device = pick_device(args.device)
    ds = load_dataset(cfg.data)
    X = torch.as_tensor(ds.X_train, device=device)
    y = torch.as_tensor(ds.y_train, device=device)
    factory = lambda: build_model(cfg.model, ds.X_train.shape[1:], ds.num_classes)  # noqa: E731
    net, p, b = E.fit_from_scratch(factory, X, y, [np.arange(ds.n)], [(0,)], cfg.base)
    theta0 = {**E.unstack(p, 0), **E.unstack(b, 0)}
    lr = cfg.daunce.lr_grid[1]
    ks = list(range(args.K))

    def losses(pp, bb):
        return E.signals(E.predict(net, pp, bb, X), y, "loss").cpu().numpy()

    E.fit_perturbed(net, theta0, X, y, ks[:2], variant=args.variant, cfg=cfg.daunce, lr=lr)  # warm-up
    t0 = time.perf_counter()
    batched = losses(*E.fit_perturbed(net, theta0, X, y, ks, variant=args.variant, cfg=cfg.daunce, lr=lr))
    t_batched = time.perf_counter() - t0
    t0 = time.perf_counter()
    single = losses(*E.fit_perturbed(net, theta0, X, y, ks, variant=args.variant, cfg=cfg.daunce, lr=lr,
                                     mode="loop"))
    t_single = time.perf_counter() - t0
    steps = len(range(0, int(round(cfg.daunce.ratio * ds.n)) // cfg.daunce.batch_size)) * cfg.daunce.epochs
    print(f"device={device} threads={args.threads} K={args.K} variant={args.variant} "
          f"n={ds.n} epochs={cfg.daunce.epochs} steps/model={steps} lr={lr}")
    print(f"batched (one vmapped chunk of {args.K}): {t_batched:8.3f} s")
    print(f"one by one (loop over {args.K} models):  {t_single:8.3f} s")
    ratio = t_single / t_batched
    print(f"speed-up: {ratio:.1f}x  (goal >= 10x: {'met' if ratio >= 10 else 'MISSED'})")
    print(f"max |loss difference| batched vs one by one: {np.abs(batched - single).max():.2e}")


if __name__ == "__main__":
    main()
