"""A real end-to-end run of the workflow on a tiny config, in a temporary folder."""
import csv
import re
import subprocess
from pathlib import Path

import pytest
import yaml

import helpers

TINY = {
    "experiment": "tiny",
    "device": "cpu",
    "data": {"name": "digits", "n_train": 240, "n_query": 40},
    "model": {"arch": "mlp", "hidden": [32]},
    "base": {"epochs": 15, "batch_size": 32, "lr": 0.05, "lr_schedule": "linear"},
    "daunce": {"K": 12, "ratio": 0.3, "epochs": 5, "batch_size": 32, "lr_grid": [0.03, 0.01],
               "variants": ["daunce", "daunce_t", "daunce_bb"], "chunk_size": 6, "k_curve": [4, 8, 12]},
    "lds": {"alpha": 0.5, "M": 30, "M_select": 12, "seeds": 1, "chunk_size": 20, "bootstrap": 200,
            "threshold": {"kind": "hard", "quantile": 0.8}},
    "figures": {"variant": "daunce", "query": 1},
    # config/config.yaml is not read under --directory: without this, LoGra's default rank 128 makes
    # two 16,384-dim eFIMs that Cholesky cannot factor at n=240 (minutes and 7 GB for a direct inverse).
    # The budget rule: no method tries more settings than DAUNCE's 2 learning rates.
    "baselines": {"logra": {"rank": 16}, "exact_if": {"damping_grid": [0.01, 0.1]}},
}


def snakemake(workdir: Path, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return helpers.snakemake(workdir, *args, configfile="config.yaml", cores=2, timeout=timeout)


@pytest.mark.slow
def test_tiny_workflow_end_to_end(tmp_path):
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(TINY))
    plan = snakemake(tmp_path, "-n")
    assert plan.returncode == 0, plan.stderr[-3000:]
    counts = dict(re.findall(r"^(\w+)\s+(\d+)$", plan.stdout, re.M))
    # K=12 in chunks of 6 -> 2 chunk jobs per variant, each fitting every lr of the grid; one gather
    # per variant writes every lr's losses file (its 2 chunks each)
    assert counts["perturbed_chunk"] == "6" and counts["gather_losses"] == "3" and counts["select_lr"] == "3"

    run = snakemake(tmp_path)
    assert run.returncode == 0, (run.stdout + run.stderr)[-5000:]
    res = tmp_path / "results"
    for name in ("fig1a.pdf", "fig1b.pdf", "fig5.pdf", "fig6.pdf", "table3.md", "table3.csv", "lds.csv"):
        assert (res / "tiny" / name).stat().st_size > 0, name
        # the top-level file is a copy (not a link) of the experiment's own
        assert not (res / name).is_symlink() and (res / name).read_bytes() == (res / "tiny" / name).read_bytes()
    rows = list(csv.DictReader(open(res / "tiny" / "lds.csv")))
    methods = {(r["method"], r["measure"], r["threshold"]) for r in rows}
    for v in TINY["daunce"]["variants"]:
        for m in ("correlation", "covariance"):
            assert (v, m, "none") in methods and (v, m, "hard(q=0.8)") in methods
    for r in rows:
        assert -1 <= float(r["lds"]) <= 1 and float(r["ci_low"]) <= float(r["lds"]) <= float(r["ci_high"])
    # chunking is invisible downstream: the gathered file holds k = 0..K-1 in order
    from daunce_core import store

    L = store.read_losses(res / "tiny" / "daunce" / "daunce" / "losses.h5")
    assert list(L.model_index) == list(range(12))
    assert (res / "tiny" / "daunce" / "daunce" / "selection.json").exists()

    # a second run has nothing to do; the report builds offline
    again = snakemake(tmp_path, "-n")
    assert "Nothing to be done" in again.stdout + again.stderr
    rep = snakemake(tmp_path, "--report", str(tmp_path / "report.html"))
    assert rep.returncode == 0, rep.stderr[-3000:]
    assert (tmp_path / "report.html").stat().st_size > 10_000


def test_cifar10_offline_is_one_clear_error(tmp_path):
    from daunce_core.config import DataConfig
    from daunce_core.data import DataError, load_dataset

    with pytest.raises(DataError, match=r"CIFAR-10 is not under .* could not be downloaded"):
        load_dataset(DataConfig(name="cifar10", root=str(tmp_path), download=False))
