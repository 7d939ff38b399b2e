"""The quality landscape study: its config, its place in the DAG (off by default)
and one real run on a tiny problem, which must agree with the workflow's own lr selection."""
import csv
import json
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml

from daunce_core.config import ConfigError, ExperimentConfig

import helpers

TINY = {
    "experiment": "tiny",
    "device": "cpu",
    "data": {"name": "digits", "n_train": 240, "n_query": 40},
    "model": {"arch": "mlp", "hidden": [32]},
    "base": {"epochs": 15, "batch_size": 32, "lr": 0.05, "lr_schedule": "linear"},
    "daunce": {"K": 12, "ratio": 0.3, "epochs": 5, "batch_size": 32, "lr_grid": [0.1, 0.03, 0.01, 0.003],
               "variants": ["daunce", "daunce_t"], "chunk_size": 12, "k_curve": [4, 12]},
    "lds": {"alpha": 0.5, "M": 20, "M_select": 12, "seeds": 1, "chunk_size": 20, "bootstrap": 200,
            "threshold": {"kind": "hard", "quantile": 0.8}},
    "baselines": {"methods": ["graddot"]},
}
STUDY = {"enabled": True, "variants": ["daunce"], "lr_around": 1,
         "settings": [{"name": "default"}, {"name": "K6", "daunce": {"K": 6}}, {"name": "theta0s2", "theta0s": 2},
                      {"name": "epochs2", "daunce": {"epochs": 2}}]}


def build(study):
    return ExperimentConfig.from_dict({**TINY, "study": study}).validate()


# --- the config -------------------------------------------------------------------------------


def test_study_config_is_checked_by_name():
    cfg = build(STUDY)
    assert cfg.study.enabled is True and [s.name for s in cfg.study.parsed()][:2] == ["default", "K6"]
    assert build({"enabled": "false"}).study.enabled is False  # what --config study='{enabled: false}' gives
    bad = [
        ({"settings": [{"name": "a", "daunce": {"epochz": 3}}]}, r"study\.settings\[0\] \(a\)\.daunce\.epochz"),
        ({"settings": [{"name": "a", "thetas": 2}]}, r"unknown key\(s\) study\.settings\[0\] \(a\)\.thetas"),
        ({"settings": [{"name": "a", "daunce": {"K": "many"}}]},
         r"study\.settings\[0\] \(a\)\.daunce\.K must be a int"),
        ({"settings": [{"name": "a/b"}]}, r"study\.settings\[0\] \(a/b\)\.name must use letters"),
        ({"settings": [{"name": "a"}, {"name": "a"}]}, r"the name\(s\) a appear more than once"),
        ({"variants": ["daunce_bb"]}, r"study\.variants"),
        ({"enabled": "yes"}, r"study\.enabled must be true or false"),
        ({"colour": 1}, r"unknown key\(s\) study\.colour"),
    ]
    for study, match in bad:
        with pytest.raises(ConfigError, match=match):
            build(study)
    # ranges are the daunce section's own, checked for each setting once the study is on
    with pytest.raises(ConfigError, match=r"study setting 'a': daunce\.ratio must be in \(0, 1\]"):
        build({"enabled": True, "settings": [{"name": "a", "daunce": {"ratio": 1.5}}]})
    with pytest.raises(ConfigError, match=r"study setting 'a': K=12 must be a multiple of theta0s=5"):
        build({"enabled": True, "settings": [{"name": "a", "theta0s": 5}]})


def test_groups_share_fits_and_grids_centre_on_the_default_choice():
    from daunce_core.steps.study import daunce_passes, groups, lr_grid

    cfg = build(STUDY)
    gs = {g.name: [m.name for m in g.members] for g in groups(cfg)}
    assert gs == {"default": ["default", "K6"], "theta0s2": ["theta0s2"], "epochs2": ["epochs2"]}
    s = cfg.study.parsed()[0]
    assert lr_grid(cfg, s, 0.03) == [0.01, 0.03, 0.1]
    assert lr_grid(cfg, s, 0.1) == [0.01, 0.03, 0.1]  # shifted inwards at the grid's end
    own = build({**STUDY, "settings": [{"name": "a", "daunce": {"lr_grid": [1.0, 0.5]}}]})
    assert lr_grid(own, own.study.parsed()[0], None) == [0.5, 1.0]
    # compute: linear in K and in the grid size; an extra theta_0 costs its training
    assert daunce_passes(cfg, 12, 3, 240, 40, 1) == 2 * daunce_passes(cfg, 6, 3, 240, 40, 1) - 280
    assert daunce_passes(cfg, 12, 3, 240, 40, 2) > daunce_passes(cfg, 12, 3, 240, 40, 1)


# --- the DAG ----------------------------------------------------------------------------------


def snakemake(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    """A dry run."""
    return helpers.snakemake(workdir, "-n", *args, configfile="config.yaml", cores=2, timeout=600)


def counts(plan: subprocess.CompletedProcess) -> dict:
    assert plan.returncode == 0, (plan.stdout + plan.stderr)[-3000:]
    return dict(re.findall(r"^(\w+)\s+(\d+)$", plan.stdout, re.M))


@pytest.mark.slow
def test_dry_runs_plan_the_study_only_when_switched_on(tmp_path):
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({**TINY, "study": {**STUDY, "enabled": False}}))
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "config.yaml").write_text(yaml.safe_dump(TINY))
    default = counts(snakemake(tmp_path))
    assert default == counts(snakemake(plain))  # the switch off changes nothing of the default plan
    assert not any(r.startswith("study") or r == "quality_figure" for r in default)
    off = snakemake(tmp_path, "results/quality.pdf")
    assert off.returncode != 0 and "study.enabled" in off.stdout + off.stderr
    on = counts(snakemake(tmp_path, "results/quality.pdf", "--config", "study={enabled: true}"))
    # 3 groups x 1 variant, one extra theta_0, then the table and the figure
    assert (on["study_group"], on["study_theta0"], on["study_table"], on["quality_figure"]) == ("3", "1", "1", "1")
    assert on["lds_table"] == "1"  # the baselines and references come from results/lds.csv


# --- one tiny real run ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def problem(tmp_path_factory):
    """Data, theta_0, both ground truths and the workflow's own lr selection of DAUNCE."""
    from daunce_core import store
    from daunce_core.fit import chunks
    from daunce_core.steps import vision as pipeline

    d = tmp_path_factory.mktemp("study")
    cfg = build(STUDY)
    pipeline.prepare_data(cfg, d / "split.npz")
    pipeline.train_base(cfg, d / "split.npz", d / "theta_0.safetensors", d / "metrics.json")
    for split in ("select", "test"):
        pipeline.ground_truth_chunk(cfg, d / "split.npz", split, 0, d / f"{split}0.h5")
        store.concat_ground_truth([d / f"{split}0.h5"], d / f"{split}.h5")
    lrs = cfg.daunce.lr_grid
    outs = [d / f"lr{lr:g}.h5" for lr in lrs]
    pipeline.perturbed_chunk(cfg, d / "split.npz", d / "theta_0.safetensors", "daunce", lrs, 0, outs)
    pipeline.select_lr(cfg, "daunce", dict(zip(lrs, map(str, outs))), d / "select.h5", d / "losses.h5",
                       d / "selection.json")
    assert chunks.n_chunks(cfg.daunce.K, cfg.daunce.chunk_size) == 1
    return cfg, d


@pytest.mark.slow
def test_study_run_agrees_with_the_workflow_selection(problem):
    from daunce_core.steps import study

    cfg, d = problem
    selection = json.loads((d / "selection.json").read_text())
    doc = study.run_group(cfg, "daunce", "default", d / "split.npz", [d / "theta_0.safetensors"], d / "select.h5",
                          d / "test.h5", d / "default.json", selection_json=d / "selection.json")
    rows = {r["setting"]: r for r in doc["rows"]}
    assert set(rows) == {"default", "K6"}
    for r in rows.values():
        assert np.isfinite([r["lds_select"], r["lds_test"], r["ci_low"], r["ci_high"]]).all()
        assert r["ci_low"] <= r["lds_test"] <= r["ci_high"]
    # the same code path as rule select_lr: the same choice and the same selection LDS at every lr
    assert rows["default"]["lr"] == selection["selected_lr"]
    workflow = {g["lr"]: g["lds_select"] for g in selection["grid"]}
    for g in doc["grid"]:
        if g["setting"] == "default":
            assert g["lds_select"] == pytest.approx(workflow[g["lr"]], abs=1e-6)
    assert rows["K6"]["passes"] < rows["default"]["passes"] and rows["K6"]["cpu_s"] > 0

    # an ensemble over two theta_0s: the extra one trained by the study's own step
    study.train_theta0(cfg, 1, d / "split.npz", d / "t1.safetensors", d / "t1.json")
    ens = study.run_group(cfg, "daunce", "theta0s2", d / "split.npz", [d / "theta_0.safetensors", d / "t1.safetensors"],
                          d / "select.h5", d / "test.h5", d / "ens.json", selection_json=d / "selection.json",
                          theta0_metrics=[d / "t1.json"])
    (r,) = ens["rows"]
    assert r["theta0s"] == 2 and np.isfinite(r["lds_test"])
    assert r["passes"] > rows["default"]["passes"] and r["cpu_s"] > json.loads((d / "t1.json").read_text())["cpu_s"]

    # quality.csv and the figure, with a baseline and a reference row from an LDS table
    lds_csv = d / "lds.csv"
    with open(lds_csv, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["method", "measure", "threshold", "lds", "ci_low", "ci_high", "n_queries", "n_masks", "tuned",
                    "on_edge"])
        w.writerow(["limit_daunce", "correlation", "none", 0.5, 0.4, 0.6, 28, 20, "", ""])  # raw: what quality reads
        w.writerow(["limit_daunce", "correlation", "hard(q=0.8)", 0.9, 0.8, 0.95, 28, 20, "", ""])
        w.writerow(["daunce", "correlation", "hard(q=0.8)", 0.3, 0.2, 0.4, 28, 20, "lr=0.03", "false"])
    rows = study.quality_table(cfg, [d / "default.json", d / "ens.json"], lds_csv, d / "split.npz", {},
                               d / "quality.csv", d / "grid.csv")
    kinds = [(r["kind"], r["variant"]) for r in rows]
    assert rows[-1]["lds_test"] == 0.5  # the raw row, not the thresholded one
    assert kinds == [("study", "daunce")] * 3 + [("reference", "limit_daunce")]  # the workflow's DAUNCE row is no point
    from daunce_core import figures

    figures.quality(d / "quality.csv", d / "quality.pdf")
    assert (d / "quality.pdf").stat().st_size > 1000
    table = study.quality_markdown(d / "quality.csv").splitlines()
    assert len(table) == 2 + 4 and "| study | daunce | default |" in "\n".join(table)
