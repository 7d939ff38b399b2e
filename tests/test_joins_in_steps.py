"""Every step that pairs two files joins them on example ids.

A file listing the same examples in another order gives the same result as the original, with a
notice in the log; a file with an example the other lacks is refused, naming the file.
"""
import csv
import json

import numpy as np
import pytest

from daunce_core import removal, store
from daunce_core.config import ExperimentConfig
from daunce_core.steps import vision as pipeline

N, M_QUERIES, MASKS, K = 12, 4, 8, 6
TRAIN_IDS = np.arange(100, 100 + N)
QUERY_IDS = np.arange(500, 500 + M_QUERIES)
EFFECT = np.random.default_rng(0).normal(size=(N, M_QUERIES))  # of each training example on each query


def cfg() -> ExperimentConfig:
    return ExperimentConfig.from_dict({"daunce": {"K": K, "k_curve": [3]},
                                       "lds": {"bootstrap": 50, "threshold": {"kind": "hard", "quantile": 0.5}}})


def ground_truth(path, split="test", train_perm=None, query_perm=None, train_ids=TRAIN_IDS):
    """Ground truth whose outputs follow the masks (so the LDS is not trivially 0), written with
    its training columns and query axis permuted by ``train_perm`` / ``query_perm``."""
    rng = np.random.default_rng(1)
    masks = rng.random((MASKS, N)) < 0.5
    outputs = (masks @ EFFECT)[None] + 0.5 * rng.normal(size=(2, MASKS, M_QUERIES))
    tp = np.arange(N) if train_perm is None else train_perm
    qp = np.arange(M_QUERIES) if query_perm is None else query_perm
    store.write_ground_truth(path, masks=masks[:, tp], outputs=outputs[:, :, qp], train_ids=train_ids[tp],
                             query_ids=QUERY_IDS[qp], attrs={"split": split})
    return path


def losses() -> store.Losses:
    rng = np.random.default_rng(1)
    return store.Losses(rng.normal(size=(K, N)).astype(np.float32), rng.normal(size=(K, M_QUERIES)).astype(np.float32),
                        np.arange(K), TRAIN_IDS, QUERY_IDS,
                        {"variant": "daunce", "signal": "loss", "seed": 0, "config": {"lr": 0.1}})


TRAIN_PERM = np.array([3, 0, 11, 5, 1, 9, 2, 8, 4, 10, 7, 6])
QUERY_PERM = np.array([2, 0, 3, 1])
FOREIGN = np.r_[TRAIN_IDS[:-1], 999]  # one training id the other files lack


def test_evaluate_scores_joins_the_ground_truth_on_ids(tmp_path, caplog):
    S = (EFFECT + np.random.default_rng(2).normal(size=(N, M_QUERIES))).astype(np.float32)
    store.write_scores(tmp_path / "s.h5", scores=S, train_ids=TRAIN_IDS, query_ids=QUERY_IDS)
    c = cfg()
    base = pipeline.evaluate_scores(c, tmp_path / "s.h5", ground_truth(tmp_path / "gt.h5"), "m", "correlation",
                                    tmp_path / "a.json")["rows"]
    assert "another order" not in caplog.text
    assert base[0]["lds"] > 0.3  # paired for real: by position 0..n-1 the scores would not predict
    gt_t = ground_truth(tmp_path / "gt_train_perm.h5", train_perm=TRAIN_PERM)
    with caplog.at_level("WARNING"):
        perm = pipeline.evaluate_scores(c, tmp_path / "s.h5", gt_t, "m", "correlation", tmp_path / "b.json")["rows"]
    assert perm == base
    assert "'train_ids' list the examples of" in caplog.text and "reordered to match" in caplog.text
    # queries in another order: the same LDS (a mean over queries); the bootstrap CI resamples
    # the queries in the ground truth's order, so only it may move
    gt_p = ground_truth(tmp_path / "gt_perm.h5", train_perm=TRAIN_PERM, query_perm=QUERY_PERM)
    perm = pipeline.evaluate_scores(c, tmp_path / "s.h5", gt_p, "m", "correlation", tmp_path / "b.json")["rows"]
    assert [r["lds"] for r in perm] == pytest.approx([r["lds"] for r in base], abs=1e-12)
    assert [r["n_queries"] for r in perm] == [r["n_queries"] for r in base]

    gt_f = ground_truth(tmp_path / "gt_foreign.h5", train_ids=FOREIGN)
    with pytest.raises(store.StoreError, match=r"s\.h5: 'train_ids' differ from .*gt_foreign\.h5: 1 of its"):
        pipeline.evaluate_scores(c, tmp_path / "s.h5", gt_f, "m", "correlation", tmp_path / "c.json")
    assert not (tmp_path / "c.json").exists()


def test_k_curve_and_lr_selection_join_losses_and_ground_truth_on_ids(tmp_path, caplog):
    c = cfg()
    store.write_losses(tmp_path / "l.h5", losses())
    base = pipeline.k_curve(c, tmp_path / "l.h5", ground_truth(tmp_path / "gt.h5"), "correlation", tmp_path / "a.csv")
    gt_p = ground_truth(tmp_path / "gt_perm.h5", train_perm=TRAIN_PERM, query_perm=QUERY_PERM)
    with caplog.at_level("WARNING"):
        perm = pipeline.k_curve(c, tmp_path / "l.h5", gt_p, "correlation", tmp_path / "b.csv")
    assert [r["lds"] for r in perm] == pytest.approx([r["lds"] for r in base], abs=1e-12)
    assert "reordered to match" in caplog.text
    with pytest.raises(store.StoreError, match=r"l\.h5: 'train_ids' differ from .*gt_foreign\.h5"):
        pipeline.k_curve(c, tmp_path / "l.h5", ground_truth(tmp_path / "gt_foreign.h5", train_ids=FOREIGN),
                         "correlation", tmp_path / "c.csv")

    other = losses()
    other.train = other.train[::-1].copy()  # a second lr with other losses
    store.write_losses(tmp_path / "l2.h5", other)
    grid = {0.1: tmp_path / "l.h5", 0.01: tmp_path / "l2.h5"}
    tables = []
    for name, sel in (("a", ground_truth(tmp_path / "sel.h5", "select")),
                      ("b", ground_truth(tmp_path / "sel_perm.h5", "select", TRAIN_PERM, QUERY_PERM))):
        pipeline.select_lr(c, "daunce", grid, sel, tmp_path / f"{name}_sel.h5", tmp_path / f"{name}_sel.json")
        tables.append(json.loads((tmp_path / f"{name}_sel.json").read_text()))
    assert tables[0]["selected_lr"] == tables[1]["selected_lr"]
    assert [g["lds_select"] for g in tables[0]["grid"]] == pytest.approx([g["lds_select"] for g in tables[1]["grid"]],
                                                                           abs=1e-12)
    assert len({g["lds_select"] for g in tables[0]["grid"]}) == 2  # the two lrs are told apart
    with pytest.raises(store.StoreError, match=r"'train_ids' differ from .*sel_foreign\.h5"):
        pipeline.select_lr(c, "daunce", grid, ground_truth(tmp_path / "sel_foreign.h5", "select", train_ids=FOREIGN),
                           tmp_path / "c_sel.h5", tmp_path / "c_sel.json")


def test_align_losses_reorders_and_names_the_file(tmp_path):
    L = losses()
    store.write_losses(tmp_path / "l.h5", L)
    read = store.read_losses(tmp_path / "l.h5")
    assert read.source == str(tmp_path / "l.h5")
    same, notices = store.align_losses(read, {"train_ids": TRAIN_IDS, "query_ids": QUERY_IDS}, "ref")
    assert same is read and notices == []
    seen = []
    ref = {"train_ids": TRAIN_IDS[TRAIN_PERM], "query_ids": QUERY_IDS[QUERY_PERM]}
    out, notices = store.align_losses(read, ref, "ref.jsonl", notify=seen.append)
    np.testing.assert_array_equal(out.train, L.train[:, TRAIN_PERM])
    np.testing.assert_array_equal(out.query, L.query[:, QUERY_PERM])
    np.testing.assert_array_equal(out.train_ids, ref["train_ids"])
    assert seen == notices and len(notices) == 2
    with pytest.raises(store.StoreError, match=r"l\.h5: 'query_ids' differ from other\.jsonl"):
        store.align_losses(read, {"train_ids": TRAIN_IDS, "query_ids": QUERY_IDS + 1}, "other.jsonl")


def test_removal_ranking_lists_positions_of_the_training_set_not_of_the_scores_file(tmp_path, caplog):
    S = np.random.default_rng(3).normal(size=(N, M_QUERIES)).astype(np.float32)
    store.write_scores(tmp_path / "s.h5", scores=S[TRAIN_PERM], train_ids=TRAIN_IDS[TRAIN_PERM], query_ids=QUERY_IDS)
    expected = removal.ranking_from_scores(S, [1, 3])
    with caplog.at_level("WARNING"):
        got = removal.ranking_from_file(tmp_path / "s.h5", QUERY_IDS[[1, 3]], TRAIN_IDS, "train.jsonl")
    np.testing.assert_array_equal(got, expected)
    assert "train.jsonl in another order" in caplog.text
    with pytest.raises(store.StoreError, match=r"s\.h5: 'train_ids' differ from train\.jsonl"):
        removal.ranking_from_file(tmp_path / "s.h5", QUERY_IDS[[1]], FOREIGN, "train.jsonl")


def test_fig4_joins_scores_on_the_ids_of_the_jsonl_files(tmp_path, caplog):
    from daunce_core.blackbox.config import BlackboxConfig
    from daunce_core.steps import blackbox as study

    bcfg = BlackboxConfig.from_dict({
        "models": ["tiny-x"], "backend": "local", "K": 2, "subset_size": 10,
        "prices": {"tiny-x": {"training": 0, "input": 0, "output": 0}},
        "data": {"source": "synthetic", "n_train": 30, "n_query_triggered": 3, "n_query_clean": 3},
        "figure": {"k": 3, "n_show_triggered": 1, "n_show_clean": 1, "top": 2}})
    study.make_data(bcfg, tmp_path / "train.jsonl", tmp_path / "query.jsonl")
    train = [json.loads(x) for x in (tmp_path / "train.jsonl").read_text().splitlines()]
    query = [json.loads(x) for x in (tmp_path / "query.jsonl").read_text().splitlines()]
    tid, qid = np.array([r["id"] for r in train]), np.array([r["id"] for r in query])
    (tmp_path / "t0.json").write_text(json.dumps({"replies": ["A"] * len(query), "metrics": {
        "backdoor_success": 0.5, "clean_accuracy": 0.5, "clean_false_refusal": 0.0}}))
    S = np.random.default_rng(4).normal(size=(len(train), len(query))).astype(np.float32)
    tp = np.random.default_rng(5).permutation(len(train))
    qp = np.random.default_rng(6).permutation(len(query))
    store.write_scores(tmp_path / "a.h5", scores=S, train_ids=tid, query_ids=qid)
    store.write_scores(tmp_path / "b.h5", scores=S[tp][:, qp], train_ids=tid[tp], query_ids=qid[qp])
    store.write_scores(tmp_path / "c.h5", scores=S, train_ids=np.r_[tid[:-1], 10**6], query_ids=qid)

    def run(name):
        study.fig4(bcfg, train_path=tmp_path / "train.jsonl", query_path=tmp_path / "query.jsonl",
                   theta0_jsons={"tiny-x": tmp_path / "t0.json"}, scores={("tiny-x", "api"): tmp_path / f"{name}.h5"},
                   out_md=tmp_path / f"{name}.md", out_csv=tmp_path / f"{name}.csv")
        with open(tmp_path / f"{name}.csv") as fh:
            return list(csv.DictReader(fh)), (tmp_path / f"{name}.md").read_text()

    base = run("a")
    with caplog.at_level("WARNING"):
        assert run("b") == base
    assert "reordered to match" in caplog.text
    with pytest.raises(store.StoreError, match=r"c\.h5: 'train_ids' differ from .*train\.jsonl / .*query\.jsonl"):
        run("c")


def test_fig5_joins_scores_on_the_dataset_ids(tmp_path, monkeypatch):
    from daunce_core import figures
    from daunce_core.data import load_dataset

    c = ExperimentConfig.from_dict({"data": {"name": "digits", "n_train": 40, "n_query": 5}})
    ds = load_dataset(c.data)
    np.savez(tmp_path / "split.npz", train_ids=ds.train_ids, query_ids=ds.query_ids)
    S = np.random.default_rng(7).normal(size=(len(ds.train_ids), len(ds.query_ids))).astype(np.float32)
    tp = np.random.default_rng(8).permutation(len(ds.train_ids))
    qp = np.random.default_rng(9).permutation(len(ds.query_ids))
    store.write_scores(tmp_path / "a.h5", scores=S, train_ids=ds.train_ids, query_ids=ds.query_ids)
    store.write_scores(tmp_path / "b.h5", scores=S[tp][:, qp], train_ids=ds.train_ids[tp], query_ids=ds.query_ids[qp])
    store.write_scores(tmp_path / "c.h5", scores=S, train_ids=ds.train_ids + 10**6, query_ids=ds.query_ids)
    titles = {}

    def keep_titles(fig, out):  # what the figure shows: each image's class and score
        titles[out] = [a.get_title() + "|" + a.get_ylabel() for a in fig.axes]
        figures.plt.close(fig)

    monkeypatch.setattr(figures, "_save", keep_titles)
    for name in ("a", "b"):
        figures.fig5(c, tmp_path / "split.npz", {"correlation": tmp_path / f"{name}.h5"}, name, query=2, top=3)
    assert titles["a"] == titles["b"] and any("+" in t or "-" in t for t in titles["a"])
    with pytest.raises(store.StoreError, match=r"c\.h5: 'train_ids' differ from .*split\.npz"):
        figures.fig5(c, tmp_path / "split.npz", {"correlation": tmp_path / "c.h5"}, "c", query=2, top=3)
