"""The HDF5 layouts as written: datasets, dtypes, shapes, chunks and attributes pinned per layout,
the table in daunce_core/store/layouts.py agreeing with the files, and the store's public interface
being the only one other modules use."""
import re
from pathlib import Path

import h5py
import numpy as np
import pytest

from daunce_core import scoring, store

ROOT = Path(__file__).resolve().parent.parent


def _content(path) -> tuple[dict, dict]:
    """{dataset: (dtype, shape, chunks, compression)} and {attribute: value} of an HDF5 file."""
    with h5py.File(path, "r") as f:
        datasets = {k: (str(f[k].dtype), f[k].shape, f[k].chunks, f[k].compression)
                    for k in f if isinstance(f[k], h5py.Dataset)}
        attrs = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in f.attrs.items()}
    return datasets, attrs


def _losses(n=5000, m=3, K=4, seed=0, **extra):
    rng = np.random.default_rng(seed)
    return store.Losses(rng.normal(size=(K, n)), rng.normal(size=(K, m)).astype(np.float32), np.arange(K),
                        np.arange(n) + 10, np.arange(m) + 7,
                        {"variant": "daunce", "signal": "loss", "seed": 3, "config": {"lr": 0.1}}, **extra)


def test_losses_layout_as_written(tmp_path):
    n = 5000
    store.write_losses(tmp_path / "l.h5", _losses(n, p0_train=np.full(n, 0.5), p0_query=np.full(3, 0.25)))
    datasets, attrs = _content(tmp_path / "l.h5")
    assert datasets == {
        "train": ("float32", (4, n), (4, 4096), None),  # chunks of all K rows, up to 4096 columns
        "query": ("float32", (4, 3), (4, 3), None),
        "model_index": ("int64", (4,), None, None),
        "train_ids": ("int64", (n,), None, None),
        "query_ids": ("int64", (3,), None, None),
        "p0_train": ("float64", (n,), None, None),
        "p0_query": ("float64", (3,), None, None),
    }
    assert attrs == {"variant": "daunce", "signal": "loss", "seed": 3, "config": '{"lr": 0.1}',
                     "daunce_version": store.VERSION}
    back = store.read_losses(tmp_path / "l.h5")
    assert back.train.dtype == np.float32 and back.p0_train.dtype == np.float64
    assert back.attrs["config"] == {"lr": 0.1}  # JSON read back as a dict


def test_scores_layouts_as_written_by_the_writer_and_the_streaming_scorer(tmp_path):
    rng = np.random.default_rng(1)
    store.write_scores(tmp_path / "s.h5", scores=rng.normal(size=(5, 2)), train_ids=np.arange(5),
                       query_ids=np.arange(2), attrs={"method": "m", "lambda": None, "grid": [0.1, 0.2]})
    datasets, attrs = _content(tmp_path / "s.h5")
    assert datasets == {"scores": ("float32", (5, 2), None, None), "train_ids": ("int64", (5,), None, None),
                        "query_ids": ("int64", (2,), None, None)}
    assert attrs == {"format": "dense", "method": "m", "lambda": "none", "grid": "[0.1, 0.2]",
                     "daunce_version": store.VERSION}

    store.write_scores(tmp_path / "k.h5", indices=np.array([[0, 4], [3, 1]]), values=rng.normal(size=(2, 2)),
                       train_ids=np.arange(5), query_ids=np.arange(2), attrs={"k": 2})
    datasets, attrs = _content(tmp_path / "k.h5")
    assert datasets == {"indices": ("int64", (2, 2), None, None), "values": ("float32", (2, 2), None, None),
                        "train_ids": ("int64", (5,), None, None), "query_ids": ("int64", (2,), None, None)}
    assert attrs == {"format": "topk", "k": 2, "daunce_version": store.VERSION}

    store.write_losses(tmp_path / "l.h5", _losses(50))
    scoring.score_file(tmp_path / "l.h5", tmp_path / "sd.h5", threshold="soft", lam=[0.0, 0.1, 0.2], threads=1)
    datasets, attrs = _content(tmp_path / "sd.h5")
    assert datasets == {"scores": ("float32", (50, 3), None, None), "train_ids": ("int64", (50,), None, None),
                        "query_ids": ("int64", (3,), None, None)}
    assert attrs == {"format": "dense", "method": "daunce", "measure": "correlation", "threshold": "soft", "K": 4,
                     "lambda": "[0.0, 0.1, 0.2]", "zero_variance_query": 0, "zero_variance_train": 0,
                     "daunce_version": store.VERSION}
    dense, meta = store.dense_scores(tmp_path / "sd.h5")
    assert meta["attrs"]["lambda"] == [0.0, 0.1, 0.2] and dense.shape == (50, 3)


def test_ground_truth_and_diverged_layouts_as_written(tmp_path):
    rng = np.random.default_rng(2)
    store.write_ground_truth(tmp_path / "g.h5", masks=rng.random((4, 6)) < 0.5, outputs=rng.normal(size=(2, 4, 3)),
                             train_ids=np.arange(6), query_ids=np.arange(3), attrs={"split": "test"})
    datasets, attrs = _content(tmp_path / "g.h5")
    assert datasets == {"masks": ("bool", (4, 6), None, None), "outputs": ("float32", (2, 4, 3), None, None),
                        "mask_index": ("int64", (4,), None, None), "train_ids": ("int64", (6,), None, None),
                        "query_ids": ("int64", (3,), None, None)}
    assert attrs == {"split": "test", "daunce_version": store.VERSION}
    np.testing.assert_array_equal(store.read_ground_truth(tmp_path / "g.h5")["mask_index"], np.arange(4))

    store.write_diverged(tmp_path / "d.h5", {"variant": "daunce", "config": {"K": 2}}, "1 of 2 models non-finite")
    datasets, attrs = _content(tmp_path / "d.h5")
    assert datasets == {}
    assert attrs == {"variant": "daunce", "config": '{"K": 2}', "diverged": True,
                     "reason": "1 of 2 models non-finite", "daunce_version": store.VERSION}


@pytest.mark.parametrize("layout, write", [
    (store.LOSSES, lambda p: store.write_losses(p, _losses(20, p0_train=np.full(20, 0.5), p0_query=np.ones(3)))),
    (store.DENSE_SCORES, lambda p: store.write_scores(p, scores=np.ones((3, 2)), train_ids=np.arange(3),
                                                      query_ids=np.arange(2))),
    (store.TOPK_SCORES, lambda p: store.write_scores(p, indices=np.array([[2], [0]]), values=np.ones((2, 1)),
                                                     train_ids=np.arange(3), query_ids=np.arange(2))),
    (store.GROUND_TRUTH, lambda p: store.write_ground_truth(p, masks=np.ones((2, 3), bool),
                                                            outputs=np.zeros((1, 2, 2)), train_ids=np.arange(3),
                                                            query_ids=np.arange(2))),
])
def test_the_table_describes_the_files_the_writers_write(tmp_path, layout, write):
    write(tmp_path / "x.h5")
    with h5py.File(tmp_path / "x.h5", "r") as f:
        assert sorted(f) == sorted(a.key for a in layout.arrays)
        for a in layout.arrays:
            assert f[a.key].dtype == np.dtype(a.dtype) and f[a.key].ndim == len(a.dims), a.key
            for size, (key, axis, _) in layout.sizes.items():  # every named size agrees across datasets
                if size in a.dims:
                    assert f[a.key].shape[a.dims.index(size)] == f[key].shape[axis], (a.key, size)
        assert all(f.attrs[k] == v for k, v in layout.fixed.items())


_PRIVATE = [
    re.compile(r"\bstore(\.\w+)*\._\w"),  # store._x, store.atomic._x
    re.compile(r"from\s+(daunce_core|\.+)\.?store(\.\w+)?\s+import\s+[^\n]*\b_[a-z]"),
    re.compile(r"setattr\(\s*store[\w.]*\s*,\s*[\"']_"),
]


def test_no_module_outside_the_store_uses_its_private_names():
    offenders = []
    for path in sorted(ROOT.glob("**/*.py")):
        rel = path.relative_to(ROOT)
        if rel.parts[0] in (".venv", "results", "build") or rel.parts[:2] == ("daunce_core", "store"):
            continue
        if rel == Path(__file__).relative_to(ROOT):
            continue
        text = path.read_text()
        offenders += [f"{rel}: {m.group(0)}" for rx in _PRIVATE for m in rx.finditer(text)]
    assert not offenders, offenders
