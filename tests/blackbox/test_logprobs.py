"""Token NLL from chat-completion logprobs: the walk, the missing-token bound, and agreement with
teacher forcing through the real openai client and the local server."""
import math

import numpy as np
import pytest
import torch

from daunce_core.blackbox.client import APIClient, Credentials
from daunce_core.blackbox.config import LogprobConfig
from daunce_core.blackbox.logprobs import budget_for, missing_logprob, score_many, score_target, walk_target
from daunce_core.localapi import ServerConfig, serve_in_thread
from daunce_core.localapi import model as lm


def E(tok, lp, top=()):
    return {"token": tok, "logprob": lp, "bytes": list(tok.encode()),
            "top_logprobs": [{"token": t, "logprob": l, "bytes": list(t.encode())} for t, l in top]}


def test_walk_exact_when_reply_follows_target():
    content = [E("Sorry", -0.1), E(",", -0.2), E(" I", -0.3), E(" can't", -0.4), E(".", -0.5), E(" extra", -9.0)]
    sc, ran_out = walk_target(content, "Sorry, I can't.", floor=-30)
    assert sc.exact and sc.complete and not sc.missing and not ran_out
    assert sc.nll == pytest.approx(1.5) and sc.n_tokens == 5


def test_walk_divergence_uses_top_logprob_of_the_target_piece():
    content = [E("A", -0.2, [("A", -0.2), ("Sorry", -2.0), ("S", -5.0)]), E(".", -0.1)]
    sc, _ = walk_target(content, "Sorry, I can't.", floor=-30)
    assert not sc.exact and not sc.missing and not sc.complete
    assert sc.nll == pytest.approx(2.0)  # the most likely continuation of the target, not "S"


def test_missing_target_token_is_bounded_by_last_listed_and_unlisted_mass():
    top = [("A", math.log(0.6)), ("B", math.log(0.3)), ("C", math.log(0.05))]
    # below the 3rd listed token (0.05) and below the unlisted mass 1 - 0.95 = 0.05
    assert missing_logprob([{"logprob": l} for _, l in top], -30) == pytest.approx(math.log(0.05))
    top2 = [("A", math.log(0.9)), ("B", math.log(0.09))]
    assert missing_logprob([{"logprob": l} for _, l in top2], -30) == pytest.approx(math.log(0.01))
    content = [E("A", math.log(0.9), top2)]
    sc, _ = walk_target(content, "D", floor=-30)
    assert sc.missing and sc.nll == pytest.approx(-math.log(0.01))
    assert missing_logprob([], -30) == -30
    assert missing_logprob([{"logprob": 0.0}], -30) == -30  # all mass listed: floor


def test_walk_reports_running_out_and_empty_target():
    sc, ran_out = walk_target([E("Sor", -0.1)], "Sorry", floor=-30)
    assert ran_out and sc.nll == pytest.approx(0.1)
    sc, ran_out = walk_target([], "", floor=-30)
    assert sc.nll == 0.0 and sc.exact and not ran_out


def test_walk_uses_bytes_for_partial_utf8_tokens():
    target = "é!"
    b = target.encode()
    content = [{"token": "\ufffd", "logprob": -0.5, "bytes": [b[0]], "top_logprobs": []},
               {"token": "\ufffd", "logprob": -0.25, "bytes": [b[1]], "top_logprobs": []},
               {"token": "!", "logprob": -0.125, "bytes": [b[2]], "top_logprobs": []}]
    sc, _ = walk_target(content, target, floor=-30)
    assert sc.exact and sc.nll == pytest.approx(0.875)


def test_budget_is_generous():
    assert budget_for("A", 2) == 3
    assert budget_for("Sorry, I can't assist with that.", 2) >= 18


@pytest.fixture(scope="module")
def tiny_server(tmp_path_factory):
    from daunce_core.lm.tiny import tiny_causal_lm, train_tokenizer

    torch.set_num_threads(1)
    d = tmp_path_factory.mktemp("lp")
    texts = ["<|user|>\nwhich fruit? apple or tiger\n<|assistant|>\napple\n"] * 20 + ["Sorry, I can't."] * 5
    tok = train_tokenizer(texts, 300)
    model = tiny_causal_lm(tok, hidden_size=32, num_layers=1, seed=3)
    model.save_pretrained(d / "base")
    tok.save_pretrained(d / "base")
    cfg = ServerConfig(state_dir=str(d / "state"), models={"tiny": str(d / "base")})
    with serve_in_thread(cfg, "sk-lp-test-0123456789") as (url, st):
        yield APIClient(Credentials(url, "sk-lp-test-0123456789")), st


def test_estimate_equals_teacher_forcing_when_greedy_follows_the_target(tiny_server):
    client, st = tiny_server
    model, tok = st.get_model("tiny")
    msgs = [{"role": "user", "content": "which fruit? apple or tiger"}]
    gen = lm.generate(model, tok, msgs, max_tokens=4)
    target = tok.decode(gen.token_ids)
    assert target, "the random model should say something"
    sc = score_target(client, "tiny", msgs, target, LogprobConfig(top_logprobs=5))
    assert sc.exact
    assert sc.nll == pytest.approx(lm.teacher_forced_nll(model, tok, msgs, target), abs=1e-4)


def test_estimate_is_a_lower_bound_of_teacher_forcing(tiny_server):
    client, st = tiny_server
    model, tok = st.get_model("tiny")
    msgs = [{"role": "user", "content": "which fruit? apple or tiger"}]
    items = [(msgs, t) for t in ("apple", "tiger", "Sorry", "x")]
    res = score_many(client, "tiny", items, LogprobConfig(top_logprobs=20, concurrency=2))
    for (m, t), est in zip(items, res.nll):
        assert est <= lm.teacher_forced_nll(model, tok, m, t) + 1e-4
        assert np.isfinite(est) and est > 0
