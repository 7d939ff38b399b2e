"""The Task API (daunce_core/api.py): any torch model, a per-example loss, datasets or loaders.

On a tiny MLP: the generic fitter equals the classifier fitter, vmapped or one by one; the
parameter-space first-order term (a JVP at theta_0) equals the logit-space one where the two
lines of equation (5) coincide; ids come from the datasets; bad inputs are one-line errors.
On the tiny LM: a JSONL of prompt/response pairs goes through the same call with LoRA.
"""
import logging

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset

from daunce_core import objectives as obj
from daunce_core import store
from daunce_core.api import ClassificationTask, LMTask, Task, TaskFitter, fit_losses, scores
from daunce_core.config import MEASURES
from daunce_core.scoring import pairwise_scores

torch.set_num_threads(1)

_g = torch.Generator().manual_seed(0)
X = torch.randn(60, 6, generator=_g)
Y = torch.randint(0, 3, (60,), generator=_g)
XQ, YQ = X[:7] + 0.05, Y[:7]
KW = dict(K=6, ratio=0.5, epochs=3, batch_size=10, chunk_size=4, device="cpu")


def mlp(seed=0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))


class GenericClassification(ClassificationTask):
    """ClassificationTask's functions, but through the generic TaskFitter (not EnsembleFitter)."""


class LossOnly(Task):
    """The same cross-entropy, given as a loss of the model: the first-order term is a JVP."""

    def loss(self, model, batch):
        return obj.cross_entropy(model(batch[0]), batch[1])


class Dicts(Dataset):
    """A user's dataset: dict examples and ids of its own."""

    def __init__(self, X, y, ids):
        self.X, self.y, self.ids = X, y, np.asarray(ids)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"x": self.X[i], "label": self.y[i]}


class DictTask(Task):
    def logits(self, model, batch):
        return model(batch["x"])

    def loss_from_logits(self, logits, batch):
        return obj.cross_entropy(logits, batch["label"])


@pytest.mark.parametrize("variant", ["daunce", "daunce_t", "daunce_e_bb"])
def test_the_generic_fitter_equals_the_classifier_fitter(variant):
    ref = fit_losses(mlp(), ClassificationTask(), (X, Y), (XQ, YQ), variant=variant, lr=0.1, **KW)
    for mode in ("vmap", "loop"):
        got = fit_losses(mlp(), GenericClassification(), (X, Y), (XQ, YQ), variant=variant, lr=0.1, mode=mode, **KW)
        assert got.train.shape == (6, 60) and got.query.shape == (6, 7) and got.signal == ref.signal
        np.testing.assert_allclose(got.train, ref.train, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(got.query, ref.query, rtol=1e-5, atol=1e-5)
    assert ref.train.std(0).max() > 0.05  # the models moved apart: the comparison means something


def test_the_jvp_first_order_term_equals_the_logit_space_one():
    """Equation (5): grad L_i(theta_0)^T (theta - theta_0) (first line, a JVP) equals
    <grad_g L(g_0), g - g_0> (second line) for a model linear in its parameters; for an MLP the
    two differ at second order, so their gap shrinks like the step size squared."""
    torch.manual_seed(0)
    linear = nn.Linear(6, 3)
    for variant in ("daunce", "daunce_e"):
        a = fit_losses(linear, GenericClassification(), (X, Y), (XQ, YQ), variant=variant, lr=0.1, **KW)
        b = fit_losses(linear, LossOnly(), (X, Y), (XQ, YQ), variant=variant, lr=0.1, **KW)
        np.testing.assert_allclose(b.train, a.train, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(b.query, a.query, rtol=1e-5, atol=1e-5)
    gaps = []
    for lr in (0.01, 0.001):
        a = fit_losses(mlp(), GenericClassification(), (X, Y), (XQ, YQ), lr=lr, **KW)
        b = fit_losses(mlp(), LossOnly(), (X, Y), (XQ, YQ), lr=lr, **KW)
        gaps.append(np.abs(a.train - b.train).max() / np.abs(a.train - a.train.mean(0)).max())
    assert gaps[1] < 0.01 and gaps[1] < gaps[0] / 5


def test_ids_and_batch_size_come_from_the_dataset_and_the_loader(tmp_path):
    train = Dicts(X, Y, ids=1000 + np.arange(60))
    query = Dicts(XQ, YQ, ids=[5, 3, 9, 1, 7, 2, 8])
    out = tmp_path / "losses.h5"
    sig = fit_losses(mlp(), DictTask(), DataLoader(train, batch_size=12, shuffle=True), query, lr=0.1,
                     out=out, **{**KW, "batch_size": None})
    L = store.read_losses(out)
    np.testing.assert_array_equal(L.train_ids, 1000 + np.arange(60))
    np.testing.assert_array_equal(L.query_ids, [5, 3, 9, 1, 7, 2, 8])
    np.testing.assert_array_equal(L.train, sig.train)
    assert L.attrs["variant"] == "daunce" and L.attrs["config"]["batch_size"] == 12 and L.attrs["lr"] == 0.1
    # the same examples as tensors, with their ids given: the same losses (DataLoader's order unused)
    same = fit_losses(mlp(), GenericClassification(), (X, Y), (XQ, YQ), lr=0.1, train_ids=1000 + np.arange(60),
                      **{**KW, "batch_size": 12})
    np.testing.assert_allclose(same.train, sig.train, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(same.train_ids, L.train_ids)
    assert np.array_equal(fit_losses(mlp(), None, (X, Y), (XQ, YQ), lr=0.1, **KW).query_ids, np.arange(7))


def test_the_measurement_is_the_query_function():
    class Margin(GenericClassification):
        def measurement(self, model, batch):
            return obj.margin(model(batch[0]), batch[1])

    a = fit_losses(mlp(), GenericClassification(), (X, Y), (XQ, YQ), lr=0.1, **KW)
    b = fit_losses(mlp(), Margin(), (X, Y), (XQ, YQ), lr=0.1, **KW)
    np.testing.assert_allclose(b.train, a.train, rtol=1e-5, atol=1e-6)  # same fits
    assert not np.allclose(b.query, a.query) and (np.sign(b.query) != np.sign(a.query)).any()


def test_task_functions_that_cannot_be_vmapped_are_fitted_one_by_one(caplog):
    class WritesIntoFreshTensor(LossOnly):
        def loss(self, model, batch):
            x = torch.zeros(batch[0].shape)
            x.copy_(batch[0])
            return obj.cross_entropy(model(x), batch[1])

    with caplog.at_level(logging.WARNING, logger="daunce_core.api"):
        got = fit_losses(mlp(), WritesIntoFreshTensor(), (X, Y), (XQ, YQ), lr=0.1, **KW)
    assert any("one by one, with the same randomness" in r.getMessage() for r in caplog.records)
    ref = fit_losses(mlp(), LossOnly(), (X, Y), (XQ, YQ), lr=0.1, **KW)
    np.testing.assert_allclose(got.train, ref.train, rtol=1e-5, atol=1e-5)


def test_scores_in_memory_and_streamed_top_k(tmp_path):
    dense = scores(mlp(), None, (X, Y), (XQ, YQ), lr=0.1, variant="daunce", **KW)
    sig = fit_losses(mlp(), None, (X, Y), (XQ, YQ), lr=0.1, variant="daunce", **KW)
    np.testing.assert_array_equal(dense, pairwise_scores(sig.train, sig.query, MEASURES.get("daunce", "correlation")))
    path = scores(mlp(), None, (X, Y), (XQ, YQ), lr=0.1, variant="daunce", out=tmp_path / "s.h5", topk=5,
                  losses_out=tmp_path / "l.h5", **KW)
    s = store.read_scores(path)
    np.testing.assert_array_equal(s["indices"], np.argsort(-dense, axis=0, kind="stable")[:5].T)
    assert (tmp_path / "l.h5").exists()
    with pytest.raises(ValueError, match="give out="):
        scores(mlp(), None, (X, Y), (XQ, YQ), topk=5, **KW)


class Stream(IterableDataset):
    def __iter__(self):
        return iter([])


@pytest.mark.parametrize("call, exc, pattern", [
    (lambda: fit_losses(mlp(), Task(), (X, Y), (XQ, YQ), **KW), TypeError, "define loss"),
    (lambda: fit_losses(mlp(), LossOnly(), (X, Y), (XQ, YQ), variant="daunce_t", **KW), TypeError,
     "daunce_t records margins"),
    (lambda: fit_losses(mlp(), "classify", (X, Y), (XQ, YQ), **KW), TypeError, "task must be"),
    (lambda: fit_losses(mlp(), None, Stream(), (XQ, YQ), **KW), TypeError, "train: an IterableDataset"),
    (lambda: fit_losses(mlp(), None, (X, Y[:50]), (XQ, YQ), **KW), ValueError, r"train: the tensors hold \[50, 60\]"),
    (lambda: fit_losses(mlp(), None, (X, Y), (XQ, YQ), train_ids=np.zeros(60, int), **KW), ValueError,
     "train_ids: ids repeat"),
    (lambda: fit_losses(mlp(), None, (X, Y), (XQ, YQ), query_ids=[1, 2], **KW), ValueError,
     "query_ids: .* ids for 7 examples"),
    (lambda: fit_losses(mlp(), None, (X, Y), (XQ, YQ), query_ids=np.arange(7) + 0.5, **KW), ValueError,
     "must be integers"),
    (lambda: fit_losses(mlp(), None, (i for i in range(3)), (XQ, YQ), **KW), TypeError,
     "train: expected a Dataset"),
    (lambda: fit_losses(mlp(), None, (X, Y), (XQ, YQ), **{**KW, "K": 1}), ValueError, "K must be at least 2"),
    (lambda: fit_losses(mlp(), None, (X, Y), (XQ, YQ), variant="dance", **KW), ValueError, "unknown DAUNCE variant"),
])
def test_bad_inputs_are_one_line_errors(call, exc, pattern):
    with pytest.raises(exc, match=pattern) as info:
        call()
    assert "\n" not in str(info.value)


def test_a_diverged_fit_writes_nothing(tmp_path):
    with pytest.raises(FloatingPointError, match="lower lr"):
        fit_losses(mlp(), None, (X, Y), (XQ, YQ), lr=1e38, out=tmp_path / "l.h5", **KW)
    assert not list(tmp_path.iterdir())


def test_frozen_parameters_stay_at_theta_0():
    net = mlp()
    net[0].weight.requires_grad_(False)
    fitter = TaskFitter(net, GenericClassification(), *_data(), variant="daunce", cfg=_cfg(), device="cpu")
    fitter._y_noise = torch.zeros((2, 60), dtype=torch.long)  # set by fit(): daunce_m's labels (unused here)
    p = fitter._train_group([0, 1], _schedule(fitter), torch.full((2, 60), 0.9), 0.1, "test")
    assert "0.weight" not in p and not torch.equal(p["0.bias"][0], net[0].bias)


def _data():
    from daunce_core.api import _as_data

    return _as_data((X, Y), "train"), _as_data((XQ, YQ), "query")


def _cfg():
    from daunce_core.config import DaunceConfig

    return DaunceConfig(K=2, ratio=0.5, epochs=1, batch_size=10)


def _schedule(fitter):
    from daunce_core import perturb

    return np.stack([perturb.batch_order((0, k), perturb.subset_and_xi(0, k, 60, 0.5)[0], 1, 10) for k in (0, 1)])


# --- a causal LM through the same call, with LoRA ------------------------------------------------

def test_a_causal_lm_on_a_jsonl_of_prompt_response_pairs(tmp_path):
    from daunce_core.fit import lm as fit_lm
    from daunce_core.lm import data as textdata
    from daunce_core.lm import sequences, tiny
    from daunce_core.lm.settings import LoraFitConfig

    task = textdata.synthetic_task(n_ops=3, n_train=24, queries_per_op=2, skew=0.8)
    tok = tiny.train_tokenizer([e["prompt"] + e["response"] for e in task["train"] + task["query"]], 280)
    model = tiny.tiny_causal_lm(tok, arch="llama", hidden_size=32, num_layers=1, num_heads=2,
                                max_position_embeddings=32, seed=0)
    train = [{**e, "id": 100 + i} for i, e in enumerate(task["train"])]
    textdata.write_jsonl(tmp_path / "train.jsonl", train)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lm = LMTask(tok, max_length=32, rank=4, alpha=8, steps=3, micro_batch_size=4)
    sig = fit_losses(model, lm, tmp_path / "train.jsonl", task["query"], K=2, ratio=0.5, lr=1e-2, batch_size=4,
                     chunk_size=2, device="cpu", out=tmp_path / "l.h5")
    L = store.read_losses(tmp_path / "l.h5")
    np.testing.assert_array_equal(L.train_ids, 100 + np.arange(24))
    np.testing.assert_array_equal(L.query_ids, np.arange(len(task["query"])))
    assert L.train.shape == (2, 24) and L.attrs["config"]["rank"] == 4 and L.attrs["signal"] == "loss"
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # the LoRA fitter underneath, called directly with the same settings: the same models
    cfg = LoraFitConfig(lr=1e-2, steps=3, batch_size=4, micro_batch_size=4, rank=4, alpha=8, ratio=0.5,
                        max_length=32)
    enc = [sequences.encode_examples(tok, rows, max_length=32) for rows in (train, task["query"])]
    ref_tr, ref_q = fit_lm.perturbed_losses(model, enc[0], enc[1], [0, 1], cfg, pad_id=tok.pad_token_id)
    np.testing.assert_array_equal(sig.train, ref_tr)
    np.testing.assert_array_equal(sig.query, ref_q)
    with pytest.raises(ValueError, match="example 0 is not a dict with 'prompt' and 'response'"):
        fit_losses(model, lm, [{"question": "1+1="}], task["query"], K=2, device="cpu")


# --- bad arguments refused before any fit; inputs never overwritten (audit 4, 5, 6, 9) ---------

@pytest.fixture
def no_fit(monkeypatch):
    """Fitting fails the test: an argument error must come before the K fits, not after them."""
    from daunce_core.fit import chunks

    def fit_all(*a, **kw):
        raise AssertionError("the models were fitted before the bad argument was refused")

    monkeypatch.setattr(chunks, "fit_all", fit_all)


@pytest.mark.parametrize("kw, pattern", [
    (dict(chunk_size=0), "chunk_size must be a whole number of at least 1, got 0"),
    (dict(epochs=0), "epochs must be a whole number of at least 1, got 0"),
    (dict(batch_size=0), "batch_size must be a whole number of at least 1, got 0"),
    (dict(lr=float("nan")), "lr must be a finite number above 0, got nan"),
    (dict(lr=0.0), "lr must be a finite number above 0, got 0.0"),
    (dict(ratio=0.0), r"ratio \(the subset ratio r of Algorithm 1\) must be in \(0, 1\]"),
    (dict(rho=float("inf")), "rho must be a finite number, got inf"),
    (dict(K=4.5), "K must be at least 2"),
    (dict(mode="fast"), "mode must be one of 'vmap', 'loop', 'auto', got 'fast'"),
    (dict(lr_schedule="linear"), "lr_schedule must be one of 'constant', 'cosine'"),
])
def test_bad_fit_arguments_are_refused_before_any_fit(no_fit, kw, pattern):
    with pytest.raises(ValueError, match=pattern) as info:
        fit_losses(mlp(), None, (X, Y), (XQ, YQ), **{**KW, "lr": 0.1, **kw})
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("kw, pattern", [
    (dict(measure="corr"), "measure must be one of"),
    (dict(topk=0), "topk must be a whole number of at least 1"),
    (dict(memory_gb=0), "memory_gb .* must be a finite number of GiB above 0"),
])
def test_bad_scores_arguments_are_refused_before_any_fit(no_fit, tmp_path, kw, pattern):
    with pytest.raises(ValueError, match=pattern):
        scores(mlp(), None, (X, Y), (XQ, YQ), out=tmp_path / "s.h5", lr=0.1, **KW, **kw)
    with pytest.raises(ValueError, match="measure must be one of"):
        scores(mlp(), None, (X, Y), (XQ, YQ), measure="corr", lr=0.1, **KW)
    assert not list(tmp_path.iterdir())


def test_numpy_float64_inputs_are_cast_to_the_models_float32():
    """sklearn and numpy hand out float64 arrays; they are cast, not refused by torch."""
    ref = fit_losses(mlp(), None, (X, Y), (XQ, YQ), lr=0.1, **KW)
    got = fit_losses(mlp(), None, (X.double().numpy(), Y.numpy()), (XQ.double().numpy(), YQ.numpy()), lr=0.1, **KW)
    np.testing.assert_array_equal(got.train, ref.train)
    generic = fit_losses(mlp(), GenericClassification(), (X.double(), Y), (XQ.double(), YQ), lr=0.1, **KW)
    same = fit_losses(mlp(), GenericClassification(), (X, Y), (XQ, YQ), lr=0.1, **KW)
    np.testing.assert_array_equal(generic.train, same.train)
    small = fit_losses(mlp(), None, (X, Y.to(torch.uint8)), (XQ, YQ.to(torch.uint8)), lr=0.1, **KW)
    np.testing.assert_array_equal(small.train, ref.train)  # any integer labels: int64 class indices


@pytest.mark.parametrize("y, yq, pattern", [
    (Y.float(), YQ, "train: the labels are float32; ClassificationTask needs integer class indices"),
    (Y[:, None], YQ, r"train: the labels have shape \(60, 1\); .* shape \(60,\) \(pass y.reshape\(-1\)\)"),
    (Y, YQ + 3, r"query: label 5 is outside the model's 3 classes \(0..2\)"),
    (Y - 1, YQ, r"train: label -1 is outside the model's 3 classes"),
])
def test_bad_labels_are_one_line_errors_before_any_fit(no_fit, y, yq, pattern):
    with pytest.raises(ValueError, match=pattern) as info:
        fit_losses(mlp(), None, (X, y), (XQ, yq), lr=0.1, **KW)
    assert "\n" not in str(info.value)


def test_ids_are_int64_and_unique_naming_the_first_repeat(no_fit):
    with pytest.raises(ValueError, match=r"train_ids: id 18446744073709551615 is beyond the int64"):
        big = np.append(np.arange(59, dtype=np.uint64), np.uint64(2**64 - 1))
        fit_losses(mlp(), None, (X, Y), (XQ, YQ), train_ids=big, lr=0.1, **KW)
    with pytest.raises(ValueError, match=r"query_ids: ids repeat \(first: 9\)"):
        fit_losses(mlp(), None, (X, Y), (XQ, YQ), query_ids=[9, 4, 1, 4, 9, 2, 3], lr=0.1, **KW)


def _jsonl(path, rows, blank_after=None):
    import json

    lines = [json.dumps(r) for r in rows]
    if blank_after is not None:
        lines.insert(blank_after, "")
    path.write_text("\n".join(lines) + "\n")
    return path


def test_lm_rows_mixing_ids_and_none_are_refused_naming_the_line(tmp_path):
    rows = [{"prompt": f"{i}+1=", "response": str(i + 1), "id": 1000 + i} for i in range(6)]
    del rows[4]["id"]
    train = _jsonl(tmp_path / "train.jsonl", rows, blank_after=2)  # line 6 holds example 4
    query = _jsonl(tmp_path / "query.jsonl", rows[:2])
    # refused before the tokenizer or the model is used
    with pytest.raises(ValueError, match=r"train.jsonl, line 6: has no 'id' while other train examples have one"):
        fit_losses(nn.Linear(1, 1), LMTask(None), train, query, K=2, device="cpu")
    with pytest.raises(ValueError, match=r"query: example 1: has no 'id'"):
        fit_losses(nn.Linear(1, 1), LMTask(None), rows[:4], [rows[0], rows[4]], K=2, device="cpu")


def test_outputs_never_replace_the_jsonl_inputs(tmp_path):
    rows = [{"prompt": f"{i}+1=", "response": str(i + 1)} for i in range(4)]
    train, query = _jsonl(tmp_path / "train.jsonl", rows), _jsonl(tmp_path / "query.jsonl", rows[:2])
    before = {p: p.read_bytes() for p in (train, query)}
    lm = LMTask(None)
    for call in (lambda: fit_losses(nn.Linear(1, 1), lm, train, query, K=2, device="cpu", out=query),
                 lambda: scores(nn.Linear(1, 1), lm, train, query, K=2, device="cpu", out=tmp_path / "s.h5",
                                losses_out=train),
                 lambda: scores(nn.Linear(1, 1), lm, train, query, K=2, device="cpu", out=train),
                 lambda: scores(nn.Linear(1, 1), lm, train, query, K=2, device="cpu", losses_out=query)):
        with pytest.raises(store.StoreError, match="is the input file"):
            call()
    assert {p: p.read_bytes() for p in (train, query)} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["query.jsonl", "train.jsonl"]


class _Tuple(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 3)

    def forward(self, x):
        return self.lin(x), x


class _Dict(_Tuple):
    def forward(self, x):
        return {"logits": self.lin(x)}


class _Rank3(_Tuple):
    def forward(self, x):
        return self.lin(x)[:, None, :]


class _NoParameters(nn.Module):
    def forward(self, x):
        return x[:, :3]


@pytest.mark.parametrize("model, exc, pattern", [
    (_Tuple(), TypeError, "forward returns a tuple; ClassificationTask needs a tensor of logits"),
    (_Dict(), TypeError, "forward returns a dict"),
    (_Rank3(), ValueError, r"returns shape \(2, 1, 3\) .*needs logits \[batch, classes\]"),
    (_NoParameters(), ValueError, "the model has no parameters"),
    (nn.Linear(6, 3).bfloat16(), ValueError, "parameters are bfloat16; .*pass model.float"),
    ("not a model", TypeError, "model must be a torch.nn.Module"),
])
def test_models_the_fits_cannot_take_are_one_line_errors(model, exc, pattern, monkeypatch):
    from daunce_core.fit import chunks

    monkeypatch.setattr(chunks, "fit_all", lambda *a, **k: pytest.fail("fitted before the model was refused"))
    with pytest.raises(exc, match=pattern) as info:
        fit_losses(model, None, (X, Y), (XQ, YQ), lr=0.1, **KW)
    assert "\n" not in str(info.value)
