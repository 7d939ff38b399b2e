"""What a changed config or dataset reruns: a real tiny run, then ``snakemake -n`` after each change.

Every rule carries a digest of the config keys its step reads (``params: settings``, built in
workflow/rules/common.smk), so Snakemake's params trigger reruns exactly the steps a changed key
feeds; the npz file ``data.root`` is an input of rule ``data``, and an image folder's listing one
of its params (docs/configuration.md, "What reruns when").
"""
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml

import helpers
from helpers import ROOT

EXP = "rr"
CHUNK = f"results/{EXP}/daunce/daunce/lr0.03/chunk0.h5"  # data -> base -> perturbed_chunk


def small_config(root: str, name: str = "npz") -> dict:
    return {
        "experiment": EXP,
        "device": "cpu",
        "data": {"name": name, "root": root, "n_train": 0, "n_query": 0},
        "model": {"arch": "mlp", "hidden": [16]},
        "base": {"epochs": 2, "batch_size": 32, "lr": 0.05, "lr_schedule": "linear"},
        "daunce": {"K": 4, "ratio": 0.3, "chunk_size": 4, "epochs": 1, "batch_size": 32, "lr_grid": [0.03],
                   "variants": ["daunce"], "k_curve": [2, 4], "trace_every": 0},
        "lds": {"alpha": 0.5, "M": 4, "M_select": 2, "seeds": 1, "chunk_size": 4, "bootstrap": 100,
                "threshold": {"kind": "hard", "quantile": 0.8}},
        "figures": {"variant": "daunce", "query": 1},
    }


def write_npz(path: Path, labels_seed: int = 0) -> None:
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X = (X.reshape(-1, 1, 8, 8) / 16.0).astype(np.float32)
    if labels_seed:  # every label moved on by one: another dataset under the same ids
        y = (y + labels_seed) % 10
    np.savez(path, X_train=X[:90], y_train=y[:90], X_query=X[90:110], y_query=y[90:110],
             train_ids=np.arange(90), query_ids=np.arange(1000, 1020))


def snakemake(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    return helpers.snakemake(workdir, *args, configfile="config.yaml")


def plan(workdir: Path, target: str) -> tuple[dict[str, int], str]:
    """The jobs ``snakemake -n target`` would run ({rule: count}) and its whole output."""
    out = snakemake(workdir, "-n", target)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    text = out.stdout + out.stderr
    stats = text[text.index("Job stats:"):] if "Job stats:" in text else ""
    return {r: int(n) for r, n in re.findall(r"^(\w+)\s+(\d+)$", stats, re.M) if r != "total"}, text


def set_config(workdir: Path, cfg: dict) -> None:
    (workdir / "config.yaml").write_text(yaml.safe_dump(cfg))


@pytest.mark.slow
def test_changed_settings_and_data_rerun_what_they_feed(tmp_path):
    data = tmp_path / "data.npz"
    write_npz(data)
    cfg = small_config(str(data))
    set_config(tmp_path, cfg)
    run = snakemake(tmp_path, CHUNK)
    assert run.returncode == 0, (run.stdout + run.stderr)[-5000:]

    # keys no fit reads: figures, device, a later step's threshold, another variant, Figure 6's K;
    # and a value written otherwise (the digest is of the typed settings)
    changed = yaml.safe_load(yaml.safe_dump(cfg))
    changed["figures"]["query"] = 2
    changed["device"] = "auto"
    changed["lds"]["threshold"] = {"kind": "hard", "quantile": 0.5}
    changed["daunce"]["variants"] = ["daunce", "daunce_e"]
    changed["daunce"]["k_curve"] = [2, 3]
    changed["base"]["epochs"] = 2.0
    set_config(tmp_path, changed)
    jobs, text = plan(tmp_path, CHUNK)
    assert jobs == {}, text[-3000:]

    # a key of the perturbed fits: they rerun (params changed), theta_0 and the data do not
    set_config(tmp_path, {**cfg, "daunce": {**cfg["daunce"], "epochs": 2}})
    jobs, text = plan(tmp_path, CHUNK)
    assert jobs == {"perturbed_chunk": 1}, text[-3000:]
    assert re.search(r"[Pp]arams have changed", text), text[-3000:]

    # a data key: everything from the data on
    set_config(tmp_path, {**cfg, "data": {**cfg["data"], "n_train": 80}})
    assert plan(tmp_path, CHUNK)[0] == {"data": 1, "base": 1, "perturbed_chunk": 1}

    # the user's npz rewritten with other labels under the same ids: the data step reruns
    set_config(tmp_path, cfg)
    write_npz(data, labels_seed=1)
    jobs, text = plan(tmp_path, CHUNK)
    assert jobs == {"data": 1, "base": 1, "perturbed_chunk": 1}, text[-3000:]
    assert str(data) in text


@pytest.mark.slow
def test_a_replaced_image_reruns_the_data_step(tmp_path):
    from PIL import Image

    root = tmp_path / "images"

    def image(path: Path, seed: int) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.random.default_rng(seed).integers(0, 255, (8, 8), dtype=np.uint8)).save(path)

    for c in range(2):
        for i in range(12):
            image(root / f"c{c}" / f"{i}.png", 100 * c + i)
    set_config(tmp_path, small_config(str(root), "imagefolder"))
    split = f"results/{EXP}/data/split.npz"
    run = snakemake(tmp_path, split)
    assert run.returncode == 0, (run.stdout + run.stderr)[-5000:]
    assert (tmp_path / "results" / EXP / "data" / "manifest.csv").exists()  # beside the results
    assert not (root / "daunce_manifest.csv").exists()  # never in the user's image folder
    assert plan(tmp_path, split)[0] == {}  # the manifest the run wrote reruns nothing

    image(root / "c0" / "3.png", 12345)  # another image under the same name
    jobs, text = plan(tmp_path, split)
    assert jobs == {"data": 1}, text[-3000:]


# Rules without a settings digest, and why: they read no config key (gathering, the cost table
# from benchmark files, scores whose only key is the memory budget), their params already hold
# what they read (fig1a, fig1b, table3), or the effective config is one of their inputs, so any
# changed config redraws them (seconds).
NO_SETTINGS = {
    "gather_losses", "gather_ground_truth", "llm_gather", "score", "cost", "quality_figure",
    "fig1a", "fig1b", "table3", "regime",
    "lds_table", "fig2", "fig3", "fig4", "fig5", "fig6", "study_table",
}


def test_every_step_carries_the_settings_it_reads():
    rules = {}
    for smk in sorted((ROOT / "workflow" / "rules").glob("*.smk")):
        for name, body in re.findall(r"^rule (\w+):\n(.*?)(?=^\S|\Z)", smk.read_text(), re.S | re.M):
            rules[name] = body
    stepping = {name for name, body in rules.items() if "    script:" in body}
    carrying = {name for name, body in rules.items() if re.search(r"^\s+settings=", body, re.M)}
    assert stepping - carrying == NO_SETTINGS
    assert carrying <= stepping
