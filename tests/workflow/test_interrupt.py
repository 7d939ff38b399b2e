"""Interruptions are harmless.

A micro-config runs the embedded DAG to results/micro/lds.csv once without interruption. A second copy
is SIGKILLed -- the Snakemake driver and its running job together, their whole process group, as
a node failure or `kill -9` would -- during perturbed fits, during LDS retrains and during
scoring, and after each kill rerun with what a user types (Snakemake's messages say both):

    snakemake --unlock ...                  (the killed driver left its lock)
    snakemake ... --rerun-incomplete        (the killed job's outputs are marked incomplete)

The final lds.csv and every scores file (and every losses and ground-truth file) must
equal the uninterrupted run's, no job that had finished is run again (Snakemake's log and the
files' mtimes), and no temporary file of store's atomic writers is left.
"""
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml

from helpers import ROOT, SNAKEMAKE

TARGET = "results/micro/lds.csv"  # the experiment's own table (results/lds.csv is a copy of it)

# digits, 2 perturbed chunks, 2 LDS chunks per split, no baselines (the llm and blackbox sections
# are absent: config/config.yaml is not under the test's working directory, so nothing is merged)
MICRO = {
    "experiment": "micro",
    "device": "cpu",
    "data": {"name": "digits", "n_train": 120, "n_query": 16},
    "model": {"arch": "mlp", "hidden": [16]},
    "base": {"epochs": 3, "batch_size": 32, "lr": 0.05},
    "daunce": {"K": 4, "chunk_size": 2, "ratio": 0.5, "epochs": 2, "batch_size": 32, "lr_grid": [0.03],
               "variants": ["daunce"], "k_curve": [2, 4]},
    "lds": {"alpha": 0.5, "M": 4, "M_select": 2, "seeds": 1, "chunk_size": 2, "bootstrap": 100,
            "threshold": {"kind": "hard", "quantile": 0.8}},
    "baselines": {"methods": []},
    "figures": {"variant": "daunce", "query": 0},
}
# kill point -> the workflow script its jobs run (Snakemake copies it to .snakemake/scripts/tmpXXX.<name>.py)
KILL_AT = {"perturbed fits": "daunce_chunk", "LDS retrains": "lds_chunk", "scoring": "score"}
TIMEOUT = 400  # seconds for one Snakemake invocation


def command(workdir: Path, *extra: str) -> list[str]:
    return [SNAKEMAKE, "-s", str(ROOT / "workflow" / "Snakefile"), "--directory", str(workdir),
            "--configfile", str(workdir / "config.yaml"), "--cores", "2", *extra, TARGET]


def run(workdir: Path, *extra: str) -> str:
    proc = subprocess.run(command(workdir, *extra), cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    return out


def group_scripts(pgid: int) -> set[str]:
    """Names of the workflow scripts run by processes of process group ``pgid``."""
    names = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[2]) == pgid:  # field 5: process group
            names.update(re.findall(r"\.snakemake/scripts/tmp[^./]*\.(\w+)\.py", cmdline))
    return names


def run_and_kill(workdir: Path, points: list[str], log: Path, *extra: str) -> tuple[str | None, str]:
    """Start the workflow in its own process group; SIGKILL the group once a job of one of
    ``points`` has run for a second. Returns the kill point (None: the run finished) and the log."""
    with open(log, "w") as fh:
        proc = subprocess.Popen(command(workdir, *extra), cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True)
    hit, seen_at = None, None
    deadline = time.monotonic() + TIMEOUT
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            running = {p for p in points if KILL_AT[p] in group_scripts(proc.pid)}
            if seen_at is None and running:
                seen_at = time.monotonic()
            elif seen_at is not None and time.monotonic() - seen_at > 1.0:
                if running:  # still inside the job: kill driver and job together
                    hit = sorted(running)[0]
                    os.killpg(proc.pid, signal.SIGKILL)
                    break
                seen_at = None  # that job ended; wait for the next one
            time.sleep(0.1)
    finally:
        if proc.poll() is None and hit is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    for _ in range(50):  # the job processes die with the group; wait until they are gone
        if not group_scripts(proc.pid):
            break
        time.sleep(0.1)
    assert not group_scripts(proc.pid), "a job survived the SIGKILL of its process group"
    return hit, log.read_text()


def jobs(log: str) -> dict[str, tuple[str, list[str]]]:
    """Jobs a Snakemake log started: jobid -> (rule, outputs)."""
    out = {}
    for block in re.split(r"^\[[^\]]+\]\n", log, flags=re.M):
        m = re.match(r"(?:local)?rule (\w+):\n", block)
        jid = re.search(r"^\s+jobid: (\d+)$", block, re.M)
        if m and jid:
            outputs = re.search(r"^\s+output: (.*)$", block, re.M)
            out[jid.group(1)] = (m.group(1), outputs.group(1).split(", ") if outputs else [])
    return out


def finished_outputs(log: str) -> set[str]:
    started = jobs(log)
    done = re.findall(r"^Finished jobid: (\d+)", log, re.M)
    return {f for j in done for f in started[j][1]}


def mtimes(workdir: Path, files: set[str]) -> dict[str, int]:
    return {f: (workdir / f).stat().st_mtime_ns for f in files}


def h5_items(path: Path) -> list[tuple[str, object, dict]]:
    """Every group and dataset of an HDF5 file: (name, data or None, attributes), root first."""
    with h5py.File(path, "r") as f:
        items = [("/", None, dict(f.attrs))]
        f.visititems(lambda name, obj: items.append(
            (name, obj[()] if isinstance(obj, h5py.Dataset) else None, dict(obj.attrs))))
    return items


def same_h5(a: Path, b: Path) -> bool:
    """Same names, data and attributes (HDF5's bytes may differ in free-space layout)."""
    ia, ib = h5_items(a), h5_items(b)
    return [n for n, *_ in ia] == [n for n, *_ in ib] and all(
        np.array_equal(np.asarray(da), np.asarray(db)) and aa.keys() == ab.keys()
        and all(np.array_equal(np.asarray(aa[k]), np.asarray(ab[k])) for k in aa)
        for (_, da, aa), (_, db, ab) in zip(ia, ib))


@pytest.mark.slow
def test_sigkill_at_three_points_then_rerun_gives_the_same_results(tmp_path):
    ref, work = tmp_path / "ref", tmp_path / "work"
    for d in (ref, work):
        d.mkdir()
        (d / "config.yaml").write_text(yaml.safe_dump(MICRO))
    run(ref)

    points, finished, stamps, redone, extra = list(KILL_AT), set(), {}, [], ()
    while points:
        hit, log = run_and_kill(work, points, tmp_path / f"kill{len(KILL_AT) - len(points)}.log", *extra)
        redone += [f for _, outs in jobs(log).values() for f in outs if f in finished]
        finished |= finished_outputs(log)
        stamps.update(mtimes(work, finished_outputs(log)))
        assert hit is not None, f"the workflow finished before it could be killed during: {points}"
        points.remove(hit)
        # what a user types next; Snakemake's messages name both: the killed driver left its
        # lock, and the killed job's outputs are marked incomplete
        run(work, "--unlock")
        extra = ("--rerun-incomplete",)
    log = run(work, *extra)
    redone += [f for _, outs in jobs(log).values() for f in outs if f in finished]

    assert not redone, f"finished jobs ran again, rewriting {redone}"
    assert mtimes(work, set(stamps)) == stamps, "a finished output was rewritten"
    assert not list(work.rglob("*.daunce-tmp-*")), "a temporary of a killed job was left behind"
    assert (work / TARGET).read_text() == (ref / TARGET).read_text()
    files = sorted(p.relative_to(ref) for p in (ref / "results").rglob("*.h5"))  # losses, ground truth, scores
    assert any(p.parts[-3] == "scores" for p in files), "the reference run wrote no scores"
    for rel in files:
        assert same_h5(ref / rel, work / rel), f"{rel} differs from the uninterrupted run's"
