"""The regime blocks (README's for tier 1, docs/regime.md's for tier 2) from a run's files; no number
is typed in by hand.

    python scripts/readme_regime.py --collect   # the run's files in results/ -> docs/regime/tier1/, then README
    python scripts/readme_regime.py             # docs/regime/tier1/ -> README.md (between the regime markers)
    python scripts/readme_regime.py --check     # exit 1 if README.md's block differs from docs/regime/tier1/
    python scripts/readme_regime.py --compare   # a new run's raw LDS against docs/regime/tier1/ (CI)
    python scripts/readme_regime.py --tier 2 --collect --resumed   # tier 2 -> docs/regime/tier2/, docs/regime.md
    python scripts/readme_regime.py --tier 2 --jobs  # an unfinished run: its jobs' times -> docs/regime/tier2/jobs.csv

``--collect`` copies the small files of a finished run (regime.csv, regime.pdf, lds.csv,
lds_paired.csv, cost.md, mislabel.csv) beside a run.json naming the commit, the command, the sum of
the jobs' seconds and the run's wall time (first to last benchmark file), with ``--note``; the
block is then written from those committed files only. ``--resumed`` marks a run that was stopped
and resumed (its first-to-last span counts the pauses, so the block gives the job seconds only).
"""
from __future__ import annotations

import argparse
import csv
import json
import shutil
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
# per tier: the experiment, its config, where its files are committed, which document holds its block
TIERS = {
    1: {"experiment": "fmnist_mlp_regime", "config": "config/regime/tier1.yaml", "src": "docs/regime/tier1",
        "doc": "README.md", "markers": ("<!-- regime:begin -->", "<!-- regime:end -->"),
        "model": "784-128-10 MLP ({params:,} parameters) on {n_train:,} Fashion-MNIST images"},
    2: {"experiment": "fmnist_resnet9q_regime", "config": "config/regime/tier2.yaml", "src": "docs/regime/tier2",
        "doc": "docs/regime.md", "markers": ("<!-- regime-tier2:begin -->", "<!-- regime-tier2:end -->"),
        "model": "ResNet-9 at width 0.25 ({params:,} parameters) on {n_train:,} Fashion-MNIST images padded to "
                 "32 x 32"},
}


def command(tier: int) -> str:
    t = TIERS[tier]
    return (f"snakemake -c2 results/{t['experiment']}/regime.pdf results/{t['experiment']}/mislabel.csv "
            f"--configfile {t['config']}")


def files(tier: int) -> dict:
    """Each file from the experiment's own folder (every table and figure of an experiment is there)."""
    return {name: [f"{TIERS[tier]['experiment']}/{name}"] for name in
            ("regime.csv", "regime.pdf", "lds.csv", "lds_paired.csv", "cost.md", "mislabel.csv")}


def benchmarks(results: Path, tier: int) -> list[dict]:
    """The run's Snakemake benchmark files, one per finished job: its path under benchmarks/ without
    the suffix, wall seconds, peak RSS (MB) and when it ended (the file's mtime, epoch seconds)."""
    bench = results / TIERS[tier]["experiment"] / "benchmarks"
    rows = []
    for b in sorted(bench.rglob("*.tsv")):
        with open(b) as f:
            r = next(csv.DictReader(f, delimiter="\t"))
        rows.append({"job": str(b.relative_to(bench).with_suffix("")), "seconds": float(r["s"]),
                     "max_rss_mb": float(r["max_rss"]), "ended": b.stat().st_mtime})
    if not rows:
        raise SystemExit(f"{bench}: no benchmark files; run  {command(tier)}  first")
    return rows


def collect(results: Path, out: Path, note: str = "", machine: str = "", tier: int = 1,
            resumed: bool = False) -> None:
    found = {}
    for name, candidates in files(tier).items():
        path = next((results / c for c in candidates if (results / c).exists()), None)
        if path is None:
            raise SystemExit(f"{results / candidates[-1]}: missing; run  {command(tier)}  first")
        found[name] = path
    jobs = [(b["ended"] - b["seconds"], b["ended"], b["seconds"]) for b in benchmarks(results, tier)]
    out.mkdir(parents=True, exist_ok=True)
    for name, path in found.items():
        shutil.copyfile(path, out / name)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    run = {"commit": commit, "command": command(tier),
           "jobs": len(jobs), "job_seconds_sum": round(sum(j[2] for j in jobs), 1),
           "first_job_start_to_last_job_end_s": round(max(j[1] for j in jobs) - min(j[0] for j in jobs), 1),
           "ci": "over masks and queries together (joint bootstrap)"}
    if resumed:
        run["resumed"] = True
    if machine:
        run["machine"] = machine
    if note:
        run["note"] = note
    (out / "run.json").write_text(json.dumps(run, indent=1) + "\n")


def jobs(results: Path, out: Path, tier: int) -> Path:
    """Every finished job's Snakemake benchmark of a run (finished so far): seconds, peak RSS and when
    it ended (the file's time), one row per job, to ``out/jobs.csv``."""
    rows = [{"job": b["job"], "seconds": f"{b['seconds']:.1f}", "max_rss_mb": f"{b['max_rss_mb']:.0f}",
             "ended_utc": datetime.fromtimestamp(b["ended"], UTC).strftime("%Y-%m-%dT%H:%M:%SZ")}
            for b in benchmarks(results, tier)]
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "jobs.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return out / "jobs.csv"


def label(method: str, measure: str) -> str:
    from daunce_core.figures import regime_label

    return regime_label(method, measure)


def block(src: Path, tier: int = 1) -> str:
    t = TIERS[tier]
    begin, end = t["markers"]
    rows = list(csv.DictReader(open(src / "regime.csv")))
    run = json.loads((src / "run.json").read_text())
    lds = list(csv.DictReader(open(src / "lds.csv")))
    meta = next(r for r in lds if r["threshold"] == "none")
    rows.sort(key=lambda r: -float(r["lds_raw"]))
    params = int(float(rows[0]["params"]))
    n_train = yaml.safe_load((ROOT / t["config"]).read_text())["data"]["n_train"]
    flag = "" if tier == 1 else " --tier 2"
    lines = [begin, f"*Generated by `python scripts/readme_regime.py{flag}` from `{t['src']}/` (the tier-{tier} run "
             f"of commit `{run['commit']}`: `{run['command']}`, {run['jobs']} jobs, "
             + (f"{run['job_seconds_sum'] / 60:.0f} minutes of job wall time summed over the jobs, on "
                f"{run['machine']}" if run.get("resumed") else
                f"{run['first_job_start_to_last_job_end_s'] / 60:.0f} minutes from the first job's start to the last "
                f"one's end, {run['job_seconds_sum'] / 60:.0f} minutes of job wall time summed over the jobs, on "
                f"{run['machine']}" if run.get("machine") else
                f"{run['job_seconds_sum'] / 60:.0f} minutes of job wall time summed over the jobs, on a shared 2-core "
                "CPU") + ").*", "",
             t["model"].format(params=params, n_train=n_train) + "; LDS on "
             f"{meta['n_queries']} test queries and {meta['n_masks']} test masks (95% bootstrap CI "
             f"{run.get('ci', 'over masks and queries')}), raw first, best first; thresholded beside it with its "
             "change. Storage: float32 numbers kept per training example; time: wall seconds of the method's jobs "
             "including its tuning grid (benchmark files). "
             f"Figure: `{t['src']}/regime.pdf`."
             + (f" {run['note']}" if run.get("note") else ""), "",
             "| method | LDS (raw) | 95% CI | LDS (thresholded) | change | stored per example | wall with tuning (s) |",
             "|---|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        raw, thr = float(r["lds_raw"]), float(r["lds_thr"])
        per = float(r["floats_per_example"])
        stored = "0 (recomputes gradients)" if r["stores_nothing"] == "True" else f"{per:,.0f}"
        lines.append(f"| {label(r['method'], r['measure'])} | {raw:.3f} | [{float(r['ci_low_raw']):.3f}, "
                     f"{float(r['ci_high_raw']):.3f}] | {thr:.3f} | {thr - raw:+.3f} | {stored} | "
                     f"{float(r['wall_tuning_s']):.0f} |")
    if (src / "mislabel.csv").exists():
        lines += ["", *mislabel_lines(src / "mislabel.csv")]
    return "\n".join(lines + ["", end])


def mislabel_lines(path: Path) -> list[str]:
    """A tier's mislabel detection table (docs/mislabel.md): AUC with its CI, best first."""
    rows = sorted(csv.DictReader(open(path)), key=lambda r: -float(r["auc"]))
    first = rows[0]
    out = [f"Mislabelled-example detection on the same data (`docs/mislabel.md`): {int(first['n_flipped']):,} of "
           f"{int(first['n_train']):,} training labels flipped, theta_0 retrained on them, every method ranks the "
           "examples by self-influence; ROC AUC of finding the flipped ones (0.5 = random) with a 95% bootstrap CI "
           "over the examples.", "",
           "| method | self-influence | AUC | 95% CI | setting |", "|---|---|---:|---|---|"]
    for r in rows:
        ci = "" if r["ci_low"] in ("", "nan") else f"[{float(r['ci_low']):.3f}, {float(r['ci_high']):.3f}]"
        out.append(f"| {r['method']} | {r['measure']} | {float(r['auc']):.3f} | {ci} | {r['setting']} |")
    return out


def compare(results: Path, src: Path, tol: float, tier: int = 1) -> int:
    """Each row's raw LDS in a new run's regime.csv against the committed one: 1 if a row is missing
    on either side or differs by more than ``tol`` (CI reruns tier 1 and checks the README's numbers
    this way; float rounding on another CPU may move the third decimal, not more)."""
    def rows(path: Path) -> dict:
        return {(r["method"], r["measure"]): float(r["lds_raw"]) for r in csv.DictReader(open(path))}

    new_path = results / TIERS[tier]["experiment"] / "regime.csv"
    if not new_path.exists():
        print(f"{new_path}: missing; run  {command(tier)}  first", file=sys.stderr)
        return 1
    old, new = rows(src / "regime.csv"), rows(new_path)
    bad = 0
    print(f"raw LDS: {src / 'regime.csv'} (committed) against {new_path}")
    for key in sorted(old.keys() | new.keys()):
        a, b = old.get(key), new.get(key)
        if a is None or b is None:
            print(f"  {key[0]} ({key[1]}): {'missing in the new run' if b is None else 'not committed'}")
            bad += 1
            continue
        flag = abs(a - b) > tol
        bad += flag
        print(f"  {key[0]} ({key[1]}): {a:.4f} -> {b:.4f} ({b - a:+.4f}){'  MORE THAN ' + str(tol) if flag else ''}")
    print(f"{bad} row(s) missing or beyond {tol}", file=sys.stderr)
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tier", type=int, choices=sorted(TIERS), default=1,
                    help="1: README.md's block from docs/regime/tier1/; 2: docs/regime.md's from docs/regime/tier2/")
    ap.add_argument("--collect", action="store_true", help="copy the run's small files to --src first")
    ap.add_argument("--resumed", action="store_true",
                    help="with --collect: the run was stopped and resumed (its span counts the pauses)")
    ap.add_argument("--results", type=Path, default=ROOT / "results")
    ap.add_argument("--src", type=Path, default=None,
                    help="the committed files (default: the tier's docs/regime/tier<N>)")
    ap.add_argument("--readme", type=Path, default=None,
                    help="the document with the block (default: README.md for tier 1, docs/regime.md for tier 2)")
    ap.add_argument("--check", action="store_true", help="exit 1 if the document's block is out of date")
    ap.add_argument("--note", default="", help="with --collect: run.json's note (restarts, what was left out)")
    ap.add_argument("--machine", default="", help="with --collect: what the run ran on (cores, other work)")
    ap.add_argument("--compare", action="store_true",
                    help="compare --results' regime.csv with the committed one (exit 1 beyond --tol)")
    ap.add_argument("--tol", type=float, default=0.02, help="with --compare: largest raw-LDS difference allowed")
    ap.add_argument("--jobs", action="store_true",
                    help="write the finished jobs' benchmark times of --results' run to --src/jobs.csv, nothing else")
    args = ap.parse_args(argv)
    t = TIERS[args.tier]
    src = args.src or ROOT / t["src"]
    doc = args.readme or ROOT / t["doc"]
    if args.jobs:
        print(jobs(args.results, src, args.tier))
        return 0
    if args.compare:
        return compare(args.results, src, args.tol, args.tier)
    if args.collect:
        collect(args.results, src, args.note, args.machine, args.tier, args.resumed)
    begin, end = t["markers"]
    text = doc.read_text()
    if begin not in text or end not in text:
        print(f"{doc}: no {begin} ... {end} markers", file=sys.stderr)
        return 1
    head, rest = text.split(begin, 1)
    new = head + block(src, args.tier) + rest.split(end, 1)[1]
    if args.check:
        same = new == text
        print(f"{doc.name}'s tier-{args.tier} regime block is " + ("up to date" if same else "out of date"),
              file=sys.stderr)
        return 0 if same else 1
    doc.write_text(new)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    raise SystemExit(main())
