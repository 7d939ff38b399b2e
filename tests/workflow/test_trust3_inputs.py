"""A new user's run of the workflow on their own config and data: every refusal is one line naming
the key, file or option, found when the workflow is parsed (before any job), and nothing the user
owns is written to. The input formats are documented in docs/inputs.md."""
import copy
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from snakemake.utils import update_config

from daunce_core.baselines import BaselinesConfig
from daunce_core.config import ExperimentConfig
from daunce_core.settings import ConfigError, check_schema, load_schema

from helpers import ROOT, snakemake, user_folder

DEFAULT = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
SCHEMA = load_schema(str(ROOT / "workflow" / "schemas" / "config.schema.yaml"))


def merged(*overrides: dict) -> dict:
    cfg = copy.deepcopy(DEFAULT)
    for o in overrides:
        update_config(cfg, copy.deepcopy(o))
    return cfg


# --- config keys: one line naming the key and the nearest valid one ------------------------------

@pytest.mark.parametrize("override, line", [
    ({"daunce": {"ratoi": 0.5}}, "unknown key(s) daunce.ratoi (did you mean daunce.ratio?)"),
    ({"daunse": {"ratio": 0.5}}, "unknown key(s) daunse (did you mean daunce?)"),
    ({"lds": {"threshold": {"kind": "hard", "qunatile": 0.5}}},
     "unknown key(s) lds.threshold.qunatile (did you mean lds.threshold.quantile?)"),
    ({"llm": {"finetune": {"master_weight": False}}},
     "unknown key(s) llm.finetune.master_weight (did you mean llm.finetune.master_weights?)"),
    ({"daunce": {"ratio": 2}}, "daunce.ratio must be <= 1, got 2"),
    ({"lds": {"threshold": {"kind": "hrad"}}}, "lds.threshold.kind must be one of none, soft, hard, topk, got 'hrad'"),
])
def test_a_schema_refusal_is_one_line_naming_the_key(override, line):
    with pytest.raises(ConfigError) as err:
        check_schema(merged(override), SCHEMA)
    assert str(err.value) == line


def test_a_config_typo_stops_snakemake_with_one_line_not_the_schema_dump(tmp_path):
    """Snakemake's own validate prints the schema's excerpt (43 lines for a typo in daunce)."""
    d = user_folder(tmp_path, {"daunce": {"ratoi": 0.5}})
    proc = snakemake(d, "-n", "--configfile", str(d / "my.yaml"))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out[-3000:]
    assert "unknown key(s) daunce.ratoi (did you mean daunce.ratio?)" in out, out[-3000:]
    assert "Failed validating" not in out and len(out.splitlines()) < 10, out


@pytest.mark.slow
def test_readme_s_master_weights_key_is_accepted_by_snakemake(tmp_path):
    """README.md: `llm.finetune.master_weights: false`; the schema lacked it, snakemake -n refused."""
    d = user_folder(tmp_path, {"llm": {"finetune": {"master_weights": False}}})
    proc = snakemake(d, "-n", "--configfile", str(d / "my.yaml"))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]


# --- numbers given as strings by --config -----------------------------------------------------

def test_config_strings_that_parse_exactly_are_read_as_the_schema_s_type():
    """Snakemake's --config 'daunce={"ratio": 0.5}' delivers "0.5" (its nested values are strings)."""
    overrides = {"daunce": {"ratio": "0.5", "lr_grid": ["1e-3", "0.1"], "K": "20"}, "data": {"image_size": "16"},
                 "blackbox": {"spend": "false", "max_spend_usd": "30"}, "experiment": "x"}
    cfg = check_schema(merged(overrides), SCHEMA, overrides=overrides)
    assert cfg["daunce"]["ratio"] == 0.5 and cfg["daunce"]["lr_grid"] == [1e-3, 0.1] and cfg["daunce"]["K"] == 20
    assert type(cfg["daunce"]["K"]) is int and cfg["data"]["image_size"] == 16
    assert cfg["blackbox"]["spend"] is False and cfg["blackbox"]["max_spend_usd"] == 30
    assert cfg["experiment"] == "x"


@pytest.mark.parametrize("value, line", [
    ("0.5x", "daunce.ratio must be a number, got '0.5x'; write a number (0.5, 1.0e-3)"),
    ("nan", "daunce.ratio must be a number, got 'nan'; write a number (0.5, 1.0e-3)"),
])
def test_config_strings_that_are_no_number_are_refused_in_one_line(value, line):
    overrides = {"daunce": {"ratio": value}}
    with pytest.raises(ConfigError) as err:
        check_schema(merged(overrides), SCHEMA, overrides=overrides)
    assert str(err.value) == line


def test_only_command_line_strings_are_converted():
    """A config file's quoted "0.5" is the user's string: refused by name, not converted."""
    with pytest.raises(ConfigError, match=r"^daunce\.ratio must be a number, got '0\.5'"):
        check_schema(merged({"daunce": {"ratio": "0.5"}}), SCHEMA)
    with pytest.raises(ConfigError, match=r"^daunce\.K must be an integer, got '2\.5'"):
        check_schema(merged({"daunce": {"K": "2.5"}}), SCHEMA, overrides={"daunce": {"K": "2.5"}})


@pytest.mark.slow
def test_snakemake_accepts_a_number_in_a_config_section_override(tmp_path):
    d = user_folder(tmp_path)
    proc = snakemake(d, "-n", "results/digits_mlp/config.yaml", "--config", 'daunce={"ratio": 0.5}')
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]


# --- one method's grid never stops another's ----------------------------------------------------

def test_a_shorter_lr_grid_thins_the_other_methods_grids_instead_of_stopping_the_run():
    """daunce.lr_grid of two values: every baseline grid of config/config.yaml is longer (exact IF's
    damping grid has four); with max_settings null each is thinned to two settings, evenly spread,
    and the run goes on."""
    cfg = merged({"daunce": {"lr_grid": [0.1, 0.01]}})
    b = BaselinesConfig.from_config(cfg).validate()
    assert b.max_settings == 2
    assert b.exact_if.damping_grid == [1e-2, 1.0]
    assert all(len(b.grid(m)) <= 2 for m in ("trak", "ekfac", "logra", "tracin"))
    assert len(b.limits.damping_grid) == 2 and len(b.thinned) == 6
    assert cfg["baselines"] == DEFAULT["baselines"]  # the config itself is left as it is
    ExperimentConfig.from_dict(cfg).validate()


def test_an_explicit_budget_still_refuses_a_longer_grid():
    cfg = merged({"daunce": {"lr_grid": [0.1, 0.01]}, "baselines": {"max_settings": 2}})
    with pytest.raises(ConfigError, match=r"^baselines\.tune\.trak: 6 settings exceed the budget "
                                          r"baselines\.max_settings=2"):
        BaselinesConfig.from_config(cfg).validate()


@pytest.mark.slow
def test_snakemake_plans_a_run_with_a_two_value_lr_grid(tmp_path):
    d = user_folder(tmp_path, {"daunce": {"lr_grid": [0.1, 0.01]}})
    proc = snakemake(d, "-n", "--configfile", str(d / "my.yaml"))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "baselines.exact_if.damping_grid: 4 values thinned to [0.01, 1.0]" in out


# --- an image folder is input data: nothing is written into it ------------------------------------

def _images(root: Path, n_per_class: int = 4) -> None:
    from PIL import Image

    for j, cls in enumerate(["cat", "dog"]):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            Image.new("L", (6, 6), 10 + 50 * j + i).save(root / cls / f"{i}.png")


def _listing(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_the_workflow_s_manifest_lies_under_results_never_in_the_image_folder(tmp_path, monkeypatch):
    from daunce_core.steps.vision import prepare_data

    root = tmp_path / "my images"
    _images(root)
    before = _listing(root)
    monkeypatch.chdir(tmp_path)
    cfg = ExperimentConfig.from_dict({"experiment": "mine", "data": {"name": "imagefolder", "root": str(root),
                                                                     "n_train": 6, "n_query": 2}}).validate()
    assert cfg.data.manifest == "results/mine/data/manifest.csv"
    ds = prepare_data(cfg, tmp_path / "split.npz")
    assert _listing(root) == before  # the user's folder: not one byte written
    rows = (tmp_path / "results" / "mine" / "data" / "manifest.csv").read_text().splitlines()
    assert rows[0] == "id,path" and rows[1] == "0,cat/0.png" and len(rows) == 9
    assert sorted(ds.train_ids.tolist() + ds.query_ids.tolist()) == list(range(8))


def test_a_manifest_left_in_the_folder_by_an_older_run_keeps_its_ids_and_is_not_touched(tmp_path):
    from daunce_core.config import DataConfig
    from daunce_core.data import load_dataset

    root = tmp_path / "imgs"
    _images(root, 2)
    old = "id,path\n7,dog/1.png\n3,cat/0.png\n5,cat/1.png\n9,dog/0.png\n"
    (root / "daunce_manifest.csv").write_text(old)
    new_manifest = tmp_path / "ids.csv"
    ds = load_dataset(DataConfig(name="imagefolder", root=str(root), n_train=0, n_query=0,
                                 manifest=str(new_manifest)))
    assert sorted(ds.train_ids.tolist()) == [3, 5, 7, 9]
    assert (root / "daunce_manifest.csv").read_text() == old
    assert new_manifest.read_text().splitlines()[1:] == ["3,cat/0.png", "5,cat/1.png", "7,dog/1.png", "9,dog/0.png"]


@pytest.mark.parametrize("text, line, match", [
    ("id,path\n0,cat/0.png\n9223372036854775808,cat/1.png\n", 3, r"id 9223372036854775808 is beyond int64"),
    ("id,path\n9223372036854775806,cat/0.png\n", None, r"largest id 9223372036854775806 leaves no int64 id for 7 "
                                                        r"new file\(s\)"),
])
def test_a_manifest_id_beyond_int64_is_one_line_and_the_manifest_is_left_as_it_was(tmp_path, text, line, match):
    from daunce_core.config import DataConfig
    from daunce_core.data import DataError, load_dataset

    root = tmp_path / "imgs"
    _images(root)
    manifest = tmp_path / "ids.csv"
    manifest.write_text(text)
    with pytest.raises(DataError, match=match) as err:
        load_dataset(DataConfig(name="imagefolder", root=str(root), n_train=0, n_query=0, manifest=str(manifest)))
    assert "\n" not in str(err.value) and str(manifest) + (f":{line}" if line else "") in str(err.value)
    assert manifest.read_text() == text  # nothing appended


def test_a_run_that_fails_on_an_image_appends_nothing_to_the_manifest(tmp_path):
    from daunce_core.config import DataConfig
    from daunce_core.data import DataError, load_dataset

    root = tmp_path / "imgs"
    _images(root)
    manifest = tmp_path / "ids.csv"
    c = DataConfig(name="imagefolder", root=str(root), n_train=0, n_query=0, manifest=str(manifest))
    load_dataset(c)
    before = manifest.read_text()
    _images(tmp_path / "more", 40)  # 40 new files per class, one of them broken
    for cls in ("cat", "dog"):
        for f in (tmp_path / "more" / cls).iterdir():
            f.rename(root / cls / f"new{f.name}")
    (root / "dog" / "new7.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"new7\.png: cannot read the image"):
        load_dataset(c)
    assert manifest.read_text() == before


def test_a_decompression_bomb_is_one_line_naming_the_file(tmp_path, monkeypatch):
    """Pillow refuses images beyond 2 x MAX_IMAGE_PIXELS (a 20000x20000 PNG at its default) with a
    DecompressionBombError, not an OSError: the limit is lowered here to test with a small image."""
    from PIL import Image

    from daunce_core.config import DataConfig
    from daunce_core.data import DataError, load_dataset

    root = tmp_path / "imgs"
    _images(root)
    Image.new("L", (40, 40), 7).save(root / "cat" / "huge.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)  # 1600 > 2 x 500
    with pytest.raises(DataError, match=r"huge\.png: the image has more pixels than Pillow reads safely") as err:
        load_dataset(DataConfig(name="imagefolder", root=str(root), n_train=0, n_query=0,
                                manifest=str(tmp_path / "ids.csv")))
    assert "\n" not in str(err.value)


# --- tabular data: an npz of feature vectors [n, d] -------------------------------------------------

def _tabular_npz(path: Path, seed: int = 0, d: int = 6, n: int = 90, m: int = 12) -> tuple:
    """Three Gaussian classes in d dimensions, centres 2.5 standard deviations apart."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(3, d)) * 2.5
    y_train, y_query = rng.integers(0, 3, n), rng.integers(0, 3, m)
    X_train = (centres[y_train] + rng.normal(size=(n, d))).astype("f4")
    X_query = (centres[y_query] + rng.normal(size=(m, d))).astype("f4")
    np.savez(path, X_train=X_train, y_train=y_train, X_query=X_query, y_query=y_query)
    return y_train, y_query


def test_tabular_npz_is_read_as_feature_vectors_standardised_per_feature(tmp_path):
    from daunce_core.config import DataConfig
    from daunce_core.data import load_dataset

    _tabular_npz(tmp_path / "tab.npz")
    ds = load_dataset(DataConfig(name="npz", root=str(tmp_path / "tab.npz"), n_train=0, n_query=0))
    assert ds.tabular and ds.X_train.shape == (90, 6) and ds.X_query.shape == (12, 6)
    np.testing.assert_allclose(ds.X_train.mean(axis=0), 0, atol=1e-5)
    np.testing.assert_allclose(ds.X_train.std(axis=0), 1, atol=1e-4)
    raw = np.load(tmp_path / "tab.npz")["X_query"]
    np.testing.assert_allclose(ds.X_query * ds.std + ds.mean, raw, atol=1e-5)


def test_daunce_on_tabular_data_ranks_same_class_training_examples_first(tmp_path, monkeypatch):
    """`daunce fit` + `daunce score` on an npz of feature vectors with an MLP: for every query the
    training examples of its class score higher on average than the others (random scores would
    not, for 12 queries out of 12)."""
    from daunce_core import store
    from daunce_core.cli import main

    monkeypatch.chdir(tmp_path)
    y_train, y_query = _tabular_npz(tmp_path / "tab.npz")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({
        "experiment": "tab", "device": "cpu", "data": {"name": "npz", "root": "tab.npz", "n_train": 0, "n_query": 0},
        "model": {"arch": "mlp", "hidden": [16]}, "base": {"epochs": 20, "batch_size": 32, "lr": 0.05},
        "daunce": {"K": 24, "chunk_size": 24, "epochs": 3, "batch_size": 16, "lr_grid": [0.05],
                   "variants": ["daunce"]}}))
    assert main(["fit", "--configfile", "c.yaml", "-o", "l.h5"]) == 0
    assert main(["score", "l.h5", "-o", "s.h5"]) == 0
    S, _ = store.dense_scores("s.h5")
    assert S.shape == (90, 12)
    same = y_train[:, None] == y_query[None, :]
    gaps = [S[same[:, j], j].mean() - S[~same[:, j], j].mean() for j in range(12)]
    assert min(gaps) > 0, gaps


def test_an_image_model_on_tabular_data_is_one_line(tmp_path):
    from daunce_core.config import ModelConfig
    from daunce_core.models import ModelError, build_model

    with pytest.raises(ModelError, match=r"^model\.arch: resnet9 takes images \[C, H, W\] but the data are "
                                         r"feature vectors of 6 values; use 'mlp'"):
        build_model(ModelConfig(arch="resnet9"), (6,), 3)


def test_figure5_draws_feature_vectors(tmp_path):
    from daunce_core import figures, store
    from daunce_core.steps.vision import prepare_data

    _tabular_npz(tmp_path / "tab.npz")
    cfg = ExperimentConfig.from_dict({"experiment": "tab", "data": {"name": "npz", "root": str(tmp_path / "tab.npz"),
                                                                    "n_train": 0, "n_query": 0}}).validate()
    ds = prepare_data(cfg, tmp_path / "split.npz")
    scores = np.random.default_rng(0).normal(size=(ds.n, ds.m)).astype("f4")
    store.write_scores(tmp_path / "s.h5", scores=scores, train_ids=ds.train_ids, query_ids=ds.query_ids)
    figures.fig5(cfg, tmp_path / "split.npz", {"correlation": str(tmp_path / "s.h5")}, tmp_path / "fig5.pdf")
    assert (tmp_path / "fig5.pdf").stat().st_size > 1000


# --- what fails late is checked before theta_0 ----------------------------------------------------

def test_an_npz_without_query_rows_is_refused_when_the_config_is_read(tmp_path):
    """The npz's sizes come from its array headers when the workflow is parsed (no data read)."""
    np.savez(tmp_path / "d.npz", X_train=np.zeros((8, 3), "f4"), y_train=np.arange(8) % 2,
             X_query=np.zeros((0, 3), "f4"), y_query=np.zeros(0, int))
    with pytest.raises(ConfigError, match=r"^data\.root .*d\.npz: X_query has no rows; daunce needs training and "
                                          r"query examples"):
        ExperimentConfig.from_dict({"data": {"name": "npz", "root": str(tmp_path / "d.npz")}}).validate()
    np.savez(tmp_path / "e.npz", X_train=np.zeros((8, 3), "f4"), y_train=np.arange(8) % 2,
             X_query=np.zeros((2, 3), "f4"), y_query=np.zeros(2, int))
    with pytest.raises(ConfigError, match=r"^data\.n_query=300 but .*e\.npz has only 2 examples in that split"):
        ExperimentConfig.from_dict({"data": {"name": "npz", "root": str(tmp_path / "e.npz"), "n_train": 8}}).validate()
    ExperimentConfig.from_dict({"data": {"name": "npz", "root": str(tmp_path / "e.npz"), "n_train": 0,
                                         "n_query": 0}}).validate()


@pytest.mark.parametrize("override, key", [({"daunce": {"K": 10**12}}, "daunce.K"), ({"lds": {"M": 10**9}}, "lds.M")])
def test_a_huge_number_of_models_is_refused_when_the_config_is_read(override, key):
    with pytest.raises(ConfigError, match=rf"^{key}=\d+ models is more than 100,000"):
        ExperimentConfig.from_dict(merged(override)).validate()


def test_daunce_fit_refuses_a_huge_k_before_training_theta0(tmp_path, capsys):
    from daunce_core.cli import main

    _tabular_npz(tmp_path / "tab.npz")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({
        "data": {"name": "npz", "root": str(tmp_path / "tab.npz"), "n_train": 0, "n_query": 0},
        "daunce": {"K": 10**12, "lr_grid": [0.05]}}))
    assert main(["fit", "--configfile", str(tmp_path / "c.yaml"), "-o", str(tmp_path / "l.h5")]) == 1
    err = capsys.readouterr().err
    assert "daunce.K=1000000000000 models is more than 100,000" in err and "theta_0" not in err


def test_a_single_class_dataset_is_one_line_saying_so(tmp_path):
    from daunce_core.config import DataConfig
    from daunce_core.data import DataError, load_dataset

    np.savez(tmp_path / "one.npz", X_train=np.random.default_rng(0).normal(size=(10, 3)).astype("f4"),
             y_train=np.zeros(10, int), X_query=np.zeros((2, 3), "f4"), y_query=np.zeros(2, int))
    with pytest.raises(DataError, match=r"one\.npz: the training examples all have one class \('0'; 1 class\(es\) "
                                        r"in all\); a classifier needs at least two classes") as err:
        load_dataset(DataConfig(name="npz", root=str(tmp_path / "one.npz"), n_train=0, n_query=0))
    assert "\n" not in str(err.value)
    root = tmp_path / "imgs"
    _images(root)
    for f in (root / "dog").iterdir():
        f.unlink()
    (root / "dog").rmdir()
    with pytest.raises(DataError, match=r"the image folder .*imgs: the training examples all have one class \('cat'"):
        load_dataset(DataConfig(name="imagefolder", root=str(root), n_train=0, n_query=0,
                                manifest=str(tmp_path / "ids.csv")))


# --- a ground truth of your own: the documented writer ---------------------------------------------

def test_a_ground_truth_written_by_the_documented_writer_is_read_by_daunce_lds(tmp_path, capsys):
    """Retrains whose margins are exactly additive in the training examples (outputs = masks @ A):
    scores A have LDS 1 under `daunce lds` (joined on ids given in another order), random scores
    about 0."""
    from daunce_core import store
    from daunce_core.cli import main
    from daunce_core.ground_truth import write_ground_truth_file

    rng = np.random.default_rng(0)
    n, m, M = 40, 6, 30
    A = rng.normal(size=(n, m))
    masks = rng.random((M, n)) < 0.5
    train_ids, query_ids = rng.permutation(1000)[:n], np.arange(100, 100 + m)
    gt = write_ground_truth_file(tmp_path / "gt.h5", masks, masks @ A, train_ids=train_ids, query_ids=query_ids)
    assert gt["outputs"].shape == (1, M, m) and gt["mask_index"].tolist() == list(range(M))
    order = rng.permutation(n)  # the scores file lists the training examples in another order
    store.write_scores(tmp_path / "true.h5", scores=A[order], train_ids=train_ids[order], query_ids=query_ids)
    store.write_scores(tmp_path / "random.h5", scores=rng.normal(size=(n, m)), train_ids=train_ids,
                       query_ids=query_ids)
    assert main(["lds", str(tmp_path / "true.h5"), str(tmp_path / "gt.h5")]) == 0
    assert json.loads(capsys.readouterr().out)["lds"] == pytest.approx(1.0)
    assert main(["lds", str(tmp_path / "random.h5"), str(tmp_path / "gt.h5")]) == 0
    assert abs(json.loads(capsys.readouterr().out)["lds"]) < 0.3


@pytest.mark.parametrize("kwargs, match", [
    (dict(masks=np.full((4, 5), 2)), r"^masks must be a 0/1 array \[M subsets, n training examples\]"),
    (dict(outputs=np.zeros((3, 2))), r"^outputs must be numbers \[M=4, m\] or \[seeds, M=4, m\]"),
    (dict(outputs=np.where(np.eye(4, 2) > 0, np.nan, 0.0)), r"^outputs\[0, 0, 0\] is nan; every margin must be finite"),
    (dict(train_ids=[1, 1, 2, 3, 4]), r"^train_ids must be 5 distinct integers"),
    (dict(mask_index=[0, 1, 2]), r"^mask_index must be 4 distinct integers \(one per row of masks\)"),
])
def test_the_ground_truth_writer_names_the_bad_array_and_writes_nothing(tmp_path, kwargs, match):
    from daunce_core.ground_truth import GroundTruthError, write_ground_truth_file

    args = {"masks": np.eye(4, 5, dtype=bool), "outputs": np.zeros((4, 2)), **kwargs}
    with pytest.raises(GroundTruthError, match=match):
        write_ground_truth_file(tmp_path / "gt.h5", **args)
    assert not (tmp_path / "gt.h5").exists()
