"""daunce_core.lm and fit.lm: response-only labels, the logit-space first-order term on sequences, LoRA
perturbed fits (bit-reproducible per (seed, k)), full fine-tuning, settings and offline errors."""
import numpy as np
import pytest
import torch

from daunce_core import objectives
from daunce_core.fit import Fitter, Signals
from daunce_core.fit import lm as fit_lm
from daunce_core.lm import generation, hub, sequences, settings, training
from daunce_core.lm import tiny as tinylm
from daunce_core.settings import ConfigError

import helpers

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny():
    return helpers.tiny_text_task(arch="qwen2", num_layers=1, seed=0)


def test_labels_cover_only_the_response_and_eos(tiny):
    task, tok, _ = tiny
    ex = task["train"][0]
    enc = sequences.encode_examples(tok, [ex], max_length=32)[0]
    p = tok(ex["prompt"])["input_ids"]
    r = tok(ex["response"], add_special_tokens=False)["input_ids"]
    assert enc["input_ids"] == p + r + [tok.eos_token_id]
    assert enc["labels"] == [-100] * len(p) + r + [tok.eos_token_id]
    batch = sequences.collate(sequences.encode_examples(tok, task["train"][:3], max_length=32), tok.pad_token_id)
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()


def test_truncation_keeps_part_of_the_response(tiny):
    _, tok, _ = tiny
    enc = sequences.encode_examples(tok, [{"prompt": "1+2+3+4+5+6+7+8=", "response": "123456789"}], max_length=8)[0]
    assert len(enc["input_ids"]) == 8
    assert sum(l != -100 for l in enc["labels"]) >= 4


def test_sequence_signal_is_mean_token_nll_over_the_response(tiny):
    task, tok, model = tiny
    enc = sequences.encode_examples(tok, task["train"][:4], max_length=32)
    batch = sequences.collate(enc, tok.pad_token_id)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    s = sequences.sequence_signal("loss", logits, batch["labels"])
    for b in range(4):
        lab = batch["labels"][b, 1:]
        m = lab != -100
        ce = torch.nn.functional.cross_entropy(logits[b, :-1][m], lab[m])
        assert torch.allclose(s[b], ce, atol=1e-5)
    np.testing.assert_allclose(sequences.per_example_signal(model, enc, pad_id=tok.pad_token_id, batch_size=3),
                               s.numpy(), atol=1e-5)


@pytest.mark.parametrize("signal", ["loss", "margin"])
def test_first_order_term_is_the_directional_derivative(signal):
    g = torch.Generator().manual_seed(0)
    B, T, V = 3, 6, 11
    logits0 = torch.randn(B, T, V, generator=g, dtype=torch.float64)
    d = torch.randn(B, T, V, generator=g, dtype=torch.float64)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[:, :2] = -100
    labels[1, 4:] = -100
    eps = 1e-2  # the signals are computed in float32
    s, s0, lin = sequences.sequence_signal_terms(signal, (logits0 + eps * d), logits0, labels)
    s_plus = sequences.sequence_signal(signal, logits0 + eps * d, labels).double()
    s_minus = sequences.sequence_signal(signal, logits0 - eps * d, labels).double()
    numeric = (s_plus - s_minus) / (2 * eps)
    torch.testing.assert_close(lin.double() / eps, numeric, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(s0, sequences.sequence_signal(signal, logits0, labels), rtol=1e-6, atol=1e-6)


def test_objective_is_zero_at_theta0():
    logits = torch.randn(2, 5, 7)
    labels = torch.randint(0, 7, (2, 5))
    for variant in [v for v in objectives.WHITE_BOX if not objectives.is_matched(v)]:  # classifiers only
        obj = sequences.sequence_objective(variant, logits, labels, logits0=logits.clone(), xi=torch.rand(2))
        assert torch.allclose(obj, torch.zeros(2), atol=1e-6), variant


def _fit_cfg(**kw):
    base = dict(variant="daunce", lr=1e-2, steps=3, batch_size=8, micro_batch_size=4, rank=4, alpha=8,
                ratio=0.5, seed=3, eval_batch_size=32)
    base.update(kw)
    return settings.LoraFitConfig(**base)


def test_lora_fit_is_bit_reproducible_alone_or_in_a_chunk(tiny):
    task, tok, model = tiny
    tr = sequences.encode_examples(tok, task["train"], max_length=32)
    qu = sequences.encode_examples(tok, task["query"], max_length=32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = _fit_cfg()
    alone_tr, alone_q = fit_lm.perturbed_losses(model, tr, qu, [2], cfg, pad_id=tok.pad_token_id)
    chunk_tr, chunk_q = fit_lm.perturbed_losses(model, tr, qu, [0, 1, 2], cfg, pad_id=tok.pad_token_id)
    np.testing.assert_array_equal(alone_tr[0], chunk_tr[2])
    np.testing.assert_array_equal(alone_q[0], chunk_q[2])
    again_tr, _ = fit_lm.perturbed_losses(model, tr, qu, [2], cfg, pad_id=tok.pad_token_id)
    np.testing.assert_array_equal(alone_tr, again_tr)
    assert not np.array_equal(chunk_tr[0], chunk_tr[2])  # models differ by k
    # the base weights are untouched and no adapter is left behind
    after = model.state_dict()
    assert set(after) == set(before)
    for k, v in before.items():
        assert torch.equal(v, after[k]), k
    # the fit moved the losses away from theta_0's
    theta0 = sequences.per_example_signal(model, tr, pad_id=tok.pad_token_id)
    assert np.abs(chunk_tr - theta0).max() > 1e-4


def test_lora_fit_reproducible_for_black_box_and_margin_variants(tiny):
    task, tok, model = tiny
    tr = sequences.encode_examples(tok, task["train"], max_length=32)
    for variant in ("daunce_t", "daunce_bb"):
        cfg = _fit_cfg(variant=variant, steps=2)
        a, _ = fit_lm.perturbed_losses(model, tr, tr[:3], [1], cfg, pad_id=tok.pad_token_id)
        b, _ = fit_lm.perturbed_losses(model, tr, tr[:3], [1], cfg, pad_id=tok.pad_token_id)
        np.testing.assert_array_equal(a, b)
        assert np.isfinite(a).all()


def test_theta0_logits_come_from_the_disabled_adapter(tiny, monkeypatch):
    """With the LoRA B matrices at zero, theta's logits equal theta_0's: the first objective is 0."""
    task, tok, model = tiny
    tr = sequences.encode_examples(tok, task["train"], max_length=32)
    seen = []
    orig = sequences.sequence_objective_terms

    def spy(variant, logits, labels, **kw):
        seen.append((logits.detach().clone(), kw["logits0"].clone()))
        return orig(variant, logits, labels, **kw)

    monkeypatch.setattr(sequences, "sequence_objective_terms", spy)
    fit_lm.perturbed_fit(model, tr, 0, _fit_cfg(steps=2), pad_id=tok.pad_token_id)
    first, first0 = seen[0]
    torch.testing.assert_close(first, first0)
    last, last0 = seen[-1]
    assert (last - last0).abs().max() > 0  # after a step the adapter moves the logits


def test_finetune_lowers_the_loss_and_is_seeded(tiny):
    task, tok, _ = tiny
    enc = sequences.encode_examples(tok, task["train"], max_length=32)
    cfg = settings.FinetuneConfig(lr=3e-3, batch_size=16, micro_batch_size=8, epochs=3, max_length=32)
    outs = []
    for _ in range(2):
        m = tinylm.tiny_causal_lm(tok, arch="llama", hidden_size=32, num_layers=1, num_heads=2,
                                  max_position_embeddings=32, seed=1)
        before = sequences.per_example_signal(m, enc, pad_id=tok.pad_token_id).mean()
        training.finetune(m, enc, cfg, pad_id=tok.pad_token_id, seed=0)
        outs.append(sequences.per_example_signal(m, enc, pad_id=tok.pad_token_id))
    assert outs[0].mean() < before - 0.5
    np.testing.assert_array_equal(outs[0], outs[1])


def test_generate_and_check(tiny):
    task, tok, model = tiny
    correct, resp = generation.evaluate_answers(model, tok, "synthetic", task["query"][:5], max_new_tokens=3,
                                         batch_size=4, max_length=32)
    assert correct.shape == (5,) and len(resp) == 5 and all(isinstance(r, str) for r in resp)


def test_settings_refuse_unknown_keys_and_bad_combinations():
    with pytest.raises(ValueError, match="llm.daunce.rnk"):
        settings.LLMSettings.from_config({"llm": {"daunce": {"rnk": 3}}})
    with pytest.raises(ValueError, match="llm.colour"):
        settings.LLMSettings.from_config({"llm": {"colour": 1}})
    with pytest.raises(ValueError, match="generated"):
        settings.LLMSettings.from_config({"llm": {"task": "ifeval", "model": "x", "query_target": "reference"}})
    s = settings.LLMSettings.from_config({"llm": {"daunce": {"K": 5, "lr_grid": [1e-3, 1e-4], "rank": 4}}})
    assert s.K == 5 and s.daunce.rank == 4 and s.lr_tags() == ["0.001", "0.0001"]


def test_settings_are_typed_and_leave_resources_to_the_profiles():
    with pytest.raises(ConfigError, match="llm.resources"):  # cluster resources are no experiment fact
        settings.LLMSettings.from_config({"llm": {"resources": {"gpu": 1}}})
    with pytest.raises(ConfigError, match="llm.removal.N must be a list"):
        settings.LLMSettings.from_config({"llm": {"removal": {"N": 3}}})
    with pytest.raises(ConfigError, match="llm.daunce.lr_grid"):  # the grid sets each fit's lr
        settings.LLMSettings.from_config({"llm": {"daunce": {"lr": 1e-3}}})
    with pytest.raises(ConfigError, match="llm.tiny.pretrain.epoch"):
        settings.LLMSettings.from_config({"llm": {"tiny": {"pretrain": {"epoch": 3}}}})
    s = settings.LLMSettings.from_config({"llm": {"daunce": {"alpha": 16, "K": 4}, "generation": {"batch_size": 2}}})
    assert s.generation.max_new_tokens == 512 and s.gen_kw()["batch_size"] == 2  # defaults kept per key
    fit = s.daunce.fit_config(1e-3, 64)
    assert type(fit) is settings.LoraFitConfig and fit.lr == 1e-3 and fit.max_length == 64
    assert fit.alpha == 16.0 and not hasattr(fit, "K")


def test_lora_fitter_follows_the_fitter_contract(tiny):
    task, tok, model = tiny
    tr = sequences.encode_examples(tok, task["train"], max_length=32)
    qu = sequences.encode_examples(tok, task["query"], max_length=32)
    cfg = _fit_cfg(lr=1.0)  # fit() sets the learning rate
    fitter = fit_lm.LoraFitter(model, tr, qu, cfg, pad_id=tok.pad_token_id,
                               train_ids=[e["id"] + 100 for e in task["train"]])
    assert isinstance(fitter, Fitter) and fitter.variant == "daunce"
    sig = fitter.fit([1, 2], 1e-2)
    assert isinstance(sig, Signals) and sig.train.shape == (2, len(tr)) and sig.query.shape == (2, len(qu))
    np.testing.assert_array_equal(sig.model_index, [1, 2])
    np.testing.assert_array_equal(sig.train_ids, [e["id"] + 100 for e in task["train"]])
    np.testing.assert_array_equal(sig.query_ids, np.arange(len(qu)))
    assert sig.signal == "loss" and sig.attrs["config"]["lr"] == 1e-2 and not sig.diverged().any()
    ref_tr, ref_q = fit_lm.perturbed_losses(model, tr, qu, [2], _fit_cfg(), pad_id=tok.pad_token_id)
    np.testing.assert_array_equal(sig.train[1], ref_tr[0])  # the same model k at the same lr
    np.testing.assert_array_equal(sig.query[1], ref_q[0])


def test_model_loading_offline_says_what_to_do(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(hub.ModelUnavailable, match="huggingface-cli download"):
        hub.load_causal_lm("Qwen/Qwen2.5-7B")
    with pytest.raises(hub.ModelUnavailable, match="offline"):
        hub.load_tokenizer("Qwen/Qwen2.5-7B")


def test_saved_tiny_model_reloads_with_the_same_tokenizer(tiny, tmp_path):
    task, tok, model = tiny
    hub.save_model(model, tok, tmp_path / "m")
    tok2 = hub.load_tokenizer(str(tmp_path / "m"))
    m2 = hub.load_causal_lm(str(tmp_path / "m"))
    for ex in task["train"][:10]:
        assert tok2(ex["prompt"] + ex["response"])["input_ids"] == tok(ex["prompt"] + ex["response"])["input_ids"]
    enc = sequences.encode_examples(tok, task["train"][:6], max_length=32)
    np.testing.assert_allclose(sequences.per_example_signal(m2, enc, pad_id=tok.pad_token_id),
                               sequences.per_example_signal(model, enc, pad_id=tok.pad_token_id), atol=1e-6)


def test_select_lr_without_selection_queries_keeps_the_first_usable_lr_of_the_grid(tmp_path):
    from daunce_core import store
    from daunce_core.steps import llm as steps

    s = settings.LLMSettings.from_config({"llm": {"daunce": {"K": 2, "lr_grid": [1e-2, 3e-3, 1e-3]}}})
    paths = []
    for j, lr in enumerate(s.lr_grid):
        attrs = {"variant": "daunce", "signal": "loss", "seed": 0, "config": {"lr": lr}}
        p = tmp_path / f"lr{j}.h5"
        if j == 0:
            store.write_diverged(p, attrs, "too large")
        else:
            rng = np.random.default_rng(j)
            store.write_losses(p, store.Losses(rng.random((2, 5)), rng.random((2, 3)), np.arange(2), np.arange(5),
                                               np.arange(3), attrs))
        paths.append(p)
    (tmp_path / "eval.json").write_text('{"select_queries": [], "test_queries": [0, 1, 2]}')
    lr = steps.select_lr(s, paths, s.lr_tags(), tmp_path / "eval.json", "unused", None, None,
                         tmp_path / "losses.h5", tmp_path / "selection.json", "cpu")
    assert lr == 3e-3  # no retraining: the grid's order decides, and the diverged 1e-2 is skipped
    np.testing.assert_array_equal(store.read_losses(tmp_path / "losses.h5").train,
                                  store.read_losses(paths[1]).train)


def test_lora_fit_traces_the_objective_terms_per_step(tiny, tmp_path):
    """Figure 3's data: per-step batch means of the full objective, the ERM term and the first-order
    term. At step 1 the adapter is still zero (theta = theta_0), so the first-order term is 0 and the
    ERM term is theta_0's mean loss over the first batch; afterwards theta has moved."""
    from daunce_core import perturb, store

    task, tok, model = tiny
    tr = sequences.encode_examples(tok, task["train"], max_length=32)
    cfg = _fit_cfg(steps=4)
    sig = fit_lm.LoraFitter(model, tr, tr[:5], cfg, pad_id=tok.pad_token_id).fit([0, 1], cfg.lr)
    t = sig.trace
    np.testing.assert_array_equal(t["step"], [1, 2, 3, 4])
    for term in fit_lm.TRACE_TERMS:
        assert t[term].shape == (2, 4) and np.isfinite(t[term]).all(), term
    np.testing.assert_allclose(t["total"], t["erm"] + t["first_order"], rtol=1e-12)
    np.testing.assert_allclose(t["first_order"][:, 0], 0.0, atol=1e-6)
    assert np.abs(t["first_order"][:, 1:]).max() > 1e-6
    theta0 = sequences.per_example_signal(model, tr, pad_id=tok.pad_token_id)
    for row, k in enumerate([0, 1]):
        subset, _ = perturb.subset_and_xi(cfg.seed, k, len(tr), cfg.ratio)
        first = perturb.batch_order((cfg.seed, k), subset, 1, min(cfg.batch_size, len(subset)))[0]
        assert t["erm"][row, 0] == pytest.approx(theta0[first].mean(), rel=1e-5)

    # written beside the signals in the chunk's losses file, read back stacked along K
    paths = []
    for j, ks in enumerate(([0, 1], [2])):
        s = sig if j == 0 else fit_lm.LoraFitter(model, tr, tr[:5], cfg, pad_id=tok.pad_token_id).fit(ks, cfg.lr)
        p = tmp_path / f"chunk{j}.h5"
        store.write_losses(p, store.Losses(s.train, s.query, s.model_index, s.train_ids, s.query_ids, s.attrs))
        fit_lm.write_trace(p, s)
        paths.append(p)
    back = fit_lm.read_trace(paths)
    np.testing.assert_array_equal(back["model_index"], [0, 1, 2])
    np.testing.assert_array_equal(back["erm"][:2], t["erm"])
    assert back["total"].shape == (3, 4)
    assert store.read_losses(paths[0]).K == 2  # the trace group leaves the losses readable
    store.write_losses(tmp_path / "bare.h5", store.read_losses(paths[1]))
    with pytest.raises(ValueError, match="no per-step trace"):
        fit_lm.read_trace(tmp_path / "bare.h5")

    bb = fit_lm.LoraFitter(model, tr, tr[:5], _fit_cfg(variant="daunce_bb", steps=2), pad_id=tok.pad_token_id)
    tb = bb.fit([0], 1e-2).trace
    assert (tb["first_order"] == 0).all() and np.array_equal(tb["total"], tb["erm"])


def test_lora_schedule_cosine_with_warmup_is_the_authors_and_changes_the_fit(tiny):
    """The authors' LoRA schedule (cosine, 3% warm-up) ramps up in its first step, decays to zero,
    and is what the fit runs: the losses differ from the default linear schedule's."""
    f = training.lr_lambda("cosine", 30, training.warmup_steps(0.03, 30))
    assert training.warmup_steps(0.03, 30) == 1 and training.warmup_steps(0.0, 30) == 0
    assert f(0) == 1.0 and f(1) == 1.0 and f(29) < 0.01 and f(15) < f(5)
    with pytest.raises(ValueError, match="warmup_ratio"):
        training.warmup_steps(1.0, 30)
    task, tok, model = tiny
    tr = sequences.encode_examples(tok, task["train"], max_length=32)
    qu = sequences.encode_examples(tok, task["query"], max_length=32)
    lin, _ = fit_lm.perturbed_losses(model, tr, qu, [0], _fit_cfg(), pad_id=tok.pad_token_id)
    cos, _ = fit_lm.perturbed_losses(model, tr, qu, [0], _fit_cfg(schedule="cosine", warmup_ratio=0.03),
                                     pad_id=tok.pad_token_id)
    assert np.abs(lin - cos).max() > 1e-6
