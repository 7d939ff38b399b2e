"""The ``daunce`` command line on files made here."""
import numpy as np

from daunce_core import store
from daunce_core.cli import main


def losses_file(path):
    rng = np.random.default_rng(0)
    store.write_losses(path, store.Losses(rng.normal(size=(20, 30)).astype(np.float32),
                                          rng.normal(size=(20, 4)).astype(np.float32), np.arange(20),
                                          np.arange(30) + 1000, np.arange(4), {"variant": "daunce"}))


def test_score_command_writes_dense_and_topk(tmp_path, capsys):
    losses_file(tmp_path / "l.h5")
    assert main(["score", str(tmp_path / "l.h5"), "-o", str(tmp_path / "s.h5")]) == 0
    dense, meta = store.dense_scores(tmp_path / "s.h5")
    L = store.read_losses(tmp_path / "l.h5")
    ref = np.corrcoef(np.concatenate([L.train, L.query], 1).T)[:30, 30:]
    np.testing.assert_allclose(dense, ref, rtol=1e-5, atol=1e-6)
    assert main(["score", str(tmp_path / "l.h5"), "-o", str(tmp_path / "k.h5"), "--topk", "3",
                 "--measure", "covariance"]) == 0
    s = store.read_scores(tmp_path / "k.h5")
    assert s["format"] == "topk" and s["indices"].shape == (4, 3)
    assert main(["info", str(tmp_path / "k.h5")]) == 0
    assert "indices" in capsys.readouterr().out


def test_score_command_on_a_bad_file_is_one_line_and_writes_nothing(tmp_path, capsys):
    (tmp_path / "bad.h5").write_bytes(b"not hdf5 at all")
    assert main(["score", str(tmp_path / "bad.h5"), "-o", str(tmp_path / "s.h5")]) == 1
    err = capsys.readouterr().err
    assert "bad.h5" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "s.h5").exists()


def test_lds_joins_on_ids_and_says_when_it_reorders(tmp_path, capsys):
    import json

    from daunce_core.perturb import lds_masks

    rng = np.random.default_rng(1)
    n, m = 40, 5
    masks = lds_masks(0, 20, n, 0.5)
    a = rng.normal(size=(n, m))
    store.write_ground_truth(tmp_path / "g.h5", masks=masks, outputs=(masks @ a)[None],
                             train_ids=np.arange(n) + 7, query_ids=np.arange(m))
    store.write_scores(tmp_path / "s.h5", scores=a, train_ids=np.arange(n) + 7,
                       query_ids=np.arange(m))
    p = rng.permutation(n)
    store.write_scores(tmp_path / "p.h5", scores=a[p], train_ids=np.arange(n)[p] + 7,
                       query_ids=np.arange(m))
    assert main(["lds", str(tmp_path / "s.h5"), str(tmp_path / "g.h5")]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert main(["lds", str(tmp_path / "p.h5"), str(tmp_path / "g.h5")]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out) == plain and plain["lds"] == 1.0
    assert "note:" in err and "'train_ids'" in err and "reordered" in err
    store.write_scores(tmp_path / "o.h5", scores=a, train_ids=np.arange(n) + 8,
                       query_ids=np.arange(m))
    assert main(["lds", str(tmp_path / "o.h5"), str(tmp_path / "g.h5")]) == 1
    assert "o.h5: 'train_ids' differ from" in capsys.readouterr().err


def test_options_that_would_do_nothing_are_refused(tmp_path, capsys):
    losses_file(tmp_path / "l.h5")
    args = ["score", str(tmp_path / "l.h5"), "-o", str(tmp_path / "s.h5")]
    assert main(args + ["--lambda", "0.2"]) == 2
    assert "--lambda does nothing" in capsys.readouterr().err
    assert main(args + ["--threshold", "hard"]) == 2
    assert "needs --lambda" in capsys.readouterr().err
    assert main(args + ["--memory-gb", "1e-9"]) == 1  # dense does not fit: refused, not top-k
    err = capsys.readouterr().err
    assert "--topk N" in err and "--memory-gb" in err
    assert not (tmp_path / "s.h5").exists()
    assert main(args + ["--threshold", "hard", "--lambda", "0.2"]) == 0
    assert store.read_scores(tmp_path / "s.h5")["attrs"]["lambda"] == 0.2


# --- daunce fit: the perturbed fits of an experiment config, without Snakemake ------------------

SMALL = """
experiment: tiny_cli
device: cpu
data: {name: digits, n_train: 120, n_query: 12}
model: {arch: mlp, hidden: [8]}
base: {epochs: 3, batch_size: 32, lr: 0.05}
daunce: {K: 4, ratio: 0.5, epochs: 2, batch_size: 16, chunk_size: 3, lr_grid: [0.03, 0.01],
         variants: [daunce_t, daunce], k_curve: [2, 4]}
"""


def test_fit_command_writes_the_losses_of_the_config(tmp_path, capsys):
    import yaml

    from daunce_core.config import ExperimentConfig
    from daunce_core.data import load_dataset
    from daunce_core.steps import vision as pipeline

    (tmp_path / "c.yaml").write_text(SMALL)
    (tmp_path / "more.yaml").write_text("daunce: {K: 5}\n")
    args = ["fit", "--configfile", str(tmp_path / "c.yaml"), "--configfile", str(tmp_path / "more.yaml"),
            "--lr", "0.03"]
    assert main(args + ["-o", str(tmp_path / "l.h5")]) == 0
    out, err = capsys.readouterr()
    assert "wrote" in out and "trained theta_0 with the base recipe (3 epochs)" in err
    # the settings used, whichever file (or daunce_core/config.py's default) set them
    assert "K=5 perturbed models of 2 epoch(s) (daunce.epochs) on r=0.5 of 120 training examples, lr=0.03" in err
    L = store.read_losses(tmp_path / "l.h5")
    cfg = ExperimentConfig.from_dict(yaml.safe_load(SMALL))
    ds = load_dataset(cfg.data)
    assert L.train.shape == (5, 120) and L.query.shape == (5, 12)  # K from the second file
    np.testing.assert_array_equal(L.train_ids, ds.train_ids)
    np.testing.assert_array_equal(L.query_ids, ds.query_ids)
    assert L.attrs["variant"] == "daunce_t" and L.attrs["signal"] == "margin" and L.attrs["lr"] == 0.03
    assert L.attrs["experiment"] == "tiny_cli" and L.attrs["config"]["arch"] == "mlp"
    assert L.attrs["config"] == pipeline.losses_config(cfg)  # the workflow's losses files' attribute
    # theta_0 loaded instead of trained: the workflow's base step gives the same theta_0, so the same losses
    pipeline.train_base(cfg, None, tmp_path / "theta0.safetensors", tmp_path / "m.json")
    assert main(args + ["--theta0", str(tmp_path / "theta0.safetensors"), "-o", str(tmp_path / "l2.h5")]) == 0
    assert "trained theta_0" not in capsys.readouterr().err
    np.testing.assert_array_equal(store.read_losses(tmp_path / "l2.h5").train, L.train)
    # ... and the same models as the workflow's perturbed step
    from daunce_core.fit import chunks

    cfg5 = ExperimentConfig.from_dict(yaml.safe_load(SMALL) | {"daunce": {**yaml.safe_load(SMALL)["daunce"], "K": 5}})
    ref = chunks.fit_all(pipeline.ensemble_fitter(cfg5, None, tmp_path / "theta0.safetensors", "daunce_t"), 5, 3, 0.03)
    np.testing.assert_array_equal(ref.train, L.train)
    np.testing.assert_array_equal(ref.query, L.query)
    # the default output name, then scoring it
    import os

    cwd = os.getcwd()
    try:
        os.chdir(tmp_path)
        assert main(["fit", "--configfile", "c.yaml", "--lr", "0.03", "--variant", "daunce_bb",
                     "--theta0", "theta0.safetensors"]) == 0
    finally:
        os.chdir(cwd)
    assert (tmp_path / "tiny_cli.daunce_bb.losses.h5").exists()
    assert main(["score", str(tmp_path / "tiny_cli.daunce_bb.losses.h5"), "-o", str(tmp_path / "s.h5")]) == 0


def test_fit_command_bad_inputs_are_one_line(tmp_path, capsys):
    (tmp_path / "c.yaml").write_text(SMALL)
    (tmp_path / "typo.yaml").write_text("daunce: {Kay: 3}\n")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    c = str(tmp_path / "c.yaml")
    cases = [
        (["fit", "--configfile", str(tmp_path / "nope.yaml"), "--lr", "0.1"], 1, "nope.yaml: no such file"),
        (["fit", "--configfile", c, "--lr", "0.1", "-o", c], 1, "is the input file"),
        (["fit", "--configfile", c, "--lr", "0.1", "--variant", "dance"], 2, "invalid choice 'dance'"),
        (["fit", "--configfile", c, "--lr", "-1"], 2, "argument --lr: must be > 0.0"),
        (["fit", "--configfile", c, "--configfile", str(tmp_path / "typo.yaml"), "--lr", "0.1"], 1, "daunce.Kay"),
        (["fit", "--configfile", str(tmp_path / "list.yaml"), "--lr", "0.1"], 1, "expected a mapping"),
        (["fit", "--configfile", c, "--lr", "0.1", "--theta0", str(tmp_path / "none.safetensors")], 1,
         "none.safetensors: no such file"),
        (["fit", "--lr", "0.1"], 2, "--configfile"),
    ]
    for argv, code, message in cases:
        assert main(argv) == code, argv
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, (argv, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml", "list.yaml", "typo.yaml"]


def test_score_command_notes_default_ids_of_a_file_without_ids(tmp_path, capsys):
    import h5py

    rng = np.random.default_rng(2)
    with h5py.File(tmp_path / "other.h5", "w") as f:  # another tool's file: no ids, no model_index
        f["train"] = rng.normal(size=(8, 20))
        f["query"] = rng.normal(size=(8, 3))
    assert main(["score", str(tmp_path / "other.h5"), "-o", str(tmp_path / "s.h5")]) == 0
    assert "carries no example ids; scored with default ids 0..n-1" in capsys.readouterr().err
    s = store.read_scores(tmp_path / "s.h5")
    np.testing.assert_array_equal(s["train_ids"], np.arange(20))
    assert s["attrs"]["ids"] == "positional"
    losses_file(tmp_path / "l.h5")
    assert main(["score", str(tmp_path / "l.h5"), "-o", str(tmp_path / "s2.h5")]) == 0
    assert "note" not in capsys.readouterr().err


def test_fit_command_refuses_a_theta0_that_does_not_fit_the_model(tmp_path, capsys):
    import torch

    from daunce_core.config import ModelConfig
    from daunce_core.models import build_model

    (tmp_path / "c.yaml").write_text(SMALL)
    torch.manual_seed(0)
    good = build_model(ModelConfig(hidden=[8]), (1, 8, 8), 10).state_dict()  # SMALL's model on digits
    last = list(good)[-1]
    bad = {
        "missing": ({k: v for k, v in good.items() if k != last}, f"lacks key {last!r}"),
        "narrow": (build_model(ModelConfig(hidden=[4]), (1, 8, 8), 10).state_dict(),
                   "key 'net.1.weight' has shape [4, 64], the model [8, 64]"),
        "foreign": ({**good, "foo.weight": torch.zeros(2)}, "has key 'foo.weight', which the model lacks"),
        "empty": ({}, "lacks key 'net.1.weight'"),
        "nan": ({**good, last: torch.full_like(good[last], float("nan"))}, f"key {last!r} holds NaN"),
        "int": ({**good, last: good[last].long()}, f"key {last!r} is torch.int64"),
    }
    for name, (state, message) in bad.items():
        store.save_state(state, tmp_path / f"{name}.safetensors")
        argv = ["fit", "--configfile", str(tmp_path / "c.yaml"), "--lr", "0.03",
                "--theta0", str(tmp_path / f"{name}.safetensors"), "-o", str(tmp_path / "l.h5")]
        assert main(argv) == 1, name
        err = capsys.readouterr().err
        assert f"{name}.safetensors: theta_0" in err and message in err, (name, err)
        assert len(err.strip().splitlines()) == 1, (name, err)
    assert not (tmp_path / "l.h5").exists()
    # a float64 theta_0 is cast to the model's float32: the same losses as the float32 one
    store.save_state(good, tmp_path / "f32.safetensors")
    store.save_state({k: v.double() for k, v in good.items()}, tmp_path / "f64.safetensors")
    for name in ("f32", "f64"):
        assert main(["fit", "--configfile", str(tmp_path / "c.yaml"), "--lr", "0.03", "--theta0",
                     str(tmp_path / f"{name}.safetensors"), "-o", str(tmp_path / f"{name}.h5")]) == 0
    np.testing.assert_array_equal(store.read_losses(tmp_path / "f64.h5").train,
                                  store.read_losses(tmp_path / "f32.h5").train)


def test_fit_command_refuses_to_write_over_its_data(tmp_path, capsys):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "mydata.npz", X_train=rng.normal(size=(30, 1, 4, 4)).astype("f4"),
             y_train=rng.integers(0, 3, 30), X_query=rng.normal(size=(6, 1, 4, 4)).astype("f4"),
             y_query=rng.integers(0, 3, 6))
    before = (tmp_path / "mydata.npz").read_bytes()
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "daunce_manifest.csv").write_text("id,path\n")
    (tmp_path / "ids.csv").write_text("id,path\n")
    configs = {
        "npz.yaml": (f"data: {{name: npz, root: {tmp_path / 'mydata.npz'}, n_train: 0, n_query: 0}}\n",
                     tmp_path / "mydata.npz"),
        "folder.yaml": (f"data: {{name: imagefolder, root: {tmp_path / 'images'}}}\n",
                        tmp_path / "images" / "daunce_manifest.csv"),
        "manifest.yaml": (f"data: {{name: imagefolder, root: {tmp_path / 'images'}, "
                          f"manifest: {tmp_path / 'ids.csv'}}}\n", tmp_path / "ids.csv"),
    }
    for name, (text, data_file) in configs.items():
        (tmp_path / name).write_text(text + "daunce: {K: 4, k_curve: [4], lr_grid: [0.03], variants: [daunce]}\n")
        assert main(["fit", "--configfile", str(tmp_path / name), "-o", str(data_file)]) == 1, name
        err = capsys.readouterr().err
        assert f"is the input file {data_file}" in err and len(err.strip().splitlines()) == 1, (name, err)
    assert (tmp_path / "mydata.npz").read_bytes() == before
    assert (tmp_path / "images" / "daunce_manifest.csv").read_text() == "id,path\n"


def _lds_files(tmp_path, a):
    """Ground truth of scores ``a`` [n, m], the dense scores and their top-3 file."""
    from daunce_core.perturb import lds_masks

    n, m = a.shape
    masks = lds_masks(0, 20, n, 0.5)
    noise = np.random.default_rng(3).normal(size=(20, m))
    store.write_ground_truth(tmp_path / "g.h5", masks=masks, outputs=(masks @ a + noise)[None],
                             train_ids=np.arange(n), query_ids=np.arange(m))
    store.write_scores(tmp_path / "s.h5", scores=a, train_ids=np.arange(n), query_ids=np.arange(m))
    top = np.argsort(-a, axis=0)[:3].T  # [m, 3], best first
    store.write_scores(tmp_path / "t.h5", indices=top, values=np.take_along_axis(a.T, top, 1),
                       train_ids=np.arange(n), query_ids=np.arange(m))
    return [str(tmp_path / f) for f in ("s.h5", "t.h5", "g.h5")]


def test_lds_on_a_topk_file_refuses_what_it_cannot_compute(tmp_path, capsys):
    import json

    a = np.random.default_rng(4).normal(size=(40, 5))
    dense, topk, gt = _lds_files(tmp_path, a)
    assert main(["lds", topk, gt, "--threshold", "topk", "--k", "10", "--bootstrap", "20"]) == 1
    err = capsys.readouterr().err
    assert "t.h5: holds only the top 3 scores" in err and "--k 10" in err and len(err.splitlines()) == 1
    assert main(["lds", topk, gt, "--threshold", "hard", "--bootstrap", "20"]) == 1
    err = capsys.readouterr().err
    assert "--threshold hard" in err and "rescore without --topk" in err and len(err.splitlines()) == 1
    for k in ("3", "2"):
        assert main(["lds", topk, gt, "--threshold", "topk", "--k", k, "--bootstrap", "20"]) == 0
        got = json.loads(capsys.readouterr().out)
        assert main(["lds", dense, gt, "--threshold", "topk", "--k", k, "--bootstrap", "20"]) == 0
        assert got == json.loads(capsys.readouterr().out) and got["threshold"] == {"kind": "topk", "k": int(k)}
    assert main(["lds", topk, gt, "--bootstrap", "20"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["threshold"] == {"kind": "none"} and "holds the top 3 scores" in err


def test_lds_topk_of_a_topk_file_with_negative_scores_keeps_them(tmp_path, capsys):
    import json

    # every score negative: the zeros the top-k file stands for must not displace its values
    a = -np.abs(np.random.default_rng(5).normal(size=(40, 5))) - 0.1
    dense, topk, gt = _lds_files(tmp_path, a)
    assert main(["lds", topk, gt, "--threshold", "topk", "--k", "2", "--bootstrap", "20"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert main(["lds", dense, gt, "--threshold", "topk", "--k", "2", "--bootstrap", "20"]) == 0
    assert got == json.loads(capsys.readouterr().out)


def test_lds_prints_only_the_options_it_applied_and_quantile_below_one(tmp_path, capsys):
    import json

    dense, _, gt = _lds_files(tmp_path, np.random.default_rng(6).normal(size=(40, 5)))
    for extra, shown in (([], {"kind": "none"}),
                         (["--threshold", "hard", "--quantile", "0.5"], {"kind": "hard", "quantile": 0.5}),
                         (["--threshold", "soft"], {"kind": "soft", "quantile": 0.9}),
                         (["--threshold", "topk"], {"kind": "topk", "k": 100})):
        assert main(["lds", dense, gt, "--bootstrap", "20", *extra]) == 0
        assert json.loads(capsys.readouterr().out)["threshold"] == shown
    assert main(["lds", dense, gt, "--threshold", "hard", "--quantile", "1"]) == 2
    assert "argument --quantile: must be in [0.0, 1.0), got '1'" in capsys.readouterr().err
