"""One function per figure or table of the paper. Inputs are the workflow's result files.

Every number drawn comes from the files passed in; nothing is typed in by hand. Where a method
loses, the figure and the table show it.
"""
from __future__ import annotations

import csv
import logging
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from . import store  # noqa: E402
from .lds import read_lds_table  # noqa: E402

log = logging.getLogger(__name__)

DISPLAY = {
    "daunce": "DAUNCE", "daunce_e": "DAUNCE-E", "daunce_t": "DAUNCE-T", "daunce_t_q": "DAUNCE-T (Q)",
    "daunce_m": "DAUNCE-M (matched noise)", "limit_daunce_m": "limit: DAUNCE-M",
    "daunce_bb": "DAUNCE (bb)", "daunce_e_bb": "DAUNCE-E (bb)", "daunce_t_bb": "DAUNCE-T (bb)",
    "trak": "TRAK", "ekfac": "EK-FAC IF", "logra": "LoGra", "graddot": "Grad-Dot",
    "tracin": "TracIn", "exact_if": "Exact IF",
    # references (not bounds): each variant's Theorem-1 limit, its linearised fits at the run's K,
    # and exact IF scored by correlation
    "limit_daunce": "limit: DAUNCE", "limit_daunce_e": "limit: DAUNCE-E", "limit_daunce_t": "limit: DAUNCE-T",
    "limit_daunce_t_q": "limit: DAUNCE-T (Q)", "exact_if_corr": "Exact IF (correlation)",
    "limit_bb": "limit: DAUNCE (bb)", "lin_daunce": "linearised: DAUNCE", "lin_daunce_e": "linearised: DAUNCE-E",
    "lin_daunce_t": "linearised: DAUNCE-T", "lin_bb": "linearised: DAUNCE (bb)",
}


def _label(method: str) -> str:
    return DISPLAY.get(method, method)


def _color(method: str) -> str:
    if method.endswith("_bb"):
        return "C1"
    return "C0" if method.startswith("daunce") else "C7"


def _save(fig, out) -> None:
    with store.atomic_path(out, suffix=Path(out).suffix) as tmp:
        fig.savefig(tmp, format=Path(out).suffix.lstrip(".") or "pdf", bbox_inches="tight")
    plt.close(fig)


def _pick(rows: list[dict], method: str, measure: str | None, threshold_raw: bool) -> dict | None:
    for r in rows:
        if r["method"] != method or (measure is not None and r["measure"] != measure):
            continue
        if (r["threshold"] == "none") == threshold_raw:
            return r
    return None


def lds_bars(rows: list[dict], methods: list[str], out, title: str,
             measures: tuple[str, ...] = ("correlation", "covariance")) -> None:
    """Bar chart of LDS with 95% CI (bootstrap over masks and queries) per method: raw scores
    (solid, the primary number) beside thresholded ones (hatched), every method alike. A DAUNCE
    variant gets one bar pair per measure in ``measures`` (correlation and covariance)."""
    entries = []
    for m in methods:
        if not any(r["method"] == m for r in rows):
            continue
        if m.startswith("daunce"):
            entries += [(m, meas) for meas in measures if any(r["method"] == m and r["measure"] == meas
                                                               for r in rows)]
        else:
            entries.append((m, None))
    fig, ax = plt.subplots(figsize=(max(4.0, 1.1 * len(entries) + 1.5), 3.4))
    x = np.arange(len(entries))
    w = 0.38
    for off, raw, style in ((-w / 2, True, {}), (w / 2, False, {"hatch": "//", "alpha": 0.55})):
        vals, lo, hi = [], [], []
        for m, meas in entries:
            r = _pick(rows, m, meas, raw)
            vals.append(r["lds"] if r else np.nan)
            lo.append(r["lds"] - r["ci_low"] if r else 0)
            hi.append(r["ci_high"] - r["lds"] if r else 0)
        label = "raw scores" if raw else "thresholded"
        ax.bar(x + off, vals, w, yerr=[lo, hi], capsize=3, label=label,
               color=[_color(m) for m, _ in entries], edgecolor="k", **style)
        for xi, v in zip(x + off, vals):
            if np.isfinite(v):
                ax.text(xi, v + 0.01 if v >= 0 else v - 0.03, f"{v:.3f}", ha="center", fontsize=6.5)
    ax.axhline(0, color="k", lw=0.6)
    ticks = [_label(m) + ("" if meas is None else f" ({meas[:4]}.)") for m, meas in entries]
    ax.set_xticks(x, ticks, rotation=30, ha="right")
    ax.set_ylabel("LDS (95% CI, masks x queries)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, frameon=False)
    _save(fig, out)


def fig1a(lds_csv, out, methods: list[str], title: str = "LDS, white-box") -> None:
    lds_bars(read_lds_table(lds_csv), methods, out, title)


def fig1b(lds_csv, out, white: list[str], black: list[str], title: str = "LDS, black-box vs white-box") -> None:
    lds_bars(read_lds_table(lds_csv), [*white, *black], out, title)


def table3(lds_csv, out_md, out_csv, variants: list[str]) -> list[dict]:
    """Table 3: LDS with correlation vs covariance for each variant (raw, and thresholded)."""
    rows = read_lds_table(lds_csv)
    table = []
    for measure in ("correlation", "covariance"):
        for v in variants:
            for raw in (True, False):
                r = _pick(rows, v, measure, raw)
                if r:
                    table.append({"measure": measure, "method": v, "threshold": r["threshold"],
                                  "lds": r["lds"], "ci_low": r["ci_low"], "ci_high": r["ci_high"]})
    with store.atomic_path(out_csv, suffix=".csv") as tmp:
        with open(tmp, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=["measure", "method", "threshold", "lds", "ci_low", "ci_high"])
            w.writeheader()
            for r in table:
                w.writerow({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in r.items()})
    lines = ["# Table 3: correlation versus covariance", "",
             "LDS (mean Spearman over queries, 95% bootstrap CI) of each DAUNCE variant.", ""]
    for raw in (True, False):
        kind = next((r["threshold"] for r in table if (r["threshold"] == "none") == raw), None)
        if kind is None:
            continue
        lines += ["Raw scores:" if raw else f"Thresholded scores ({kind}):", "",
                  "| measure | " + " | ".join(_label(v) for v in variants) + " |",
                  "|---|" + "---|" * len(variants)]
        for measure in ("correlation", "covariance"):
            cells = []
            for v in variants:
                r = next((t for t in table if t["method"] == v and t["measure"] == measure
                          and (t["threshold"] == "none") == raw), None)
                cells.append(f"{r['lds']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}]" if r else "n/a")
            lines.append(f"| {measure} | " + " | ".join(cells) + " |")
        lines.append("")
    with store.atomic_path(out_md, suffix=".md") as tmp:
        tmp.write_text("\n".join(lines))
    return table


def fit_exponential(K: np.ndarray, lds: np.ndarray) -> tuple[float, float, float]:
    """Fit ``y = a exp(-b K) + c`` (Figure 6) with scipy; returns (a, b, c)."""
    from scipy.optimize import curve_fit

    K = np.asarray(K, float)
    lds = np.asarray(lds, float)
    f = lambda k, a, b, c: a * np.exp(-b * k) + c  # noqa: E731
    p0 = (lds[0] - lds[-1], 1.0 / max(1.0, np.median(K)), lds[-1])
    params, _ = curve_fit(f, K, lds, p0=p0, maxfev=20000)
    return tuple(float(v) for v in params)


def fig6(k_csv, out, label: str = "DAUNCE") -> tuple[float, float, float]:
    with open(k_csv) as fh:
        rows = list(csv.DictReader(fh))
    K = np.array([float(r["K"]) for r in rows])
    y = np.array([float(r["lds"]) for r in rows])
    lo = np.array([float(r["ci_low"]) for r in rows])
    hi = np.array([float(r["ci_high"]) for r in rows])
    fig, ax = plt.subplots(figsize=(4.2, 3.0))
    ax.errorbar(K, y, yerr=[y - lo, hi - y], fmt="o", capsize=3, label=label)
    try:
        a, b, c = fit_exponential(K, y)
        ks = np.linspace(K.min(), K.max(), 200)
        ax.plot(ks, a * np.exp(-b * ks) + c, "k--", label=f"fit: y = {a:.3f} exp(-{b:.4f} K) + {c:.3f}")
    except (RuntimeError, ValueError, TypeError) as exc:  # too few points or no convergence
        a = b = c = float("nan")
        ax.text(0.5, 0.1, f"exponential fit failed: {exc}", transform=ax.transAxes, fontsize=6)
    ax.set_xlabel("number of perturbed models K")
    ax.set_ylabel("LDS")
    ax.legend(fontsize=7, frameon=False)
    _save(fig, out)
    return a, b, c


def fig5(cfg, split_path, scores_paths: dict[str, str], out, query: int = 0, top: int = 5) -> None:
    """A query image with its most positive and most negative training images (Figure 5)."""
    from .data import load_dataset

    ds = load_dataset(cfg.data)
    store.check_split(split_path, ds.train_ids, ds.query_ids, ds.content_hash, ds.source)
    measures = list(scores_paths)
    fig, axes = plt.subplots(2 * len(measures), top + 1, figsize=(1.25 * (top + 1), 2.6 * len(measures)))
    qimg = ds.images(ds.X_query[query:query + 1])[0]
    for mi, measure in enumerate(measures):
        scores, meta = store.dense_scores(scores_paths[measure])
        scores, _ = store.align_scores(scores, meta, {"train_ids": ds.train_ids, "query_ids": ds.query_ids},
                                       scores_paths[measure], split_path, notify=log.warning)  # join on ids
        col = scores[:, query]
        order = np.argsort(col)
        for ri, (name, idx) in enumerate((("most positive", order[::-1][:top]), ("most negative", order[:top]))):
            row = axes[2 * mi + ri]
            row[0].imshow(np.atleast_2d(qimg.squeeze()), cmap="gray" if qimg.shape[-1] == 1 else None,
                          aspect="auto" if ds.tabular else None)  # feature vectors: one row of features
            row[0].set_title(f"query ({ds.classes[ds.y_query[query]]})", fontsize=7)
            row[0].set_ylabel(f"{measure}\n{name}", fontsize=7)
            imgs = ds.images(ds.X_train[idx])
            for j, i in enumerate(idx):
                row[j + 1].imshow(np.atleast_2d(imgs[j].squeeze()), cmap="gray" if imgs.shape[-1] == 1 else None,
                                  aspect="auto" if ds.tabular else None)
                row[j + 1].set_title(f"{ds.classes[ds.y_train[i]]}  {col[i]:+.3g}", fontsize=6.5)
            for a in row:
                a.set_xticks([])
                a.set_yticks([])
    fig.suptitle("Query and its most influential training examples (DAUNCE)", fontsize=9)
    _save(fig, out)


# --- Figure 3: the terms of the perturbed objective during training --------------------------------

TRACE_TERMS = ("total", "erm", "first_order")  # the ``trace`` group of a chunk's losses file
_TERM_LABEL = {"total": "full perturbed objective", "erm": "ERM term", "first_order": "first-order term"}


def read_trace(paths: list) -> dict[str, np.ndarray] | None:
    """The ``trace`` groups of a setting's chunk files stacked along K (``step`` [S], terms [K, S]);
    ``None`` when a file has none (a fitter or a run that logged nothing)."""
    import h5py

    parts = []
    for p in paths:
        with h5py.File(p, "r") as f:
            if "trace" not in f:
                return None
            parts.append({k: f["trace"][k][()] for k in f["trace"]})
    out = {"step": parts[0]["step"]}
    for t in TRACE_TERMS:
        out[t] = np.concatenate([q[t] for q in parts], axis=0)
    return out


def _selected_chunks(selection_json, chunks_by_lr: dict[str, list]) -> tuple[str, list]:
    """The chunk files of the learning rate a selection chose (``selected_lr`` of its json)."""
    import json

    lr = json.loads(Path(selection_json).read_text())["selected_lr"]
    for tag, files in chunks_by_lr.items():
        if float(tag) == float(lr):
            return tag, list(files)
    raise ValueError(f"{selection_json}: the selected lr {lr} is none of the grid's {sorted(chunks_by_lr)}")


def _trace_panel(ax, trace: dict, ylabel: str, log_y: bool) -> None:
    for i, t in enumerate(TRACE_TERMS):
        v = trace[t]
        med = np.nanmedian(v, axis=0)
        lo, hi = np.nanquantile(v, 0.1, axis=0), np.nanquantile(v, 0.9, axis=0)
        ax.plot(trace["step"], med, color=f"C{i}", label=_TERM_LABEL[t])
        ax.fill_between(trace["step"], lo, hi, color=f"C{i}", alpha=0.2, lw=0)
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7, frameon=False)


def fig3(vision: dict | None, llm: dict | None, out) -> list[str]:
    """Figure 3: the terms of the perturbed objective over the training steps of the perturbed fits
    at the selected learning rate -- gradient norms (vision) and batch values (LLM), each for the full
    objective, the ERM term and the first-order term; median over the K models, 10-90% band.

    ``vision`` / ``llm``: ``{"selection": selection.json, "chunks": {lr tag: [chunk files]},
    "label": ...}`` or ``None``. A side whose chunk files carry no ``trace`` group is drawn as an
    empty panel that says so. Returns the panels drawn.
    """
    sides = [(k, v) for k, v in (("vision", vision), ("llm", llm)) if v]
    fig, axes = plt.subplots(1, max(1, len(sides)), figsize=(4.4 * max(1, len(sides)), 3.2), squeeze=False)
    drawn = []
    for ax, (kind, side) in zip(axes[0], sides):
        tag, files = _selected_chunks(side["selection"], side["chunks"])
        trace = read_trace(files)
        title = f"{side.get('label', kind)}, lr={tag}"
        if trace is None:
            ax.text(0.5, 0.5, "no per-step trace in these losses files", ha="center", transform=ax.transAxes)
            ax.set_axis_off()
        else:
            _trace_panel(ax, trace, "gradient norm" if kind == "vision" else "batch mean of the term",
                         log_y=kind == "vision")
            drawn.append(kind)
        ax.set_title(title, fontsize=9)
    _save(fig, out)
    return drawn


# --- the quality landscape (docs/quality.md) ----------------------------------------------------

_STUDY_MARKERS = {"daunce": "o", "daunce_e": "s", "daunce_t": "^", "daunce_t_q": "v"}
_LINE_METHODS = ("exact_if",)  # drawn as a level as well as a point: a reference


def quality(quality_csv, out, title: str = "Quality against compute (test LDS, raw scores)") -> None:
    """LDS on the test masks against compute, whole tuning grid included, in two panels: forward-pass
    equivalents (hardware-independent) and measured CPU seconds (log x). One marker series per DAUNCE
    variant over the study's settings (a setting chosen at an end of its lr grid is drawn hollow),
    each baseline a labelled point, exact IF and every reference row without a cost of its own
    (the limit_* and lin_* rows of results/<experiment>/lds.csv) a horizontal line. Error bars: 95% bootstrap CI."""
    with open(quality_csv) as fh:
        rows = list(csv.DictReader(fh))
    for r in rows:  # numbers as floats, nan where a kind has none
        for k in ("lds_test", "ci_low", "ci_high", "passes", "cpu_s"):
            r[k] = float(r[k]) if r.get(k) not in (None, "") else math.nan
    study = [r for r in rows if r["kind"] == "study"]
    points = [r for r in rows if r["kind"] == "baseline"]
    levels = [r for r in rows if r["kind"] == "reference" or r["variant"] in _LINE_METHODS]
    fig, axes = plt.subplots(1, 2, figsize=(12.5, 5.0), sharey=True)
    for ax, key, xlabel in ((axes[0], "passes", "compute: forward-pass equivalents, whole tuning grid"),
                            (axes[1], "cpu_s", "compute: CPU seconds, whole tuning grid")):
        for v in dict.fromkeys(r["variant"] for r in study):
            rs = sorted((r for r in study if r["variant"] == v and np.isfinite(r[key])), key=lambda r: r[key])
            if not rs:
                continue
            x = np.array([r[key] for r in rs])
            y = np.array([r["lds_test"] for r in rs])
            err = np.array([[r["lds_test"] - r["ci_low"] for r in rs], [r["ci_high"] - r["lds_test"] for r in rs]])
            color = f"C{list(_STUDY_MARKERS).index(v) if v in _STUDY_MARKERS else 4}"
            ax.errorbar(x, y, yerr=err, fmt="none", ecolor=color, alpha=0.35, lw=0.8)
            edge = np.array([str(r["on_edge"]).lower() == "true" for r in rs])
            marker = _STUDY_MARKERS.get(v, "D")
            ax.scatter(x[~edge], y[~edge], marker=marker, color=color, s=26, label=_label(v), zorder=3)
            if edge.any():
                ax.scatter(x[edge], y[edge], marker=marker, facecolors="none", edgecolors=color, s=26, zorder=3)
            best = int(np.argmax(y))
            ax.annotate(rs[best]["setting"], (x[best], y[best]), textcoords="offset points", xytext=(4, 4),
                        fontsize=6, color=color)
        for r in points:
            if not np.isfinite(r[key]):
                continue
            ax.errorbar([r[key]], [r["lds_test"]], yerr=[[r["lds_test"] - r["ci_low"]], [r["ci_high"] - r["lds_test"]]],
                        fmt="X", color="C7", ms=6, lw=0.8, zorder=3)
            ax.annotate(_label(r["variant"]), (r[key], r["lds_test"]), textcoords="offset points", xytext=(4, -9),
                        fontsize=7, color="0.3")
        for i, r in enumerate(levels):
            ax.axhline(r["lds_test"], color="0.25" if r["variant"] in _LINE_METHODS else f"C{5 + i % 5}",
                       ls="--" if r["variant"] in _LINE_METHODS else ":", lw=1.0,
                       label=_label(r["variant"]) if ax is axes[0] else None)
        ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3, which="both", lw=0.4)
    axes[0].scatter([], [], marker="o", facecolors="none", edgecolors="0.4", s=26,
                    label="hollow: lr at an end of its grid")
    axes[0].set_ylabel("LDS, test masks (95% CI)")
    axes[0].legend(fontsize=7, loc="best")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    _save(fig, out)


# --- the regime experiment (config/regime/*.yaml, docs/regime.md) --------------------------------

REGIME_COLUMNS = ["method", "measure", "lds_raw", "ci_low_raw", "ci_high_raw", "lds_thr", "ci_low_thr",
                  "ci_high_thr", "floats_per_example", "stores_nothing", "wall_s", "wall_tuning_s", "params"]


def regime_label(method: str, measure: str = "") -> str:
    """Display name: ``trak_k200`` -> ``TRAK k=200``; DAUNCE's covariance rows marked."""
    if method.startswith("trak_k") and method[6:].isdigit():
        name = f"TRAK k={int(method[6:])}"
    else:
        name = {"trak_ens": "TRAK ensemble", "if_iter": "IF (Arnoldi)"}.get(method, _label(method))
    return name + (" (cov)" if measure == "covariance" else "")


def _param_count(theta_0) -> int:
    from safetensors import safe_open

    with safe_open(str(theta_0), "np") as f:
        return int(sum(int(np.prod(f.get_slice(k).get_shape())) for k in f.keys()))


def regime_rows(entries: list[dict], lds_csv, theta_0, selection_benchmarks: list[str] | None = None) -> list[dict]:
    """One row per method (and per DAUNCE measure in ``lds_csv``): raw and thresholded LDS with
    CIs, numbers stored per training example (bytes / 4) and wall time, from the same files as
    results/<experiment>/cost.md (:mod:`daunce_core.baselines.cost`). A method that stores nothing per example
    (EK-FAC recomputes training gradients per query batch) has ``stores_nothing`` set."""
    from .baselines.cost import baseline_row, daunce_row

    params = _param_count(theta_0)
    with open(lds_csv, newline="") as fh:
        lds = list(csv.DictReader(fh))
    rows = []
    for e in entries:
        kw = {k: v for k, v in e.items() if k != "kind"}
        c = daunce_row(**kw) if e["kind"] == "daunce" else baseline_row(**kw)
        measures = sorted({r["measure"] for r in lds if r["method"] == e["method"]})
        for measure in measures:
            raw = next((r for r in lds if r["method"] == e["method"] and r["measure"] == measure
                        and r["threshold"] == "none"), None)
            thr = next((r for r in lds if r["method"] == e["method"] and r["measure"] == measure
                        and r["threshold"] != "none"), None)
            if raw is None:
                continue
            per = c.get("per_example")
            rows.append({
                "method": e["method"], "measure": measure,
                "lds_raw": float(raw["lds"]), "ci_low_raw": float(raw["ci_low"]), "ci_high_raw": float(raw["ci_high"]),
                "lds_thr": float(thr["lds"]) if thr else math.nan,
                "ci_low_thr": float(thr["ci_low"]) if thr else math.nan,
                "ci_high_thr": float(thr["ci_high"]) if thr else math.nan,
                "floats_per_example": float(per) / 4 if per else 0.0, "stores_nothing": not per,
                "wall_s": float(c["wall"]), "wall_tuning_s": float(c["wall_tuning"]), "params": params,
            })
    if not rows:
        raise store.StoreError(f"{lds_csv}: no LDS row of any method of the regime figure")
    return rows


def regime_figure(rows: list[dict], out_pdf, out_csv, title: str = "") -> None:
    """LDS (raw, 95% CI; thresholded: hollow) against numbers stored per training example and
    against wall time with tuning, every method; plus the rows as CSV."""
    with store.atomic_path(out_csv, suffix=".csv") as tmp, open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=REGIME_COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{r[k]:.6g}" if isinstance(r[k], float) else r[k]) for k in REGIME_COLUMNS})
    params = rows[0]["params"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4), sharey=True)
    panels = ((axes[0], "floats_per_example", "numbers stored per training example (float32)"),
              (axes[1], "wall_tuning_s", "wall time with tuning (s, benchmark files)"))
    for ax, key, xlabel in panels:
        for i, r in enumerate(rows):
            color = "C0" if r["method"].startswith("daunce") else f"C{1 + i % 9}"
            x = r[key]
            if key == "floats_per_example" and r["stores_nothing"]:
                x = params  # recomputes a full gradient per example for every query batch
            ax.errorbar([x], [r["lds_raw"]], yerr=[[r["lds_raw"] - r["ci_low_raw"]], [r["ci_high_raw"] - r["lds_raw"]]],
                        fmt="s" if r["stores_nothing"] and key == "floats_per_example" else "o", color=color,
                        ms=5, lw=0.8, mfc="white" if r["stores_nothing"] and key == "floats_per_example" else color)
            if np.isfinite(r["lds_thr"]):
                ax.plot([x], [r["lds_thr"]], marker="_", color=color, ms=9, mew=1.2)
            ax.annotate(regime_label(r["method"], r["measure"]), (x, r["lds_raw"]), textcoords="offset points",
                        xytext=(4, 3), fontsize=6.5, color="0.25")
        ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.axhline(0.0, color="0.6", lw=0.6)
        ax.grid(alpha=0.3, which="both", lw=0.4)
    axes[0].axvline(params, color="0.5", ls=":", lw=0.9)
    axes[0].annotate(f"{params:,} parameters", (params, axes[0].get_ylim()[0]), textcoords="offset points",
                     xytext=(-4, 4), fontsize=7, rotation=90, ha="right", va="bottom", color="0.4")
    axes[0].set_ylabel("LDS, test masks: raw (dot, 95% CI); thresholded (dash)")
    axes[0].set_title("storage (hollow square: nothing stored, gradients recomputed)", fontsize=8)
    axes[1].set_title("compute", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    _save(fig, out_pdf)
