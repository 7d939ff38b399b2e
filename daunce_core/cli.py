"""The ``daunce`` command: scoring, LDS evaluation and file inspection without Snakemake.

    daunce score LOSSES.h5 -o SCORES.h5 [--measure correlation|covariance] [--topk N]
                 [--threshold none|soft|hard --lambda X] [--memory-gb G]
    daunce lds SCORES.h5 GROUND_TRUTH.h5 [--threshold hard --quantile 0.9]
    daunce info FILE.h5
"""
from __future__ import annotations

import argparse
import json
import sys

from . import store


def _score(args: argparse.Namespace) -> None:
    from .scoring import score_file

    path = score_file(args.losses, args.output, measure=args.measure, topk=args.topk,
                      threshold=args.threshold, lam=args.lam, memory_gb=args.memory_gb)
    print(f"wrote {path}")


def _lds(args: argparse.Namespace) -> None:
    from . import lds as L
    from .scoring import apply_threshold

    scores, _ = store.dense_scores(args.scores)
    gt = store.read_ground_truth(args.ground_truth)
    th = {"kind": args.threshold, "quantile": args.quantile, "k": args.k}
    res, _ = L.evaluate(apply_threshold(scores, th), gt, n_resamples=args.bootstrap)
    print(json.dumps({"lds": res.lds, "ci_low": res.ci_low, "ci_high": res.ci_high,
                      "n_queries": res.n_queries, "threshold": th}, indent=2))


def _info(args: argparse.Namespace) -> None:
    import h5py

    with store._open(args.file) as f:
        print(args.file)
        for key, ds in f.items():
            print(f"  {key}: {ds.shape} {ds.dtype}")
        for key, value in store._attrs(f).items():
            print(f"  @{key} = {value}")
    del h5py


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="daunce", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("score", help="attribution scores from a losses file (train [K,n], query [K,m])")
    s.add_argument("losses", help="losses HDF5 file")
    s.add_argument("-o", "--output", required=True, help="scores HDF5 file to write (atomically)")
    s.add_argument("--measure", choices=["correlation", "covariance"], default="correlation")
    s.add_argument("--topk", type=int, default=None, help="keep the N best training examples per query")
    s.add_argument("--threshold", choices=["none", "soft", "hard"], default="none")
    s.add_argument("--lambda", dest="lam", type=float, default=0.0, help="threshold for soft/hard")
    s.add_argument("--memory-gb", type=float, default=4.0, help="peak memory budget of the scoring")
    s.set_defaults(func=_score)

    q = sub.add_parser("lds", help="LDS of a scores file against LDS ground truth")
    q.add_argument("scores")
    q.add_argument("ground_truth")
    q.add_argument("--threshold", choices=["none", "soft", "hard", "topk"], default="none")
    q.add_argument("--quantile", type=float, default=0.9)
    q.add_argument("--k", type=int, default=100)
    q.add_argument("--bootstrap", type=int, default=2000)
    q.set_defaults(func=_lds)

    i = sub.add_parser("info", help="print the datasets and attributes of a daunce HDF5 file")
    i.add_argument("file")
    i.set_defaults(func=_info)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (store.StoreError, ValueError, OSError) as exc:
        print(f"daunce {args.command}: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
