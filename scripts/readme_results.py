"""Rewrite README.md's results block from the files a run wrote (no number is typed in by hand).

    python scripts/readme_results.py              # after ./dev run: results/ -> README.md
    python scripts/readme_results.py --check      # exit 1 if README.md differs from results/

Reads results/lds.csv, results/<experiment>/blackbox/precision.csv and results/llm_removal.csv
(whichever exist), and replaces the text between the markers ``<!-- results:begin -->`` and
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
         "limit_bb": "limit: DAUNCE (black-box)", "lin_daunce": "linearised at K: DAUNCE",
         "lin_daunce_e": "linearised at K: DAUNCE-E", "lin_daunce_t": "linearised at K: DAUNCE-T",
         "lin_bb": "linearised at K: DAUNCE (black-box)"}
REFERENCE_PREFIXES = ("limit_", "lin_")  # exact references of issue 13, not methods a user runs


def _show(path: Path) -> str:
    """``results/...``: the path as the README names it, wherever the results folder lies."""
    parts = path.parts
    return "/".join(parts[len(parts) - 1 - parts[::-1].index("results"):])


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def lds_lines(path: Path) -> list[str]:
    rows = [r for r in _rows(path) if r["threshold"] != "none" and r["measure"] in ("correlation", "score")]
    if not rows:
        return []
    rows.sort(key=lambda r: -float(r["lds"]))
    refs = [r for r in rows if r["method"].startswith(REFERENCE_PREFIXES)]
    rows = [r for r in rows if not r["method"].startswith(REFERENCE_PREFIXES)]
    out = [f"LDS of the embedded default (`{_show(path)}`; thresholded "
           f"{rows[0]['threshold']}, correlation for DAUNCE, 95% bootstrap CI over "
           f"{rows[0]['n_queries']} queries, {rows[0]['n_masks']} masks), best first:", "",
           "| method | LDS | 95% CI |", "|---|---:|---|"]
    tuned = "tuned" in rows[0]  # tables since issue 12, item 7: the chosen setting, flagged at a grid's end
    if tuned:
        out[-2:] = ["| method | LDS | 95% CI | chosen on the selection masks |", "|---|---:|---|---|"]
    for r in rows:
        name = NAMES.get(r["method"], r["method"])
        line = f"| {name} | {float(r['lds']):.3f} | [{float(r['ci_low']):.3f}, {float(r['ci_high']):.3f}] |"
        if tuned:
            line += f" {r['tuned'] or '–'}{' (**at the end of its grid**)' if r.get('on_edge') == 'true' else ''} |"
        out.append(line)
    if refs:
        out += ["", "Exact references of the same run (`daunce_core/baselines/limits.py`): each DAUNCE variant's "
                "Theorem-1 limit (converged, linearised fits, K → ∞) and its linearised fits at the run's K; the "
                "limits bound what DAUNCE can reach on this model (`docs/quality.md`):", "",
                "| reference | LDS | 95% CI | damping chosen on the selection masks |", "|---|---:|---|---|"]
        for r in refs:
            out.append(f"| {NAMES.get(r['method'], r['method'])} | {float(r['lds']):.3f} | "
                       f"[{float(r['ci_low']):.3f}, {float(r['ci_high']):.3f}] | {r.get('tuned') or '–'} |")
    return out + [""]


def backdoor_lines(paths: list[Path]) -> list[str]:
    out = []
    for path in paths:
        for r in _rows(path):
            if r.get("method") == "response_match":  # the text-matching baseline (issue 12)
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
    lines += backdoor_lines(sorted(results.glob("*/blackbox/precision.csv")))
    if (results / "llm_removal.csv").exists():
        lines += removal_lines(results / "llm_removal.csv")
    return "\n".join(lines + [END])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", type=Path, default=ROOT / "results")
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
