"""Tiny causal language models and tokenizers made on the spot, for offline runs and tests.

The embedded default cannot download a model from a hub, so it builds one: a byte-level BPE
tokenizer trained with ``tokenizers`` on the task's own text, wrapped as a
``PreTrainedTokenizerFast``, and a Llama- or Qwen2-style model from a ``transformers`` config
with random weights. Both save and load with ``save_pretrained``/``from_pretrained`` like any
hub model, so every downstream code path (PEFT, generation, the local OpenAI-compatible server)
is the one used at paper scale.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch

from .sequences import encode_examples
from .settings import FinetuneConfig
from .training import finetune

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]


def train_tokenizer(texts: Iterable[str], vocab_size: int = 1024):
    """Train a byte-level BPE tokenizer on ``texts``; returns a ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
    )


def tiny_causal_lm(
    tokenizer,
    *,
    arch: str = "llama",
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 256,
    seed: int = 0,
):
    """A randomly initialised Llama- or Qwen2-style causal LM sized for a CPU.

    ``hidden_size=64, num_layers=2`` with a 1024-token vocabulary is about 205k parameters.
    """
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config}.get(arch)
    if cls is None:
        raise ValueError(f"tiny_causal_lm: unknown arch {arch!r}; choose 'llama' or 'qwen2'")
    config = cls(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)


def pretrain(tokenizer, corpus, *, arch: str = "llama", hidden_size: int = 64, num_layers: int = 2,
             num_heads: int = 4, max_position_embeddings: int = 64, epochs: int = 15,
             batch_size: int = 64, lr: float = 3e-3, seed: int = 0):
    """A tiny causal LM pre-trained on ``corpus`` (examples with prompt/response) from scratch.

    The stand-in for a hub checkpoint in the embedded miniature: the loss is on the response
    tokens (as in every other fit of the project), AdamW with warm-up and cosine decay.
    The workflow's rule ``llm_pretrain`` logs the held-out accuracy it reaches
    (``results/<exp>/logs/llm/pretrain.log``, key ``heldout_accuracy``).
    """
    model = tiny_causal_lm(tokenizer, arch=arch, hidden_size=hidden_size, num_layers=num_layers,
                           num_heads=num_heads, max_position_embeddings=max_position_embeddings, seed=seed)
    enc = encode_examples(tokenizer, corpus, max_length=max_position_embeddings)
    cfg = FinetuneConfig(lr=lr, batch_size=batch_size, micro_batch_size=batch_size, epochs=epochs,
                         warmup_ratio=0.05, schedule="cosine", max_grad_norm=1.0,
                         max_length=max_position_embeddings)
    log = finetune(model, enc, cfg, pad_id=tokenizer.pad_token_id, seed=seed, desc="pre-train")
    return model, log
