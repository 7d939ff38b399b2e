"""docs/tutorial.md: each ```python snippet is at most 15 lines and runs, on small data made here."""
import re
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import ROOT

SNIPPETS = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "tutorial.md").read_text(), re.S)


def test_the_tutorial_has_a_classifier_and_an_lm_snippet_of_at_most_15_lines():
    assert len(SNIPPETS) == 2
    assert "ClassificationTask" in SNIPPETS[0] and "LMTask" in SNIPPETS[1]
    assert all(len(s.strip().splitlines()) <= 15 for s in SNIPPETS)


def classifier_namespace() -> dict:
    """A trained MLP on 200 digits and 10 queries, as TensorDatasets."""
    from torch.utils.data import TensorDataset

    from daunce_core import ensemble as E
    from daunce_core.config import DataConfig, ModelConfig, TrainConfig
    from daunce_core.data import load_dataset
    from daunce_core.models import build_model

    ds = load_dataset(DataConfig(n_train=200, n_query=10))
    X, y = torch.tensor(ds.X_train), torch.tensor(ds.y_train)
    factory = lambda: build_model(ModelConfig(hidden=[32]), ds.X_train.shape[1:], 10)  # noqa: E731
    _, p, b = E.fit_from_scratch(factory, X, y, [np.arange(200)], [(0,)], TrainConfig(epochs=10, lr=0.05))
    model = factory()
    model.load_state_dict({**E.unstack(p, 0), **E.unstack(b, 0)})
    return {"model": model, "train_set": TensorDataset(X, y),
            "query_set": TensorDataset(torch.tensor(ds.X_query), torch.tensor(ds.y_query))}


def lm_namespace(folder: Path) -> dict:
    """The tiny causal LM and tokenizer, and JSONL files of prompt/response pairs in ``folder``."""
    from daunce_core.lm import data as textdata
    from daunce_core.lm import tiny

    task = textdata.synthetic_task(n_ops=3, n_train=24, queries_per_op=2, skew=0.8)
    tok = tiny.train_tokenizer([e["prompt"] + e["response"] for e in task["train"] + task["query"]], 280)
    model = tiny.tiny_causal_lm(tok, arch="llama", hidden_size=32, num_layers=1, num_heads=2,
                                max_position_embeddings=64, seed=0)
    textdata.write_jsonl(folder / "train.jsonl", task["train"])
    textdata.write_jsonl(folder / "query.jsonl", task["query"])
    return {"model": model, "tokenizer": tok}


@pytest.mark.parametrize("which", [0, 1], ids=["classifier", "lm"])
def test_the_tutorial_snippet_runs(which, tmp_path, monkeypatch, capsys):
    torch.set_num_threads(1)
    monkeypatch.chdir(tmp_path)
    namespace = classifier_namespace() if which == 0 else lm_namespace(tmp_path)
    start = time.perf_counter()
    exec(compile(SNIPPETS[which], f"docs/tutorial.md snippet {which + 1}", "exec"), namespace)
    assert time.perf_counter() - start < 30
    from daunce_core import store

    if which == 0:
        assert namespace["s"].shape == (200, 10) and np.isfinite(namespace["s"]).all()
        L = store.read_losses(tmp_path / "losses.h5")
        assert L.train.shape == (16, 200) and "most helpful" in capsys.readouterr().out
    else:
        s = store.read_scores(tmp_path / "lm_scores.h5")
        assert s["format"] == "topk" and s["indices"].shape == (6, 5)
        np.testing.assert_array_equal(s["train_ids"], np.arange(24))
