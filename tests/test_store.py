"""HDF5 round trips, atomic writes and clear errors on bad files."""
import h5py
import numpy as np
import pytest

from daunce_core import store


def make_losses(K=4, n=6, m=3, start=0, seed=0, variant="daunce"):
    rng = np.random.default_rng(seed)
    return store.Losses(rng.normal(size=(K, n)).astype(np.float32), rng.normal(size=(K, m)).astype(np.float32),
                        np.arange(start, start + K), np.arange(100, 100 + n), np.arange(200, 200 + m),
                        {"variant": variant, "signal": "loss", "seed": 0, "config": {"ratio": 0.3}})


def test_losses_round_trip(tmp_path):
    L = make_losses()
    store.write_losses(tmp_path / "l.h5", L)
    R = store.read_losses(tmp_path / "l.h5")
    np.testing.assert_array_equal(R.train, L.train)
    np.testing.assert_array_equal(R.query, L.query)
    np.testing.assert_array_equal(R.train_ids, L.train_ids)
    assert R.attrs["config"] == {"ratio": 0.3} and R.attrs["variant"] == "daunce"
    assert [p.name for p in tmp_path.iterdir()] == ["l.h5"]  # no temporary left behind


def test_nan_losses_are_refused_naming_ids_and_nothing_is_written(tmp_path):
    L = make_losses()
    L.train[2, 4] = np.nan
    L.train[0, 1] = np.inf
    with pytest.raises(store.StoreError, match=r"2 training example\(s\).*first ids: 101, 104"):
        store.write_losses(tmp_path / "l.h5", L)
    assert list(tmp_path.iterdir()) == []


def test_failed_write_keeps_the_previous_file(tmp_path):
    store.write_losses(tmp_path / "l.h5", make_losses(seed=1))
    before = (tmp_path / "l.h5").read_bytes()
    bad = make_losses(seed=2)
    bad.query[0, 0] = np.nan
    with pytest.raises(store.StoreError):
        store.write_losses(tmp_path / "l.h5", bad)
    assert (tmp_path / "l.h5").read_bytes() == before
    assert len(list(tmp_path.iterdir())) == 1


def test_truncated_file_is_a_clear_error(tmp_path):
    store.write_losses(tmp_path / "l.h5", make_losses())
    data = (tmp_path / "l.h5").read_bytes()
    (tmp_path / "t.h5").write_bytes(data[: len(data) // 2])
    with pytest.raises(store.StoreError, match=r"t\.h5.*truncated"):
        store.read_losses(tmp_path / "t.h5")


def test_missing_dataset_is_named(tmp_path):
    with h5py.File(tmp_path / "x.h5", "w") as f:
        f["train"] = np.zeros((2, 3))
    with pytest.raises(store.StoreError, match="missing dataset 'query'"):
        store.read_losses(tmp_path / "x.h5")


def test_concat_orders_by_k_and_refuses_mixed_settings(tmp_path):
    a, b = make_losses(K=2, start=2, seed=1), make_losses(K=2, start=0, seed=2)
    store.write_losses(tmp_path / "a.h5", a)
    store.write_losses(tmp_path / "b.h5", b)
    out = store.concat_losses([tmp_path / "a.h5", tmp_path / "b.h5"], tmp_path / "all.h5")
    np.testing.assert_array_equal(out.model_index, [0, 1, 2, 3])
    np.testing.assert_array_equal(out.train, np.concatenate([b.train, a.train]))
    store.write_losses(tmp_path / "c.h5", make_losses(K=2, start=4, variant="daunce_e"))
    with pytest.raises(store.StoreError, match="attribute 'variant' differs"):
        store.concat_losses([tmp_path / "a.h5", tmp_path / "c.h5"], tmp_path / "bad.h5")
    with pytest.raises(store.StoreError, match="repeat some model indices"):
        store.concat_losses([tmp_path / "a.h5", tmp_path / "a.h5"], tmp_path / "bad.h5")
    assert not (tmp_path / "bad.h5").exists()


def test_mismatched_K_between_train_and_query_is_refused(tmp_path):
    L = make_losses()
    L.query = L.query[:3]
    with pytest.raises(store.StoreError, match="K=4 models but 'query' has shape"):
        store.write_losses(tmp_path / "l.h5", L)
    with h5py.File(tmp_path / "x.h5", "w") as f:
        f["train"] = np.zeros((4, 3), np.float32)
        f["query"] = np.zeros((5, 2), np.float32)
        f["model_index"] = np.arange(4)
        f["train_ids"] = np.arange(3)
        f["query_ids"] = np.arange(2)
    with pytest.raises(store.StoreError, match=r"x\.h5.*K=4"):
        store.read_losses(tmp_path / "x.h5")


def test_diverged_marker(tmp_path):
    store.write_diverged(tmp_path / "d.h5", {"variant": "daunce", "lr": 0.1}, "2 of 4 models non-finite")
    assert store.is_diverged(tmp_path / "d.h5")
    with pytest.raises(store.StoreError, match="diverged"):
        store.read_losses(tmp_path / "d.h5")


def test_scores_and_ground_truth_round_trip(tmp_path):
    s = np.random.default_rng(0).normal(size=(5, 3)).astype(np.float32)
    store.write_scores(tmp_path / "s.h5", scores=s, train_ids=np.arange(5), query_ids=np.arange(3),
                       attrs={"method": "x", "measure": "correlation"})
    d, meta = store.dense_scores(tmp_path / "s.h5")
    np.testing.assert_array_equal(d, s)
    assert meta["attrs"]["method"] == "x"
    idx = np.array([[4, 0], [1, 2], [3, 3]])[:, :1]
    store.write_scores(tmp_path / "k.h5", indices=idx, values=np.ones((3, 1)), train_ids=np.arange(5),
                       query_ids=np.arange(3))
    d, _ = store.dense_scores(tmp_path / "k.h5")
    assert d.sum() == 3 and d[4, 0] == 1 and d[1, 1] == 1 and d[3, 2] == 1
    masks = np.ones((2, 5), bool)
    store.write_ground_truth(tmp_path / "g.h5", masks=masks, outputs=np.zeros((1, 2, 3)),
                             train_ids=np.arange(5), query_ids=np.arange(3), attrs={"split": "test"})
    gt = store.read_ground_truth(tmp_path / "g.h5")
    assert gt["outputs"].shape == (1, 2, 3) and gt["attrs"]["split"] == "test"
