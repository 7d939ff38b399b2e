"""Where a workflow run's time goes: per rule, parallelism, critical path and per-job start-up.

``run_breakdown.py RESULTS_DIR [--log SNAKEMAKE_LOG] [--startup]`` reads one finished run:

* Snakemake's log of the run (``.snakemake/log/*.snakemake.log``; default: the newest one of the
  checkout that holds RESULTS_DIR): every job's rule, threads, start and finish (1 s resolution),
  inputs and outputs, from which it rebuilds the DAG of the jobs that ran;
* the run's ``benchmark:`` files (``RESULTS_DIR/**/benchmarks/**/*.tsv``, named in the log):
  wall ``s`` and ``cpu_time`` of the jobs that have one.

It prints, per rule, the jobs, threads, wall seconds (log) and the benchmark files' wall and CPU
seconds, each as a share of the run's total; then the run's elapsed time against two lower bounds
(core-seconds claimed / cores, and the critical path: the longest chain of dependent jobs) and the
seconds during which 0, 1, ... jobs ran. ``--startup`` also measures, with
``bench_startup.py``'s method (a fresh Python running Snakemake's script preamble and the script's
imports, median of ``--repeat``), every rule script's start-up, interleaved with
``import torch`` as the reference, and totals it over the run's jobs. ``--json`` and ``--md``
write the same figures.
"""
from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import re
import statistics
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_startup  # noqa: E402

STAMP = re.compile(r"\[(\w{3} \w{3} +\d+ \d\d:\d\d:\d\d \d{4})\]")
RULE = re.compile(r"(?:local)?rule (\w+):")
FIELD = re.compile(r"\s+(input|output|jobid|benchmark|threads): (.*)")
FINISHED = re.compile(r"Finished jobid: (\d+) \(Rule: (\w+)\)")


@dataclass
class Job:
    jobid: int
    rule: str
    start: dt.datetime
    end: dt.datetime | None = None
    threads: int = 1
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    benchmark: str | None = None
    bench_s: float | None = None
    bench_cpu: float | None = None

    @property
    def wall(self) -> float:
        return (self.end - self.start).total_seconds()


def parse_log(path: Path) -> list[Job]:
    """The jobs a Snakemake log names, with their times, threads, files and benchmark path."""
    jobs: dict[int, Job] = {}
    stamp = rule = job = None
    files: dict[str, list[str]] = {}  # a job's input and output lines come before its jobid line
    for line in path.read_text().splitlines():
        if m := STAMP.match(line):
            stamp = dt.datetime.strptime(m.group(1), "%a %b %d %H:%M:%S %Y")
        elif m := RULE.match(line):
            rule, job, files = m.group(1), None, {}
        elif (m := FIELD.match(line)) and rule:
            key, value = m.groups()
            if key in ("input", "output"):
                files[key] = [v.strip() for v in value.split(", ")]
            elif key == "jobid":
                job = jobs[int(value)] = Job(int(value), rule, stamp, inputs=files.get("input", []),
                                             outputs=files.get("output", []))
            elif job is not None and key == "benchmark":
                job.benchmark = value.strip()
            elif job is not None and key == "threads":
                job.threads = int(value)
        elif m := FINISHED.match(line):
            jobs[int(m.group(1))].end = stamp
            rule = None
    done = [j for j in jobs.values() if j.end is not None]
    if not done:
        raise SystemExit(f"{path}: no finished job in this Snakemake log")
    return sorted(done, key=lambda j: (j.start, j.jobid))


def read_benchmarks(jobs: list[Job], root: Path) -> int:
    """Fill each job's benchmark wall and CPU seconds from its tsv file; how many were found."""
    found = 0
    for j in jobs:
        if not j.benchmark:
            continue
        p = root / j.benchmark
        if p.is_file():
            rows = list(csv.DictReader(p.open(), delimiter="\t"))
            if rows:
                j.bench_s, j.bench_cpu = float(rows[-1]["s"]), float(rows[-1]["cpu_time"])
                found += 1
    return found


def critical_path(jobs: list[Job]) -> tuple[float, list[Job]]:
    """The longest chain of jobs (by log wall time) in which each job reads an output of the one
    before it."""
    producer = {o: j for j in jobs for o in j.outputs}
    best: dict[int, tuple[float, list[Job]]] = {}
    for j in sorted(jobs, key=lambda j: (j.end, j.start)):  # a producer finishes before its consumer
        preds = [producer[i] for i in j.inputs if i in producer and producer[i].jobid in best]
        length, chain = max((best[p.jobid] for p in preds), key=lambda x: x[0], default=(0.0, []))
        best[j.jobid] = (length + j.wall, chain + [j])
    return max(best.values(), key=lambda x: x[0])


def concurrency(jobs: list[Job], t0: dt.datetime, cores: int) -> tuple[Counter, Counter]:
    """Seconds during which n jobs ran, and during which n cores were claimed (threads, capped)."""
    span = int(max((j.end - t0).total_seconds() for j in jobs))
    n_jobs, n_cores = [0] * span, [0] * span
    for j in jobs:
        for t in range(int((j.start - t0).total_seconds()), int((j.end - t0).total_seconds())):
            n_jobs[t] += 1
            n_cores[t] += min(j.threads, cores)
    return Counter(n_jobs), Counter(min(c, cores) for c in n_cores)


def measure_startup(rules: set[str], repeat: int, checkout: Path) -> dict:
    """Median start-up (wall, CPU) of each rule script of ``checkout`` (its scripts/ and
    daunce_core), with ``import torch`` and ``python -c pass`` interleaved as references
    (bench_startup.py's method)."""
    env = {**os.environ, "PYTHONPATH": str(checkout), "OMP_NUM_THREADS": "1"}
    scripts = bench_startup.rule_scripts(checkout)
    cases = {"python -c pass": "pass", "import torch": "import torch"}
    for s in sorted({scripts[r] for r in rules if r in scripts}):
        cases[s] = bench_startup.PREAMBLE + "\n" + bench_startup.script_imports(checkout / "scripts" / s)
    samples: dict[str, list] = defaultdict(list)
    heavy = {}
    for _ in range(repeat):  # interleaved, so load changes hit every case alike
        for k, code in cases.items():
            wall, cpu, mods = bench_startup.time_code(code, env)
            samples[k].append((wall, cpu))
            heavy[k] = mods
    med = {k: {"wall_s": statistics.median(w for w, _ in v), "cpu_s": statistics.median(c for _, c in v),
               "heavy": heavy[k]} for k, v in samples.items()}
    return {"repeat": repeat, "load_average": os.getloadavg()[0], "cases": med, "rule_script": scripts,
            "checkout": str(checkout)}


def breakdown(jobs: list[Job], cores: int, startup: dict | None) -> dict:
    t0 = min(j.start for j in jobs)
    elapsed = max((j.end - t0).total_seconds() for j in jobs)
    wall_sum = sum(j.wall for j in jobs)
    bench_jobs = [j for j in jobs if j.bench_s is not None]
    bench_cpu = sum(j.bench_cpu for j in bench_jobs)
    bench_wall = sum(j.bench_s for j in bench_jobs)
    claimed = sum(j.wall * min(j.threads, cores) for j in jobs)
    cp_len, cp = critical_path(jobs)
    n_jobs, n_cores = concurrency(jobs, t0, cores)
    per_rule: dict[str, dict] = {}
    for j in jobs:
        r = per_rule.setdefault(j.rule, {"jobs": 0, "threads": j.threads, "wall_s": 0.0, "core_s": 0.0,
                                         "bench_jobs": 0, "bench_wall_s": 0.0, "bench_cpu_s": 0.0})
        r["jobs"] += 1
        r["wall_s"] += j.wall
        r["core_s"] += j.wall * min(j.threads, cores)
        if j.bench_s is not None:
            r["bench_jobs"] += 1
            r["bench_wall_s"] += j.bench_s
            r["bench_cpu_s"] += j.bench_cpu
    out = {
        "jobs": len(jobs), "cores": cores, "elapsed_s": elapsed, "job_wall_s": wall_sum,
        "core_s_claimed": claimed, "bound_core_s": claimed / cores, "critical_path_s": cp_len,
        "critical_path": [f"{j.rule} ({j.wall:.0f} s)" for j in cp],
        "seconds_with_n_jobs": dict(sorted(n_jobs.items())),
        "seconds_with_n_cores_claimed": dict(sorted(n_cores.items())),
        "bench_jobs": len(bench_jobs), "bench_wall_s": bench_wall, "bench_cpu_s": bench_cpu,
        "rules": dict(sorted(per_rule.items(), key=lambda kv: -kv[1]["core_s"])),
    }
    if startup:
        cases, scripts = startup["cases"], startup["rule_script"]
        rows, total_cpu, total_wall, n = {}, 0.0, 0.0, 0
        for rule, r in out["rules"].items():
            s = scripts.get(rule)
            if s in cases:
                rows[rule] = {"script": s, "jobs": r["jobs"], "cpu_s_per_job": cases[s]["cpu_s"],
                              "wall_s_per_job": cases[s]["wall_s"], "heavy": cases[s]["heavy"]}
                total_cpu += r["jobs"] * cases[s]["cpu_s"]
                total_wall += r["jobs"] * cases[s]["wall_s"]
                n += r["jobs"]
        torch = cases["import torch"]
        out["startup"] = {
            "load_average": startup["load_average"], "repeat": startup["repeat"], "checkout": startup["checkout"],
            "python_pass": cases["python -c pass"], "import_torch": torch, "rules": rows,
            "script_jobs": n, "cpu_s_total": total_cpu, "wall_s_total": total_wall,
            "cpu_s_per_job": total_cpu / n if n else 0.0,
            "cpu_per_job_over_import_torch": (total_cpu / n) / torch["cpu_s"] if n else 0.0,
        }
    return out


def render(b: dict, source: str) -> str:
    """The breakdown as Markdown (what the script prints)."""
    el = b["elapsed_s"]
    lines = [f"# Run breakdown: {source}", "",
             f"{b['jobs']} jobs on {b['cores']} cores; elapsed {el:.0f} s (first job start to last finish, "
             f"Snakemake log). Sum of job wall times {b['job_wall_s']:.0f} s; core-seconds claimed "
             f"(wall x threads) {b['core_s_claimed']:.0f}.", "",
             f"- lower bound from claimed cores: {b['bound_core_s']:.0f} s ({b['bound_core_s'] / el:.0%} of elapsed)",
             f"- critical path: {b['critical_path_s']:.0f} s ({b['critical_path_s'] / el:.0%} of elapsed): "
             + " -> ".join(b["critical_path"]),
             "- seconds with n jobs running: " + ", ".join(f"{k}: {v}" for k, v in b["seconds_with_n_jobs"].items()),
             "- seconds with n cores claimed: "
             + ", ".join(f"{k}: {v}" for k, v in b["seconds_with_n_cores_claimed"].items()),
             f"- benchmark files: {b['bench_jobs']} jobs, {b['bench_wall_s']:.0f} wall s, "
             f"{b['bench_cpu_s']:.0f} CPU s", "",
             "| rule | jobs | threads | wall s (log) | core-s | share of core-s | bench jobs | bench wall s "
             "| bench CPU s | CPU/wall |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for rule, r in b["rules"].items():
        cw = f"{r['bench_cpu_s'] / r['bench_wall_s']:.2f}" if r["bench_wall_s"] else ""
        bench = (f"{r['bench_jobs']} | {r['bench_wall_s']:.0f} | {r['bench_cpu_s']:.0f} | {cw}"
                 if r["bench_jobs"] else " | | | ")
        lines.append(f"| {rule} | {r['jobs']} | {r['threads']} | {r['wall_s']:.0f} | {r['core_s']:.0f} | "
                     f"{r['core_s'] / b['core_s_claimed']:.1%} | {bench} |")
    if "startup" in b:
        s = b["startup"]
        t = s["import_torch"]
        lines += ["", f"## Per-job start-up of {s['checkout']} (bench_startup.py's method; median of "
                      f"{s['repeat']}, load average {s['load_average']:.1f})", "",
                  f"References in the same measurement: `python -c pass` {s['python_pass']['cpu_s']:.2f} CPU s "
                  f"({s['python_pass']['wall_s']:.2f} wall s), `import torch` {t['cpu_s']:.2f} CPU s "
                  f"({t['wall_s']:.2f} wall s).", "",
                  "| rule | script | jobs | start-up CPU s/job | wall s/job | CPU / import torch | "
                  "jobs x CPU s | heavy modules |",
                  "|---|---|---:|---:|---:|---:|---:|---|"]
        for rule, r in sorted(s["rules"].items(), key=lambda kv: -kv[1]["jobs"] * kv[1]["cpu_s_per_job"]):
            lines.append(f"| {rule} | {r['script']} | {r['jobs']} | {r['cpu_s_per_job']:.2f} | "
                         f"{r['wall_s_per_job']:.2f} | {r['cpu_s_per_job'] / t['cpu_s']:.2f} | "
                         f"{r['jobs'] * r['cpu_s_per_job']:.1f} | {', '.join(r['heavy'])} |")
        lines += ["", f"{s['script_jobs']} jobs run a rule script: start-up {s['cpu_s_total']:.0f} CPU s in all, "
                      f"{s['cpu_s_per_job']:.2f} CPU s per job ({s['cpu_per_job_over_import_torch']:.2f} x "
                      f"`import torch`), {s['cpu_s_total'] / b['job_wall_s']:.0%} of the run's summed job wall "
                      f"time (start-up runs on one core: on an idle machine its wall time is about its CPU "
                      f"time; {s['wall_s_total']:.0f} wall s at this measurement's load)."]
    return "\n".join(lines) + "\n"


def default_log(results: Path) -> Path:
    """The newest Snakemake log that ran jobs (not a --report run) of the checkout holding
    ``results`` (the nearest folder above it with .snakemake/log)."""
    for d in [results.resolve(), *results.resolve().parents]:
        logs = sorted((d / ".snakemake" / "log").glob("*.snakemake.log"), key=lambda p: p.stat().st_mtime)
        for p in reversed(logs):
            if "Finished jobid:" in p.read_text():
                return p
    raise SystemExit(f"{results}: no .snakemake/log/*.snakemake.log above it; give --log")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", type=Path, nargs="?", help="the run's results folder (or its checkout)")
    ap.add_argument("--log", type=Path, help="the run's Snakemake log (default: the newest of the checkout)")
    ap.add_argument("--cores", type=int, default=2, help="cores the run was given (--cores)")
    ap.add_argument("--startup", action="store_true", help="also measure each rule script's start-up")
    ap.add_argument("--repeat", type=int, default=3, help="fresh processes per script for --startup")
    ap.add_argument("--checkout", type=Path, default=bench_startup.ROOT,
                    help="the checkout whose scripts/ and daunce_core --startup measures (the run's own "
                         "code; default: this one)")
    ap.add_argument("--json", type=Path, help="write the figures as JSON")
    ap.add_argument("--md", type=Path, help="write the printed table as Markdown")
    ap.add_argument("--from-json", type=Path, metavar="JSON", help="print (and --md) a breakdown --json wrote")
    args = ap.parse_args(argv)
    if args.from_json:
        b = json.loads(args.from_json.read_text())
        text = render(b, b["log"])
        print(text, end="")
        if args.md:
            args.md.write_text(text)
        return 0
    if args.results is None:
        ap.error("give the run's results folder (or --from-json)")
    log = args.log or default_log(args.results)
    jobs = parse_log(log)
    root = next((d for d in [args.results.resolve(), *args.results.resolve().parents]
                 if all((d / j.benchmark).exists() for j in jobs if j.benchmark)), None)
    if root is None:
        raise SystemExit(f"{args.results}: the benchmark files the log {log} names are not under it")
    read_benchmarks(jobs, root)
    startup = measure_startup({j.rule for j in jobs}, args.repeat, args.checkout.resolve()) if args.startup else None
    b = breakdown(jobs, args.cores, startup)
    b["log"] = str(log)
    text = render(b, str(log))
    print(text, end="")
    if args.md:
        args.md.write_text(text)
    if args.json:
        args.json.write_text(json.dumps(b, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
