"""Which defaults should the one-call API have? LDS and cost of candidate settings on small problems.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/defaults_study.py [--problems digits,tabular,fashion]
        [--out benchmarks/out/defaults] [--quick] [--K 200 500 1000] [--lrs ...] [--matched RHO:PROX ...]

Three small problems, each with theta_0 trained by the workflow's base recipe
(``ensemble.fit_from_scratch``) and LDS ground truth made here by retraining on masks
(``lds.retrain_outputs``: a selection stream and a disjoint test stream, and a seeded split of the
queries into selection and test queries, as the workflow does):

* ``digits``  -- the embedded default's data (sklearn digits), 500 training examples, MLP [64];
* ``tabular`` -- sklearn's breast-cancer data standardised, 398 training examples (70%), MLP [16]
  (530 parameters): the new user's problem;
* ``fashion`` -- a Fashion-MNIST subset (1,000 training examples, pooled to 14x14, MLP [16]: 3,322
  parameters, so that the exact IF's curvature fits in memory) read from
  ``--fashion`` (the four idx .gz files); skipped with a note when absent.

For every problem it fits K = 200 perturbed models through the public API
(:func:`daunce_core.api.fit_losses`) for each variant (``daunce``, ``daunce_t``, and
``daunce_m`` when the installed objectives have it), each fit length (``epochs = 1``, and at least
50 optimiser steps, ``--steps``; :func:`daunce_core.api.fit_epochs`) and each learning rate of the
grid, and scores the first 100 and all 200 models with correlation and covariance (DAUNCE-T's fits
also as ``daunce_t_q``: scores times TRAK's Q, ``1 - p_i(theta_0)``, on the training side). Per
(variant, length, lr) it records the label-free statistics the lr rule reads
(:func:`daunce_core.api.lr_statistics`: split-K reliability, divergence) and the raw LDS on the
selection masks and on the test masks. Per (variant, length, measure, K) it then compares the lr
the rule picks (no ground truth) with the lr the selection masks pick, both judged on the test
masks. Grad-dot and the exact influence function (GGN, damping chosen on the selection masks;
``daunce_core.baselines.exact``) are the references.

Options for a narrower or longer study: ``--K`` (prefixes of the largest K's fits; a K above 200
also gets "pilot" rows, the rule read on the first 200 models of each lr), ``--lrs`` (a subset of
the grid: the rule then picks among these only), ``--epochs`` (fixed fit lengths), ``--matched``
(daunce_m's scale:prox pairs), ``--measures``, ``--antithetic`` / ``--common-batches`` (the fits' estimator
options). Beside the library's earlier rule (split-K reliability, :func:`reliability_lr`: the "lr by the
rule" column), each candidate gets a "plateau rule" row (:func:`plateau_lr`, the library's ``lr="auto"`` rule:
the largest lr whose scores agree with the next smaller lr's). theta_0 and the ground truth of each problem are
cached under ``--cache`` (benchmarks/out/defaults_cache), so later runs do not retrain them. Beside
grad-dot and the exact IF, the references include daunce_m's limit (the GGN sandwich at several
proximal dampings, docs/matched_noise.md).

Writes ``<out>/grid.csv`` (every fit), ``<out>/summary.csv`` (one row per candidate default) and
``<out>/summary.md`` (the table docs/defaults.md quotes). LDS are raw (no thresholding), mean over
the test queries.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import gzip
import logging
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

from daunce_core import api
from daunce_core import ensemble as E
from daunce_core import lds as L
from daunce_core.baselines import exact
from daunce_core.baselines.common import Problem
from daunce_core.config import DaunceConfig, ExperimentConfig
from daunce_core.data import Dataset, load_dataset
from daunce_core.models import build_model
from daunce_core.perturb import lds_masks, theta0_key
from daunce_core.scoring import pairwise_scores

ROOT = Path(__file__).resolve().parents[1]
LR_GRID = sorted(api.DEFAULTS.lr_grid)  # the grid lr="auto" searches


def _dataset(X_train, y_train, X_query, y_query, C: int, source: str) -> Dataset:
    return Dataset(X_train.astype(np.float32), y_train.astype(np.int64), np.arange(len(y_train)),
                   X_query.astype(np.float32), y_query.astype(np.int64), np.arange(len(y_query)), C,
                   [str(c) for c in range(C)], np.zeros(1), np.ones(1), source=source)


def problem_digits():
    cfg = ExperimentConfig.from_dict({"experiment": "study_digits", "data": {"name": "digits", "n_train": 500,
                                      "n_query": 100}, "model": {"arch": "mlp", "hidden": [64]},
                                      "base": {"epochs": 30, "lr": 0.05}}).validate()
    return cfg, load_dataset(cfg.data)


def problem_tabular():
    from sklearn.datasets import load_breast_cancer
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    X, y = load_breast_cancer(return_X_y=True)
    Xtr, Xq, ytr, yq = train_test_split(X, y, test_size=0.3, random_state=0, stratify=y)
    sc = StandardScaler().fit(Xtr)
    cfg = ExperimentConfig.from_dict({"experiment": "study_tabular", "model": {"arch": "mlp", "hidden": [16]},
                                      "base": {"epochs": 60, "lr": 0.02}}).validate()
    return cfg, _dataset(sc.transform(Xtr), ytr, sc.transform(Xq), yq, 2, "breast_cancer")


def _idx(path: Path, images: bool) -> np.ndarray:
    with gzip.open(path) as fh:
        raw = fh.read()
    return np.frombuffer(raw, np.uint8, offset=16 if images else 8)


def problem_fashion(root: Path):
    if not (root / "train-images-idx3-ubyte.gz").is_file():
        return None
    Xall = _idx(root / "train-images-idx3-ubyte.gz", True).reshape(-1, 1, 28, 28).astype(np.float32) / 255.0
    yall = _idx(root / "train-labels-idx1-ubyte.gz", False)
    order = np.random.default_rng(0).permutation(len(yall))[:1100]
    X = Xall[order].reshape(-1, 1, 14, 2, 14, 2).mean(axis=(3, 5))  # 14x14: the exact IF's p^2 curvature fits
    X = (X - X.mean()) / X.std()
    cfg = ExperimentConfig.from_dict({"experiment": "study_fashion", "model": {"arch": "mlp", "hidden": [16]},
                                      "base": {"epochs": 20, "lr": 0.05}}).validate()
    return cfg, _dataset(X[:1000], yall[order[:1000]], X[1000:], yall[order[1000:]], 10, "fashion-mnist")


def theta0(cfg: ExperimentConfig, ds: Dataset, device):
    X, y = torch.as_tensor(ds.X_train, device=device), torch.as_tensor(ds.y_train, device=device)
    factory = lambda: build_model(cfg.model, ds.X_train.shape[1:], ds.num_classes)  # noqa: E731
    net, p, b = E.fit_from_scratch(factory, X, y, [np.arange(ds.n)], [theta0_key(cfg.base.seed)], cfg.base)
    model = factory().to(device)
    model.load_state_dict({**E.unstack(p, 0), **E.unstack(b, 0)})
    return model.eval()


def ground_truth(cfg, ds, device, M_select: int, M_test: int, seeds: int):
    cfg.lds.seeds = seeds
    gts = {}
    for split, M, offset in (("select", M_select, L.SELECT_OFFSET), ("test", M_test, 0)):
        index = offset + np.arange(M)
        masks = lds_masks(cfg.lds.seed, M, ds.n, cfg.lds.alpha, offset=offset)
        gts[split] = (masks, L.retrain_outputs(cfg, ds, masks, index, device).mean(axis=0))
    sel_q, test_q = L.query_split(ds.m, 0.3, cfg.lds.seed)
    return gts, sel_q, test_q


def lds_of(scores, gts, sel_q, test_q) -> tuple[float, float]:
    out = []
    for split, q in (("select", sel_q), ("test", test_q)):
        masks, outputs = gts[split]
        out.append(float(np.nanmean(L.per_query_lds(scores[:, q], masks, outputs[:, q]))))
    return out[0], out[1]


def references(cfg, ds, model, device, gts, sel_q, test_q) -> list[dict]:
    prob = Problem(cfg, ds, model, {k: v.detach() for k, v in model.state_dict().items()}, device)
    t0 = time.perf_counter()
    Gt = exact.per_example_grads(prob, "train")
    Gq = exact.per_example_grads(prob, "query", "margin")
    t_grads = time.perf_counter() - t0
    rows = []
    s = Gt @ Gq.T
    sel, test = lds_of(s, gts, sel_q, test_q)
    rows.append({"method": "grad-dot", "lds_select": sel, "lds_test": test, "seconds": t_grads})
    t0 = time.perf_counter()
    H = exact.curvature_matrix(prob, "ggn", float(cfg.base.weight_decay))
    best = None
    for d in (1e-3, 1e-2, 1e-1, 1.0):
        s = exact.influence(Gt, Gq, H, d)
        if s is None:
            continue
        sel, test = lds_of(s, gts, sel_q, test_q)
        if best is None or sel > best["lds_select"]:
            best = {"method": f"exact IF (GGN, damping {d:g})", "lds_select": sel, "lds_test": test}
    best["seconds"] = t_grads + time.perf_counter() - t0
    rows.append(best)
    # daunce_m's limit (docs/matched_noise.md): the GGN sandwich g_a^T (G + prox)^-1 G (G + prox)^-1 g_b,
    # at each proximal damping, to see which prox its fits should aim at (test LDS, no selection)
    t0 = time.perf_counter()
    e, V = np.linalg.eigh(H)
    e = np.clip(e, 0.0, None)
    A, B = Gt @ V, Gq @ V
    for prox in (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 1.0):
        s = (A * (e / (e + prox) ** 2)) @ B.T
        sel, test = lds_of(s, gts, sel_q, test_q)
        rows.append({"method": f"limit daunce_m (prox {prox:g})", "lds_select": sel, "lds_test": test,
                     "seconds": t_grads + time.perf_counter() - t0})
    return rows


def the_default_call(model, ds, gts, sel_q, test_q) -> dict:
    """The one-call API at every library default, ``daunce_scores(model, train, query)``, as a user
    calls it (docs/defaults.md): its test LDS, the lr its rule chose and its seconds."""
    from daunce_core.attribute import daunce_scores

    train = (torch.as_tensor(ds.X_train), torch.as_tensor(ds.y_train))
    query = (torch.as_tensor(ds.X_query), torch.as_tensor(ds.y_query))
    records = []

    class Keep(logging.Handler):  # the lr the rule chose, from the call's own log line
        def emit(self, record):
            records.append(record.getMessage())

    keep, api_log = Keep(), logging.getLogger(api.__name__)
    api_log.addHandler(keep)
    level = api_log.level
    api_log.setLevel(logging.INFO)
    t0 = time.perf_counter()
    try:
        s = daunce_scores(model, train, query)
    finally:
        api_log.removeHandler(keep)
        api_log.setLevel(level)
    seconds = time.perf_counter() - t0
    chosen = next((m.split(" chosen")[0] for m in records if " chosen" in m), "lr=?")
    sel, test = lds_of(np.asarray(s), gts, sel_q, test_q)
    d = api.DEFAULTS
    return {"method": f"default call (daunce_scores: {d.variant} {d.measure} K={d.K}, lr rule on "
                      f"{d.lr_pilot_K} pilot models: {chosen})", "lds_select": sel, "lds_test": test,
            "seconds": seconds}


def cached_truth(name, cfg, ds, device, quick: bool, cache: Path | None):
    """theta_0 and the LDS ground truth of a problem, read from ``cache`` when a run made them before
    (both depend only on the problem and the mask counts), else made and written there."""
    M_select, M_test = (20, 30) if quick else (40, 60)
    path = cache / f"{name}_sel{M_select}_test{M_test}_seeds2.pt" if cache else None
    if path is not None and path.is_file():
        saved = torch.load(path, weights_only=False)
        model = build_model(cfg.model, ds.X_train.shape[1:], ds.num_classes).to(device)
        model.load_state_dict(saved["state"])
        return model.eval(), saved["gts"], saved["sel_q"], saved["test_q"], f"read from {path}"
    model = theta0(cfg, ds, device)
    gts, sel_q, test_q = ground_truth(cfg, ds, device, M_select, M_test, 2)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save({"state": model.state_dict(), "gts": gts, "sel_q": sel_q, "test_q": test_q}, tmp)
        tmp.replace(path)
    return model, gts, sel_q, test_q, "made"


def run_problem(name, cfg, ds, device, variants, lengths, quick: bool, *, Ks=(100, 200), lrs=LR_GRID,
                measures=("correlation", "covariance"), matched=((None, None),), cache: Path | None = None,
                options: dict | None = None, default_call: bool = False):
    options = options or {}  # fit_losses's estimator options (antithetic, common_batches), named in the setting
    print(f"[{name}] n={ds.n} m={ds.m} classes={ds.num_classes}", flush=True)
    t0 = time.perf_counter()
    model, gts, sel_q, test_q, how = cached_truth(name, cfg, ds, device, quick, cache)
    print(f"[{name}] theta_0 and ground truth ({how}): {time.perf_counter() - t0:.0f}s", flush=True)
    K_max = max(Ks)
    refs = references(cfg, ds, model, device, gts, sel_q, test_q)
    if default_call:
        refs.append(the_default_call(model, ds, gts, sel_q, test_q))
    for r in refs:
        print(f"[{name}] {r['method']}: select {r['lds_select']:.3f} test {r['lds_test']:.3f}", flush=True)
    train = (torch.as_tensor(ds.X_train), torch.as_tensor(ds.y_train))
    query = (torch.as_tensor(ds.X_query), torch.as_tensor(ds.y_query))
    grid = []
    fits = [(v, rho, prox) for v in variants for rho, prox in (matched if v == "daunce_m" else ((None, None),))]
    for variant, rho, prox in fits:
        tag = variant + "".join(f" {k}={v:g}" for k, v in (("rho", rho), ("prox", prox)) if v is not None)
        tag += "".join(f" {k}" for k, v in sorted(options.items()) if v)
        for length, min_steps in lengths:
            ratio = DaunceConfig().for_variant(variant).ratio  # daunce_m fits on all examples
            # a length is "epochs=N" (fixed) or "steps>=S" (the fewest epochs giving S optimiser steps)
            epochs = (int(length.split("=")[1]) if length.startswith("epochs=")
                      else api.fit_epochs(ds.n, ratio, api.DEFAULTS.batch_size, min_steps))
            previous = {}  # (form, measure, K) -> the scores at the previous (smaller) lr
            for lr in lrs:
                t0 = time.perf_counter()
                with api.quiet():
                    sig = api.fit_losses(model, None, train, query, variant=variant, K=K_max, epochs=epochs,
                                         lr=lr, rho=rho, prox=prox, device=str(device), **options)
                secs = time.perf_counter() - t0
                # daunce_t_q: DAUNCE-T's fits scored with TRAK's Q, 1 - p_i(theta_0), on the training side
                forms = [(tag, None)] + ([("daunce_t_q", 1.0 - sig.p0_train)] if variant == "daunce_t" else [])
                for (form, q), measure in ((f, m) for f in forms for m in measures):
                    for K in Ks:  # the rule reads the K models a call with this K would fit
                        stats = api.lr_statistics(_prefix(sig, K), measure)
                        tr, qu = sig.train[:K], sig.query[:K]
                        agree = float("nan")
                        if stats["diverged"] or not (np.isfinite(tr).all() and np.isfinite(qu).all()):
                            sel = test = float("nan")
                            previous.pop((form, measure, K), None)
                        else:
                            s = pairwise_scores(tr, qu, measure)
                            s = s if q is None else s * q[:, None]
                            sel, test = lds_of(s, gts, sel_q, test_q)
                            # label-free: do the scores of this lr agree with those of the next smaller lr?
                            if (form, measure, K) in previous:
                                agree = agreement(s, previous[(form, measure, K)])
                            previous[(form, measure, K)] = s
                        grid.append({"problem": name, "variant": form, "length": length, "epochs": epochs,
                                     "steps": stats["steps"], "lr": lr, "measure": measure, "K": K,
                                     "reliability": stats["reliability"], "loss_ratio": stats["loss_ratio"],
                                     "diverged": stats["diverged"], "agreement": agree,
                                     "lds_select": sel, "lds_test": test,
                                     "fit_seconds": secs * K / K_max})
                print(f"[{name}] {variant} {length} lr={lr:g}: {secs:.1f}s "
                      + " ".join(f"{g['measure'][:4]}/K{g['K']} rel={g['reliability']:.2f} "
                                 f"sel={g['lds_select']:.3f} test={g['lds_test']:.3f}"
                                 for g in grid[-len(Ks) * len(measures) * len(forms):]),
                      flush=True)
    return refs, grid


agreement = api.agreement  # the plateau rule's statistic, the library's (daunce_core/api.py)


def _prefix(sig, K: int):
    return dataclasses.replace(sig, train=sig.train[:K], query=sig.query[:K], model_index=sig.model_index[:K])


def plateau_lr(cells: list[dict]) -> float | None:
    """The plateau rule, the library's ``lr="auto"`` rule (:func:`daunce_core.api.pick_lr`): the
    largest lr whose scores agree (:func:`agreement`) at least 0.9 with the next smaller lr's, the
    same K models' seeds; diverged lrs and those less than 10 x below them are out; none agreeing:
    the smallest lr left."""
    return api.pick_lr(cells)


def reliability_lr(rows: list[dict], min_reliability: float = 0.8, backoff: float = 10.0) -> float | None:
    """The library's earlier rule, kept to compare against (the "lr by the rule" column): among the
    lrs at least ``backoff`` x below the smallest diverged one, the largest whose split-K reliability
    reaches ``min_reliability``, else the most reliable."""
    ok = [r for r in rows if not r["diverged"] and math.isfinite(r["reliability"])]
    if not ok:
        return None
    bad = [r["lr"] for r in rows if r["diverged"]]
    cap = min(bad) / backoff if bad else math.inf
    cand = [r for r in ok if r["lr"] <= cap] or [min(ok, key=lambda r: r["lr"])]
    good = [r for r in cand if r["reliability"] >= min_reliability]
    return max(r["lr"] for r in good) if good else max(cand, key=lambda r: r["reliability"])["lr"]


def summarize(name, refs, grid, pilot: int = 200) -> list[dict]:
    """One row per (variant, length, measure, K): the test LDS at the rule's lr and at the lr the
    selection masks choose. For K above ``pilot`` a second row, "lr from K=<pilot> pilot": the rule
    reads the first ``pilot`` models of each lr (as a call fitting ``pilot`` models per lr of the grid
    and then K at the chosen lr would) -- its seconds are the pilot grid's plus the chosen lr's K fits."""
    rows = [{"problem": name, "setting": r["method"], "lr_rule": "", "lds_test": r["lds_test"],
             "lds_test_oracle_lr": "", "lr_oracle": "", "seconds": r["seconds"], "lrs": ""} for r in refs]
    keys = sorted({(g["variant"], g["length"], g["measure"], g["K"]) for g in grid})

    def cells_of(variant, length, measure, K):
        return [g for g in grid if (g["variant"], g["length"], g["measure"], g["K"]) == (variant, length, measure, K)]

    def rule(cells):
        return reliability_lr([{"lr": g["lr"], "reliability": g["reliability"], "diverged": g["diverged"]}
                               for g in cells])

    for variant, length, measure, K in keys:
        cells = cells_of(variant, length, measure, K)
        ok = [g for g in cells if math.isfinite(g["lds_select"])]
        oracle = max(ok, key=lambda g: g["lds_select"]) if ok else None
        lrs = " ".join(f"{g['lr']:g}" for g in cells)
        pilots = [("", rule(cells), sum(g["fit_seconds"] for g in cells))]
        if any(math.isfinite(g.get("agreement", float("nan"))) for g in cells):  # runs before it lack the column
            pilots.append((" plateau rule", plateau_lr(cells), pilots[0][2]))
        pc = cells_of(variant, length, measure, pilot) if K > pilot else []
        if pc:
            lr_p = rule(pc)
            pilots.append((f" lr from K={pilot} pilot", lr_p, sum(g["fit_seconds"] for g in pc)
                           + sum(g["fit_seconds"] for g in cells if g["lr"] == lr_p)))
            if any(math.isfinite(g.get("agreement", float("nan"))) for g in pc):
                # the library's lr="auto" with lr_pilot_K: the plateau rule on the pilot's models, then K
                lr_pp = plateau_lr(pc)
                pilots.append((f" plateau rule, lr from K={pilot} pilot", lr_pp, sum(g["fit_seconds"] for g in pc)
                               + sum(g["fit_seconds"] for g in cells if g["lr"] == lr_pp)))
        for suffix, rule_lr, secs in pilots:
            chosen = next((g for g in cells if g["lr"] == rule_lr), None)
            rows.append({"problem": name, "setting": f"{variant} {measure} K={K} {length}{suffix}",
                         "lr_rule": rule_lr, "lds_test": chosen["lds_test"] if chosen else float("nan"),
                         "lds_test_oracle_lr": oracle["lds_test"] if oracle else float("nan"),
                         "lr_oracle": oracle["lr"] if oracle else "", "seconds": secs, "lrs": lrs})
    return rows


def write(out: Path, grid: list[dict], summary: list[dict], command: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for path, rows in ((out / "grid.csv", grid), (out / "summary.csv", summary)):
        if not rows:  # references only (--variants ''): no grid
            continue
        with open(path, "w", newline="") as fh:
            # rows of older runs may lack newer columns (lrs): the union, blank where missing
            w = csv.DictWriter(fh, fieldnames=list(dict.fromkeys(k for r in rows for k in r)), restval="")
            w.writeheader()
            w.writerows(rows)

    def f(v):
        return f"{v:.3f}" if isinstance(v, float) and math.isfinite(v) else ("--" if isinstance(v, float) else str(v))

    lines = [f"`{command}`", "", "| problem | setting | lr by the rule | test LDS (rule's lr) | test LDS (lr chosen "
             "on selection masks) | lr chosen on masks | seconds (whole lr grid; references: total) | lrs fitted |",
             "|---|---|---|---|---|---|---|---|"]
    for r in summary:
        lines.append(f"| {r['problem']} | {r['setting']} | {r['lr_rule']} | {f(r['lds_test'])} | "
                     f"{f(r['lds_test_oracle_lr'])} | {r['lr_oracle']} | {r['seconds']:.1f} | {r.get('lrs', '')} |")
    lines += ["", "Each candidate default across the problems (test LDS at the rule's lr, relative to grad-dot and to "
              "the exact IF of the same problem; the best candidate maximises the worst ratio to exact IF):", ""]
    problems = list(dict.fromkeys(r["problem"] for r in summary))
    ref = {(r["problem"], r["setting"].split(" (")[0]): r["lds_test"] for r in summary if not r["lr_rule"]}
    settings = list(dict.fromkeys(r["setting"] for r in summary if r["lr_rule"] != ""))
    lines += ["| setting | " + " | ".join(f"{p}: LDS / grad-dot / exact IF" for p in problems)
              + " | worst LDS / exact IF | worst LDS / grad-dot | rule within 10% of the masks' lr |",
              "|---|" + "---|" * (len(problems) + 3)]
    ranked = []
    for st in settings:
        cells, r_if, r_gd, near = [], [], [], []
        for p in problems:
            row = next((r for r in summary if r["problem"] == p and r["setting"] == st), None)
            if row is None or not math.isfinite(row["lds_test"]):
                cells.append("--")
                r_if.append(float("nan"))
                continue
            gd, ei = ref.get((p, "grad-dot")), ref.get((p, "exact IF"))
            cells.append(f"{row['lds_test']:.3f} / {row['lds_test'] / gd:.2f} / {row['lds_test'] / ei:.2f}")
            r_if.append(row["lds_test"] / ei)
            r_gd.append(row["lds_test"] / gd)
            near.append(row["lds_test"] >= 0.9 * row["lds_test_oracle_lr"])
        ranked.append((min(r_if), st, cells, min(r_gd) if r_gd else float("nan"), f"{sum(near)}/{len(near)}"))
    for worst, st, cells, worst_gd, near in sorted(ranked, key=lambda t: -t[0] if math.isfinite(t[0]) else 1):
        lines.append(f"| {st} | " + " | ".join(cells) + f" | {f(worst)} | {f(worst_gd)} | {near} |")
    (out / "summary.md").write_text("\n".join(lines) + "\n")


def _read_csv(path: Path) -> list[dict]:
    def num(v: str):
        for kind in (int, float):
            try:
                return kind(v)
            except ValueError:
                pass
        return {"True": True, "False": False}.get(v, v)

    with open(path, newline="") as fh:
        return [{k: num(v) for k, v in row.items()} for row in csv.DictReader(fh)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--problems", default="digits,tabular,fashion")
    ap.add_argument("--fashion", type=Path, default=Path("/usr/share/datasets/fashion-mnist"))
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "defaults")
    ap.add_argument("--variants", default=None, help="comma-separated (default: daunce, daunce_t, daunce_m)")
    ap.add_argument("--quick", action="store_true", help="fewer masks (a smoke run)")
    ap.add_argument("--steps", type=int, nargs="*", default=[50],
                    help="fit lengths besides one epoch: at least this many optimiser steps per model")
    ap.add_argument("--epochs", type=int, nargs="*", default=[],
                    help="fixed fit lengths (epochs per model) besides one epoch and --steps")
    ap.add_argument("--no-one-epoch", action="store_true", help="leave out the one-epoch fits")
    ap.add_argument("--K", type=int, nargs="+", default=[100, 200],
                    help="K scored (prefixes of the largest K's models; a K above 200 also gets the rule run on "
                         "its first 200 models, the 'pilot' rows)")
    ap.add_argument("--lrs", type=float, nargs="+", default=None,
                    help="the lrs fitted (default: the whole grid lr='auto' searches); the rule then picks among "
                         "these only, so a subset is for pruning where the rule was shown to pick from them")
    ap.add_argument("--measures", default="correlation,covariance")
    ap.add_argument("--matched", nargs="+", default=None, metavar="RHO:PROX",
                    help="daunce_m's perturbation scale and proximal damping pairs (default: its own, "
                         "DaunceConfig.for_variant)")
    ap.add_argument("--antithetic", action="store_true",
                    help="fit with antithetic pairs (fit_losses's antithetic; needs even K values)")
    ap.add_argument("--common-batches", action="store_true",
                    help="one batch order for every model (fit_losses's common_batches)")
    ap.add_argument("--cache", type=Path, default=ROOT / "benchmarks" / "out" / "defaults_cache",
                    help="where theta_0 and the ground truth of each problem are kept between runs ('' : none)")
    ap.add_argument("--combine", type=Path, nargs="+", default=None,
                    help="write --out from the grid.csv and summary.csv of these finished runs (e.g. problems run "
                         "as separate processes; or a grid_NAME.csv file with its summary_NAME.csv beside it) "
                         "instead of running anything")
    ap.add_argument("--default-call", action="store_true",
                    help="also run daunce_scores(model, train, query) at every library default on each problem "
                         "(a reference row; with --variants '' only the references and this call)")
    ap.add_argument("--resummarize", action="store_true",
                    help="with --combine: recompute the rules' rows from the grids (the references' rows are kept), "
                         "so rows added to this script since those runs appear")
    args = ap.parse_args(argv)
    if args.combine:
        grid, summary = [], []
        for d in args.combine:  # a run's --out folder, or a committed grid_NAME.csv beside its summary_NAME.csv
            g = d if d.suffix == ".csv" else d / "grid.csv"
            grid += _read_csv(g) if g.is_file() else []  # references only (--variants ''): no grid
            summary += _read_csv(g.with_name(g.name.replace("grid", "summary", 1)))
        seen = set()  # runs of the same problem repeat its references: keep the first of each row
        summary = [r for r in summary if (r["problem"], r["setting"]) not in seen
                   and not seen.add((r["problem"], r["setting"]))]
        if args.resummarize:
            problems = list(dict.fromkeys(r["problem"] for r in summary))
            summary = [row for p in problems for row in summarize(
                p, [{"method": r["setting"], "lds_test": r["lds_test"], "seconds": r["seconds"]}
                    for r in summary if r["problem"] == p and r["lr_rule"] == ""],
                [g for g in grid if g["problem"] == p])]
        write(args.out, grid, summary, "python benchmarks/defaults_study.py " + " ".join(argv or sys.argv[1:]))
        print((args.out / "summary.md").read_text())
        return 0
    from daunce_core.objectives import VARIANTS

    variants = ([v for v in args.variants.split(",") if v] if args.variants is not None
                else [v for v in ("daunce", "daunce_t", "daunce_m") if v in VARIANTS])
    lengths = (([] if args.no_one_epoch else [("epochs=1", 1)]) + [(f"steps>={s}", s) for s in args.steps]
               + [(f"epochs={e}", 0) for e in args.epochs if e != 1])
    matched = ([tuple(float(x) for x in m.split(":")) for m in args.matched] if args.matched else [(None, None)])
    if any(not (rho > 0 and prox >= 0) for rho, prox in matched if rho is not None):
        ap.error(f"--matched {args.matched}: each RHO:PROX needs RHO > 0 and PROX >= 0")
    torch.manual_seed(0)
    device = torch.device("cpu")
    grid, summary = [], []
    for name in args.problems.split(","):
        made = {"digits": problem_digits, "tabular": problem_tabular,
                "fashion": lambda: problem_fashion(args.fashion)}[name]()
        if made is None:
            print(f"[{name}] skipped: no data under {args.fashion}", file=sys.stderr)
            continue
        refs, g = run_problem(name, *made, device, variants, lengths, args.quick, Ks=sorted(args.K),
                              lrs=sorted(args.lrs) if args.lrs else LR_GRID, measures=args.measures.split(","),
                              matched=matched, cache=args.cache if str(args.cache) else None,
                              options={"antithetic": args.antithetic, "common_batches": args.common_batches},
                              default_call=args.default_call)
        grid += g
        summary += summarize(name, refs, g)
        write(args.out, grid, summary, "python benchmarks/defaults_study.py " + " ".join(argv or sys.argv[1:]))
    print((args.out / "summary.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
