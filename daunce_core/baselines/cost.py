"""``results/<experiment>/cost.md``: what each method cost on the same model, from Snakemake benchmark files.

Every figure comes from files of the run (each job's ``benchmark:`` TSV, the storage attributes of
the scores files, the losses files' shapes, ``lds.csv``); DAUNCE's and each baseline's whole tuning
grid is counted beside the chosen setting alone. ``rule cost`` (``scripts/cost.py``) calls it. How
each column is counted: docs/design.md#daunce_corebaselinescostpy-what-each-method-cost."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import h5py

from .. import store


def read_benchmark(path: str | Path) -> dict[str, float]:
    """One Snakemake benchmark TSV -> ``{"s", "cpu_time", "max_rss"}`` (mean time, max memory over repeats)."""
    path = Path(path)
    if not path.exists():
        raise store.StoreError(f"{path}: no benchmark file; rerun the job that writes it (its rule has "
                               "a 'benchmark:' directive)")
    with open(path) as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    if not rows:
        raise store.StoreError(f"{path}: empty benchmark file")

    def num(r, k):
        v = r.get(k, "NA")
        try:
            return float(v)
        except (TypeError, ValueError):
            return math.nan

    return {"s": sum(num(r, "s") for r in rows) / len(rows),
            "cpu_time": sum(num(r, "cpu_time") for r in rows) / len(rows),
            "max_rss": max(num(r, "max_rss") for r in rows)}


def _bytes(v: float | None) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    v = float(v)
    for unit, f in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if v >= f:
            return f"{v / f:.3g} {unit}"
    return f"{v:.0f} B"


def _lds(rows: list[dict], method: str, measure: str | None) -> tuple[str, str]:
    def pick(raw: bool) -> str:
        for r in rows:
            if r["method"] == method and (measure is None or r["measure"] == measure) and \
                    ((r["threshold"] == "none") == raw):
                return f"{float(r['lds']):.3f} [{float(r['ci_low']):.3f}, {float(r['ci_high']):.3f}]"
        return "–"

    return pick(False), pick(True)


def daunce_row(method: str, fit_benchmarks: list[str], score_benchmark: str, grid: int, losses: str,
               select_benchmark: str | None = None, selection: str | None = None) -> dict:
    fits = [read_benchmark(p) for p in fit_benchmarks]
    sc = read_benchmark(score_benchmark)
    sel = read_benchmark(select_benchmark) if select_benchmark else {"s": 0.0, "cpu_time": 0.0, "max_rss": 0.0}
    fit_s = sum(f["s"] for f in fits)
    fit_cpu = sum(f["cpu_time"] for f in fits)
    with h5py.File(losses, "r") as f:
        K, n = f["train"].shape
        itemsize = f["train"].dtype.itemsize
    doc = json.loads(Path(selection).read_text()) if selection else {}
    chosen = doc.get("selected_lr")
    return {
        "method": method,
        "wall": fit_s / grid + sc["s"], "cpu": fit_cpu / grid + sc["cpu_time"],
        "wall_tuning": fit_s + sel["s"] + sc["s"],
        "rss": max([f["max_rss"] for f in fits] + [sc["max_rss"], sel["max_rss"]]),
        "per_example": K * itemsize, "shared": None,
        "notes": (f"{len(fits)} fit job(s) took {fit_s:.1f} s for all {grid} learning rates of the grid "
                  f"(÷{grid} for the chosen one) + selection {sel['s']:.1f} s + scoring {sc['s']:.1f} s; "
                  f"stores K={K} float32 losses per example"),
        "grid": _grid_text("lr", doc.get("grid", []), {"lr": chosen} if chosen is not None else None,
                           doc.get("on_edge")),
    }


def _grid_text(what: str, table: list[dict], chosen: dict | None, edge) -> str:
    """One line per tuned method: every setting with its selection LDS, the chosen one in bold."""
    if not table:
        return ""
    parts = []
    for r in table:
        setting = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()
                            if k not in ("lds_select", "seconds", "diverged", "failed", "skipped"))
        v = r.get("lds_select")
        val = "diverged" if r.get("diverged") else "failed" if r.get("failed") or r.get("skipped") else \
            ("–" if v is None else f"{v:.3f}")
        item = f"{setting}: {val}"
        if chosen is not None and all(r.get(k) == x for k, x in chosen.items()):
            item = f"**{item}**"
        parts.append(item)
    return "; ".join(parts) + (" — **chosen value at an end of the grid**" if edge else "")


SETTINGS = ("library", "measurement", "proj_dim", "lambda_reg", "half_precision", "ensemble", "strategy",
            "empirical_fisher", "damping", "rank", "checkpoints", "weights", "curvature", "weight_decay",
            # the Theorem-1 limits and linearised fits (:mod:`.limits`)
            "variant", "measure_of_scores", "damping_absolute", "K")


def _settings(attrs: dict) -> str:
    out = []
    for k in SETTINGS:
        if k in attrs:
            v = attrs[k]
            if isinstance(v, list):
                v = "[" + ", ".join(f"{x:.3g}" if isinstance(x, float) else str(x) for x in v) + "]"
            out.append(f"{k}={v}")
    return ", ".join(out)


def startup_baseline() -> dict[str, float]:
    """Wall time and peak RSS of a bare ``python -c 'import torch'`` on this machine, now: the part
    of every job's figures that is process start-up, not the method."""
    import resource
    import subprocess
    import sys
    import time

    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import torch"], check=True, capture_output=True)
    wall = time.perf_counter() - t
    # Linux reports ru_maxrss in KiB: the largest child so far, i.e. this one
    return {"s": wall, "max_rss": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024 / 1e6}


def baseline_row(method: str, benchmark: str, scores: str) -> dict:
    b = read_benchmark(benchmark)
    attrs = store.read_scores(scores)["attrs"]
    inproc = attrs.get("seconds_in_process")
    notes = str(attrs.get("storage", ""))
    if inproc is not None:
        notes = f"{float(inproc):.1f} s inside the job after start-up; " + notes
    tuning = attrs.get("tuning") or {}
    table = tuning.get("grid", [])
    chosen = tuning.get("selected")
    # the chosen setting alone: the job less the in-process seconds of the other settings it tried
    others = sum(float(r.get("seconds") or 0.0) for r in table
                 if chosen is None or not all(r.get(k) == v for k, v in chosen.items()))
    frac = (b["s"] - others) / b["s"] if b["s"] > 0 else 1.0
    return {"method": method, "wall": b["s"] - others, "cpu": b["cpu_time"] * frac, "wall_tuning": b["s"],
            "rss": b["max_rss"], "per_example": attrs.get("bytes_per_example"), "shared": attrs.get("shared_bytes"),
            "notes": notes, "settings": _settings(attrs),
            "grid": _grid_text("", table, chosen, tuning.get("on_edge"))}


def write_cost_table(entries: list[dict[str, Any]], lds_csv: str, base_benchmark: str | None, out: str,
                     *, experiment: str = "", daunce_measure: str = "correlation",
                     startup: dict[str, float] | None = None,
                     selection_benchmarks: list[str] | None = None) -> list[dict]:
    """Write ``out`` (Markdown) from ``entries``: dicts with ``kind`` ``"daunce"`` (keys of
    :func:`daunce_row`) or ``"baseline"`` (keys of :func:`baseline_row`)."""
    with open(lds_csv) as fh:
        lds_rows = list(csv.DictReader(fh))
    rows = []
    for e in entries:
        kw = {k: v for k, v in e.items() if k != "kind"}
        r = daunce_row(**kw) if e["kind"] == "daunce" else baseline_row(**kw)
        r["lds_thr"], r["lds_raw"] = _lds(lds_rows, r["method"], daunce_measure if e["kind"] == "daunce" else None)
        rows.append(r)
    from ..figures import DISPLAY

    source = f"results/{experiment or '<experiment>'}/lds.csv"
    lines = [f"# Cost of each attribution method on the same model ({experiment})", "",
             f"Measured in the run that produced `{source}`: wall and CPU time and peak resident "
             "memory come from each job's Snakemake `benchmark:` file; every job is a fresh Python process, "
             "so the times include interpreter and library start-up (a few seconds each at this scale). "
             "A job that was already up to date keeps the benchmark file of the run that made its output, "
             "so every figure belongs to the results it sits beside. "
             "LDS is on the test masks with 95% bootstrap CIs over masks and queries: raw scores, and thresholded as "
             "`lds.threshold` beside it.", ""]
    if startup:
        lines += [f"Start-up alone: a bare `python -c 'import torch'` took {startup['s']:.1f} s and peaked at "
                  f"{startup['max_rss']:.0f} MB RSS when this table was written.", ""]
    if base_benchmark:
        b = read_benchmark(base_benchmark)
        lines += [f"Training theta_0 (shared by every method, not counted below): {b['s']:.1f} s wall, "
                  f"{b['max_rss']:.0f} MB peak RSS.", ""]
    sel_s = None
    if selection_benchmarks:
        sel = [read_benchmark(p) for p in selection_benchmarks]
        sel_s = sum(x["s"] for x in sel)
        lines += [f"Tuning counts in full. Every method's knobs are chosen on the LDS selection "
                  f"masks and selection queries, whose ground truth took {sel_s:.1f} s wall ({len(sel)} job(s) of "
                  "retrains from scratch): shared by every tuned method, and added to each one's *total with "
                  "tuning* below. The *with tuning* column counts every setting of the method's grid.", ""]
    lines += ["| method | LDS (raw) | LDS (thresholded) | wall time, chosen setting (s) | wall time with tuning (s) | "
              "total with tuning and selection retrains (s) | CPU time (s) | peak RSS (MB) | "
              "stored per training example | stored once | notes |",
              "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        tuned = bool(r.get("grid"))
        total = (f"{r['wall_tuning'] + sel_s:.1f}" if tuned and sel_s is not None else f"{r['wall_tuning']:.1f}")
        lines.append(f"| {DISPLAY.get(r['method'], r['method'])} | {r['lds_raw']} | {r['lds_thr']} | "
                     f"{r['wall']:.1f} | {r['wall_tuning']:.1f} | {total} | {r['cpu']:.1f} | {r['rss']:.0f} | "
                     f"{_bytes(r['per_example'])} | {_bytes(r['shared'])} | {r['notes']} |")
    grids = [r for r in rows if r.get("grid")]
    if grids:
        lines += ["", "Grids searched, each setting with its selection LDS (raw scores; the chosen one in bold). "
                  "Budget rule: no method tries more settings than DAUNCE's learning-rate grid has values.", ""]
        lines += [f"- {DISPLAY.get(r['method'], r['method'])}: {r['grid']}" for r in grids]
    lines += ["", "Stored per training example: what the method keeps to score a new query without "
              "redoing its per-example work (DAUNCE: the K losses; TRAK: the projected feature; LoGra: the "
              "projected preconditioned gradient; Grad-Dot/TracIn/exact IF: full gradients). "
              "EK-FAC keeps nothing per example: kronfluence recomputes training gradients for every query batch.",
              "", "Settings of the baselines in this run (from their scores files):", ""]
    lines += [f"- {DISPLAY.get(r['method'], r['method'])}: {r['settings']}" for r in rows if r.get("settings")]
    lines += [""]
    with store.atomic_path(out, suffix=".md") as tmp:
        tmp.write_text("\n".join(lines))
    return rows
