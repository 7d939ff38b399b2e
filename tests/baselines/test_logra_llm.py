"""LoGra for causal LMs (dattri): scores shaped [n, m], same-operator examples score highest, and
the attributor runs on PEFT models (the LoRA and wrapped base Linear layers)."""
import copy

import numpy as np
import pytest
import torch

from daunce_core.baselines import logra_llm
from daunce_core.lm import data as textdata
from daunce_core.lm import sequences, settings, training
from daunce_core.lm import tiny as tinylm

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def trained():
    task = textdata.synthetic_task(n_ops=3, n_train=60, queries_per_op=4, skew=0.9)
    tok = tinylm.train_tokenizer([e["prompt"] + e["response"] for e in task["train"] + task["query"]],
                                 vocab_size=280)
    model = tinylm.tiny_causal_lm(tok, arch="llama", hidden_size=32, num_layers=1, num_heads=2,
                                  max_position_embeddings=32, seed=0)
    tr = sequences.encode_examples(tok, task["train"], max_length=32)
    qu = sequences.encode_examples(tok, task["query"], max_length=32)
    training.finetune(model, tr, settings.FinetuneConfig(lr=3e-3, batch_size=16, micro_batch_size=16, epochs=4,
                                               max_length=32), pad_id=tok.pad_token_id, seed=0)
    return task, tok, model, tr, qu


def test_logra_scores_favour_examples_of_the_same_operator(trained, tmp_path, monkeypatch):
    task, tok, model, tr, qu = trained
    monkeypatch.chdir(tmp_path)  # dattri must not write into the working folder
    S = logra_llm.logra_scores(model, tr, qu, pad_id=tok.pad_token_id, proj_dim=64, batch_size=16)
    assert S.shape == (len(tr), len(qu)) and np.isfinite(S).all()
    op_t = np.array([e["meta"]["op"] for e in task["train"]])
    op_q = np.array([e["meta"]["op"] for e in task["query"]])
    same = op_t[:, None] == op_q[None, :]
    assert S[same].mean() > S[~same].mean()
    assert list(tmp_path.iterdir()) == []
    S2 = logra_llm.logra_scores(model, tr, qu, pad_id=tok.pad_token_id, proj_dim=64, batch_size=16)
    np.testing.assert_allclose(S, S2, rtol=1e-4, atol=1e-4 * np.abs(S).max())  # seeded projections


def test_logra_runs_on_a_peft_model(trained):
    from peft import LoraConfig, get_peft_model

    task, tok, model, tr, qu = trained
    pm = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    names = logra_llm.linear_layer_names(pm, prefix="lm.")
    assert any("lora_B" in n for n in names) and any("base_layer" in n for n in names)
    base_layers = [n for n in names if n.endswith("base_layer")]
    S = logra_llm.logra_scores(pm, tr[:20], qu[:6], pad_id=tok.pad_token_id, proj_dim=16, batch_size=10,
                               layer_names=base_layers)
    assert S.shape == (20, 6) and np.isfinite(S).all() and np.abs(S).max() > 0
