"""HDF5 round trips, atomic writes and clear errors on bad files."""
import os
import re
import signal
import stat
import subprocess
import sys
import time

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
    with pytest.raises(store.StoreError, match=r"a.h5 and .*a.h5 overlap: both hold models k 2, 3"):
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


# --- destroying nothing: output checks, temporaries, umask, signals -----------------------

def test_outputs_that_would_destroy_something_are_refused_before_writing(tmp_path):
    store.write_losses(tmp_path / "l.h5", make_losses())
    before = (tmp_path / "l.h5").read_bytes()
    (tmp_path / "dir.h5").mkdir()
    os.mkfifo(tmp_path / "pipe.h5")
    cases = {tmp_path / "dir.h5": "existing directory", tmp_path / "pipe.h5": "device, pipe",
             tmp_path / "l.h5" / "x.h5": "is a file, not a folder"}
    for out, message in cases.items():
        with pytest.raises(store.StoreError, match=message):
            store.write_scores(out, scores=np.zeros((2, 1)), train_ids=np.arange(2),
                               query_ids=np.arange(1))
    with pytest.raises(store.StoreError, match="is the input file"):
        store.check_output(tmp_path / "sub" / ".." / "l.h5", inputs=[tmp_path / "l.h5"])
    with pytest.raises(store.StoreError, match="is the input file"):
        store.concat_losses([tmp_path / "l.h5"], tmp_path / "l.h5")
    assert (tmp_path / "l.h5").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir.h5", "l.h5", "pipe.h5"]


def test_temporaries_are_named_beside_the_output_and_outputs_follow_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        with store.atomic_path(tmp_path / "out.json", suffix=".json") as tmp:
            assert tmp.parent == tmp_path
            assert tmp.name.startswith(f".out.json.daunce-tmp-{os.getpid()}@")
            assert tmp.name.endswith(".json")
            tmp.write_text("{}")
        assert stat.S_IMODE(os.stat(tmp_path / "out.json").st_mode) == 0o640
        os.umask(0o022)
        store.write_losses(tmp_path / "l.h5", make_losses())
        assert stat.S_IMODE(os.stat(tmp_path / "l.h5").st_mode) == 0o644
    finally:
        os.umask(old)


def test_files_a_library_recreates_in_our_temporary_still_follow_the_umask(tmp_path):
    """safetensors' save_file writes its own 0600 temporary and renames it onto ours (audit 2,
    finding 6): theta_0 must still get 0666 minus the umask."""
    import torch

    old = os.umask(0o002)
    try:
        store.save_state({"w": torch.zeros(3)}, tmp_path / "theta_0.safetensors")
        assert stat.S_IMODE(os.stat(tmp_path / "theta_0.safetensors").st_mode) == 0o664
        with store.atomic_path(tmp_path / "x.bin") as tmp:
            tmp.unlink()
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT, 0o600))  # any library's private temporary
        assert stat.S_IMODE(os.stat(tmp_path / "x.bin").st_mode) == 0o664
    finally:
        os.umask(old)


@pytest.mark.parametrize("exc", [KeyboardInterrupt, SystemExit, store.Terminated(15), OSError])
def test_an_interrupted_write_removes_its_temporary(tmp_path, exc):
    (tmp_path / "s.h5").write_bytes(b"earlier result")
    with pytest.raises(type(exc) if isinstance(exc, BaseException) else exc):
        with store.atomic_h5(tmp_path / "s.h5") as f:
            f["x"] = np.zeros(10)
            raise exc
    assert [p.name for p in tmp_path.iterdir()] == ["s.h5"]
    assert (tmp_path / "s.h5").read_bytes() == b"earlier result"


def test_leftovers_of_dead_processes_are_cleaned_and_live_ones_ignored(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()  # reaped: its pid no longer exists (unless reused at once, very unlikely)
    host = store.atomic.host()
    dead = tmp_path / f".s.h5.daunce-tmp-{proc.pid}@{host}.abcd1234.h5.tmp"
    live = tmp_path / f".s.h5.daunce-tmp-{os.getppid()}@{host}.abcd1234.h5.tmp"
    other_host = tmp_path / f".s.h5.daunce-tmp-{proc.pid}@elsewhere-{host}.abcd1234.h5.tmp"
    other_file = tmp_path / f".t.h5.daunce-tmp-{proc.pid}@{host}.abcd1234.h5.tmp"
    for p in (dead, live, other_host, other_file):
        p.write_bytes(b"partial")
    store.write_scores(tmp_path / "s.h5", scores=np.ones((2, 1)), train_ids=np.arange(2),
                       query_ids=np.arange(1))
    assert not dead.exists()
    assert live.exists() and other_host.exists() and other_file.exists()
    assert store.read_scores(tmp_path / "s.h5")["scores"].shape == (2, 1)


def test_cleanup_on_signals_turns_sigterm_into_an_exception_and_restores_handlers():
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(store.Terminated) as info:
        with store.cleanup_on_signals():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler interrupts this
    assert info.value.signum == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) == before


# --- joining on ids ---------------------------------------------------------------------------

def test_match_ids_reorders_equal_sets_and_refuses_different_ones():
    ref = np.array([10, 11, 12, 13])
    assert store.match_ids(ref.copy(), ref, "train_ids", "a.h5", "b.h5") is None
    ids = np.array([12, 10, 13, 11])
    order = store.match_ids(ids, ref, "train_ids", "a.h5", "b.h5")
    np.testing.assert_array_equal(ids[order], ref)
    with pytest.raises(store.StoreError, match=r"a\.h5: 'train_ids' differ from b\.h5: 1 of its 4 "
                                               r"ids are missing \(first: 13\)"):
        store.match_ids(np.array([10, 11, 12, 99]), ref, "train_ids", "a.h5", "b.h5")
    with pytest.raises(store.StoreError, match="holds 3 ids but b.h5 holds 4"):
        store.match_ids(ref[:3], ref, "train_ids", "a.h5", "b.h5")
    with pytest.raises(store.StoreError, match="a.h5: 'query_ids' repeats id 10"):
        store.match_ids(np.array([10, 10, 12, 13]), ref, "query_ids", "a.h5", "b.h5")


def test_join_notices_and_positional_files():
    j = store.join("s.h5", [2, 1, 0], [5, 6], "g.h5", [0, 1, 2], [5, 6])
    np.testing.assert_array_equal(j.train, [2, 1, 0])
    assert j.query is None
    assert j.notices == [("s.h5: 'train_ids' list the examples of g.h5 in another order; "
                          "reordered to match")]
    a = np.arange(6).reshape(3, 2)
    np.testing.assert_array_equal(j.take(a, 0, 1), a[::-1])
    j = store.join("s.h5", [0, 1], [0], "g.h5", [0, 1], [0], positional=True, ref_positional=True)
    assert j.notices == ["s.h5 and g.h5 carry no example ids: joined by position"]
    with pytest.raises(store.StoreError, match=r"differ from g\.h5.*\(s\.h5 carries no example ids"):
        store.join("s.h5", [0, 1], [0], "g.h5", [7, 8], [0], positional=True)


def test_concat_joins_chunks_listed_in_another_order(tmp_path, caplog):
    a, b = make_losses(K=2, start=0, seed=1), make_losses(K=2, start=2, seed=2)
    p = np.array([5, 3, 0, 1, 4, 2])
    b_perm = store.Losses(b.train[:, p], b.query[:, ::-1], b.model_index, b.train_ids[p],
                          b.query_ids[::-1], b.attrs)
    store.write_losses(tmp_path / "a.h5", a)
    store.write_losses(tmp_path / "b.h5", b_perm)
    with caplog.at_level("WARNING"):
        out = store.concat_losses([tmp_path / "a.h5", tmp_path / "b.h5"], tmp_path / "all.h5")
    np.testing.assert_array_equal(out.train, np.concatenate([a.train, b.train]))
    np.testing.assert_array_equal(out.query, np.concatenate([a.query, b.query]))
    assert "reordered to match" in caplog.text


def test_files_without_ids_get_positional_ids_and_a_marker(tmp_path):
    with h5py.File(tmp_path / "l.h5", "w") as f:
        f["train"] = np.random.default_rng(0).normal(size=(3, 5)).astype(np.float16)
        f["query"] = np.ones((3, 2), np.float32)
        f["model_index"] = np.arange(3)
    L = store.read_losses(tmp_path / "l.h5")
    assert L.train.dtype == np.float32 and L.attrs["ids"] == "positional"
    np.testing.assert_array_equal(L.train_ids, np.arange(5))
    with h5py.File(tmp_path / "l.h5", "a") as f:
        f["query_ids"] = np.arange(2)
    with pytest.raises(store.StoreError, match="has 'query_ids' but no 'train_ids'"):
        store.read_losses(tmp_path / "l.h5")


def test_huge_float64_losses_are_refused_by_name_not_stored_as_inf(tmp_path):
    L = make_losses()
    L.train = L.train.astype(np.float64) * 1e300
    with pytest.raises(store.StoreError, match=r"'train' holds values up to .*e\+300, beyond the "
                                               "float32"):
        store.write_losses(tmp_path / "l.h5", L)
    assert list(tmp_path.iterdir()) == []


def test_scores_with_nan_or_bad_topk_positions_are_refused(tmp_path):
    with pytest.raises(store.StoreError, match="'scores' holds 1 NaN or infinite value"):
        store.write_scores(tmp_path / "s.h5", scores=np.array([[1.0], [np.nan]]),
                           train_ids=np.arange(2), query_ids=np.arange(1))
    with pytest.raises(store.StoreError, match="'indices' holds position 2, outside the 2"):
        store.write_scores(tmp_path / "s.h5", indices=np.array([[2]]), values=np.ones((1, 1)),
                           train_ids=np.arange(2), query_ids=np.arange(1))
    assert list(tmp_path.iterdir()) == []


def _raw(path, **datasets):
    with h5py.File(path, "w") as f:
        for key, value in datasets.items():
            f[key] = value
    return path


def test_repeated_ids_are_refused_where_they_are_read_naming_key_and_id(tmp_path):
    L = make_losses()
    base = {"train": L.train, "query": L.query, "train_ids": L.train_ids, "query_ids": L.query_ids}
    _raw(tmp_path / "l.h5", **{**base, "train_ids": np.array([100, 101, 102, 101, 104, 100])})
    with pytest.raises(store.StoreError, match=r"l\.h5: 'train_ids' repeats id 100 \(2 times\)"):
        store.read_losses(tmp_path / "l.h5")
    _raw(tmp_path / "s.h5", scores=np.ones((6, 3)), train_ids=L.train_ids, query_ids=np.array([7, 8, 7]))
    with h5py.File(tmp_path / "s.h5", "a") as f:
        f.attrs["format"] = "dense"
    with pytest.raises(store.StoreError, match=r"s\.h5: 'query_ids' repeats id 7"):
        store.read_scores(tmp_path / "s.h5")


def test_uint64_ids_beyond_int64_are_refused_not_wrapped(tmp_path):
    L = make_losses(n=3)
    ids = np.array([2**63 + 5, 7, 2**64 - 1], np.uint64)
    _raw(tmp_path / "l.h5", train=L.train, query=L.query, train_ids=ids, query_ids=L.query_ids)
    with pytest.raises(store.StoreError, match=r"'train_ids' holds uint64 value 9223372036854775813, beyond the int64"):
        store.read_losses(tmp_path / "l.h5")
    _raw(tmp_path / "ok.h5", train=L.train, query=L.query, train_ids=np.array([2**63 - 1, 7, 0], np.uint64),
         query_ids=L.query_ids.astype(np.uint64))
    np.testing.assert_array_equal(store.read_losses(tmp_path / "ok.h5").train_ids, [2**63 - 1, 7, 0])


def test_a_losses_file_of_train_and_query_alone_reads_with_model_index_0_to_K(tmp_path):
    """README and the tutorial describe a losses file as ``train`` [K, n] and ``query`` [K, m];
    ``daunce score`` reads it, and so does ``read_losses``."""
    L = make_losses()
    R = store.read_losses(_raw(tmp_path / "l.h5", train=L.train, query=L.query))
    np.testing.assert_array_equal(R.model_index, np.arange(4))
    np.testing.assert_array_equal(R.train, L.train)
    assert R.attrs["ids"] == "positional"


def test_check_split_compares_the_recorded_content_hash_when_both_sides_have_one(tmp_path):
    split = tmp_path / "exp" / "data" / "split.npz"
    ids = np.arange(3)
    store.save_split(split, ids, ids, ids % 2, ids % 2, "sha256:aa")
    store.check_split(split, ids, ids, "sha256:aa", "d.npz")
    store.check_split(split, ids, ids)  # a caller without a hash: ids alone
    with pytest.raises(store.StoreError, match=rf"split.npz: the data read from d.npz changed since this split was "
                       rf"recorded .*; delete {re.escape(str(tmp_path / 'exp'))} and rerun$"):
        store.check_split(split, ids, ids, "sha256:bb", "d.npz")
    store.save_split(tmp_path / "old.npz", ids, ids, ids % 2, ids % 2)  # no hash: ids alone
    assert "content_hash" not in np.load(tmp_path / "old.npz").files
    store.check_split(tmp_path / "old.npz", ids, ids, "sha256:bb", "d.npz")
    with pytest.raises(store.StoreError, match="the recorded split differs"):
        store.check_split(split, ids[::-1], ids, "sha256:aa", "d.npz")
