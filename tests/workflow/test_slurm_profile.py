"""The paper-scale plan and the profiles, checked with dry runs (no data, GPU or SLURM).

The real SLURM run is `.ci/run`'s second step (tests/slurm/run_workflow.sh); these tests keep the
plan the user reads before spending GPU hours honest: it builds on a machine without CIFAR-10,
the cluster sees hundreds of jobs (chunks, not one job per model), with profiles/slurm the GPU
rules and only they ask for a GPU, threads come from the workflow profile profiles/default on
every run, and the profiles resolve as the README says.
"""
import math
import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from daunce_core.config import fit_variant

from helpers import ROOT, SNAKEMAKE

PAPER = ROOT / "config" / "paper" / "cifar10.yaml"
TRAINING_RULES = {"base", "perturbed_chunk", "lds_chunk"}
LLM_GPU_RULES = {"llm_full", "llm_daunce_chunk", "llm_select_lr", "llm_logra", "llm_removal"}
# steps that never need a GPU, whatever the config
CPU_RULES = {"data", "gather_losses", "select_lr", "score", "gather_ground_truth", "lds_eval", "lds_table",
             "k_curve", "fig1a", "fig1b", "table3", "fig5", "fig6"}


def dry_run(workdir: Path, *args: str) -> str:
    proc = subprocess.run([SNAKEMAKE, "-n", "-s", str(ROOT / "workflow" / "Snakefile"), "--directory", str(workdir),
                           *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    return out


def job_counts(out: str) -> dict[str, int]:
    table = out[out.index("Job stats:"):]
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.M)}


def resources_by_rule(out: str) -> dict[str, set[str]]:
    """rule -> the distinct `resources:` lines of its jobs in a dry run."""
    res: dict[str, set[str]] = {}
    for block in re.split(r"\n(?=(?:local)?rule \w+:)", out):
        m = re.match(r"(?:local)?rule (\w+):", block)
        r = re.search(r"^\s+resources: (.*)$", block, re.M)
        if m and r:
            res.setdefault(m.group(1), set()).add(r.group(1))
    return res


@pytest.mark.slow
def test_paper_plan_dry_runs_without_data_or_gpu(tmp_path):
    cfg = yaml.safe_load(PAPER.read_text())
    # targets before --configfile: the option takes every word after it
    # GPU requests come from the profile (profiles/slurm), not from the config
    out = dry_run(tmp_path, "results/fig1a.pdf", "--profile", "profiles/slurm", "--configfile", str(PAPER))
    counts = job_counts(out)
    d, lds = cfg["daunce"], cfg["lds"]
    # daunce_t_q scores daunce_t's fits: one set of perturbed fits per fitted variant
    fitted = {fit_variant(v) for v in d["variants"]}
    assert counts["perturbed_chunk"] == len(fitted) * math.ceil(d["K"] / d["chunk_size"])
    assert counts["lds_chunk"] == (math.ceil(lds["M"] / lds["chunk_size"])
                                   + math.ceil(lds["M_select"] / lds["chunk_size"]))
    assert counts["gather_losses"] == len(fitted)  # one per fitted variant: every lr's losses file
    # the cluster sees hundreds of jobs, not one per model (6,000 fits + 2,200 retrains)
    assert counts["total"] < 1000
    assert not (tmp_path / "results").exists()

    res = resources_by_rule(out)
    for rule in TRAINING_RULES:
        assert all(re.search(r"\bgpu=1\b", line) for line in res[rule]), (rule, res[rule])
    for rule in CPU_RULES & set(res):
        assert not any(re.search(r"\bgpu=[1-9]", line) for line in res[rule]), (rule, res[rule])


@pytest.mark.slow
def test_every_target_of_the_paper_config_dry_runs(tmp_path):
    out = dry_run(tmp_path, "--configfile", str(PAPER))
    counts = job_counts(out)
    for rule in ("fig1a", "fig1b", "table3", "fig5", "fig6", "k_curve"):
        assert counts.get(rule) == 1, rule


@pytest.mark.slow
def test_embedded_default_requests_no_gpu(tmp_path):
    out = dry_run(tmp_path, "results/fig1a.pdf", "--configfile", str(ROOT / "config" / "config.yaml"))
    res = resources_by_rule(out)
    assert TRAINING_RULES <= set(res)
    for rule, lines in res.items():
        assert not any(re.search(r"\bgpu=[1-9]", line) for line in lines), (rule, lines)


@pytest.mark.slow
@pytest.mark.parametrize("profiles,experiment,gpu,mem_mb", [
    (["profiles/slurm"], "cifar10_resnet9", 1, 16000),                     # the user's command
    (["profiles/slurm", "profiles/ci-slurm"], "slurm_ci", 0, 2000),        # what CI runs
])
def test_profiles_resolve_and_set_resources(tmp_path, profiles, experiment, gpu, mem_mb):
    args = [a for p in profiles for a in ("--profile", p)]
    out = dry_run(tmp_path, "results/fig1a.pdf", *args)
    assert f"experiment={experiment}" in out  # the profile names the config
    res = resources_by_rule(out)
    for rule in TRAINING_RULES:
        for line in res[rule]:
            assert f"mem_mb={mem_mb}," in line, (rule, line)
            assert (f"gpu={gpu}" in line) if gpu else not re.search(r"\bgpu=[1-9]", line), (rule, line)
            assert "slurm_partition" not in line  # chosen per job from the profile's partitions.yaml


class _Job:  # what the plugin's partition selection reads of a job
    def __init__(self, name, threads=1, **resources):
        self.name, self.threads, self.resources = name, threads, resources


@pytest.mark.parametrize("profile,gpu,expected", [
    ("slurm", 1, "gpu"), ("slurm", 0, "cpu"), ("ci-slurm", 0, "ci"), ("ci-slurm", 1, None),
])
def test_partition_files_route_gpu_jobs_to_gpu_partitions(profile, gpu, expected):
    import logging

    from snakemake_executor_plugin_slurm.partitions import get_best_partition, read_partition_file

    parts = read_partition_file(ROOT / "profiles" / profile / "partitions.yaml")
    job = _Job("perturbed_chunk", threads=2, gpu=gpu, mem_mb=2000, runtime=20)
    assert get_best_partition(parts, job, logging.getLogger("test")) == expected


@pytest.mark.slow
def test_command_line_configfile_overrides_the_profiles(tmp_path):
    out = dry_run(tmp_path, "results/fig1a.pdf", "--profile", "profiles/slurm", "--configfile",
                  str(ROOT / "config" / "config.yaml"))
    assert "experiment=digits_mlp" in out and "experiment=cifar10_resnet9" not in out


@pytest.mark.slow
def test_profile_by_name_from_the_user_config_dir(tmp_path):
    """README: link profiles/slurm into ~/.config/snakemake, then `--profile slurm` finds it."""
    cfg_home = tmp_path / "xdg"
    (cfg_home / "snakemake").mkdir(parents=True)
    (cfg_home / "snakemake" / "slurm").symlink_to(ROOT / "profiles" / "slurm")
    proc = subprocess.run([SNAKEMAKE, "-n", "--profile", "slurm", "-s", str(ROOT / "workflow" / "Snakefile"),
                           "--directory", str(tmp_path / "work"), "results/fig1a.pdf"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "XDG_CONFIG_HOME": str(cfg_home)})
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "experiment=cifar10_resnet9" in out


def threads_by_rule(out: str) -> dict[str, set[int]]:
    """rule -> the distinct thread counts of its jobs in a dry run (jobs of 1 thread print none)."""
    res: dict[str, set[int]] = {}
    for block in re.split(r"\n(?=(?:local)?rule \w+:)", out):
        m = re.match(r"(?:local)?rule (\w+):", block)
        if m:
            t = re.search(r"^\s+threads: (\d+)$", block, re.M)
            res.setdefault(m.group(1), set()).add(int(t.group(1)) if t else 1)
    return res


def profile(name: str) -> dict:
    return yaml.safe_load((ROOT / "profiles" / name / "config.yaml").read_text())


def test_the_workflow_profile_never_replaces_an_entry_of_a_cluster_profile():
    """Snakemake layers profiles/default (the workflow profile) over every --profile and replaces
    whole top-level entries: a `set-resources` there would silently drop profiles/slurm's."""
    default = set(profile("default"))
    assert default == {"set-threads"}, default
    for name in ("slurm", "ci-slurm"):
        assert not default & set(profile(name)), name


@pytest.mark.slow
@pytest.mark.parametrize("profiles", [[], ["profiles/slurm"], ["profiles/slurm", "profiles/ci-slurm"]])
def test_threads_come_from_the_workflow_profile_on_every_run(tmp_path, profiles):
    args = [a for p in profiles for a in ("--profile", p)]
    out = dry_run(tmp_path, "results/fig1a.pdf", "--cores", "2", "--configfile", str(ROOT / "config" / "config.yaml"),
                  *args)
    threads = threads_by_rule(out)
    for rule, n in profile("default")["set-threads"].items():
        if rule in threads:
            assert threads[rule] == {n}, (rule, threads[rule])
    assert TRAINING_RULES <= set(threads) and threads["lds_eval"] == {1}


@pytest.mark.slow
def test_paper_llm_plan_asks_gpus_through_the_slurm_profile_only(tmp_path):
    # merged over the embedded default, as the Snakefile's configfile does when run from the repository
    configs = [str(ROOT / "config" / "config.yaml"), str(ROOT / "config" / "paper" / "llm_math.yaml")]
    res = resources_by_rule(dry_run(tmp_path, "results/fig2.pdf", "--profile", "profiles/slurm",
                                    "--configfile", *configs))
    assert LLM_GPU_RULES <= set(res)
    for rule, lines in res.items():
        if rule in LLM_GPU_RULES:
            assert all(re.search(r"\bgpu=[1-9]", ln) and "mem_mb=240000," in ln for ln in lines), (rule, lines)
        else:
            assert not any(re.search(r"\bgpu=[1-9]", ln) for ln in lines), (rule, lines)
    local = resources_by_rule(dry_run(tmp_path, "results/fig2.pdf", "--configfile", *configs))
    assert not any(re.search(r"\bgpu=[1-9]", ln) for lines in local.values() for ln in lines), local


def test_rules_define_no_resources_or_threads():
    """Resources and threads are defined once, in the profiles."""
    for smk in sorted((ROOT / "workflow" / "rules").glob("*.smk")):
        for n, line in enumerate(smk.read_text().splitlines(), 1):
            assert not re.match(r"\s+(resources|threads):", line), f"{smk.name}:{n}: {line.strip()}"
