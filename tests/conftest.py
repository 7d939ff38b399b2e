"""Fixtures shared across test folders: a tiny causal LM on disk for the local server, a few chat
examples to upload to it, and the miniature black-box study as a config dict.

Plain functions and constants several modules share live in ``helpers.py`` (``import helpers``):
under ``--import-mode=importlib`` (pyproject.toml) a test module cannot import ``conftest``.
"""
import json

import pytest

CHAT = "<|user|>\nhello there\n<|assistant|>\nB\n"


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory):
    """``make(text)``: saves a tiny causal LM whose tokenizer is trained on ``text`` (a chat
    template string) in a fresh folder, and returns the folder, a model the local server can serve."""

    def make(text: str = CHAT) -> str:
        import torch

        from daunce_core.lm.tiny import tiny_causal_lm, train_tokenizer

        torch.set_num_threads(1)
        d = tmp_path_factory.mktemp("base")
        tok = train_tokenizer([text] * 10, 300)
        m = tiny_causal_lm(tok, hidden_size=32, num_layers=1)
        m.save_pretrained(d)
        tok.save_pretrained(d)
        return str(d)

    return make


@pytest.fixture(scope="module")
def base(tiny_lm):
    """One tiny LM per test module, its tokenizer trained on a short chat; override in a module
    that needs another text."""
    return tiny_lm()


@pytest.fixture()
def chat_jsonl() -> bytes:
    """A fine-tuning file of 12 chat examples ("hello i" -> "B"), as the bytes one uploads."""
    return "".join(json.dumps({"messages": [{"role": "user", "content": f"hello {i}"},
                                            {"role": "assistant", "content": "B"}]}) + "\n"
                   for i in range(12)).encode()


@pytest.fixture()
def tiny_study() -> dict:
    """The miniature black-box study (K=3 subsets of 12 of 30 synthetic examples, 3 + 3 queries,
    a local backend, both access settings, free), as a ``BlackboxConfig.from_dict`` input; a
    fresh dict per test, so a test may change its top-level keys."""
    return {
        "models": ["tiny-x"], "backend": "local", "access": ["api", "strict"], "K": 3, "subset_size": 12,
        "prices": {"tiny-x": {"training": 0, "input": 0, "output": 0}},
        "data": {"source": "synthetic", "n_train": 30, "n_query_triggered": 3, "n_query_clean": 3},
        "theta0": {"hyperparameters": {"n_epochs": 3, "batch_size": 8, "learning_rate_multiplier": 3}},
        "finetune": {"hyperparameters": {"n_epochs": 1, "batch_size": 8, "learning_rate_multiplier": 1},
                     "poll_interval_s": 0.05},
        "bdpl": {"epochs": 1, "batch_size": 4, "prompt_length": 3, "sample_size": 2, "search_space": 5},
        "local": {"model": {"hidden_size": 32, "num_layers": 1, "vocab_size": 300}, "train": {"max_len": 384}},
        "figure": {"k": 3, "n_show_triggered": 1, "n_show_clean": 1, "top": 2},
    }
