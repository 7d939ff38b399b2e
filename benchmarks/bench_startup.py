"""Start-up of each workflow job: interpreter, Snakemake's script preamble and the script's imports.

Snakemake runs a rule's ``script:`` as a fresh ``python`` process whose source is the script
behind a preamble (``import pickle``, unpickling the ``snakemake`` object, which imports
``snakemake.iocontainers`` and ``snakemake.logging``). Everything before the script's
``run_script(...)`` line is start-up; the job's real work begins there. For each
``scripts/*.py`` this runs, in a fresh process, that preamble's imports followed by the script's
top-level imports, ``--repeat`` times, and prints the median wall and CPU time (user + system of
the child) against two references measured in the same run, interleaved with the scripts:
``python -c pass`` and ``python -c "import torch"``. CPU time is the figure to compare on a busy
machine (wall time includes waiting for a core). It also names the heavy libraries each script
has loaded once its imports are done.

``--per-run`` adds the embedded run's job count per rule (``snakemake -n --quiet rules`` in this
checkout, so run it where ``results/`` is empty) and the start-up CPU seconds of the whole run.
``--snakemake N`` also times a toy workflow of N jobs whose scripts do nothing, against the same
N jobs run in one process (``run:``), to show what Snakemake costs per job beyond the imports.
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PREAMBLE = "import pickle, snakemake.iocontainers, snakemake.logging"
HEAVY = ["torch", "scipy.stats", "scipy.optimize", "scipy.spatial", "sklearn", "numba", "matplotlib",
         "transformers", "peft", "openai", "kronfluence", "trak", "dattri", "h5py", "pandas", "yaml"]


def script_imports(path: Path) -> str:
    """The top-level import statements of a rule script, as one block of code."""
    tree = ast.parse(path.read_text())
    lines = [ast.unparse(node) for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))
             and not (isinstance(node, ast.ImportFrom) and node.module == "__future__")]
    return "\n".join(lines)


def time_code(code: str, env: dict) -> tuple[float, float, list[str]]:
    """(wall s, CPU s, heavy modules loaded) of ``python -c code`` in a fresh process."""
    probe = code + f"\nimport sys, json\nprint(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    # -P: the working directory is not put on sys.path, so PYTHONPATH alone picks daunce_core
    out = subprocess.run([sys.executable, "-P", "-c", probe], env=env, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if out.returncode != 0:
        raise RuntimeError(f"python -c failed:\n{code}\n{out.stderr[-2000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, json.loads(out.stdout.strip().splitlines()[-1])


def rule_scripts(checkout: Path = ROOT) -> dict[str, str]:
    """Rule name -> script file name, read from ``checkout``'s workflow/rules/*.smk."""
    out = {}
    for smk in sorted((checkout / "workflow" / "rules").glob("*.smk")):
        for m in re.finditer(r"^rule (\w+):(.*?)(?=^rule |\Z)", smk.read_text(), re.S | re.M):
            s = re.search(r"script:\s*\n\s*[\"']([^\"']+)[\"']", m.group(2))
            if s:
                out[m.group(1)] = Path(s.group(1)).name
    return out


def job_counts(env: dict) -> dict[str, int]:
    """Rule -> number of jobs of the embedded run, from a Snakemake dry run in this checkout."""
    out = subprocess.run([str(Path(sys.executable).with_name("snakemake")), "-n", "--cores", "2",
                          "--quiet", "rules"], env=env, cwd=ROOT, capture_output=True, text=True)
    counts = {}
    for line in out.stdout.splitlines():
        m = re.fullmatch(r"(\w+)\s+(\d+)", line.strip())
        if m and m.group(1) != "total":
            counts[m.group(1)] = int(m.group(2))
    if not counts:
        raise RuntimeError(f"snakemake -n printed no job stats:\n{out.stdout[-1000:]}{out.stderr[-1000:]}")
    return counts


def _toy_workflow(kind: str, n: int, env: dict) -> float:
    """Wall seconds of ``snakemake --cores 1`` on n jobs that each write an empty file."""
    body = {"script": '    script:\n        "noop.py"\n',
            "run": "    run:\n        open(output[0], 'w').close()\n"}[kind]
    with tempfile.TemporaryDirectory() as d:
        Path(d, "noop.py").write_text("open(snakemake.output[0], 'w').close()\n")
        Path(d, "Snakefile").write_text(
            f"rule all:\n    input: expand('out/{{i}}.txt', i=range({n}))\n\n"
            f"rule job:\n    output: 'out/{{i}}.txt'\n{body}")
        t0 = time.perf_counter()
        subprocess.run([str(Path(sys.executable).with_name("snakemake")), "--cores", "1", "--quiet"],
                       cwd=d, env=env, check=True, capture_output=True)
        return time.perf_counter() - t0


def snakemake_overhead(n: int, env: dict) -> dict[str, float]:
    """Wall seconds per job that Snakemake adds for a no-op ``script:`` and ``run:`` job: the
    time of 1 + n jobs minus that of 1 job, over n (Snakemake's own start-up cancels)."""
    return {k: (_toy_workflow(k, 1 + n, env) - _toy_workflow(k, 1, env)) / n for k in ("script", "run")}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=3, help="fresh processes per script (median kept)")
    ap.add_argument("--scripts", nargs="*", help="script names (default: every scripts/*.py a rule runs)")
    ap.add_argument("--per-run", action="store_true", help="weight by the embedded run's job counts")
    ap.add_argument("--before", type=Path, metavar="DIR",
                    help="also time each script with DIR first on PYTHONPATH (e.g. an export of an older "
                         "daunce_core), interleaved with this checkout; rows marked 'before'")
    ap.add_argument("--snakemake", type=int, default=0, metavar="N",
                    help="also time N no-op script: jobs against N run: jobs")
    args = ap.parse_args(argv)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    rules = rule_scripts()
    names = args.scripts or sorted(set(rules.values()))
    cases = {"python -c pass": "pass", "import torch": "import torch",
             "snakemake preamble": PREAMBLE}
    envs = {k: env for k in cases}
    for n in names:
        code = PREAMBLE + "\n" + script_imports(ROOT / "scripts" / n)
        if args.before:
            cases[f"{n} (before)"] = code
            envs[f"{n} (before)"] = {**env, "PYTHONPATH": f"{args.before.resolve()}{os.pathsep}{ROOT}"}
        cases[n] = code
        envs[n] = env
    samples: dict[str, list[tuple[float, float]]] = {k: [] for k in cases}
    heavy: dict[str, list[str]] = {}
    for _ in range(args.repeat):  # interleaved, so load changes hit every case alike
        for k, code in cases.items():
            wall, cpu, mods = time_code(code, envs[k])
            samples[k].append((wall, cpu))
            heavy[k] = mods
    med = {k: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v))
           for k, v in samples.items()}
    torch_cpu, torch_wall = med["import torch"][1], med["import torch"][0]
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; median of {args.repeat}; "
          f"python {sys.version.split()[0]}")
    print(f"{'case':<24}{'wall s':>8}{'CPU s':>8}{'CPU/torch':>10}{'wall/torch':>11}  heavy modules loaded")
    for k in cases:
        w, c = med[k]
        print(f"{k:<24}{w:8.2f}{c:8.2f}{c / torch_cpu:10.2f}{w / torch_wall:11.2f}  {', '.join(heavy[k])}")
    if args.per_run:
        counts = job_counts(env)
        total_cpu = total_jobs = 0
        print(f"\n{'rule':<24}{'jobs':>6}  script            start-up CPU s (jobs x median)")
        for rule, n in sorted(counts.items(), key=lambda x: -x[1]):
            s = rules.get(rule)
            if s in med:
                total_cpu += n * med[s][1]
                total_jobs += n
                print(f"{rule:<24}{n:6d}  {s:<18}{n * med[s][1]:8.1f}")
            elif s:
                print(f"{rule:<24}{n:6d}  {s:<18}(not measured: not in --scripts)")
            else:
                print(f"{rule:<24}{n:6d}  (no script: runs inside Snakemake)")
        print(f"\nembedded run: {sum(counts.values())} jobs, {total_jobs} run a measured script; their start-up: "
              f"{total_cpu:.0f} CPU s ({total_cpu / total_jobs:.2f} s per job, "
              f"{total_cpu / torch_cpu:.0f} x 'import torch')")
        if args.before:
            before = sum(n * med[f"{rules[r]} (before)"][1] for r, n in counts.items()
                         if f"{rules.get(r)} (before)" in med)
            print(f"the same jobs with --before's daunce_core: {before:.0f} CPU s "
                  f"({before / total_jobs:.2f} s per job); difference {before - total_cpu:.0f} CPU s")
    if args.snakemake:
        o = snakemake_overhead(args.snakemake, env)
        print(f"\nSnakemake's cost per no-op job (wall, 1 core, (time of 1+{args.snakemake} jobs - time of 1 job)"
              f" / {args.snakemake}): script: {o['script']:.2f} s (a fresh python, the preamble, "
              f"Snakemake's bookkeeping); run: {o['run']:.2f} s (Snakemake runs each run: job in a "
              "fresh Snakemake process that parses the workflow again)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
