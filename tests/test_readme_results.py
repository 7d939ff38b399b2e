"""scripts/readme_results.py: the README's results block is built from result files only."""
import json
import subprocess
import sys

import pytest

from helpers import ROOT

SCRIPT = ROOT / "scripts" / "readme_results.py"

LDS = """method,measure,threshold,lds,ci_low,ci_high,n_queries,n_masks
daunce,correlation,none,0.2950,0.2851,0.3065,300,100
daunce,correlation,hard(q=0.9),0.3357,0.3260,0.3468,300,100
daunce,covariance,none,0.4150,0.4010,0.4290,300,100
daunce,covariance,hard(q=0.9),0.4000,0.3850,0.4150,300,100
ekfac,score,none,0.5900,0.5700,0.6100,300,100
ekfac,score,hard(q=0.9),0.5823,0.5667,0.5974,300,100
limit_daunce,correlation,none,0.3570,0.3430,0.3710,300,100
"""
PAIRED = """kind,method,measure,versus,versus_measure,threshold,diff,ci_low,ci_high,n_resamples
threshold,daunce,correlation,daunce,correlation,hard(q=0.9) - none,0.0407,0.0300,0.0500,2000
method,daunce,covariance,ekfac,score,none,-0.1750,-0.1900,-0.1600,2000
"""


def test_block_is_read_from_the_results(tmp_path):
    results = tmp_path / "results" / "digits_mlp"  # the experiment's own folder, never the top-level copies
    results.mkdir(parents=True)
    (results / "lds.csv").write_text(LDS)
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- results:begin -->\nstale 0.999\n<!-- results:end -->\noutro\n")
    run = [sys.executable, str(SCRIPT), "--results", str(results), "--readme", str(readme)]
    assert subprocess.run(run + ["--check"], capture_output=True).returncode == 1
    subprocess.run(run, check=True)
    text = readme.read_text()
    assert "stale" not in text and text.startswith("intro\n") and text.endswith("outro\n")
    # raw LDS first and sorted by it; the thresholded LDS beside it with its change (paired CI
    # when results/lds_paired.csv has it, the plain difference otherwise); both DAUNCE measures
    assert "| EK-FAC | – | 0.590 | [0.570, 0.610] | 0.582 | -0.008 |" in text
    assert "(`results/digits_mlp/lds.csv`)" in text
    assert "| DAUNCE | correlation | 0.295 | [0.285, 0.306] | 0.336 | +0.041 |" in text
    assert text.index("| EK-FAC |") < text.index("| DAUNCE | covariance | 0.415") < \
        text.index("| DAUNCE | correlation | 0.295")
    # the limits are references, apart, never called bounds
    assert "Exact references" in text and "| limit: DAUNCE | correlation | 0.357 |" in text
    assert "bound what" not in text and "can reach" not in text
    (results / "lds_paired.csv").write_text(PAIRED)
    subprocess.run(run, check=True)
    text = readme.read_text()
    assert "| DAUNCE | correlation | 0.295 | [0.285, 0.306] | 0.336 | +0.041 [+0.030, +0.050] |" in text
    assert "| DAUNCE | covariance | -0.175 [-0.190, -0.160] |" in text  # paired difference vs EK-FAC
    assert subprocess.run(run + ["--check"], capture_output=True).returncode == 0


def test_missing_results_is_one_clear_error(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("<!-- results:begin -->\n<!-- results:end -->\n")
    r = subprocess.run([sys.executable, str(SCRIPT), "--results", str(tmp_path / "nope"), "--readme", str(readme)],
                       capture_output=True, text=True)
    assert r.returncode != 0 and "lds.csv: missing" in r.stderr


@pytest.mark.slow
def test_gpu_cost_block_is_generated_from_the_config_and_the_rates(tmp_path):
    """README.md's GPU cost block is what scripts/readme_gpu_cost.py makes of config/paper/cifar10.yaml
    and the rates (assumed until a GPU check is committed): a config change that moves a number
    leaves it stale and fails here. Doubling the assumed rates halves every GPU-hour."""
    gpu = ROOT / "scripts" / "readme_gpu_cost.py"
    assert subprocess.run([sys.executable, str(gpu), "--check"], capture_output=True).returncode == 0, \
        "README.md's GPU cost block is stale: run python scripts/readme_gpu_cost.py"
    sys.path.insert(0, str(ROOT / "scripts"))
    import readme_gpu_cost as G
    import yaml

    rates = yaml.safe_load(G.ASSUMED.read_text())
    fast = {k: ({kk: 2 * vv for kk, vv in v.items()} if isinstance(v, dict) else v) for k, v in rates.items()}
    (tmp_path / "fast.yaml").write_text(yaml.safe_dump(fast))
    slow_block = G.render(measured=tmp_path / "none.json")
    fast_block = G.render(measured=tmp_path / "none.json", assumed=tmp_path / "fast.yaml")

    def hours(block):
        block = block.split("LLM jobs", 1)[0]  # the GPU-hours table, not the LLM memory table
        return [float(line.rsplit("|", 2)[1]) for line in block.splitlines()
                if line.startswith("| ") and line.rstrip().endswith("|") and "GPU-hours" not in line]
    assert "ESTIMATE" in slow_block and len(hours(slow_block)) >= 4
    for s, f in zip(hours(slow_block), hours(fast_block)):
        assert abs(f - s / 2) <= 0.01


def test_llm_memory_table_counts_the_paper_models_and_follows_the_profile(tmp_path):
    """The LLM rows of the GPU cost block: the typed-in layer shapes give the published parameter
    counts (Qwen2.5-7B 7.61 B, Llama-3.1-8B 8.03 B on their model cards), and the FSDP rows shard
    16 bytes per parameter over the GPUs the SLURM profile gives the rule."""
    import yaml

    sys.path.insert(0, str(ROOT / "scripts"))
    import readme_gpu_cost as G

    assert round(G.llm_parameters("qwen2.5-7b")[0] / 1e9, 2) == 7.62
    assert round(G.llm_parameters("llama-3.1-8b")[0] / 1e9, 2) == 8.03
    # LoRA on the MLP at rank 64: r (d_in + d_out) per adapted matrix, 3 per layer
    assert G.llm_parameters("qwen2.5-7b")[1] == 28 * 3 * 64 * (3584 + 18944)

    def row(lines, rule):
        cells = next(line for line in lines if line.startswith(f"| `{rule}`")).strip("| ").split(" | ")
        return int(cells[2]), [float(c) for c in cells[3:]]

    base = G.llm_state_lines()
    prof = yaml.safe_load(G.PROFILE.read_text())
    prof["set-resources"]["llm_full"]["gpu"] = 4
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(prof))
    four = G.llm_state_lines(tmp_path / "p.yaml")
    (g8, gb8), (g4, gb4) = row(base, "llm_full"), row(four, "llm_full")
    assert (g8, g4) == (8, 4) and all(abs(b - 2 * a) <= 0.15 for a, b in zip(gb8, gb4))  # 1-decimal rounding
    assert row(base, "llm_daunce_chunk")[1] == row(four, "llm_daunce_chunk")[1]  # LoRA: not sharded


def test_quality_findings_are_read_from_the_study_table(tmp_path):
    """docs/quality.md's findings block: the chosen setting is the best on the *selection* masks
    (not the test masks), and the ratios to the limit and exact IF are computed from the file."""
    import csv

    sys.path.insert(0, str(ROOT / "scripts"))
    import quality_summary as Q

    from daunce_core.steps.study import QUALITY_COLUMNS

    def row(kind, variant, setting="", select="", test="", K=""):
        r = dict.fromkeys(QUALITY_COLUMNS, "")
        r.update(kind=kind, variant=variant, setting=setting, lds_select=select, lds_test=test, K=K,
                 ci_low=test, ci_high=test, lr="0.01" if kind == "study" else "", grid="0.01")
        return r
    rows = [row("study", "daunce", "default", 0.30, 0.31, 100),
            row("study", "daunce", "K200", 0.32, 0.30, 200),      # best on selection, not on test
            row("study", "daunce", "antithetic", 0.29, 0.33, 100),
            row("baseline", "exact_if", test=0.60), row("reference", "limit_daunce", test=0.40),
            row("reference", "lin_daunce", test=0.35)]
    q = tmp_path / "quality.csv"
    with open(q, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=QUALITY_COLUMNS)
        w.writeheader()
        w.writerows(rows)
    block = Q.render(q)
    line = next(x for x in block.splitlines() if x.startswith("| daunce | "))
    assert "| K200 | 200 | 0.300 | 0.400 | 0.350 | 0.75 | 0.50 | 0.310 |" in line
    assert "| daunce | antithetic | default | -0.010 | +0.020 |" in block


# --- scripts/readme_regime.py: the tier-1 block and CI's rerun check ------------------------------

REGIME = ROOT / "scripts" / "readme_regime.py"


@pytest.mark.parametrize("tier", ["1", "2"])
def test_regime_block_matches_the_committed_files(tier):
    # README.md's block (tier 1) and docs/regime.md's (tier 2) are what their committed files give
    r = subprocess.run([sys.executable, str(REGIME), "--tier", tier, "--check"], capture_output=True, text=True,
                       cwd=ROOT)
    assert r.returncode == 0, r.stderr


def test_regime_compare_flags_a_moved_or_missing_row(tmp_path):
    src = ROOT / "docs" / "regime" / "tier1"
    rows = (src / "regime.csv").read_text().splitlines()
    header, body = rows[0], rows[1:]
    col = header.split(",").index("lds_raw")
    run = tmp_path / "results" / "fmnist_mlp_regime"
    run.mkdir(parents=True)

    def compare(lines, tol="0.02"):
        (run / "regime.csv").write_text("\n".join([header, *lines]) + "\n")
        return subprocess.run([sys.executable, str(REGIME), "--compare", "--results", str(tmp_path / "results"),
                               "--tol", tol], capture_output=True, text=True, cwd=ROOT)

    assert compare(body).returncode == 0
    moved = body[0].split(",")
    moved[col] = f"{float(moved[col]) + 0.05:.4f}"
    r = compare([",".join(moved), *body[1:]])
    assert r.returncode == 1 and "MORE THAN" in r.stdout and "1 row(s)" in r.stderr
    assert compare([",".join(moved), *body[1:]], tol="0.06").returncode == 0
    r = compare(body[1:])
    assert r.returncode == 1 and "missing in the new run" in r.stdout


def test_regime_tier2_block_goes_to_its_own_document(tmp_path):
    # tier 2 writes docs/regime.md's block from docs/regime/tier2/; a resumed run gives its job seconds,
    # not its first-to-last span (which would count the pauses between sittings)
    src = tmp_path / "tier2"
    src.mkdir()
    for name in ("regime.csv", "lds.csv", "mislabel.csv"):
        (src / name).write_text((ROOT / "docs" / "regime" / "tier1" / name).read_text())
    (src / "run.json").write_text(json.dumps({
        "commit": "abc1234", "command": "snakemake ... tier2.yaml", "jobs": 62, "job_seconds_sum": 12345.0,
        "first_job_start_to_last_job_end_s": 99999.0, "resumed": True, "machine": "2 CPU cores"}))
    doc = tmp_path / "regime.md"
    doc.write_text("# x\n<!-- regime-tier2:begin -->\nold\n<!-- regime-tier2:end -->\ntail\n")

    def run(*extra):
        return subprocess.run([sys.executable, str(REGIME), "--tier", "2", "--src", str(src), "--readme", str(doc),
                               *extra], capture_output=True, text=True, cwd=ROOT)

    assert run("--check").returncode == 1
    assert run().returncode == 0
    text = doc.read_text()
    assert text.startswith("# x\n<!-- regime-tier2:begin -->\n*Generated by `python scripts/readme_regime.py --tier 2`")
    assert text.endswith("<!-- regime-tier2:end -->\ntail\n") and "\nold\n" not in text
    assert "ResNet-9 at width 0.25" in text and "on 2,000 Fashion-MNIST images padded" in text  # tier2.yaml's n_train
    assert "206 minutes of job wall time summed" in text and "first job's start" not in text
    assert "Mislabelled-example detection" in text
    assert run("--check").returncode == 0
    doc.write_text("no markers\n")
    r = run()
    assert r.returncode == 1 and "no <!-- regime-tier2:begin -->" in r.stderr and doc.read_text() == "no markers\n"


def test_regime_jobs_lists_every_finished_benchmark(tmp_path):
    # an unfinished run's measured job times, one row per Snakemake benchmark file
    bench = tmp_path / "results" / "fmnist_resnet9q_regime" / "benchmarks"
    (bench / "lds" / "test").mkdir(parents=True)
    head = "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"
    (bench / "base.tsv").write_text(head + "20.85\t0:00:20\t1028.74\t1\t1\t1\t0\t0\t90\t19\n")
    (bench / "lds" / "test" / "chunk0.tsv").write_text(head + "410.45\t0:06:50\t3962.54\t1\t1\t1\t0\t0\t190\t780\n")
    out = tmp_path / "tier2"
    r = subprocess.run([sys.executable, str(REGIME), "--tier", "2", "--jobs", "--results", str(tmp_path / "results"),
                        "--src", str(out)], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    lines = (out / "jobs.csv").read_text().splitlines()
    assert lines[0] == "job,seconds,max_rss_mb,ended_utc" and len(lines) == 3
    assert lines[1].startswith("base,20.9,1029,") and lines[2].startswith("lds/test/chunk0,410.4,3963,")
    r = subprocess.run([sys.executable, str(REGIME), "--tier", "2", "--jobs", "--results", str(tmp_path / "none"),
                        "--src", str(out)], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 1 and "no benchmark files" in r.stderr
