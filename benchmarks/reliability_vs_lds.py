"""Do the diagnostics of ``daunce score --reliability`` predict the LDS?

    .venv/bin/python benchmarks/reliability_vs_lds.py [--configfile config/config.yaml]
        [--results results] [--out results/reliability.csv] [--all-lrs] [--splits 4]

Reads a finished run of the workflow: the losses of each variant in ``daunce.variants``
(``results/{experiment}/daunce/{variant}/losses.h5``, the selected learning rate; with
``--all-lrs`` instead every ``lr*/losses.h5`` of the grid that did not diverge) and the test ground truth
(``results/{experiment}/lds/test.h5``). For each losses file and each K' of ``daunce.k_curve``
(and the file's K) it scores the first K' models (correlation, as Figure 6) and computes

* the diagnostics, from those K' models alone: split-half reliability rho_h, its Spearman-Brown
  reliability R(K') at K', the median Monte Carlo SE, the share of |score| > 2 SE, the K needed
  for reliability 0.9 (daunce_core/diagnostics.py);
* the test LDS of the raw scores and of the scores thresholded as ``lds.threshold``;
* two predictions from the attenuation law LDS(K) ~ LDS(oo) sqrt(R(K)) (diagnostics.py):
  ``lds_pred_from_full``, LDS(K') predicted from the full-K LDS and the two reliabilities, and
  ``lds_full_pred``, the full-K LDS predicted from this prefix alone (R at the full K from
  Spearman-Brown on the prefix's halves): what a user with K' models learns about adding more;
  and ``lds_limit``, LDS(K') / sqrt(R(K')), the same law extrapolated to K -> oo (checked here
  only up to the run's K).

It writes one CSV row per (file, K') and prints: the rank correlation of reliability and LDS over
all rows (within a file both grow with K', so this is mostly that), across settings at their
full K (does a more reliable setting score better? reliability measures Monte Carlo noise, not
bias), the errors of both predictions (by K' for the second), and the rank correlation across
queries of per-query reliability and per-query LDS (does it flag the queries scored poorly?).
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np
import yaml
from scipy import stats

from daunce_core import diagnostics as D
from daunce_core import lds as L
from daunce_core import store
from daunce_core.config import ExperimentConfig
from daunce_core.scoring import apply_threshold, pairwise_scores

ROOT = Path(__file__).resolve().parents[1]
COLUMNS = ["variant", "lr", "K", "half_reliability", "reliability", "se_median", "share_above_2se",
           "K_needed_0.9", "lds", "lds_thresholded", "lds_pred_from_full", "lds_full_pred",
           "lds_limit"]


def losses_files(results: Path, exp: str, variants: list[str], all_lrs: bool) -> list[tuple]:
    """(variant, path) of each losses file present; missing or diverged ones are named on stderr.
    With ``all_lrs`` the grid's files replace the selected one (a copy of one of them)."""
    out = []
    for v in variants:
        folder = results / exp / "daunce" / v
        for p in sorted(folder.glob("lr*/losses.h5")) if all_lrs else [folder / "losses.h5"]:
            if not p.is_file():
                print(f"reliability_vs_lds: note: {p} is missing; skipped", file=sys.stderr)
            elif store.is_diverged(p):
                print(f"reliability_vs_lds: note: {p} diverged; skipped", file=sys.stderr)
            else:
                out.append((v, p))
    return out


def rows_of(variant: str, path: Path, cfg: ExperimentConfig, gt: dict, splits: int):
    losses = store.read_losses(path)
    tag = f"{float(losses.attrs['lr']):g}" if "lr" in losses.attrs else "?"
    for key, ids in (("train_ids", losses.train_ids), ("query_ids", losses.query_ids)):
        if not np.array_equal(ids, gt[key]):
            raise SystemExit(f"{path}: '{key}' differ from the ground truth's; run both from the "
                             "same experiment")
    masks, outputs = gt["masks"], gt["outputs"]
    rows, per_query = [], None
    for k in sorted({int(v) for v in cfg.daunce.k_curve if v <= losses.K} | {losses.K}):
        train, query = losses.train[:k], losses.query[:k]
        d = D.diagnose(train, query, "correlation", splits=splits)
        s = pairwise_scores(train, query, "correlation")
        pq = L.per_query_lds(s, masks, outputs)
        lds_th = float(L.per_query_lds(apply_threshold(s, cfg.lds.threshold), masks, outputs).mean())
        r_full = float(D.spearman_brown(d.mean_half, losses.K / d.half))
        rows.append({"variant": variant, "lr": tag, "K": k, "half_reliability": d.mean_half,
                     "reliability": d.mean_reliability, "se_median": d.se_quantiles["q50"],
                     "share_above_2se": d.share_significant, "K_needed_0.9": d.K_needed,
                     "lds": float(pq.mean()), "lds_thresholded": lds_th,
                     "_r_full_from_here": r_full})
        if k == losses.K:
            per_query = stats.spearmanr(d.reliability, pq).statistic
    full = rows[-1]
    for r in rows:  # the attenuation law needs R > 0: NaN where the halves do not agree at all
        ok = r["reliability"] > 0 and full["reliability"] > 0
        r["lds_pred_from_full"] = (full["lds"] * np.sqrt(r["reliability"] / full["reliability"])
                                   if ok else np.nan)
        # R(K) predicted from this prefix's halves, against R(K') from the same halves
        r_full = r.pop("_r_full_from_here")
        r["lds_full_pred"] = (r["lds"] * np.sqrt(r_full / r["reliability"])
                              if ok and r_full > 0 else np.nan)
        r["lds_limit"] = r["lds"] / np.sqrt(r["reliability"]) if ok else np.nan
    return rows, per_query


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configfile", default=str(ROOT / "config" / "config.yaml"))
    ap.add_argument("--results", default="results", help="the run's results folder")
    ap.add_argument("--out", default=None, help="CSV to write (default: RESULTS/reliability.csv)")
    ap.add_argument("--all-lrs", action="store_true", help="also every learning rate of the grid")
    ap.add_argument("--splits", type=int, default=4, help="random halvings averaged per estimate")
    args = ap.parse_args()
    cfg = ExperimentConfig.from_dict(yaml.safe_load(Path(args.configfile).read_text())).validate()
    results = Path(args.results)
    gt_path = results / cfg.experiment / "lds" / "test.h5"
    if not gt_path.is_file():
        raise SystemExit(f"{gt_path}: no test ground truth; run the workflow first (snakemake -c2)")
    gt = store.read_ground_truth(gt_path)
    files = losses_files(results, cfg.experiment, list(cfg.daunce.variants), args.all_lrs)
    if not files:
        raise SystemExit(f"no losses under {results / cfg.experiment / 'daunce'}; run the workflow first")
    rows, per_query = [], []
    for v, p in files:
        r, pq = rows_of(v, p, cfg, gt, args.splits)
        rows += r
        per_query.append(pq)
        print(f"{v:12s} lr={r[0]['lr']:6s} " + "  ".join(
            f"K={x['K']}: R={x['reliability']:.2f} LDS={x['lds']:.3f}" for x in r), flush=True)
    out = Path(args.out) if args.out else results / "reliability.csv"
    with store.atomic_path(out, suffix=".csv") as tmp, open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in r.items()} for r in rows)

    def rho(a, b):
        return stats.spearmanr(a, b, nan_policy="omit").statistic

    col = {c: np.array([r[c] for r in rows], dtype=float) for c in COLUMNS[2:]}
    last = {}
    for r in rows:  # rows of a file come in increasing K
        last[(r["variant"], r["lr"])] = r
    full = list(last.values())
    pairs = [(r, last[(r["variant"], r["lr"])]) for r in rows if r is not last[(r["variant"], r["lr"])]]
    print(f"\nwrote {out} ({len(rows)} rows, {len(files)} losses files)")
    print(f"Spearman(reliability, LDS) over all rows: {rho(col['reliability'], col['lds']):.3f} "
          f"(thresholded LDS: {rho(col['reliability'], col['lds_thresholded']):.3f})")
    if len(full) > 2:
        print(f"across settings at full K: Spearman(reliability, LDS) "
              f"{rho([r['reliability'] for r in full], [r['lds'] for r in full]):.3f}")
    if pairs:
        e = np.array([r["lds_pred_from_full"] - r["lds"] for r, _ in pairs])
        print(f"LDS(K') from the full-K LDS and the two R: mean |error| {np.nanmean(np.abs(e)):.4f}, "
              f"mean error {np.nanmean(e):+.4f} (LDS itself spans {col['lds'].min():.3f}-"
              f"{col['lds'].max():.3f})")
        print("full-K LDS predicted from a prefix of K' models alone:")
        for k in sorted({r["K"] for r, _ in pairs}):
            sel = [(r, f) for r, f in pairs if r["K"] == k]
            e = np.array([r["lds_full_pred"] - f["lds"] for r, f in sel])
            print(f"  K'={k:3d} (halves of {k // 2:2d}): mean |error| {np.nanmean(np.abs(e)):.4f}, "
                  f"mean error {np.nanmean(e):+.4f} ({int(np.isnan(e).sum())} undefined)")
    print(f"per query (full K, Spearman across queries of reliability and LDS), mean over files: "
          f"{np.nanmean(per_query):.3f} (range {np.nanmin(per_query):.3f} to {np.nanmax(per_query):.3f})")

if __name__ == "__main__":
    main()
