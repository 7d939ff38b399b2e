"""Files, scores and LDS that could give a wrong result without a word (third trust probe).

Each test fails without its fix: nested temporaries that no later run removes, top-k rows that
name a training example twice, overlapping ground-truth chunks, outputs that destroy data an
input reads through an HDF5 link, a ``topk`` threshold described as |scores|, a second threshold
applied silently, outputs that replace a symbolic link, an absurd memory budget, and the exact
influence function's native crash on a large curvature.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from daunce_core import store
from daunce_core.cli import main

from helpers import ROOT


def _losses(path: Path, K=8, n=40, m=5, seed=0) -> Path:
    rng = np.random.default_rng(seed)
    shared = rng.standard_normal((K, 1))
    store.write_losses(path, store.Losses(
        (shared * rng.standard_normal(n) + rng.standard_normal((K, n))).astype(np.float32),
        (shared * rng.standard_normal(m) + rng.standard_normal((K, m))).astype(np.float32),
        np.arange(K), 100 + np.arange(n), 500 + np.arange(m), {"variant": "daunce"}))
    return path


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()  # reaped: its pid no longer exists (unless reused at once, very unlikely)
    return proc.pid


# --- one temporary per output, and every daunce temporary of a killed run is cleaned ------------

def _temps_made(monkeypatch) -> list[str]:
    """Record the name of every temporary file the atomic writes create."""
    made: list[str] = []
    orig = store.atomic.new_temp

    def spy(path, suffix):
        tmp = orig(path, suffix)
        made.append(tmp.name)
        return tmp

    monkeypatch.setattr(store.atomic, "new_temp", spy)
    return made


def test_reliability_scoring_writes_through_one_temporary_named_after_the_output(tmp_path, monkeypatch):
    from daunce_core import diagnostics

    _losses(tmp_path / "l.h5")
    made = _temps_made(monkeypatch)
    diagnostics.score_file_with_diagnostics(tmp_path / "l.h5", tmp_path / "s.h5")
    assert len(made) == 1, f"temporaries of temporaries: {made}"
    assert made[0].startswith(f".s.h5{store.atomic.TMP_TAG}{os.getpid()}@")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["l.h5", "s.h5"]
    with h5py.File(tmp_path / "s.h5", "r") as f:
        assert "diagnostics" in f and f.attrs["format"] == "dense"


def test_chunk_scoring_and_traced_losses_write_through_one_temporary(tmp_path, monkeypatch):
    from daunce_core.fit import chunks
    from daunce_core.fit.contract import Signals

    _losses(tmp_path / "l.h5")
    made = _temps_made(monkeypatch)
    chunks.score(tmp_path / "l.h5", tmp_path / "s.h5", "correlation", method="daunce_x")
    chunks.score(tmp_path / "l.h5", tmp_path / "k.h5", "correlation", topk=3)
    assert [m.split(store.atomic.TMP_TAG)[0] for m in made] == [".s.h5", ".k.h5"], made
    assert store.read_scores(tmp_path / "s.h5")["attrs"]["method"] == "daunce_x"

    # a losses file with its per-step trace: one write, so the file never lacks the trace
    rng = np.random.default_rng(1)
    sig = Signals(train=rng.standard_normal((3, 6)), query=rng.standard_normal((3, 2)), model_index=np.arange(3),
                  train_ids=np.arange(6), query_ids=np.arange(2), signal="loss", attrs={"variant": "daunce"},
                  trace={"step": np.arange(4), "term": rng.standard_normal((3, 4))})
    made.clear()
    assert chunks.write_signals(tmp_path / "t.h5", sig)
    assert len(made) == 1, made
    with h5py.File(tmp_path / "t.h5", "r") as f:
        assert f["trace/term"].shape == (3, 4)


def test_nested_temporaries_of_killed_runs_are_cleaned_and_live_ones_kept(tmp_path):
    host, dead, live = store.atomic.host(), _dead_pid(), os.getppid()
    nested_dead = tmp_path / (f"..s.h5.daunce-tmp-{dead}@{host}.ab12cd34.h5.daunce-tmp-{dead}@{host}."
                              "ef56ab78.h5.tmp")  # what earlier versions left (45 MB in the probe)
    nested_live = tmp_path / (f"..s.h5.daunce-tmp-{live}@{host}.ab12cd34.h5.daunce-tmp-{dead}@{host}."
                              "ef56ab78.h5.tmp")  # its outer writer still runs
    other_output = tmp_path / f"..t.h5.daunce-tmp-{dead}@{host}.ab12cd34.h5.tmp"
    for p in (nested_dead, nested_live, other_output):
        p.write_bytes(b"partial")
    assert store.clean_leftovers(tmp_path / "s.h5") == [nested_dead]
    assert nested_live.exists() and other_output.exists()


def test_sigkill_during_reliability_scoring_leaves_one_temporary_that_the_next_run_removes(tmp_path):
    rng = np.random.default_rng(0)
    K, n, m = 32, 300_000, 100  # dense output 120 MB plus its standard errors: seconds to write
    store.write_losses(tmp_path / "l.h5", store.Losses(
        rng.standard_normal((K, n), dtype=np.float32), rng.standard_normal((K, m), dtype=np.float32),
        np.arange(K), np.arange(n), np.arange(m), {"variant": "daunce"}))
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "daunce_core.cli", "score", str(tmp_path / "l.h5"), "-o",
           str(tmp_path / "s.h5"), "--reliability"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".*s.h5.daunce-tmp-*")):
        assert proc.poll() is None, f"finished before it could be killed: {proc.stderr.read()}"
        assert time.monotonic() < deadline, "no temporary file appeared"
        time.sleep(0.005)
    time.sleep(0.5)  # well into the scoring (the nested temporary of earlier versions exists then)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    left = [p.name for p in tmp_path.iterdir() if p.name != "l.h5"]
    assert len(left) == 1 and left[0].startswith(".s.h5.daunce-tmp-") and left[0].count("daunce-tmp") == 1, left
    res = subprocess.run(cmd[:-1] + ["--topk", "2"], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["l.h5", "s.h5"]


# --- top-k rows that name a training example twice -----------------------------------------------

def test_topk_with_a_repeated_training_index_is_refused_where_written_and_read(tmp_path):
    idx = np.array([[3, 1, 2], [4, 0, 4]])
    vals = np.array([[0.9, 0.5, 0.1], [0.8, 0.3, 0.2]], np.float32)
    with pytest.raises(store.StoreError, match=r"names training position 4 more than once for query id 71 "
                                               r"\(row 1\)"):
        store.write_scores(tmp_path / "k.h5", indices=idx, values=vals, train_ids=np.arange(5),
                           query_ids=np.array([70, 71]))
    assert not (tmp_path / "k.h5").exists()
    with h5py.File(tmp_path / "k.h5", "w") as f:  # written by another tool
        f.attrs["format"] = "topk"
        f["indices"], f["values"] = idx, vals
        f["train_ids"], f["query_ids"] = np.arange(5), np.array([70, 71])
    with pytest.raises(store.StoreError, match="k.h5: 'indices' names training position 4 more than once"):
        store.dense_scores(tmp_path / "k.h5")
    # the reason: read as dense, the repeat keeps one of its two values, chosen by column order
    idx[1] = [4, 0, 3]
    store.write_scores(tmp_path / "ok.h5", indices=idx, values=vals, train_ids=np.arange(5),
                       query_ids=np.array([70, 71]))
    assert store.dense_scores(tmp_path / "ok.h5")[0][4, 1] == pytest.approx(0.8)


def test_repeated_model_or_mask_index_in_one_file_is_refused(tmp_path):
    _losses(tmp_path / "l.h5")
    with h5py.File(tmp_path / "l.h5", "r+") as f:
        f["model_index"][...] = [0, 1, 2, 3, 4, 5, 6, 3]
    with pytest.raises(store.StoreError, match=r"l.h5: 'model_index' repeats model k 3 \(2 times\)"):
        store.read_losses(tmp_path / "l.h5")


# --- ground-truth chunks whose mask ranges overlap --------------------------------------------

def _gt_chunk(path: Path, lo: int, hi: int) -> Path:
    rng = np.random.default_rng(lo)
    masks = rng.random((hi - lo, 20)) < 0.5
    store.write_ground_truth(path, masks=masks, outputs=rng.standard_normal((1, hi - lo, 3)).astype(np.float32),
                             train_ids=np.arange(20), query_ids=np.arange(3), mask_index=np.arange(lo, hi))
    return path


def test_overlapping_ground_truth_chunks_are_refused_naming_files_and_overlap(tmp_path):
    a, b = _gt_chunk(tmp_path / "a.h5", 0, 8), _gt_chunk(tmp_path / "b.h5", 4, 12)
    with pytest.raises(store.StoreError, match=r"chunks .*a.h5 and .*b.h5 overlap: both hold subsets \(masks\) "
                                               r"4, 5, 6, 7 \(4 in all, 'mask_index'\)"):
        store.concat_ground_truth([a, b], tmp_path / "gt.h5")
    assert not (tmp_path / "gt.h5").exists()
    c = _gt_chunk(tmp_path / "c.h5", 8, 12)
    gt = store.concat_ground_truth([c, a], tmp_path / "gt.h5")
    np.testing.assert_array_equal(gt["mask_index"], np.arange(12))


def test_overlapping_losses_chunks_name_both_files(tmp_path):
    a, b = _losses(tmp_path / "a.h5"), _losses(tmp_path / "b.h5", seed=1)
    with pytest.raises(store.StoreError, match=r"chunks .*a.h5 and .*b.h5 overlap: both hold models k 0, 1"):
        store.concat_losses([a, b], tmp_path / "all.h5")


# --- outputs that would destroy data an input reads through a link ------------------------------

def test_output_may_not_replace_a_file_an_input_reads_through_an_external_link(tmp_path, capsys):
    _losses(tmp_path / "train_part.h5")
    with h5py.File(tmp_path / "losses_ext.h5", "w") as f:
        for key in ("train", "query", "train_ids", "query_ids"):
            f[key] = h5py.ExternalLink("train_part.h5", key)  # relative: beside the linking file
    before = (tmp_path / "train_part.h5").read_bytes()
    for out in (tmp_path / "train_part.h5", Path(os.path.relpath(tmp_path / "train_part.h5"))):
        assert main(["score", str(tmp_path / "losses_ext.h5"), "-o", str(out)]) == 1
        err = capsys.readouterr().err
        assert "reads data from this file (an HDF5 external link or virtual dataset)" in err
    assert (tmp_path / "train_part.h5").read_bytes() == before
    assert main(["score", str(tmp_path / "losses_ext.h5"), "-o", str(tmp_path / "s.h5")]) == 0


def test_output_may_not_replace_the_source_of_a_virtual_dataset_even_two_links_away(tmp_path):
    _losses(tmp_path / "src.h5")
    with h5py.File(tmp_path / "src.h5", "r") as f:
        shape, dtype = f["train"].shape, f["train"].dtype
    layout = h5py.VirtualLayout(shape=shape, dtype=dtype)
    layout[:] = h5py.VirtualSource(str(tmp_path / "src.h5"), "train", shape=shape)
    with h5py.File(tmp_path / "vds.h5", "w") as f:
        f.create_virtual_dataset("train", layout)
    with h5py.File(tmp_path / "top.h5", "w") as f:
        f["group/train"] = h5py.ExternalLink("vds.h5", "train")
        f["group/root"] = f["/"]  # a hard-link cycle: walked once
    with pytest.raises(store.StoreError, match="top.h5 reads data from this file"):
        store.check_output(tmp_path / "src.h5", inputs=[tmp_path / "top.h5"])
    store.check_output(tmp_path / "other.h5", inputs=[tmp_path / "top.h5", tmp_path / "not_hdf5.txt"])


# --- topk: the largest signed scores, and every text says so ---------------------------------

def test_topk_threshold_keeps_the_largest_signed_scores_and_the_texts_say_so():
    from daunce_core.config import ExperimentConfig, ThresholdSetting, check_cross_fields
    from daunce_core.scoring import apply_threshold

    s = np.array([[5.0], [-9.0], [1.0], [0.5]])
    kept = apply_threshold(s, {"kind": "topk", "k": 2})[:, 0]
    np.testing.assert_array_equal(kept, [5.0, 0.0, 1.0, 0.0])  # -9 is large but harmful: not kept
    texts = [ThresholdSetting.__dataclass_fields__["k"].metadata.get("help", ""),
             str(ThresholdSetting.__dataclass_fields__["k"].metadata)]
    cfg = ExperimentConfig.from_dict({"lds": {"threshold": {"kind": "topk"}}})
    with pytest.raises(Exception) as info:
        check_cross_fields(cfg)
    texts.append(str(info.value))
    schema = (ROOT / "workflow/schemas/config.schema.yaml").read_text()
    texts.append(schema[schema.index("threshold:"):schema.index("baselines:")])
    for text in texts:
        assert "|scores|" not in text.replace("quantile of |scores|", "").replace("|score| quantile", "")
    assert "largest (signed) scores" in str(info.value)


# --- a second threshold, and outputs through symbolic links ------------------------------------

def test_lds_refuses_a_second_threshold_and_names_the_first(tmp_path, capsys):
    from daunce_core.scoring import score_file

    _losses(tmp_path / "l.h5")
    score_file(tmp_path / "l.h5", tmp_path / "soft.h5", threshold="soft", lam=0.05)
    rng = np.random.default_rng(3)
    masks = rng.random((6, 40)) < 0.5
    store.write_ground_truth(tmp_path / "g.h5", masks=masks, outputs=rng.standard_normal((1, 6, 5)).astype(np.float32),
                             train_ids=100 + np.arange(40), query_ids=500 + np.arange(5))
    assert main(["lds", str(tmp_path / "soft.h5"), str(tmp_path / "g.h5"), "--threshold", "hard"]) == 1
    assert "already soft-thresholded when scored (lambda=0.05)" in capsys.readouterr().err
    assert main(["lds", str(tmp_path / "soft.h5"), str(tmp_path / "g.h5"), "--bootstrap", "20"]) == 0
    out = capsys.readouterr().out
    report = json.JSONDecoder().raw_decode(out[out.index("{"):])[0]
    assert report["threshold"] == {"kind": "none"}
    assert report["scores_threshold"] == {"kind": "soft", "lambda": pytest.approx(0.05)}


def test_every_output_through_a_symbolic_link_is_written_to_its_target(tmp_path):
    _losses(tmp_path / "l.h5")
    (tmp_path / "store").mkdir()
    (tmp_path / "store/s.h5").write_bytes(b"stale")
    os.symlink("store/s.h5", tmp_path / "s.h5")
    assert main(["score", str(tmp_path / "l.h5"), "-o", str(tmp_path / "s.h5")]) == 0
    assert os.path.islink(tmp_path / "s.h5"), "the link was replaced by a file"
    assert store.read_scores(tmp_path / "store/s.h5")["scores"].shape == (40, 5)
    # the same for any writer: a json through atomic_path, a dangling link's future target
    os.symlink("store/new.json", tmp_path / "new.json")
    with store.atomic_path(tmp_path / "new.json") as tmp:
        tmp.write_text("{}")
    assert os.path.islink(tmp_path / "new.json") and (tmp_path / "store/new.json").read_text() == "{}"
    assert sorted(p.name for p in (tmp_path / "store").iterdir()) == ["new.json", "s.h5"]


def test_a_link_to_an_input_is_still_refused(tmp_path):
    _losses(tmp_path / "l.h5")
    os.symlink("l.h5", tmp_path / "out.h5")
    with pytest.raises(store.StoreError, match="is the input file"):
        from daunce_core.scoring import score_file
        score_file(tmp_path / "l.h5", tmp_path / "out.h5")


# --- memory budget beyond any machine ---------------------------------------------------------

def test_memory_budget_beyond_any_machine_is_one_message_everywhere(tmp_path):
    from daunce_core import diagnostics
    from daunce_core.scoring import score_file

    _losses(tmp_path / "l.h5")
    for call in (lambda: score_file(tmp_path / "l.h5", tmp_path / "s.h5", memory_gb=1e308),
                 lambda: diagnostics.diagnose(np.ones((8, 3)), np.ones((8, 2)), memory_gb=1e308)):
        with pytest.raises(ValueError, match=r"memory_gb \(--memory-gb\) must be a finite number of GiB above 0 "
                                             r"and at most 1048576"):
            call()
    assert not (tmp_path / "s.h5").exists()


# --- exact influence on a large curvature: no native crash ---------------------------------------

_EXACT_LARGE = textwrap.dedent("""
    import numpy as np, torch
    from daunce_core import ensemble as E
    from daunce_core.baselines import common as B, exact as X
    from daunce_core.config import ExperimentConfig, ModelConfig, TrainConfig
    from daunce_core.data import Dataset
    from daunce_core.models import model_factory

    rng = np.random.default_rng(0)
    n, m = 40, 5
    Xa = rng.normal(size=(n + m, 1, 2, 2)).astype(np.float32)
    y = rng.integers(0, 3, n + m).astype(np.int64)
    ds = Dataset(Xa[:n], y[:n], np.arange(n), Xa[n:], y[n:], np.arange(m), 3, ["a", "b", "c"],
                 np.zeros(1, np.float32), np.ones(1, np.float32))
    cfg = ExperimentConfig(model=ModelConfig(arch="mlp", hidden=[2137]),
                           base=TrainConfig(epochs=1, batch_size=8, lr=0.05, weight_decay=1e-3))
    factory = model_factory(cfg.model, (1, 2, 2), 3)
    net = factory()
    state = net.state_dict()
    net.eval()
    problem = B.Problem(cfg, ds, net, state, torch.device("cpu"))
    print("params", problem.num_params(), flush=True)
    bc = B.BaselinesConfig.from_config({"baselines": {"exact_if": {"curvature": "ggn", "damping_grid": [0.1]}}})
    scores, attrs = X.exact_if_scores(problem, bc)
    assert scores.shape == (n, m) and np.isfinite(scores).all()
    print("ok", attrs["num_params"])
""")


@pytest.mark.slow
def test_exact_if_on_a_17099_parameter_curvature_does_not_crash():
    """A user's run died with SIGSEGV here: multithreaded OpenBLAS (numpy's and scipy's) crashes on
    the p x p product and Cholesky from p of about 16,000 on this machine; the exact IF now uses
    torch's BLAS. Run in a subprocess, so that a crash fails this test instead of the session."""
    import psutil  # a declared dependency: a broken install fails here, it is not a skip

    if psutil.virtual_memory().available < 12 * 2**30:
        pytest.skip("needs 12 GiB of free memory: three 17,099^2 float64 matrices (2.3 GB each)")
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="2", OPENBLAS_NUM_THREADS="2")
    res = subprocess.run([sys.executable, "-c", _EXACT_LARGE], env=env, capture_output=True, text=True,
                         timeout=900)
    assert res.returncode == 0, f"exit {res.returncode}: {res.stderr[-2000:]}"
    assert "ok 17099" in res.stdout
