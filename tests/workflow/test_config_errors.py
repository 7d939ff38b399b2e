"""Config errors come before any job.

Cross-field checks (``daunce_core.config.check_cross_fields`` and ``check_figures``) refuse a bad
config when the workflow is parsed; a YAML syntax error names the file and the line; every run
writes its effective config (config/config.yaml with the ``--configfile`` merged onto it) to
results/<experiment>/config.yaml.
"""
import copy

import pytest
import yaml
from snakemake.utils import update_config

from daunce_core.config import ConfigError, ExperimentConfig, check_figures, read_config_file

from helpers import ROOT, plan_jobs, snakemake, user_folder

DEFAULT = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())


def merged(*overrides: dict) -> dict:
    """config/config.yaml with overrides merged as Snakemake's --configfile merges them."""
    cfg = copy.deepcopy(DEFAULT)
    for o in overrides:
        update_config(cfg, copy.deepcopy(o))
    return cfg


def check(cfg: dict) -> None:
    check_figures(cfg.get("figures"), ExperimentConfig.from_dict(cfg).validate())


# (case, override merged onto config/config.yaml, the message). Each override is what a user
# puts in a --configfile; several show the merge trap (a list replaced whole, a key kept).
CASES = [
    ("topk without k", {"lds": {"threshold": {"kind": "topk"}}}, r"kind 'topk' needs k,.*lds\.threshold\.k"),
    ("hard without quantile", {"lds": {"threshold": {"kind": "hard", "quantile": None}}},
     r"kind 'hard' needs quantile,.*lds\.threshold\.quantile"),
    ("topk k above n_train", {"lds": {"threshold": {"kind": "topk", "k": 2000}}},
     r"lds\.threshold\.k=2000 exceeds the 1000 training examples"),
    ("figure variant not run", {"daunce": {"variants": ["daunce_t"]}},
     r"figures\.variant 'daunce' is not among daunce\.variants \['daunce_t'\]"),
    ("figure query out of range", {"figures": {"query": 300}}, r"figures\.query=300 but there are 300 queries"),
    ("digits train + query", {"data": {"n_train": 1500, "n_query": 300}},
     r"data\.n_train \+ data\.n_query = 1500 \+ 300 but digits has 1797 examples"),
    ("digits train", {"data": {"n_train": 2000}}, r"data\.n_train=2000 but digits has only 1797"),
    ("digits all train leaves no query", {"data": {"n_train": 0, "n_query": 0}},
     r"data\.n_train \+ data\.n_query = 1797 \+ all"),
    ("cifar10 queries", {"data": {"name": "cifar10", "n_query": 20000}},
     r"data\.n_query=20000 but cifar10 has only 10000"),
    ("one selection mask", {"lds": {"M_select": 1}}, r"lds\.M_select must be at least 2"),
    ("learning rates print alike", {"daunce": {"lr_grid": [0.1, 0.1000001]}},
     r"daunce\.lr_grid has learning rates that print alike"),
]


@pytest.mark.parametrize("override,match", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_cross_field_check_names_the_key(override, match):
    with pytest.raises(ConfigError, match=match):
        check(merged(override))


def test_every_shipped_config_passes_the_checks():
    check(merged())
    for path in sorted((ROOT / "config" / "paper").glob("*.yaml")):
        check(merged(read_config_file(path)))


def test_figure_query_follows_n_query_zero():
    """n_query 0 means all the rest of digits: 1797 - 1000 queries."""
    check(merged({"data": {"n_query": 0}, "figures": {"query": 796}}))
    with pytest.raises(ConfigError, match=r"figures\.query=797 but there are 797 queries"):
        check(merged({"data": {"n_query": 0}, "figures": {"query": 797}}))


@pytest.mark.parametrize("text,where,what", [
    ("data:\n  n_train: [1, 2\n  n_query: 3\n", ":3:10:", "expected ',' or ']'"),
    ("data:\n\tn_train: 5\n", ":2:1:", "indent with spaces, not tabs"),
    ("experiment: a\nexperiment: b: c\n", ":2:14:", "mapping values are not allowed here"),
    ("- a\n- b\n", "", "a config file is a mapping of keys"),
])
def test_yaml_error_names_file_and_line(tmp_path, text, where, what):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        read_config_file(path)
    assert str(err.value).startswith(f"{path}{where}") and what in str(err.value), str(err.value)
    assert "\n" not in str(err.value)


# --- through Snakemake: a real run (not -n) that must stop before any job --------------------


@pytest.mark.slow
@pytest.mark.parametrize("override,match", [
    ({"lds": {"threshold": {"kind": "topk"}}}, "lds.threshold.k"),
    ({"daunce": {"variants": ["daunce_t"]}}, "figures.variant 'daunce' is not among daunce.variants"),
    ({"data": {"n_train": 1500, "n_query": 300}}, "data.n_train + data.n_query = 1500 + 300"),
], ids=["topk without k", "figure variant not run", "digits too small"])
def test_workflow_refuses_before_any_job(tmp_path, override, match):
    d = user_folder(tmp_path, override)
    proc = snakemake(d, "--configfile", str(d / "my.yaml"))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out[-3000:]
    assert match in out, out[-3000:]
    assert not (d / "results").exists(), "a job ran"


def test_workflow_yaml_error_in_the_default_config_names_file_and_line(tmp_path):
    text = (ROOT / "config" / "config.yaml").read_text().replace("  n_train: 1000", "  n_train: [1000", 1)
    d = user_folder(tmp_path, default_text=text)
    line = text.splitlines().index("  n_train: [1000") + 1
    proc = snakemake(d)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out[-3000:]
    assert "config/config.yaml:" in out and f"started at line {line}" in out, out[-3000:]
    assert not (d / "results").exists(), "a job ran"


@pytest.mark.slow
def test_effective_config_is_written_once_per_config(tmp_path):
    """The run writes config/config.yaml + --configfile as merged, the report shows it; the same
    config does not rewrite it, a changed one does (params changed)."""
    d = user_folder(tmp_path, {"experiment": "eff", "daunce": {"variants": ["daunce_t"]},
                               "figures": {"variant": "daunce_t"}})
    target = d / "results" / "eff" / "config.yaml"
    run = snakemake(d, "results/eff/config.yaml", "--configfile", str(d / "my.yaml"))
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    eff = yaml.safe_load(target.read_text())
    assert eff["daunce"]["variants"] == ["daunce_t"]                      # a list replaced whole
    assert eff["daunce"]["lr_grid"] == DEFAULT["daunce"]["lr_grid"]       # the rest of the section kept
    assert "llm" in eff and "blackbox" in eff                             # sections cannot be deleted
    stamp = target.stat().st_mtime_ns
    rep = snakemake(d, "--report", str(d / "report.html"), "results/eff/config.yaml",
                    "--configfile", str(d / "my.yaml"))
    assert rep.returncode == 0, (rep.stdout + rep.stderr)[-3000:]
    html = (d / "report.html").read_text()
    assert "The effective config of this run" in html and "Configuration" in html

    again = snakemake(d, "-n", "results/eff/config.yaml", "--configfile", str(d / "my.yaml"))
    assert "Nothing to be done" in again.stdout + again.stderr, (again.stdout + again.stderr)[-3000:]
    (d / "my.yaml").write_text(yaml.safe_dump({"experiment": "eff", "daunce": {"variants": ["daunce_t"]},
                                               "figures": {"variant": "daunce_t", "query": 3}}))
    plan = snakemake(d, "-n", "results/eff/config.yaml", "--configfile", str(d / "my.yaml"))
    assert "effective_config" in plan.stdout and "params" in plan.stdout.lower(), plan.stdout[-3000:]
    assert target.stat().st_mtime_ns == stamp


@pytest.mark.slow
def test_every_final_target_depends_on_the_effective_config(tmp_path):
    """So a run that makes any final table or figure (not only `rule all`) writes the config."""
    d = user_folder(tmp_path)
    plan = snakemake(d, "-n", "--forceall")
    assert plan.returncode == 0, (plan.stdout + plan.stderr)[-3000:]
    inputs, final = {}, None
    for rule, ins, outs in plan_jobs(plan.stdout + plan.stderr):
        if rule == "all":
            final = ins
        for f in outs:
            inputs[f] = ins
    assert final and "results/fig2.pdf" in final and "results/fig4.md" in final

    def upstream(f, seen):
        for i in inputs.get(f, []):
            if i not in seen:
                seen.add(i)
                upstream(i, seen)
        return seen

    config = f"results/{DEFAULT['experiment']}/config.yaml"
    assert [f for f in final if config not in upstream(f, set())] == []


def test_daunce_fit_takes_a_scoring_form_first_in_the_variants(tmp_path, capsys):
    """daunce.variants: [daunce_t_q, ...] (accepted by the workflow, which fits daunce_t for it):
    `daunce fit` fits daunce_t's models too, saying so, instead of failing after theta_0."""
    from daunce_core import store
    from daunce_core.cli import main

    (tmp_path / "c.yaml").write_text(yaml.safe_dump({
        "experiment": "tq", "device": "cpu", "data": {"name": "digits", "n_train": 60, "n_query": 6},
        "model": {"arch": "mlp", "hidden": [4]}, "base": {"epochs": 1, "batch_size": 32},
        "daunce": {"K": 2, "epochs": 1, "batch_size": 16, "lr_grid": [0.03], "variants": ["daunce_t_q", "daunce"]}}))
    assert main(["fit", "--configfile", str(tmp_path / "c.yaml"), "-o", str(tmp_path / "l.h5")]) == 0
    err = capsys.readouterr().err
    assert "daunce_t_q is scored from daunce_t's fits" in err, err
    assert store.read_losses(tmp_path / "l.h5").attrs["variant"] == "daunce_t"
