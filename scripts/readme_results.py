"""Rewrite README.md's results block from the files a run wrote (no number is typed in by hand).

    python scripts/readme_results.py              # after ./dev run: results/digits_mlp/ -> README.md
    python scripts/readme_results.py --check      # exit 1 if README.md differs from the results

Reads the embedded default's own files (results/<experiment of config/config.yaml>/, or --results):
lds.csv (with lds_paired.csv beside it when there), blackbox/precision.csv and llm_removal.csv
(whichever exist), never the top-level copies another experiment's run may have replaced, and
replaces the text between the markers ``<!-- results:begin -->`` and
``<!-- results:end -->``; the block names the commit and the date of the run's lds.csv. Not a
workflow rule: the README is source, and a rule must not write outside results/.
"""
from __future__ import annotations

import argparse
import csv
import datetime as dt
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
NAMES = {"daunce": "DAUNCE", "daunce_e": "DAUNCE-E", "daunce_t": "DAUNCE-T", "daunce_t_q": "DAUNCE-T (TRAK's Q)",
         "daunce_bb": "DAUNCE (black-box)",
         "daunce_e_bb": "DAUNCE-E (black-box)", "daunce_t_bb": "DAUNCE-T (black-box)", "trak": "TRAK",
         "ekfac": "EK-FAC", "logra": "LoGra", "graddot": "Grad-Dot", "tracin": "TracIn", "exact_if": "exact IF",
         "limit_daunce": "limit: DAUNCE", "limit_daunce_e": "limit: DAUNCE-E", "limit_daunce_t": "limit: DAUNCE-T",
         "limit_daunce_t_q": "limit: DAUNCE-T (TRAK's Q)", "exact_if_corr": "exact IF, correlation-normalised",
         "limit_bb": "limit: DAUNCE (black-box)", "lin_daunce": "linearised at K: DAUNCE",
         "lin_daunce_e": "linearised at K: DAUNCE-E", "lin_daunce_t": "linearised at K: DAUNCE-T",
         "lin_bb": "linearised at K: DAUNCE (black-box)"}
REFERENCE_PREFIXES = ("limit_", "lin_", "exact_if_corr")  # exact references, not methods a user runs


def _show(path: Path) -> str:
    """``results/...``: the path as the README names it, wherever the results folder lies."""
    parts = path.parts
    return "/".join(parts[len(parts) - 1 - parts[::-1].index("results"):])


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _ci(lo, hi, sign: bool = False) -> str:
    f = "{:+.3f}" if sign else "{:.3f}"
    return f"[{f.format(float(lo))}, {f.format(float(hi))}]"


def _paired(results_dir: Path) -> list[dict]:
    path = results_dir / "lds_paired.csv"
    return _rows(path) if path.exists() else []


def lds_lines(path: Path) -> list[str]:
    """The LDS tables: raw scores first (the primary number, sorted by it), the thresholded LDS of
    the same scores beside it with its change (thresholded - raw, paired CI); every DAUNCE row in
    both measures; the exact references apart; paired differences of each DAUNCE row against
    the baselines (lds_paired.csv)."""
    all_rows = _rows(path)
    raw = [r for r in all_rows if r["threshold"] == "none"]
    if not raw:
        return []
    thr = {(r["method"], r["measure"]): r for r in all_rows if r["threshold"] != "none"}
    paired = _paired(path.parent)
    deltas = {(p["method"], p["measure"]): p for p in paired if p["kind"] == "threshold"}
    label = next(iter(thr.values()))["threshold"] if thr else None
    raw.sort(key=lambda r: -float(r["lds"]))
    refs = [r for r in raw if r["method"].startswith(REFERENCE_PREFIXES)]
    rows = [r for r in raw if not r["method"].startswith(REFERENCE_PREFIXES)]
    tuned = "tuned" in raw[0]

    def header(first: str, last: str) -> list[str]:
        cols = [first, "measure", "LDS (raw)", "95% CI"]
        if label:
            cols += [f"thresholded {label}", "change (thresholded − raw) [95% CI]"]
        if tuned:
            cols.append(last)
        return ["| " + " | ".join(cols) + " |", "|" + "|".join("---:" if c.startswith(("LDS", "thresholded"))
                                                               else "---" for c in cols) + "|"]

    def line(r: dict) -> str:
        key = (r["method"], r["measure"])
        cells = [NAMES.get(r["method"], r["method"]), "–" if r["measure"] == "score" else r["measure"],
                 f"{float(r['lds']):.3f}", _ci(r["ci_low"], r["ci_high"])]
        if label:
            t = thr.get(key)
            cells.append(f"{float(t['lds']):.3f}" if t else "–")
            d = deltas.get(key)
            cells.append(f"{float(d['diff']):+.3f} {_ci(d['ci_low'], d['ci_high'], True)}" if d else
                         (f"{float(t['lds']) - float(r['lds']):+.3f}" if t else "–"))
        if tuned:
            edge = " (**at the end of its grid**)" if r.get("on_edge") == "true" else ""
            cells.append(f"{r.get('tuned') or '–'}{edge}")
        return "| " + " | ".join(cells) + " |"

    n_q, n_m = rows[0]["n_queries"] if rows else raw[0]["n_queries"], raw[0]["n_masks"]
    out = [f"LDS of the embedded default (`{_show(path)}`), raw scores: the primary number, best first. "
           f"Every DAUNCE variant in both measures (correlation and covariance). 95% CIs from one "
           f"bootstrap over the {n_m} test masks and {n_q} test queries together"
           + (f"; beside it the LDS of the same scores thresholded {label}, applied to every method alike, "
              "and its change with a paired CI (the same draws)" if label else "") + ". Every choice (DAUNCE's "
           "learning rate, the baselines' knobs, the references' damping) was made by raw LDS on the "
           "selection masks and queries:", ""]
    out += header("method", "chosen on the selection masks")
    out += [line(r) for r in rows]
    if refs:
        out += ["", "Exact references of the same run (`daunce_core/baselines/limits.py`, `docs/theory.md`): each "
                "DAUNCE variant's Theorem-1 limit (converged, linearised fits, K → ∞) and its linearised fits at "
                "the run's K, and exact IF scored by correlation. Each uses the damping that was best on the "
                "selection masks: references for reading the rows above, not bounds on them (another damping, "
                "curvature or noise gives another value):", ""]
        out += header("reference", "damping chosen on the selection masks")
        out += [line(r) for r in refs]
    vs = [p for p in paired if p["kind"] == "method" and p["threshold"] == "none"]
    if vs:
        others = list(dict.fromkeys(p["versus"] for p in vs))
        entries = list(dict.fromkeys((p["method"], p["measure"]) for p in vs))
        cell = {(p["method"], p["measure"], p["versus"]): p for p in vs}
        out += ["", f"Paired differences in raw LDS (`{_show(path.parent / 'lds_paired.csv')}`): DAUNCE row minus "
                "each method, with the 95% CI of the same joint bootstrap draws for both; a CI excluding 0 "
                "separates the two:", "",
                "| DAUNCE row | measure | " + " | ".join(f"− {NAMES.get(o, o)}" for o in others) + " |",
                "|---|---|" + "---|" * len(others)]
        for m, meas in entries:
            cells = []
            for o in others:
                p = cell.get((m, meas, o))
                cells.append(f"{float(p['diff']):+.3f} {_ci(p['ci_low'], p['ci_high'], True)}" if p else "–")
            out.append(f"| {NAMES.get(m, m)} | {meas} | " + " | ".join(cells) + " |")
    return out + [""]


def backdoor_lines(paths: list[Path]) -> list[str]:
    out = []
    for path in paths:
        for r in _rows(path):
            if r.get("method") == "response_match":  # the text-matching baseline
                out.append(f"Backdoor retrieval (`{_show(path)}`), baseline matching the training responses to "
                           f"theta_0's reply: precision@10 {float(r['precision@10 (fired)']):.3f} on the same "
                           f"queries.")
                continue
            out.append(f"Backdoor retrieval (`{_show(path)}`), {r['access']} access, K = {r['K']}: "
                       f"precision@10 {float(r['precision@10 (fired)']):.3f} on the triggered queries whose "
                       f"backdoor fired, against {float(r['random']):.2f} for random retrieval.")
    return out + [""] if out else []


def removal_lines(path: Path) -> list[str]:
    rows = [r for r in _rows(path) if r.get("kind") == "difference"]
    if not rows:
        return []
    out = [f"Most-influential-subset removal on the tiny LM (`{_show(path)}`): paired differences "
           f"in the share of solved queries made wrong, {rows[0]['seeds']} paired seeds, 95% t-interval:", "",
           "| comparison | N removed | difference | 95% CI |", "|---|---:|---:|---|"]
    for r in rows:
        out.append(f"| {r['method']} | {r['N']} | {float(r['mean']):+.3f} | "
                   f"[{float(r['ci_low']):+.3f}, {float(r['ci_high']):+.3f}] |")
    return out + [""]


def block(results: Path) -> str:
    lds = results / "lds.csv"
    if not lds.exists():
        raise SystemExit(f"{lds}: missing; run ./dev run first")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=results.parent, capture_output=True,
                            text=True).stdout.strip() or "unknown"
    when = dt.datetime.fromtimestamp(lds.stat().st_mtime, dt.UTC).strftime("%Y-%m-%d")
    lines = [BEGIN, f"*Generated by `python scripts/readme_results.py` from the `./dev run` of commit "
             f"`{commit}` ({when}); every number below is read from the file named beside it.*", ""]
    lines += lds_lines(lds)
    lines += backdoor_lines(sorted(results.glob("blackbox/precision.csv")))
    if (results / "llm_removal.csv").exists():
        lines += removal_lines(results / "llm_removal.csv")
    return "\n".join(lines + [END])


def default_results() -> Path:
    """results/<experiment>/ of the embedded default (config/config.yaml's `experiment`)."""
    import yaml

    return ROOT / "results" / yaml.safe_load((ROOT / "config" / "config.yaml").read_text())["experiment"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", type=Path, default=default_results(),
                    help="the experiment's folder (default: results/<experiment of config/config.yaml>)")
    ap.add_argument("--readme", type=Path, default=ROOT / "README.md")
    ap.add_argument("--check", action="store_true", help="exit 1 if the README's block is out of date")
    args = ap.parse_args(argv)
    text = args.readme.read_text()
    if BEGIN not in text or END not in text:
        print(f"{args.readme}: no {BEGIN} ... {END} markers", file=sys.stderr)
        return 1
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    new = head + block(args.results.resolve()) + tail
    if args.check:
        same = _strip_stamp(new) == _strip_stamp(text)
        print("README results block is " + ("up to date" if same else "out of date"), file=sys.stderr)
        return 0 if same else 1
    args.readme.write_text(new)
    return 0


def _strip_stamp(text: str) -> str:
    return "\n".join(line for line in text.splitlines() if not line.startswith("*Generated by"))


if __name__ == "__main__":
    sys.exit(main())
