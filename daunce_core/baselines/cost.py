"""``results/cost.md``: what each method cost on the same model, from Snakemake benchmark files.

Every figure comes from files of the run: the ``benchmark:`` TSV of each job (wall seconds ``s``,
``cpu_time``, peak resident memory ``max_rss`` in MB), the storage attributes each baseline
adapter wrote into its scores file, the shapes of DAUNCE's losses files and ``results/lds.csv``.

DAUNCE's perturbed-fit jobs fit the K models for *every* learning rate of the grid in one job; the
table divides their time by the grid size (the cost of one setting) and gives the undivided total
beside it. Choosing the learning rate on the selection masks is evaluation, not attribution, and
is not counted -- nor is exact IF's damping selection separable from its job (it is included).
"""
from __future__ import annotations

import csv
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


def daunce_row(method: str, fit_benchmarks: list[str], score_benchmark: str, grid: int, losses: str) -> dict:
    fits = [read_benchmark(p) for p in fit_benchmarks]
    sc = read_benchmark(score_benchmark)
    fit_s = sum(f["s"] for f in fits)
    fit_cpu = sum(f["cpu_time"] for f in fits)
    with h5py.File(losses, "r") as f:
        K, n = f["train"].shape
        itemsize = f["train"].dtype.itemsize
    return {
        "method": method,
        "wall": fit_s / grid + sc["s"], "cpu": fit_cpu / grid + sc["cpu_time"],
        "rss": max([f["max_rss"] for f in fits] + [sc["max_rss"]]),
        "per_example": K * itemsize, "shared": None,
        "notes": (f"{len(fits)} fit job(s) took {fit_s:.1f} s for all {grid} learning rates of the grid "
                  f"(÷{grid} here) + scoring {sc['s']:.1f} s; stores K={K} float32 losses per example"),
    }


SETTINGS = ("library", "measurement", "proj_dim", "lambda_reg", "half_precision", "ensemble", "strategy",
            "empirical_fisher", "damping", "rank", "checkpoints", "weights", "curvature", "weight_decay")


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
    return {"method": method, "wall": b["s"], "cpu": b["cpu_time"], "rss": b["max_rss"],
            "per_example": attrs.get("bytes_per_example"), "shared": attrs.get("shared_bytes"), "notes": notes,
            "settings": _settings(attrs)}


def write_cost_table(entries: list[dict[str, Any]], lds_csv: str, base_benchmark: str | None, out: str,
                     *, experiment: str = "", daunce_measure: str = "correlation",
                     startup: dict[str, float] | None = None) -> list[dict]:
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

    lines = [f"# Cost of each attribution method on the same model ({experiment})", "",
             "Measured in the run that produced `results/lds.csv`: wall and CPU time and peak resident "
             "memory come from each job's Snakemake `benchmark:` file; every job is a fresh Python process, "
             "so the times include interpreter and library start-up (a few seconds each at this scale). "
             "A job that was already up to date keeps the benchmark file of the run that made its output, "
             "so every figure belongs to the results it sits beside. "
             "LDS is on the test masks with 95% bootstrap CIs (thresholded as `lds.threshold`, and raw).", ""]
    if startup:
        lines += [f"Start-up alone: a bare `python -c 'import torch'` took {startup['s']:.1f} s and peaked at "
                  f"{startup['max_rss']:.0f} MB RSS when this table was written.", ""]
    if base_benchmark:
        b = read_benchmark(base_benchmark)
        lines += [f"Training theta_0 (shared by every method, not counted below): {b['s']:.1f} s wall, "
                  f"{b['max_rss']:.0f} MB peak RSS.", ""]
    lines += ["| method | LDS (thresholded) | LDS (raw) | wall time (s) | CPU time (s) | peak RSS (MB) | "
              "stored per training example | stored once | notes |",
              "|---|---|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {DISPLAY.get(r['method'], r['method'])} | {r['lds_thr']} | {r['lds_raw']} | "
                     f"{r['wall']:.1f} | {r['cpu']:.1f} | {r['rss']:.0f} | {_bytes(r['per_example'])} | "
                     f"{_bytes(r['shared'])} | {r['notes']} |")
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
