"""profiles/workstation: one GPU on one machine (README, "On one GPU (conda)").

The profile asks one GPU for exactly the rules profiles/slurm asks one for (so the two never
drift), offers the machine one GPU, and Snakemake then runs GPU jobs one at a time with CPU jobs
beside them -- checked on a throwaway two-rule workflow that sleeps, since the real GPU rules
need a GPU.
"""
import subprocess

import pytest
import yaml

from helpers import ROOT, SNAKEMAKE

WORKSTATION = ROOT / "profiles" / "workstation"


def _profile(name: str) -> dict:
    return yaml.safe_load((ROOT / "profiles" / name / "config.yaml").read_text())


def _gpu_rules(profile: dict) -> dict[str, int]:
    return {rule: res["gpu"] for rule, res in profile["set-resources"].items() if "gpu" in res}


def test_workstation_asks_one_gpu_for_the_rules_slurm_does():
    ws, slurm = _profile("workstation"), _profile("slurm")
    # the same GPU rules; a cluster job may take several GPUs (torchrun), a workstation job its one
    assert set(_gpu_rules(ws)) == set(_gpu_rules(slurm))
    assert set(_gpu_rules(ws).values()) == {1}
    # nothing else per rule: threads are profiles/default's, memory is not managed on a workstation
    assert all(set(res) == {"gpu"} for res in ws["set-resources"].values())
    assert ws["resources"] == {"gpu": 1}
    # cores are the user's --cores; a configfile here would hide the one given on the command line
    assert not {"cores", "configfile", "set-threads", "executor"} & set(ws)


@pytest.mark.slow
def test_gpu_jobs_run_one_at_a_time_beside_cpu_jobs(tmp_path):
    """Three jobs of a GPU rule never overlap; the CPU rule's jobs overlap them (--cores 4)."""
    (tmp_path / "Snakefile").write_text(
        'rule all:\n    input: expand("gpu/{i}", i=range(3)), expand("cpu/{i}", i=range(2))\n\n'
        'rule lds_chunk:\n    output: "gpu/{i}"\n'
        '    shell: "date +%s.%N > {output}; sleep 1; date +%s.%N >> {output}"\n\n'
        'rule score:\n    output: "cpu/{i}"\n'
        '    shell: "date +%s.%N > {output}; sleep 1; date +%s.%N >> {output}"\n')
    proc = subprocess.run([SNAKEMAKE, "--profile", str(WORKSTATION), "--workflow-profile", "none", "--cores", "4"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]

    def spans(kind: str) -> list[tuple[float, float]]:
        return sorted(tuple(map(float, p.read_text().split())) for p in (tmp_path / kind).iterdir())

    gpu, cpu = spans("gpu"), spans("cpu")
    assert len(gpu) == 3 and len(cpu) == 2
    assert all(end <= start for (_, end), (start, _) in zip(gpu, gpu[1:])), gpu
    assert any(s < ge and gs < e for s, e in cpu for gs, ge in gpu), (gpu, cpu)
