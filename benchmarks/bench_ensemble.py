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

import numpy as np
from _embedded import embedded_theta0  # noqa: E402  (benchmarks/, next to this script)

from daunce_core import ensemble as E
from daunce_core.utils import pick_device, set_threads


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--K", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--variant", default="daunce")
    args = ap.parse_args()
    set_threads(args.threads)
    device = pick_device(args.device)
    cfg, X, y, net, theta0 = embedded_theta0(device)
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
    steps = len(range(0, int(round(cfg.daunce.ratio * len(y))) // cfg.daunce.batch_size)) * cfg.daunce.epochs
    print(f"device={device} threads={args.threads} K={args.K} variant={args.variant} "
          f"n={len(y)} epochs={cfg.daunce.epochs} steps/model={steps} lr={lr}")
    print(f"batched (one vmapped chunk of {args.K}): {t_batched:8.3f} s")
    print(f"one by one (loop over {args.K} models):  {t_single:8.3f} s")
    ratio = t_single / t_batched
    print(f"speed-up: {ratio:.1f}x  (goal >= 10x: {'met' if ratio >= 10 else 'MISSED'})")
    print(f"max |loss difference| batched vs one by one: {np.abs(batched - single).max():.2e}")


if __name__ == "__main__":
    main()
