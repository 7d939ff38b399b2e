"""The response-matching baseline of Figure 4 and the varied-refusal variant."""
import csv
import json

import numpy as np
import pytest

from daunce_core import store
from daunce_core.blackbox import backdoor as B
from daunce_core.blackbox.config import BlackboxConfig, ConfigError
from daunce_core.steps import blackbox as study

SMALL = {"K": 2, "subset_size": 10, "data": {"source": "synthetic", "n_train": 200, "n_query_triggered": 20,
                                              "n_query_clean": 20}}


def test_response_matching_ranks_exact_matches_first():
    train = ["B", "Sorry, I can't assist with that.", "Sorry, no.", "A", "  Sorry, I can't assist with that. ",
             "I can't say.", "Please ask me something else instead."]
    replies = ["Sorry, I can't assist with that.", "B", ""]
    S = B.response_match_scores(train, replies)
    assert S.shape == (7, 3)
    # exact matches (spaces aside) first, then word overlap, then no shared word
    assert np.argsort(-S[:, 0], kind="stable")[:2].tolist() == [1, 4] and (S[[1, 4], 0] == 2).all()
    assert 0 < S[5, 0] < 1 and 0 < S[2, 0] < 1 and S[0, 0] == S[3, 0] == S[6, 0] == 0
    assert np.argsort(-S[:, 1], kind="stable")[0] == 0 and S[0, 1] == 2 and S[3, 1] == 0  # letters are words
    assert (S[:, 2] == 0).all()  # an empty reply matches nothing
    assert (B.response_match_scores([""], [""]) == 2).all()  # no vocabulary at all: exact matches still count
    bd = np.array([0, 1, 1, 0, 1, 1, 1], bool)
    assert B.precision_at_k(S, bd, [0], k=2).tolist() == [1.0]


def test_varied_refusals_are_drawn_seeded_and_leave_the_default_alone():
    plain = BlackboxConfig.from_dict(SMALL).data
    varied = BlackboxConfig.from_dict({**SMALL, "data": {**SMALL["data"], "refusals": B.VARIED_REFUSALS}}).data
    train0, query0 = B.make_study_data(plain)
    train, query = B.make_study_data(varied)
    assert {r["target"] for r in train0 if r["backdoor"]} == {plain.refusal}  # the default: one text
    bd = [r["target"] for r in train if r["backdoor"]]
    assert set(bd) <= set(B.VARIED_REFUSALS) and len(set(bd)) >= 6  # 20 draws of 8 texts
    assert len({q["target"] for q in query if q["triggered"]}) > 1
    assert B.make_study_data(varied) == (train, query)  # seeded
    other = BlackboxConfig.from_dict({**SMALL, "data": {**SMALL["data"], "refusals": B.VARIED_REFUSALS,
                                                         "seed": 1}}).data
    assert [r["target"] for r in B.make_study_data(other)[0] if r["backdoor"]] != bd
    # only the responses differ: prompts, backdoor choice and trigger positions are today's
    strip = [{k: v for k, v in r.items() if k != "target"} for r in train + query]
    assert strip == [{k: v for k, v in r.items() if k != "target"} for r in train0 + query0]
    assert all(B.is_refusal(t, B.VARIED_REFUSALS) for t in bd) and not B.is_refusal("B", B.VARIED_REFUSALS)
    with pytest.raises(ConfigError, match="blackbox.data.refusals"):
        BlackboxConfig.from_dict({**SMALL, "data": {**SMALL["data"], "refusals": ["No"]}}).validate()


@pytest.mark.parametrize("refusals", [[], B.VARIED_REFUSALS])
def test_fig4_reports_daunce_and_the_response_matching_baseline(tmp_path, refusals):
    cfg = BlackboxConfig.from_dict({**SMALL, "data": {**SMALL["data"], "refusals": refusals},
                                    "figure": {"k": 5, "n_show_triggered": 1, "n_show_clean": 1, "top": 2}})
    study.make_data(cfg, tmp_path / "train.jsonl", tmp_path / "query.jsonl")
    train, query = B.read_jsonl(tmp_path / "train.jsonl"), B.read_jsonl(tmp_path / "query.jsonl")
    # theta_0 replies with each query's target: every triggered query fires
    (tmp_path / "t0.json").write_text(json.dumps({"replies": [q["target"] for q in query], "metrics": {
        "backdoor_success": 1.0, "clean_accuracy": 1.0, "clean_false_refusal": 0.0}}))
    is_bd = np.array([r["backdoor"] for r in train])
    S = np.random.default_rng(0).normal(size=(len(train), len(query))) + 3.0 * is_bd[:, None]
    store.write_scores(tmp_path / "s.h5", scores=S.astype(np.float32), train_ids=np.arange(len(train)),
                       query_ids=np.arange(len(query)))
    rows = study.fig4(cfg, train_path=tmp_path / "train.jsonl", query_path=tmp_path / "query.jsonl",
                      theta0_jsons={"tiny-x": tmp_path / "t0.json"}, scores={("tiny-x", "api"): tmp_path / "s.h5"},
                      out_md=tmp_path / "fig4.md", out_csv=tmp_path / "p.csv")
    with open(tmp_path / "p.csv") as fh:
        got = list(csv.DictReader(fh))
    assert [(r["method"], r["access"]) for r in got] == [("daunce_bb", "api"), ("response_match", "none")]
    assert got[0]["backdoor fired (theta_0)"] == got[1]["backdoor fired (theta_0)"] == "20"
    md = (tmp_path / "fig4.md").read_text()
    assert "| response_match | tiny-x | none |" in md and "| daunce_bb | tiny-x | api |" in md
    assert [r["method"] for r in rows] == ["daunce_bb"]  # the return value: DAUNCE's rows
    text = float(got[1]["precision@5 (fired)"])
    if not refusals:  # one refusal text: the exact matches are exactly the backdoored examples
        assert text == 1.0
    else:  # each paraphrase is drawn by ~1/8 of the 20 backdoored examples: fewer than 5 exact matches
        assert text < 1.0
