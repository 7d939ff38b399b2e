"""How much LDS ground truth does the regime experiment need? Re-read one finished run.

The ground truth (``lds.M`` test masks x ``lds.seeds`` retrains each) is the largest cost of the
regime experiment's tier 1 (docs/regime.md). Every retrain's outputs are kept per seed
(``lds/test.h5``: outputs [seeds, M, queries]), so fewer masks or seeds can be evaluated on the
same scores files without retraining: this script prints, for each (masks, seeds) subset, every
method's raw LDS with its joint (masks x queries) bootstrap CI, and how the methods' ordering
compares with the full ground truth's (Kendall's tau from scipy, and the pairs that swap).

    python benchmarks/regime_groundtruth.py results/fmnist_mlp_regime --out benchmarks/results/regime_groundtruth.md
"""
from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import numpy as np
from scipy import stats

from daunce_core import lds, store


def scores_files(run: Path) -> dict[str, Path]:
    """Each method's scores file: DAUNCE variants by both measures, baselines' score.h5."""
    out = {}
    for d in sorted((run / "scores").iterdir()):
        for f in sorted(d.glob("*.h5")):
            out[d.name if f.stem == "score" else f"{d.name} ({f.stem})"] = f
    return out


def subset(gt: dict, M: int, seeds: int) -> dict:
    return {**gt, "masks": gt["masks"][:M], "outputs": gt["outputs"][:seeds, :M]}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, help="a finished run's results/<experiment> folder")
    ap.add_argument("--masks", type=int, nargs="+", default=[50, 100, 200])
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--resamples", type=int, default=1000)
    ap.add_argument("--out", type=Path, help="also write the table (markdown) here")
    a = ap.parse_args(argv)

    gt = store.read_ground_truth(a.run / "lds" / "test.h5")
    S, M = gt["outputs"].shape[:2]
    files = scores_files(a.run)
    dense = {}
    for name, f in files.items():
        s, meta = store.dense_scores(f)
        dense[name], _ = lds.align_to_ground_truth(s, meta["train_ids"], meta["query_ids"], gt,
                                                   scores_path=str(f), attrs=meta.get("attrs"))
    names = list(dense)
    combos = [(m, s) for m, s in itertools.product(a.masks, a.seeds) if m <= M and s <= S]
    res = {}
    for m, s in combos:
        res[m, s] = lds.evaluate_many([dense[n] for n in names], subset(gt, m, s), n_resamples=a.resamples)
    full = max(combos, key=lambda c: (c[0] * c[1], c))
    ref = np.array([res[full][i][0].lds for i in range(len(names))])

    lines = [f"# LDS against the amount of ground truth ({a.run})", "",
             f"Raw LDS (no thresholding) of every scores file of the run, on the first M of its {M} test masks "
             f"and the first S of its {S} retrains per mask; 95% joint bootstrap CI over masks and queries "
             f"({a.resamples} resamples). tau: Kendall's tau of the methods' order against M={full[0]}, "
             f"S={full[1]}; swaps: the pairs in the other order there.", "",
             "| method | " + " | ".join(f"M={m}, S={s}" for m, s in combos) + " |",
             "|---|" + "---|" * len(combos)]
    for i, n in enumerate(names):
        cells = []
        for c in combos:
            r = res[c][i][0]
            cells.append(f"{r.lds:.3f} [{r.ci_low:.3f}, {r.ci_high:.3f}]")
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    taus, swaps, widths = [], [], []
    for c in combos:
        v = np.array([res[c][i][0].lds for i in range(len(names))])
        taus.append(stats.kendalltau(v, ref).statistic)
        sw = [f"{names[i]} / {names[j]}" for i, j in itertools.combinations(range(len(names)), 2)
              if (v[i] - v[j]) * (ref[i] - ref[j]) < 0]
        swaps.append(sw)
        widths.append(np.mean([res[c][i][0].ci_high - res[c][i][0].ci_low for i in range(len(names))]))
    lines.append("| **Kendall tau vs full** | " + " | ".join(f"{t:.3f}" for t in taus) + " |")
    lines.append("| **mean CI width** | " + " | ".join(f"{w:.3f}" for w in widths) + " |")
    lines.append("| **pairs swapped** | " + " | ".join(str(len(s)) for s in swaps) + " |")
    lines += ["", "Swapped pairs:", ""]
    for c, sw in zip(combos, swaps):
        lines.append(f"- M={c[0]}, S={c[1]}: " + ("; ".join(sw) if sw else "none"))
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(text)


if __name__ == "__main__":
    main()
