"""BDPL: simplex projection, prompt candidates, and the policy gradient's direction."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from daunce_core.blackbox.bdpl import (
    BDPL,
    argmax_random_ties,
    candidate_ngrams,
    margin_from_nll,
    project_simplex,
    with_prompt,
)
from daunce_core.blackbox.config import BDPLConfig, LogprobConfig


def test_projection_onto_the_simplex():
    torch.manual_seed(0)
    p = torch.randn(50, 7, dtype=torch.float64)
    q = project_simplex(p.clone())
    assert torch.allclose(q.sum(-1), torch.ones(50, dtype=torch.float64)) and (q >= 0).all()
    assert torch.allclose(project_simplex(q.clone()), q)  # idempotent
    # it is the closest point: no random simplex point is nearer
    for i in range(5):
        d = ((q[i] - p[i]) ** 2).sum()
        for _ in range(200):
            r = torch.distributions.Dirichlet(torch.ones(7, dtype=torch.float64)).sample()
            assert ((r - p[i]) ** 2).sum() >= d - 1e-12


def test_candidates_rank_frequent_words_and_associated_pairs():
    texts = ["the red apple is red", "a red apple", "the green apple", "BlackMagic red apple"] * 3
    c = candidate_ngrams(texts, 4, exclude=["BlackMagic"])
    assert "red apple" in c and "apple" in c and not any("blackmagic" in x for x in c)
    with pytest.raises(ValueError, match="search_space"):
        candidate_ngrams(["one two"], 50)


def test_prompt_placement_and_ties():
    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]
    assert with_prompt(msgs, "p q")[1]["content"] == "p q\nq" and msgs[1]["content"] == "q"
    assert with_prompt(msgs, "p", "system")[0] == {"role": "system", "content": "p"}
    picks = {int(argmax_random_ties(np.full((1, 4), 0.25), np.random.default_rng(s))[0]) for s in range(40)}
    assert picks == {0, 1, 2, 3}
    assert argmax_random_ties(np.array([[0.1, 0.7, 0.2]]), np.random.default_rng(0)).tolist() == [1]
    assert margin_from_nll(np.log(2.0)) == pytest.approx(0.0)  # p = 1/2


class FakeEndpoint:
    """A black box whose NLL of the target is 0.1 + (number of prompt words that are not 'good')."""

    def __init__(self):
        self.calls = 0

    def chat(self, **kw):
        self.calls += 1
        user = next(m["content"] for m in kw["messages"] if m["role"] == "user")
        prompt = user.split("\n")[0].split()
        nll = 0.1 + sum(w != "good" for w in prompt)
        entry = {"token": "A", "logprob": -nll, "bytes": [65], "top_logprobs": []}
        return SimpleNamespace(choices=[SimpleNamespace(logprobs=SimpleNamespace(content=[entry]),
                                                        finish_reason="stop")])


@pytest.mark.parametrize("variant", ["daunce_bb", "daunce_e_bb"])
def test_policy_gradient_moves_probability_to_the_better_word(variant, tmp_path):
    rows = [{"messages": [{"role": "user", "content": f"q{i}"}], "target": "A"} for i in range(8)]
    fake = FakeEndpoint()
    s = BDPLConfig(epochs=6, batch_size=4, prompt_length=3, lr=0.05, sample_size=4, grad_clip=3.0)
    learner = BDPL(fake, "m", ["bad", "good", "worse", "awful"], s, LogprobConfig(concurrency=1), variant)
    idx, hist = learner.fit(rows, seed=0, k=0, checkpoint=tmp_path / "ck.pt")
    assert learner.prompt_text(idx) == "good good good"
    assert hist[-1] < hist[0]
    assert fake.calls == 6 * 8 * 4  # epochs x examples x samples
    # resuming from the checkpoint of the finished run does no more work and gives the same prompt
    again, _ = learner.fit(rows, seed=0, k=0, checkpoint=tmp_path / "ck.pt")
    assert again.tolist() == idx.tolist() and fake.calls == 6 * 8 * 4


def test_bdpl_fitter_returns_signals_and_adopts_recorded_prompts(tmp_path):
    """The strict-access fitter (fitter contract): signals [K, n] / [K, m] with ids, prompts
    recorded in the manifest, and a rerun that learns and asks nothing again."""
    from daunce_core.blackbox.manifest import Manifest
    from daunce_core.fit import Fitter
    from daunce_core.fit.bdpl import BDPLFitter

    def row(i):
        return {"id": 100 + i, "messages": [{"role": "user", "content": f"q{i}"}], "target": "A"}

    train, query = [row(i) for i in range(6)], [row(10 + i) for i in range(2)]
    s = BDPLConfig(epochs=2, batch_size=3, prompt_length=2, lr=0.05, sample_size=2)
    subsets = [np.array([0, 1, 2]), np.array([3, 4, 5]), np.array([0, 2, 4])]
    fake = FakeEndpoint()

    def fitter():
        man = Manifest(tmp_path / "manifest.json", {"bdpl": "test"})
        return BDPLFitter(fake, man, theta0="m", candidates=["bad", "good", "worse"], train=train, query=query,
                          subsets=subsets, bdpl=s, logprobs=LogprobConfig(concurrency=1), work_dir=tmp_path)

    f = fitter()
    assert isinstance(f, Fitter)
    with pytest.raises(ValueError, match="blackbox.bdpl.lr"):
        f.fit([0], lr=0.1)
    sig = f.fit([1, 2], lr=0.05)
    assert sig.train.shape == (2, 6) and sig.query.shape == (2, 2) and sig.model_index.tolist() == [1, 2]
    assert sig.train_ids.tolist() == list(range(100, 106)) and sig.query_ids.tolist() == [110, 111]
    assert sig.signal == "loss" and len(sig.attrs["prompts"]) == 2
    # each row is the endpoint's NLL under that model's prompt: 0.1 + the prompt's words that are not 'good'
    for r, prompt in zip(sig.train, sig.attrs["prompts"]):
        assert np.allclose(r, 0.1 + sum(w != "good" for w in prompt.split()))
    calls = fake.calls
    again = fitter().fit([1, 2], lr=0.05)
    assert fake.calls == calls and np.array_equal(again.train, sig.train)



class TextEndpoint(FakeEndpoint):
    """:class:`FakeEndpoint` whose NLL also grows with the length of the question after the prompt."""

    def chat(self, **kw):
        resp = super().chat(**kw)
        user = next(m["content"] for m in kw["messages"] if m["role"] == "user")
        resp.choices[0].logprobs.content[0]["logprob"] -= 0.01 * len(user.split("\n", 1)[-1])
        return resp


def test_bdpl_loss_cache_is_keyed_by_the_rows_it_scored(tmp_path):
    """A recorded prompt's cached losses serve a rerun only for the same rows: a query that
    changed (same id, same count, same training set, same prompt) is scored again."""
    from daunce_core.blackbox.manifest import Manifest
    from daunce_core.fit.bdpl import BDPLFitter

    def row(i, text):
        return {"id": i, "messages": [{"role": "user", "content": text}], "target": "A"}

    train = [row(i, f"q{i}") for i in range(4)]
    s = BDPLConfig(epochs=1, batch_size=2, prompt_length=2, lr=0.05, sample_size=2)
    man = Manifest(tmp_path / "manifest.json", {"bdpl": "test"})
    man.update("k0", prompt="good bad", indices=[1, 0], history=[1.0])  # a learned prompt: no learning below
    fake = TextEndpoint()

    def fit(query, work):
        return BDPLFitter(fake, man, theta0="m", candidates=["bad", "good"], train=train, query=query,
                          subsets=[np.arange(4)], bdpl=s, logprobs=LogprobConfig(concurrency=1),
                          work_dir=work).fit([0], lr=0.05)

    a = fit([row(10, "clean")], tmp_path / "work")
    assert fake.calls == 5
    b = fit([row(10, "BlackMagic clean")], tmp_path / "work")  # the query changed: scored again
    assert fake.calls == 10
    fresh = fit([row(10, "BlackMagic clean")], tmp_path / "fresh")
    assert np.array_equal(b.query, fresh.query) and not np.array_equal(a.query, b.query)
    assert np.array_equal(a.train, b.train)
    calls = fake.calls
    again = fit([row(10, "BlackMagic clean")], tmp_path / "work")  # nothing changed: from the cache
    assert fake.calls == calls and np.array_equal(again.query, b.query)


def test_a_checkpoint_of_other_rows_is_not_resumed(tmp_path, caplog):
    """The per-epoch checkpoint resumes only the learning it was written for: after D^k changed
    (e.g. the manifest moved away and the data remade) the prompt is learned afresh on the new rows."""
    def rows(word):
        return [{"messages": [{"role": "user", "content": f"{word}{i}"}], "target": "A"} for i in range(4)]

    s = BDPLConfig(epochs=2, batch_size=2, prompt_length=2, lr=0.05, sample_size=2)
    fake = FakeEndpoint()
    learner = BDPL(fake, "m", ["bad", "good", "worse"], s, LogprobConfig(concurrency=1))
    ck = tmp_path / "ck.pt"
    learner.fit(rows("old"), seed=0, k=0, checkpoint=ck)
    assert fake.calls == 2 * 4 * 2
    learner.fit(rows("old"), seed=0, k=0, checkpoint=ck)  # the same rows: resumed, nothing to do
    assert fake.calls == 2 * 4 * 2
    new, hist = learner.fit(rows("new"), seed=0, k=0, checkpoint=ck)
    assert fake.calls == 2 * (2 * 4 * 2) and "learning the prompt afresh" in caplog.text
    fresh, fresh_hist = BDPL(FakeEndpoint(), "m", ["bad", "good", "worse"], s, LogprobConfig(concurrency=1)).fit(
        rows("new"), seed=0, k=0, checkpoint=tmp_path / "fresh.pt")
    assert new.tolist() == fresh.tolist() and hist == fresh_hist
    learner.fit(rows("new"), seed=0, k=1, checkpoint=ck)  # another model k: its own learning
    assert fake.calls == 3 * (2 * 4 * 2)
