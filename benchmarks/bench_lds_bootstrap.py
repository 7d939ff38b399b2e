#!/usr/bin/env python
"""Cost of the LDS's joint bootstrap over masks and queries (``daunce_core.lds``).

Prints figures; it is not a timed test. At the embedded default's sizes (M = 100 test masks,
m = 210 test queries, 2000 draws; one ``lds_eval`` job evaluates a method's raw and thresholded
scores together), it times:

* ``lds.evaluate_many`` of two score matrices (what one ``lds_eval`` job does), joint bootstrap;
* ``lds.evaluate(..., resample="queries")`` of one matrix, the query-only bootstrap it replaces;
* the reference: scipy's ``rankdata`` of every resampled column, for one batch of draws, scaled
  to all draws (what the rank shortcut avoids), and the largest difference between the two.

Run: ``.venv/bin/python benchmarks/bench_lds_bootstrap.py [--M 100] [--m 210] [--draws 2000]``.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from daunce_core import lds as L  # noqa: E402
from daunce_core.perturb import lds_masks  # noqa: E402
from daunce_core.scoring import apply_threshold  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--M", type=int, default=100)
    ap.add_argument("--m", type=int, default=210)
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--draws", type=int, default=2000)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    masks = lds_masks(0, args.M, args.n, 0.5)
    a = rng.normal(size=(args.n, args.m))
    gt = {"masks": masks, "outputs": (masks @ a + rng.normal(scale=5.0, size=(args.M, args.m)))[None]}
    scores = (a + rng.normal(size=a.shape)).astype(np.float32)
    thresholded = apply_threshold(scores, {"kind": "hard", "quantile": 0.9})

    t = time.perf_counter()
    (raw, _), (thr, _) = L.evaluate_many([scores, thresholded], gt, n_resamples=args.draws)
    joint_s = time.perf_counter() - t
    t = time.perf_counter()
    q, _ = L.evaluate(scores, gt, n_resamples=args.draws, resample="queries")
    query_s = time.perf_counter() - t

    actual, predicted = L.predictions(scores, masks, gt["outputs"])
    mc, _ = next(L.bootstrap_draws(args.M, args.m, min(50, args.draws), 0))
    t = time.perf_counter()
    ref = np.empty((len(mc), args.m))
    for b, counts in enumerate(mc):
        idx = np.repeat(np.arange(args.M), counts)
        ref[b] = L.per_query_lds_arrays(predicted[idx], actual[idx])
    ref_s = (time.perf_counter() - t) * args.draws / len(mc)
    diff = np.abs(L.resampled_spearman(predicted, actual, mc) - ref).max()

    print(f"sizes: M={args.M} masks, m={args.m} queries, n={args.n}, {args.draws} draws")
    print(f"joint bootstrap, raw + thresholded (one lds_eval job): {joint_s:.2f} s")
    print(f"  raw LDS {raw.lds:.4f} [{raw.ci_low:.4f}, {raw.ci_high:.4f}], "
          f"thresholded {thr.lds:.4f} [{thr.ci_low:.4f}, {thr.ci_high:.4f}]")
    print(f"query-only bootstrap, raw alone: {query_s:.2f} s, CI [{q.ci_low:.4f}, {q.ci_high:.4f}]")
    print(f"re-ranking every resample with scipy.stats.rankdata, one matrix (projected): {ref_s:.2f} s; "
          f"largest difference from the rank shortcut {diff:.2e}")


if __name__ == "__main__":
    main()
