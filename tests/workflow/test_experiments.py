"""Each experiment's tables and figures are its own: results/<experiment>/<name>, never shared by
two experiments; results/<name> is a copy of the current config's experiment's (rule view)."""
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import ROOT, SNAKEMAKE, plan_jobs

EMBEDDED = ROOT / "config" / "config.yaml"
TIER1 = ROOT / "config" / "regime" / "tier1.yaml"  # experiment: fmnist_mlp_regime


def snakemake(workdir: Path, *args: str) -> str:
    proc = subprocess.run([SNAKEMAKE, *args, "-s", str(ROOT / "workflow" / "Snakefile"), "--directory", str(workdir),
                           "--cores", "1"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    return out


def plan(workdir: Path, *configs: Path) -> tuple[dict[str, list[str]], list[str]]:
    """The default target's plan: {rule: [its jobs' outputs]} and rule all's inputs."""
    out = snakemake(workdir, "-n", "--forceall", "--configfile", *map(str, configs))
    outputs, final = {}, []
    for rule, ins, outs in plan_jobs(out):
        if rule == "all":
            final = ins
        elif outs:
            outputs.setdefault(rule, []).extend(outs)
            if rule == "view":
                outputs.setdefault("view inputs", []).append(", ".join(ins))
    return outputs, final


@pytest.mark.slow
def test_two_experiments_write_disjoint_files(tmp_path):
    """The embedded default and the regime's tier 1 (another `experiment`): no job of one writes a
    file a job of the other writes, except rule view's top-level copies, each of which copies the
    current config's experiment's file."""
    plans = {"digits_mlp": plan(tmp_path, EMBEDDED), "fmnist_mlp_regime": plan(tmp_path, EMBEDDED, TIER1)}
    written = {}
    for exp, (outputs, final) in plans.items():
        own = [f for rule, files in outputs.items() if rule not in ("view", "view inputs") for f in files]
        assert own and all(f.startswith(f"results/{exp}/") for f in own), \
            [f for f in own if not f.startswith(f"results/{exp}/")]
        written[exp] = set(own)
        # the default target: every table and figure in the experiment's folder, and its top-level view
        mine = [f for f in final if f.startswith(f"results/{exp}/")]
        views = [f for f in final if f.count("/") == 1]
        assert f"results/{exp}/lds.csv" in mine and f"results/{exp}/fig1a.pdf" in mine
        assert sorted(views) == sorted(f"results/{Path(f).name}" for f in mine) and len(mine) + len(views) == len(final)
        assert sorted(outputs["view"]) == sorted(views)
        assert sorted(outputs["view inputs"]) == sorted(mine)
    assert not written["digits_mlp"] & written["fmnist_mlp_regime"]


@pytest.mark.slow
def test_top_level_view_follows_the_current_experiment(tmp_path):
    """results/lds.csv is a byte copy (never a link) of the current experiment's file: a run of
    experiment b replaces a's copy, a run of a again brings a's back, and neither run touches the
    other experiment's own file. (Only rule view runs: the experiments' files are given.)"""
    res = tmp_path / "results"
    for exp in ("a", "b"):
        (res / exp).mkdir(parents=True)
        (res / exp / "lds.csv").write_text(f"method,lds\ndaunce,{exp}\n")

    def view(exp: str) -> str:
        snakemake(tmp_path, "results/lds.csv", "--configfile", str(EMBEDDED), "--config", f"experiment={exp}",
                  "--allowed-rules", "view")
        assert not (res / "lds.csv").is_symlink()
        return (res / "lds.csv").read_text()

    assert view("a") == "method,lds\ndaunce,a\n"
    assert view("b") == "method,lds\ndaunce,b\n"
    assert view("a") == "method,lds\ndaunce,a\n"  # a's file is older than the copy: copied again all the same
    assert [(res / e / "lds.csv").read_text() for e in "ab"] == ["method,lds\ndaunce,a\n", "method,lds\ndaunce,b\n"]


def test_dev_names_the_experiment_of_its_command_line(tmp_path):
    """./dev writes the report to results/<experiment>/report.html: the experiment Snakemake would
    run (config/config.yaml, then each --configfile, then --config experiment=...)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from experiment_of import experiment_of

    (tmp_path / "other.yaml").write_text("daunce: {K: 8}\n")  # sets no experiment: the earlier name stands
    assert experiment_of([], default=EMBEDDED) == "digits_mlp"
    assert experiment_of(["-n", "--configfile", str(TIER1)], default=EMBEDDED) == "fmnist_mlp_regime"
    assert experiment_of([f"--configfile={TIER1}", str(tmp_path / "other.yaml")], default=EMBEDDED) == \
        "fmnist_mlp_regime"
    assert experiment_of(["results/fig1a.pdf", "--config", "experiment=mine", "daunce={K: 8}"],
                         default=EMBEDDED) == "mine"
