"""The quality landscape (docs/quality.md): DAUNCE's LDS against compute, over its settings.

A step module like :mod:`daunce_core.steps.vision` (whose fitter and scoring it reuses, imported
inside the functions): ``scripts/study.py`` calls it for the rules of ``workflow/rules/study.smk``,
switched on by ``study.enabled``. Settings that differ only in K share one fit (:func:`groups`),
each lr grid is judged on the selection masks (:func:`lds_of`), and compute counts the whole
tuning grid (:func:`daunce_passes`, :func:`baseline_compute`); docs/quality.md#the-settings and
docs/quality.md#how-compute-is-counted say how."""
from __future__ import annotations

import csv
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import lds as L
from .. import store
from ..baselines.cost import read_benchmark
from ..config import ExperimentConfig, StudySetting, fit_variant, study_setting_config
from ..perturb import subset_size

log = logging.getLogger(__name__)

FWD_BWD = 3  # one forward + backward pass in forward-pass equivalents (the backward ~ two forwards)

QUALITY_COLUMNS = ["kind", "variant", "setting", "overrides", "theta0s", "K", "lr", "grid", "on_edge", "lds_select",
                   "lds_test", "ci_low", "ci_high", "passes", "cpu_s", "compute_note"]
GRID_COLUMNS = ["variant", "setting", "lr", "lds_select", "lds_test", "ci_low", "ci_high", "diverged"]


# --- the settings and how they share fits ---------------------------------------------------------

@dataclass
class Group:
    """Settings that share one fit: the member with the largest K names it and is fitted."""

    name: str
    members: list[StudySetting]
    theta0s: int


def groups(cfg: ExperimentConfig) -> list[Group]:
    """The study's settings grouped by everything but K (and ``theta0s``), in config order."""
    out: dict[str, list[StudySetting]] = {}
    for s in cfg.study.parsed():
        key = json.dumps([{k: v for k, v in s.daunce.items() if k != "K"}, s.theta0s], sort_keys=True)
        out.setdefault(key, []).append(s)
    result = []
    for members in out.values():
        Ks = [study_setting_config(cfg, s).daunce.K for s in members]
        result.append(Group(members[int(np.argmax(Ks))].name, members, members[0].theta0s))
    return result


def group_of(cfg: ExperimentConfig, name: str) -> Group:
    for g in groups(cfg):
        if g.name == name:
            return g
    raise ValueError(f"no study group {name!r}; the groups are {[g.name for g in groups(cfg)]}")


def needs_default_selection(cfg: ExperimentConfig, group: Group) -> bool:
    """Whether the group's lr grid is centred on the default's chosen lr (no lr_grid override)."""
    return cfg.study.lr_around is not None and "lr_grid" not in group.members[0].daunce


def lr_grid(cfg: ExperimentConfig, s: StudySetting, chosen: float | None) -> list[float]:
    """The learning rates searched for setting ``s`` (ascending): its own ``lr_grid`` override whole,
    else the default's choice ``chosen`` and ``study.lr_around`` neighbours each side in
    ``daunce.lr_grid`` (shifted inwards at an end of the grid, so the window keeps its size)."""
    if not needs_default_selection(cfg, Group(s.name, [s], s.theta0s)):
        return sorted(float(v) for v in study_setting_config(cfg, s).daunce.lr_grid)
    grid = sorted(float(v) for v in cfg.daunce.lr_grid)
    tags = [f"{v:g}" for v in grid]
    if chosen is None or f"{chosen:g}" not in tags:
        raise ValueError(f"study: the default's chosen lr {chosen!r} is not in daunce.lr_grid {grid}")
    i, a = tags.index(f"{chosen:g}"), cfg.study.lr_around
    width = min(len(grid), 2 * a + 1)
    lo = max(0, min(i - a, len(grid) - width))
    return grid[lo:lo + width]


# --- compute ------------------------------------------------------------------------------------

def fit_steps(d, n: int) -> tuple[int, int]:
    """(steps, batch) of one perturbed fit: ``perturb.batch_order`` drops the last partial batch."""
    sub = subset_size(n, d.ratio)
    bs = min(d.batch_size, sub)
    return d.epochs * (sub // bs), bs


def theta0_passes(cfg: ExperimentConfig, n: int) -> int:
    """Forward-pass equivalents of training one theta_0 with the base recipe."""
    bs = min(cfg.base.batch_size, n)
    return FWD_BWD * cfg.base.epochs * (n // bs) * bs


def daunce_passes(cfg: ExperimentConfig, K: int, n_lrs: int, n: int, m: int, theta0s: int) -> int:
    """Forward-pass equivalents of one study point's whole tuning (docs/quality.md#how-compute-is-counted)."""
    steps, bs = fit_steps(cfg.daunce, n)
    per_lr = K * (FWD_BWD * steps * bs + n + m)
    return n_lrs * per_lr + theta0s * (n + m) + (theta0s - 1) * theta0_passes(cfg, n)


# --- the LDS of losses, averaged over theta_0s -----------------------------------------------------

def lds_of(cfg: ExperimentConfig, parts: list[store.Losses], gt: dict, variant: str, *, n_resamples: int,
           seed: int = 0) -> L.LDSResult:
    """LDS of the mean scores of ``parts`` (one losses set per theta_0) on ground truth ``gt``.

    For one part this is :func:`daunce_core.steps.vision.selection_score` (the workflow's lr
    selection): raw scores of ``daunce.select_measure`` (no thresholding)."""
    from . import vision

    total = None
    for part in parts:
        sub = L.restrict_queries(part, gt)
        s, notices = L.align_to_ground_truth(vision.scores_from_losses(sub, cfg.daunce.select_measure, variant),
                                             sub.train_ids, sub.query_ids, gt, "study losses", "ground truth",
                                             sub.attrs)
        for notice in notices:
            log.warning("%s", notice)
        total = s if total is None else total + s
    return L.evaluate(total / len(parts), gt, n_resamples=n_resamples, seed=seed)[0]


def _prefix(losses: store.Losses, K: int) -> store.Losses:
    keep = losses.model_index < K
    return store.Losses(losses.train[keep], losses.query[keep], losses.model_index[keep], losses.train_ids,
                        losses.query_ids, losses.attrs, p0_train=losses.p0_train, p0_query=losses.p0_query)


# --- the study step -------------------------------------------------------------------------------

def run_group(cfg: ExperimentConfig, variant: str, group_name: str, split_path, theta0_paths: list,
              gt_select_path, gt_test_path, out_json, selection_json=None, theta0_metrics: list | None = None) -> dict:
    """Fit one group of settings for ``variant`` over its lr grid and write, per member setting,
    the lr chosen on the selection masks, its selection and test LDS and its compute.

    ``theta0_paths[s]`` is theta_0 number s (``base.seed + s``); ``theta0_metrics[s - 1]`` the
    metrics (with ``cpu_s``) of each extra one; ``selection_json`` the default's selection record
    (needed unless the setting brings its own lr grid).
    """
    from . import vision

    group = group_of(cfg, group_name)
    S = group.theta0s
    if len(theta0_paths) != S:
        raise ValueError(f"study group {group_name!r}: {len(theta0_paths)} theta_0 files for theta0s={S}")
    fit_cfg = study_setting_config(cfg, next(s for s in group.members if s.name == group.name))
    K, cs = fit_cfg.daunce.K, fit_cfg.daunce.chunk_size
    chosen = json.loads(Path(selection_json).read_text())["selected_lr"] if selection_json else None
    lrs = lr_grid(cfg, group.members[0], chosen)
    gt_sel, gt_test = store.read_ground_truth(gt_select_path), store.read_ground_truth(gt_test_path)
    for gt, want, path in ((gt_sel, "select", gt_select_path), (gt_test, "test", gt_test_path)):
        if gt["attrs"].get("split") != want:
            raise store.StoreError(f"{path}: expected the {want!r} split, got {gt['attrs'].get('split')!r}")

    t = time.process_time()
    fitters = [vision.ensemble_fitter(fit_cfg, split_path, p, fit_variant(variant)) for p in theta0_paths]
    setup_cpu = time.process_time() - t
    n, m = len(fitters[0].train_ids), len(fitters[0].query_ids)
    fits: dict[float, list[store.Losses] | None] = {}
    fit_cpu: dict[float, float] = {}
    for lr in lrs:
        t = time.process_time()
        parts = []
        for s, fitter in enumerate(fitters):
            ks = list(range(s, K, S))  # model k starts from theta_0 number k mod S
            sig = [fitter.fit(ks[i:i + cs], lr) for i in range(0, len(ks), cs)]
            if any(x.diverged().any() for x in sig):
                parts = None
                break
            parts.append(store.Losses(np.concatenate([x.train for x in sig]), np.concatenate([x.query for x in sig]),
                                      np.asarray(ks), sig[0].train_ids, sig[0].query_ids, dict(sig[0].attrs),
                                      p0_train=sig[0].p0_train, p0_query=sig[0].p0_query))
        fit_cpu[lr] = time.process_time() - t
        fits[lr] = parts
        log.info("%s %s lr=%g: fitted %d models on %d theta_0(s) in %.1f CPU s%s", variant, group_name, lr, K, S,
                 fit_cpu[lr], "" if parts is not None else " (diverged)")
    extra_cpu = sum(float(json.loads(Path(p).read_text())["cpu_s"]) for p in theta0_metrics or [])

    rows, grid_rows = [], []
    for member in group.members:
        mcfg = study_setting_config(cfg, member)
        Km = mcfg.daunce.K
        table, score_cpu = [], 0.0
        for lr in lrs:
            if fits[lr] is None:
                table.append({"lr": lr, "lds_select": None, "diverged": True})
                continue
            parts = [_prefix(p, Km) for p in fits[lr]]
            t = time.process_time()
            sel = lds_of(mcfg, parts, gt_sel, variant, n_resamples=200)  # what select_lr computes
            score_cpu += time.process_time() - t
            test = lds_of(mcfg, parts, gt_test, variant, n_resamples=cfg.lds.bootstrap, seed=cfg.lds.seed)
            table.append({"lr": lr, "lds_select": sel.lds, "lds_test": test.lds, "ci_low": test.ci_low,
                          "ci_high": test.ci_high, "diverged": False})
        ok = [r for r in table if not r["diverged"]]
        if not ok:
            raise ValueError(f"study {variant} {member.name}: every lr of {lrs} diverged; give the setting "
                             "smaller values in its daunce.lr_grid")
        best = max(ok, key=lambda r: r["lds_select"])
        cpu = sum(fit_cpu.values()) * Km / K + setup_cpu + score_cpu + extra_cpu
        rows.append({"kind": "study", "variant": variant, "setting": member.name,
                     "overrides": json.dumps(member.daunce, sort_keys=True), "theta0s": S, "K": Km, "lr": best["lr"],
                     "grid": " ".join(f"{v:g}" for v in lrs), "on_edge": L.on_edge(lrs, best["lr"]),
                     "lds_select": best["lds_select"], "lds_test": best["lds_test"], "ci_low": best["ci_low"],
                     "ci_high": best["ci_high"], "passes": daunce_passes(mcfg, Km, len(lrs), n, m, S),
                     "cpu_s": cpu, "compute_note": f"{len(lrs)} lr(s) x K={Km}" + (
                         f", {S} theta_0s" if S > 1 else "") + (f" (prefix of K={K})" if Km < K else "")})
        grid_rows += [{"variant": variant, "setting": member.name, **r} for r in table]
        log.info("%s %s: lr=%g, selection LDS %.4f, test LDS %.4f", variant, member.name, best["lr"],
                 best["lds_select"], best["lds_test"])
    doc = {"variant": variant, "group": group_name, "rows": rows, "grid": grid_rows}
    with store.atomic_path(out_json, suffix=".json") as tmp:
        tmp.write_text(json.dumps(doc, indent=2))
    return doc


def train_theta0(cfg: ExperimentConfig, s: int, split_path, out_state, out_metrics) -> dict:
    """theta_0 number ``s`` of the ensembles: the base recipe with seed ``base.seed + s``; its
    metrics record the CPU seconds (``cpu_s``) and forward-pass equivalents (``passes``)."""
    import dataclasses

    from . import vision

    if s < 1:
        raise ValueError(f"extra theta_0 number must be >= 1 (0 is the workflow's theta_0), got {s}")
    cfg_s = dataclasses.replace(cfg, base=dataclasses.replace(cfg.base, seed=cfg.base.seed + s))
    t = time.process_time()
    metrics = vision.train_base(cfg_s, split_path, out_state, out_metrics)
    n = len(np.load(split_path)["train_ids"])
    metrics = {**metrics, "seed": cfg_s.base.seed, "cpu_s": time.process_time() - t,
               "passes": theta0_passes(cfg, n)}
    with store.atomic_path(out_metrics, suffix=".json") as tmp:
        tmp.write_text(json.dumps(metrics, indent=2))
    return metrics


# --- the baselines' compute, from their own runs ---------------------------------------------------

# Per setting of a baseline's tuning grid, the per-example passes it needs at least, in units of
# one forward + backward pass over a training (n) or query (m) example: every gradient method takes
# each example's gradient once per setting (TracIn once per checkpoint); EK-FAC fits its covariance
# and its eigenvalue correction over the training set before it scores; exact IF adds a Gauss-Newton
# matrix built from each training example's Jacobian (one backward pass per class), once for all
# its dampings (baselines.exact_if.damping_grid costs no passes).
BASELINE_PASSES = {
    "graddot": lambda n, m, c, knobs: n + m,
    "trak": lambda n, m, c, knobs: n + m,
    "logra": lambda n, m, c, knobs: n + m,
    "tracin": lambda n, m, c, knobs: int(knobs.get("checkpoints", 1)) * (n + m),
    "ekfac": lambda n, m, c, knobs: 3 * n + m,
}


def baseline_compute(cfg: ExperimentConfig, method: str, benchmark, scores, n: int, m: int, classes: int) -> dict:
    """``passes`` and ``cpu_s`` of a baseline's whole tuning job.

    ``passes``: :data:`BASELINE_PASSES` summed over every setting of its grid (the ``tuning`` record
    of its scores file), x ``FWD_BWD``; TracIn adds the replay of theta_0's training that yields its
    checkpoints (once for the grid), exact IF ``(n + m) + classes x n`` once. ``cpu_s``: the CPU
    seconds of the job's Snakemake benchmark file (the whole grid, job start-up included).
    """
    attrs = store.read_scores(scores)["attrs"]
    grid = (attrs.get("tuning") or {}).get("grid") or [{}]
    if method == "exact_if":
        units = n + m + classes * n
    elif method in BASELINE_PASSES:
        units = sum(BASELINE_PASSES[method](n, m, classes, r) for r in grid)
    else:
        raise ValueError(f"study: no pass count for baseline {method!r}; add it to study.BASELINE_PASSES")
    passes = FWD_BWD * units + (theta0_passes(cfg, n) if method == "tracin" else 0)
    return {"passes": passes, "cpu_s": read_benchmark(benchmark)["cpu_time"],
            "compute_note": f"{len(grid)} setting(s); CPU from its benchmark file"}


# --- quality.csv ----------------------------------------------------------------------------------

def _raw(rows: list[dict], method: str, measure: str) -> dict | None:
    """The method's raw (unthresholded) row of the LDS table, of ``measure`` (or a baseline's
    ``score``) when it has one."""
    mine = [r for r in rows if r["method"] == method and r["threshold"] == "none"]
    return next((r for r in mine if r["measure"] in (measure, "score")), mine[0] if mine else None)


def quality_table(cfg: ExperimentConfig, group_jsons: list, lds_csv, split_path, baselines: dict[str, dict],
                  out_csv, out_grid_csv) -> list[dict]:
    """Write ``quality.csv``: the study's points (kind ``study``), every baseline of ``lds_csv``
    with its compute (kind ``baseline``: ``baselines[method]`` gives its ``benchmark`` and
    ``scores`` files) and every other non-DAUNCE row of ``lds_csv`` (kind ``reference``: the limits,
    exact references without a cost of their own), all at the raw LDS on the test masks;
    and ``grid.csv``: every (variant, setting, lr) with its selection and test LDS."""
    docs = [json.loads(Path(p).read_text()) for p in group_jsons]
    rows = [r for d in docs for r in d["rows"]]
    split = np.load(split_path)
    n, m = len(split["train_ids"]), len(split["query_ids"])
    classes = int(max(split["y_train"].max(), split["y_query"].max())) + 1
    lds_rows = L.read_lds_table(lds_csv)
    from ..baselines.common import REFERENCE

    daunce_methods = set(cfg.daunce.variants)
    baselines = {k: v for k, v in baselines.items() if k not in REFERENCE}  # exact references: no cost row
    for method in dict.fromkeys(r["method"] for r in lds_rows):
        if method in daunce_methods:
            continue
        r = _raw(lds_rows, method, cfg.daunce.select_measure)
        if r is None:
            continue
        row = {"kind": "baseline" if method in baselines else "reference", "variant": method, "setting": "",
               "overrides": "", "theta0s": "", "K": "", "lr": "", "grid": r.get("tuned", ""),
               "on_edge": r.get("on_edge", ""), "lds_select": "", "lds_test": r["lds"], "ci_low": r["ci_low"],
               "ci_high": r["ci_high"], "passes": "", "cpu_s": "", "compute_note": ""}
        if method in baselines:
            row.update(baseline_compute(cfg, method, baselines[method]["benchmark"], baselines[method]["scores"],
                                        n, m, classes))
        rows.append(row)
    with store.atomic_path(out_csv, suffix=".csv") as tmp:
        with open(tmp, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=QUALITY_COLUMNS)
            w.writeheader()
            w.writerows(rows)
    with store.atomic_path(out_grid_csv, suffix=".csv") as tmp:
        with open(tmp, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=GRID_COLUMNS, extrasaction="ignore")
            w.writeheader()
            w.writerows(r for d in docs for r in d["grid"])
    return rows



def quality_markdown(quality_csv) -> str:
    """``quality.csv`` as a Markdown table, best test LDS first within each variant (for reports:
    ``python -m daunce_core.steps.study results/<exp>/study/quality.csv``)."""
    with open(quality_csv) as fh:
        rows = list(csv.DictReader(fh))

    def num(v, fmt):
        return "" if v in (None, "") else format(float(v), fmt)

    order = {"study": 0, "baseline": 1, "reference": 2}
    rows.sort(key=lambda r: (order.get(r["kind"], 3), r["variant"], -float(r["lds_test"] or "nan")))
    lines = ["| kind | variant | setting | K | lr (grid) | LDS select | LDS test [95% CI] | passes | CPU s |",
             "|---|---|---|---:|---|---:|---|---:|---:|"]
    for r in rows:
        edge = " (edge)" if str(r["on_edge"]).lower() == "true" else ""
        lr = f"{r['lr']} ({r['grid']}){edge}" if r["kind"] == "study" else f"{r['grid']}{edge}"
        lines.append(f"| {r['kind']} | {r['variant']} | {r['setting']} | {r['K']} | {lr} | "
                     f"{num(r['lds_select'], '.3f')} | "
                     f"{num(r['lds_test'], '.3f')} [{num(r['ci_low'], '.3f')}, {num(r['ci_high'], '.3f')}] | "
                     f"{num(r['passes'], '.3g')} | {num(r['cpu_s'], '.1f')} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    import sys

    if len(sys.argv) != 2:
        sys.exit("usage: python -m daunce_core.steps.study results/<experiment>/study/quality.csv")
    print(quality_markdown(sys.argv[1]), end="")
