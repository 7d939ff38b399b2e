"""The ``daunce`` command: perturbed fits, scoring, LDS evaluation and file inspection without Snakemake.

    daunce fit --configfile CONFIG.yaml [--configfile MORE.yaml] [-o LOSSES.h5] [--variant V]
               [--lr X] [--theta0 STATE.safetensors]
    daunce score LOSSES.h5 -o SCORES.h5 [--measure correlation|covariance] [--topk N]
                 [--threshold none|soft|hard [--lambda X]] [--memory-gb G] [--reliability]
    daunce lds SCORES.h5 GROUND_TRUTH.h5 [--threshold soft|hard [--quantile 0.9] |
                 --threshold topk [--k 100]] [--bootstrap B]
    daunce info FILE.h5

An error is one line naming the file, key or option, with exit status 1 (2 for a bad command
line), and it leaves every file as it was: an output that is an input, a directory, a device or
under a file is refused before any work, options that would do nothing are refused, and SIGTERM
or Ctrl-C remove the temporary output (exit status 143 or 130). ``daunce lds`` pairs scores with
ground truth on example ids, reordering (with a note on stderr) when only the order differs,
and prints the LDS with the threshold options it applied. A top-k scores file (``daunce score
--topk k``) counts the scores it lacks as 0; it takes ``--threshold topk`` with ``--k`` up to its k,
not a quantile threshold (the quantile of all n scores of a query is not in it).
A losses file without ids (written by another tool) is scored with ids 0..n-1 and 0..m-1, with
a note on stderr.

``daunce fit`` runs the K perturbed fits of an experiment config (the workflow's layout: several
``--configfile`` are merged in order, nested keys one by one, later files winning) and writes the
losses file, for users who only want scores. Keys that no file sets take the library defaults of
daunce_core/config.py, not the workflow's config/config.yaml (which an installed ``daunce`` may
not have): to start from the workflow's settings, pass that file first. The K, epochs and
learning rate used are printed on stderr before the fits. theta_0 is loaded from ``--theta0``
(the workflow's ``base`` output; its keys and shapes must be those of the config's model) or
trained with the config's ``base`` recipe and not kept. ``-o`` may not name a config file,
theta_0 or a data file of the config (``data.root``, ``data.manifest``).

``daunce score --reliability`` also tells whether K is large enough, without retraining: the
Monte Carlo standard error of each score and the split-K reliability of the scores
(daunce_core/diagnostics.py), printed and stored in the scores file.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

from . import store


def _merge(base: dict, extra: dict) -> dict:
    """``extra`` over ``base``, nested dicts key by key (Snakemake's merge of config files)."""
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _experiment(paths: list[str]):
    import yaml

    from .config import ExperimentConfig

    raw: dict = {}
    for path in paths:
        with open(path) as fh:
            try:
                doc = yaml.safe_load(fh)
            except yaml.YAMLError as exc:
                raise ValueError(f"{path}: not YAML ({' '.join(str(exc).split())})") from None
        if not isinstance(doc, dict):
            raise ValueError(f"{path}: expected a mapping of config keys, got {type(doc).__name__}")
        raw = _merge(raw, doc)
    return ExperimentConfig.from_dict(raw).validate()


def _data_files(data) -> list[str]:
    """The files the data config reads and -o must not replace: ``data.root`` (the .npz of
    ``npz``; a folder is refused as an output anyway) and the id manifest of an image folder."""
    files = [data.root]
    if data.name == "imagefolder":  # a manifest in the folder is read when data.manifest does not exist yet
        from .data import MANIFEST_NAME

        files.append(os.path.join(data.root, MANIFEST_NAME))
    if data.manifest:
        files.append(data.manifest)
    return files


def _fit(args: argparse.Namespace) -> None:
    inputs = [*args.configfile, *([args.theta0] if args.theta0 else [])]
    for path in inputs:
        if not os.path.isfile(path):
            raise ValueError(f"{path}: no such file")
    from .config import Q_FORMS

    cfg = _experiment(args.configfile)
    inputs += _data_files(cfg.data)
    variant = args.variant or cfg.daunce.variants[0]
    if variant in Q_FORMS:  # a scoring form (TRAK's Q), fitted as the workflow fits it
        print(f"daunce fit: note: {variant} is scored from {Q_FORMS[variant]}'s fits, which this writes; "
              "daunce score does not apply its Q", file=sys.stderr)
        variant = Q_FORMS[variant]
    lr = args.lr
    if lr is None:  # the API's default: the label-free rule over the grid (docs/defaults.md)
        lr = float(cfg.daunce.lr_grid[0]) if len(cfg.daunce.lr_grid) == 1 else "auto"
    out = args.output or f"{cfg.experiment}.{variant}.losses.h5"
    store.check_output(out, inputs=inputs)  # before the slow imports and the fits
    from .api import lr_statistics

    signals = _perturbed_fits(cfg, variant, lr, args.theta0)
    lr = signals.attrs.get("lr", lr)
    stats = lr_statistics(signals, cfg.daunce.select_measure, reliability=False)
    if stats["diverged"]:
        raise ValueError(f"the perturbed models diverged at lr={lr:g} ({stats['why']}); nothing written, "
                         "lower --lr")
    from .fit import chunks
    from .steps.vision import losses_config

    chunks.write_signals(out, signals, {"config": losses_config(cfg), "experiment": cfg.experiment, "lr": lr})
    print(f"wrote {out}")


def _perturbed_fits(cfg, variant: str, lr: float, theta0_path: str | None):
    """The K perturbed fits of the workflow's ``perturbed`` rule at one lr, theta_0 loaded or
    trained by the ``base`` rule's step (tests/test_cli.py checks both against
    daunce_core/steps/vision.py)."""
    import torch

    from . import ensemble as E
    from .data import load_dataset
    from .fit import chunks
    from .fit.ensemble import EnsembleFitter
    from .models import build_model, check_state
    from .utils import pick_device

    device = pick_device(cfg.device)
    ds = load_dataset(cfg.data)
    X, y = torch.as_tensor(ds.X_train, device=device), torch.as_tensor(ds.y_train, device=device)
    in_shape = ds.X_train.shape[1:]
    net = build_model(cfg.model, in_shape, ds.num_classes).to(device)
    if theta0_path is not None:  # checked before any note or fit: a wrong file is one line
        theta0 = check_state(net, store.load_state(theta0_path, device), theta0_path)
    d = cfg.daunce
    # the settings used, since keys the config files leave out take daunce_core/config.py's defaults
    from .config import MATCHED_VARIANTS

    dv, key = d.for_variant(variant), "matched_epochs" if variant in MATCHED_VARIANTS else "epochs"
    print(f"daunce fit: K={d.K} perturbed models of {dv.epochs} epoch(s) (daunce.{key}) on r={dv.ratio:g} of "
          f"{ds.n} training examples, lr={lr if lr == 'auto' else format(lr, 'g')}, variant {variant}, "
          f"{cfg.model.arch}", file=sys.stderr)
    if theta0_path is None:  # as the workflow's base step trains it
        from .steps.vision import fit_theta0

        _, p, b = fit_theta0(cfg, ds, device)
        theta0 = {**E.unstack(p, 0), **E.unstack(b, 0)}
        print(f"daunce fit: note: trained theta_0 with the base recipe ({cfg.base.epochs} epochs); pass "
              "--theta0 to reuse one", file=sys.stderr)
    query = (torch.as_tensor(ds.X_query, device=device), torch.as_tensor(ds.y_query, device=device))
    fitter = EnsembleFitter(net, theta0, (X, y), query,
                            variant=variant, cfg=cfg.daunce, train_ids=ds.train_ids, query_ids=ds.query_ids,
                            speed=E.Speed.from_train(cfg.base))
    if lr == "auto":  # the API's label-free rule over daunce.lr_grid (docs/defaults.md)
        from .api import _auto_lr, rule_line

        measure = d.measure_for(variant)
        sig, table = _auto_lr(fitter, cfg.daunce.K, cfg.daunce.chunk_size, [float(v) for v in d.lr_grid], measure)
        print(f"daunce fit: chosen by the plateau rule ({measure}): {rule_line(table, sig.attrs['lr'])}",
              file=sys.stderr)
        sig.attrs = {**sig.attrs, "lr_rule": table}
        return sig
    return chunks.fit_all(fitter, cfg.daunce.K, cfg.daunce.chunk_size, lr)


def _lr_arg(text: str):
    return "auto" if text == "auto" else _number(float, 0.0, above=True)(text)


def _setting(cls: type, name: str):
    """The declaration of a config key (daunce_core/config.py) that an option mirrors."""
    import dataclasses

    return next(f for f in dataclasses.fields(cls) if f.name == name)


def _check_fit(args: argparse.Namespace) -> str | None:
    from .config import DaunceConfig

    choices = _setting(DaunceConfig, "variants").metadata["limits"]["choices"]  # daunce.variants' own
    if args.variant is not None and args.variant not in choices:
        return f"argument --variant: invalid choice {args.variant!r} (choose from {', '.join(choices)})"
    return None


def _score(args: argparse.Namespace) -> None:
    store.check_output(args.output, inputs=[args.losses])  # before the slow imports and reads
    from .scoring import score_file


    kwargs = dict(measure=args.measure, topk=args.topk, threshold=args.threshold,
                  lam=0.0 if args.lam is None else args.lam, memory_gb=args.memory_gb)
    if args.reliability:
        from .diagnostics import score_file_with_diagnostics

        path, diag = score_file_with_diagnostics(args.losses, args.output, **kwargs)
        print(diag.report())
    else:
        path = score_file(args.losses, args.output, **kwargs)
    with store.open_h5(path) as f:
        if f.attrs.get("ids") == "positional":
            print(f"daunce score: note: {args.losses} carries no example ids; scored with default ids "
                  "0..n-1 (training) and 0..m-1 (queries), marked ids=positional", file=sys.stderr)
    print(f"wrote {path}")


def _check_score(args: argparse.Namespace) -> str | None:
    if args.lam is not None and args.threshold not in ("soft", "hard"):
        return (f"--lambda does nothing with --threshold {args.threshold}; add --threshold soft "
                "or hard, or drop --lambda")
    if args.threshold in ("soft", "hard") and args.lam is None:
        return f"--threshold {args.threshold} needs --lambda X (the threshold on the scores)"
    return None


def _lds(args: argparse.Namespace) -> None:
    from . import lds as L
    from .config import THRESHOLD_NEEDS
    from .scoring import apply_threshold, check_threshold_once, scored_threshold

    scores, meta = store.dense_scores(args.scores)
    check_threshold_once(meta["attrs"], args.scores, args.threshold)
    th = {"kind": args.threshold, "quantile": args.quantile, "k": args.k}
    th = {key: value for key, value in th.items() if key == "kind" or key in THRESHOLD_NEEDS[args.threshold]}
    gt = store.read_ground_truth(args.ground_truth)
    if meta["format"] == "topk":  # after every read: a note never precedes an error
        scores, th = _topk_file(args, scores, meta, th)
    # the ground truth may hold a subset of the queries (the test or the selection queries)
    scores, notices = L.align_to_ground_truth(scores, meta["train_ids"], meta["query_ids"], gt, args.scores,
                                              args.ground_truth, meta["attrs"])
    for notice in notices:
        print(f"daunce lds: note: {notice}", file=sys.stderr)
    res, _ = L.evaluate(scores if meta["format"] == "topk" else apply_threshold(scores, th), gt,
                        n_resamples=args.bootstrap)
    report = {"lds": res.lds, "ci_low": res.ci_low, "ci_high": res.ci_high, "n_queries": res.n_queries,
              "threshold": th}
    if scored_threshold(meta["attrs"])["kind"] != "none":  # applied when scored, before this one
        report["scores_threshold"] = scored_threshold(meta["attrs"])
    print(json.dumps(report, indent=2))


def _topk_file(args: argparse.Namespace, dense, meta: dict, th: dict):
    """Scores and threshold of ``daunce lds`` on a top-k scores file [m, k] read as dense (zeros
    elsewhere, i.e. the top-k thresholding of the dense scores). ``--threshold topk --k K`` keeps
    the K best of the file's k (the top-K of the dense scores, which no zero may displace); K
    above the file's k, or a quantile of all n scores (soft/hard), cannot be computed from it."""
    import numpy as np

    indices, values = meta["indices"], meta["values"]
    k_file = indices.shape[1]
    if args.threshold in ("soft", "hard"):
        raise ValueError(f"{args.scores}: holds only the top {k_file} scores of each query, so the "
                         f"--quantile of all its scores (--threshold {args.threshold}) is unknown; "
                         "rescore without --topk, or use --threshold topk --k K or none")
    if args.threshold == "topk":
        if args.k > k_file:
            raise ValueError(f"{args.scores}: holds only the top {k_file} scores of each query, fewer "
                             f"than --k {args.k}; use --k {k_file} or less, or rescore with --topk {args.k}")
        best = np.argsort(-values, axis=1, kind="stable")[:, :args.k]  # best first, whatever the writer
        rows = np.arange(len(values))[:, None]
        dense = np.zeros_like(dense)
        dense[indices[rows, best], rows] = values[rows, best]
        return dense, th
    print(f"daunce lds: note: {args.scores} holds the top {k_file} scores of each query; the other "
          "training examples count as 0", file=sys.stderr)
    return dense, th


def _check_lds(args: argparse.Namespace) -> str | None:
    if args.quantile is not None and args.threshold not in ("soft", "hard"):
        return (f"--quantile does nothing with --threshold {args.threshold}; add --threshold "
                "soft or hard, or drop --quantile")
    if args.k is not None and args.threshold != "topk":
        return (f"--k does nothing with --threshold {args.threshold}; add --threshold topk, or "
                "drop --k")
    args.quantile = 0.9 if args.quantile is None else args.quantile
    args.k = 100 if args.k is None else args.k
    return None


def _info(args: argparse.Namespace) -> None:
    import h5py

    def show(name: str, obj) -> None:
        if isinstance(obj, h5py.Dataset):
            print(f"  {name}: {obj.shape} {obj.dtype}")
        else:
            print(f"  {name}/ (group)")

    with store.open_h5(args.file) as f:
        print(args.file)
        f.visititems(show)
        for key, value in store.read_attrs(f).items():
            print(f"  @{key} = {value}")


def _number(kind: type, low: float, *, above: bool = False, high: float | None = None, below: bool = False):
    """An argparse type: a finite ``kind`` >= ``low`` (> with ``above``), <= ``high`` if given
    (< with ``below``)."""
    what = "a whole number" if kind is int else "a number"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
        if (value < low or (above and value == low) or (high is not None and value > high)
                or (below and value == high)):
            bounds = (f"in {'(' if above else '['}{low}, {high}{')' if below else ']'}" if high is not None
                      else f"{'>' if above else '>='} {low}")
            raise argparse.ArgumentTypeError(f"must be {bounds}, got {text!r}")
        return value

    return parse


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        """One line, like every other error of the command (argparse prints the usage too)."""
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="daunce", description=__doc__,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("fit", help="the K perturbed fits of an experiment config -> a losses file")
    t.add_argument("--configfile", action="append", required=True,
                   help="experiment config (YAML); repeat to merge several, later ones winning; "
                        "keys that no file sets take daunce_core/config.py's defaults (pass "
                        "config/config.yaml first for the workflow's)")
    t.add_argument("-o", "--output", default=None,
                   help="losses HDF5 file to write (default: EXPERIMENT.VARIANT.losses.h5)")
    t.add_argument("--variant", default=None,
                   help="perturbed objective, one of daunce.variants' choices (default: the first of "
                        "daunce.variants)")
    t.add_argument("--lr", type=_lr_arg, default=None,
                   help="learning rate of the perturbed fits, or 'auto': the label-free plateau rule (the "
                        "largest lr whose scores agree with the next smaller lr's) over daunce.lr_grid, K "
                        "models per lr (default: 'auto', the library "
                        "calls' default; daunce.lr_grid's rate when it holds one)")
    t.add_argument("--theta0", default=None,
                   help="theta_0 (safetensors, the workflow's base output); default: train it")
    t.set_defaults(func=_fit, check=_check_fit)

    s = sub.add_parser("score", help="attribution scores from a losses file (train [K,n], query [K,m])")
    s.add_argument("losses", help="losses HDF5 file")
    s.add_argument("-o", "--output", required=True, help="scores HDF5 file to write (atomically)")
    s.add_argument("--measure", choices=["correlation", "covariance"], default="correlation")
    s.add_argument("--topk", type=_number(int, 1), default=None,
                   help="keep the N best training examples per query (default: dense scores)")
    s.add_argument("--threshold", choices=["none", "soft", "hard"], default="none")
    s.add_argument("--lambda", dest="lam", type=_number(float, 0.0), default=None,
                   help="threshold for soft/hard (required by them)")
    s.add_argument("--memory-gb", type=_number(float, 0.0, above=True, high=2.0**20), default=4.0,
                   help="peak memory budget of the scoring; dense scores larger than it are "
                        "refused (use --topk)")
    s.add_argument("--reliability", action="store_true",
                   help="also the Monte Carlo standard error of each score and the split-K "
                        "reliability (is K large enough?), printed and stored in the scores file; "
                        "about 5x the scoring's arithmetic")
    s.set_defaults(func=_score, check=_check_score)

    q = sub.add_parser("lds", help="LDS of a scores file against LDS ground truth")
    q.add_argument("scores")
    q.add_argument("ground_truth")
    q.add_argument("--threshold", choices=["none", "soft", "hard", "topk"], default="none")
    q.add_argument("--quantile", type=_number(float, 0.0, high=1.0, below=True), default=None,
                   help="per-query quantile of |scores| in [0, 1) used as lambda by soft/hard "
                        "(0.9); dense scores files only")
    q.add_argument("--k", type=_number(int, 1), default=None,
                   help="scores kept per query by topk (100); at most the k of a top-k scores file")
    q.add_argument("--bootstrap", type=_number(int, 1), default=2000,
                   help="bootstrap resamples of the 95%% confidence interval")
    q.set_defaults(func=_lds, check=_check_lds)

    i = sub.add_parser("info", help="print the datasets and attributes of a daunce HDF5 file")
    i.add_argument("file")
    i.set_defaults(func=_info, check=lambda args: None)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the command; return its exit status (also for a bad command line: no SystemExit)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        problem = args.check(args)
        if problem:
            parser.exit(2, f"daunce {args.command}: error: {problem}\n")
    except SystemExit as exc:  # argparse has printed its one line (or the help)
        return exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 2
    with store.cleanup_on_signals():
        try:
            args.func(args)
        except (store.StoreError, ValueError, OSError, RuntimeError) as exc:  # DataError too
            message = " ".join(str(exc).split())
            print(f"daunce {args.command}: error: {message}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print(f"daunce {args.command}: interrupted; no output was written", file=sys.stderr)
            return 130
        except store.Terminated as exc:
            print(f"daunce {args.command}: terminated by signal {exc.signum}; no output was "
                  "written", file=sys.stderr)
            return 128 + exc.signum
    return 0


if __name__ == "__main__":
    sys.exit(main())
