"""Cost of Figure 3's log: perturbed fits with and without the per-term gradient norms.

    .venv/bin/python benchmarks/bench_trace.py [--K 100] [--repeats 7] [--threads 2] [--every 10 2 1]

Fits the K perturbed models of the embedded default (digits, MLP, config/config.yaml's daunce
settings, variant ``daunce``) as one vmapped chunk, alternating ``daunce.trace_every`` = 0 (no log)
and each value of ``--every``, and prints the median wall time of each and its overhead. A logged
step costs one extra backward pass (the ERM term's gradient; the first-order term's is the
difference), so the expected overhead is about one backward per ``trace_every`` steps.
"""
from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np
from _embedded import embedded_theta0  # noqa: E402  (benchmarks/, next to this script)

from daunce_core import ensemble as E
from daunce_core.utils import pick_device, set_threads


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--K", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--every", type=int, nargs="+", default=[10, 2, 1])
    args = ap.parse_args()
    set_threads(args.threads)
    device = pick_device(args.device)
    cfg, X, y, net, theta0 = embedded_theta0(device)
    ks = list(range(args.K))
    times: dict[int, list[float]] = {e: [] for e in [0, *args.every]}
    for _ in range(args.repeats):  # interleaved, so a change of machine load hits every setting alike
        for every in times:
            d = dataclasses.replace(cfg.daunce, trace_every=every)
            out = {} if every else None
            t0 = time.perf_counter()
            E.fit_perturbed(net, theta0, X, y, ks, variant="daunce", cfg=d, lr=0.01, trace_out=out)
            times[every].append(time.perf_counter() - t0)
    base = float(np.median(times[0]))
    print(f"device={device} threads={args.threads} K={args.K} repeats={args.repeats}")
    for every, t in times.items():
        med = float(np.median(t))
        label = "no log" if every == 0 else f"trace_every={every}"
        print(f"{label:>16}: median {med:7.3f} s  overhead {100 * (med / base - 1):+5.0f}%")


if __name__ == "__main__":
    main()
