"""benchmarks/compare_runs.py: two results trees compared array by array."""
import importlib.util
import json
import shutil
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("compare_runs", ROOT / "benchmarks" / "compare_runs.py")
cr = importlib.util.module_from_spec(_spec)
sys.modules["compare_runs"] = cr  # dataclasses look their module up by name
_spec.loader.exec_module(cr)


def _tree(root: Path, checkout: str = "/tmp/run1") -> Path:
    """A small results tree with one file of each kind the workflow writes."""
    rng = np.random.default_rng(0)
    exp = root / "exp"
    (exp / "scores" / "m").mkdir(parents=True)
    (exp / "logs").mkdir()
    (exp / "benchmarks").mkdir()
    with h5py.File(exp / "scores" / "m" / "score.h5", "w") as h:
        h["scores"] = rng.standard_normal((5, 7)).astype(np.float32)
        h["train_ids"] = np.arange(7)
        h.attrs["method"] = "m"
        h.attrs["seconds_in_process"] = 1.0 if checkout == "/tmp/run1" else 2.5
        h.attrs["config"] = json.dumps({"lr": 0.1, "epochs": 3})
        h.attrs["reason"] = f"chunk {checkout}/results/exp/daunce/chunk0.h5: fine"
    np.savez(exp / "split.npz", train=np.arange(10), query=rng.standard_normal(4))
    save_file({"w": torch.from_numpy(rng.standard_normal((3, 3)).astype(np.float32))},
              str(exp / "theta_0.safetensors"))
    (exp / "metrics.json").write_text(json.dumps(
        {"acc": 0.75, "created_at": 1e9 if checkout == "/tmp/run1" else 2e9,
         "local_path": f"{checkout}/results/exp/base"}))
    (root / "lds.csv").write_text("method,lds,ci_low\nm,0.3229,0.2888\n")
    (root / "table.md").write_text("| method | LDS |\n|---|---|\n| m | 0.323 |\n")
    (root / "cost.md").write_text(
        "Start-up took 2.5 s.\n\n| method | LDS | wall time (s) | peak RSS (MB) |\n|---|---|---:|---:|\n"
        f"| m | 0.323 | {5.3 if checkout == '/tmp/run1' else 7.1} | 1333 |\n")
    (exp / "logs" / "m.log").write_text(f"took {checkout}\n")
    (exp / "benchmarks" / "m.tsv").write_text(f"s\n{len(checkout)}\n")
    return root


def _run(a: Path, b: Path, capsys, *extra: str) -> tuple[int, str]:
    rc = cr.main([str(a), str(b), *extra])
    return rc, capsys.readouterr().out


@pytest.fixture
def trees(tmp_path):
    a = _tree(tmp_path / "a")
    b = _tree(tmp_path / "b", checkout="/elsewhere/run2")
    return a, b


def test_identical_trees_pass_despite_run_specific_content(trees, capsys):
    rc, out = _run(*trees, capsys)
    assert rc == 0, out
    assert "0 differ, 0 missing" in out
    for cls in ("logs: 1", "benchmark-tsv: 1", "timing-keys: 2", "absolute-paths: 4"):
        assert cls in out, out


def test_one_ulp_in_one_dataset_fails_and_is_named(trees, capsys):
    a, b = trees
    with h5py.File(b / "exp" / "scores" / "m" / "score.h5", "r+") as h:
        s = h["scores"][()]
        s[2, 3] = np.nextafter(s[2, 3], np.float32(np.inf))
        h["scores"][...] = s
    rc, out = _run(a, b, capsys)
    assert rc == 1
    assert "DIFFERS  exp/scores/m/score.h5" in out
    assert "/scores: 1 of 35 elements differ" in out
    assert "1 differ" in out


@pytest.mark.parametrize("edit", ["npz", "safetensors", "csv", "json", "md", "attr", "cost"])
def test_a_change_in_any_format_is_found(trees, capsys, edit):
    a, b = trees
    exp = b / "exp"
    if edit == "npz":
        z = dict(np.load(exp / "split.npz"))
        z["query"][1] = np.nextafter(z["query"][1], np.inf)
        np.savez(exp / "split.npz", **z)
    elif edit == "safetensors":
        from safetensors.torch import load_file
        t = load_file(str(exp / "theta_0.safetensors"))
        t["w"][0, 0] = torch.nextafter(t["w"][0, 0], torch.tensor(np.inf))
        save_file(t, str(exp / "theta_0.safetensors"))
    elif edit == "csv":
        (b / "lds.csv").write_text("method,lds,ci_low\nm,0.3230,0.2888\n")
    elif edit == "json":
        m = json.loads((exp / "metrics.json").read_text())
        m["acc"] = 0.76
        (exp / "metrics.json").write_text(json.dumps(m))
    elif edit == "md":
        (b / "table.md").write_text("| method | LDS |\n|---|---|\n| m | 0.324 |\n")
    elif edit == "attr":
        with h5py.File(exp / "scores" / "m" / "score.h5", "r+") as h:
            h.attrs["config"] = json.dumps({"lr": 0.1, "epochs": 4})
    elif edit == "cost":  # a result column of cost.md (not a timing) changed
        (b / "cost.md").write_text((b / "cost.md").read_text().replace("| 0.323 |", "| 0.324 |"))
    rc, out = _run(a, b, capsys)
    assert rc == 1, out
    assert "1 differ" in out


def test_missing_file_is_named(trees, capsys):
    a, b = trees
    (b / "exp" / "split.npz").unlink()
    rc, out = _run(a, b, capsys)
    assert rc == 1
    assert "MISSING  exp/split.npz: only in A" in out


def test_map_compares_a_moved_file(trees, capsys):
    a, b = trees
    shutil.move(b / "lds.csv", b / "exp" / "lds.csv")
    rc, out = _run(a, b, capsys)
    assert rc == 1 and "MISSING  lds.csv" in out
    rc, out = _run(a, b, capsys, "--map", "lds.csv=exp/lds.csv")
    assert rc == 0, out


def test_bad_arguments_are_refused(tmp_path, capsys):
    assert cr.main([str(tmp_path / "nope"), str(tmp_path)]) == 2
    assert "is not a directory" in capsys.readouterr().err
    assert cr.main([str(tmp_path), str(tmp_path), "--map", "x"]) == 2
    assert "expected OLD=NEW" in capsys.readouterr().err
