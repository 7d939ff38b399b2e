"""The small transformers model behind the local OpenAI-compatible server.

A chat template (:func:`render_chat`), supervised fine-tuning on chat examples (:func:`train_chat`)
and generation reporting each token's logprob and ``top_logprobs`` (:func:`generate`), on any
``AutoModelForCausalLM`` saved with ``save_pretrained``; the server's :mod:`.state` calls it.
Details: docs/design.md#daunce_corelocalapimodelpy-the-local-servers-model."""
from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .config import TrainSettings

log = logging.getLogger(__name__)

Messages = Sequence[dict]


def render_chat(messages: Messages, add_generation_prompt: bool = False) -> list[tuple[str, bool]]:
    """Split a conversation into text pieces, each flagged as trained-on (assistant content).

    Every message becomes ``<|role|>\\n`` + content + ``\\n``; assistant content is followed by the
    EOS token (added by :func:`encode_chat`). With ``add_generation_prompt`` an empty assistant
    header is appended, as a chat completion request needs.
    """
    pieces: list[tuple[str, bool]] = []
    for m in messages:
        role, content = m.get("role"), m.get("content")
        if role not in ("system", "user", "assistant", "developer"):
            raise ValueError(f"unsupported message role {role!r}")
        if not isinstance(content, str):
            raise ValueError("message content must be a string (multi-part content is not supported)")
        pieces.append((f"<|{role}|>\n", False))
        pieces.append((content, role == "assistant"))
        pieces.append(("\n", False))
    if add_generation_prompt:
        pieces.append(("<|assistant|>\n", False))
    return pieces


def encode_chat(tokenizer, messages: Messages, add_generation_prompt: bool = False,
                max_len: int | None = None) -> tuple[list[int], list[int]]:
    """Token ids and labels (-100 outside assistant content) of a conversation.

    Pieces are tokenized separately and concatenated, so the assistant target always starts on a
    token boundary: the tokens the model is trained to produce are exactly those it generates.
    """
    ids = [tokenizer.bos_token_id]
    labels = [-100]
    for text, trained in render_chat(messages, add_generation_prompt):
        if not text:
            continue
        toks = tokenizer.encode(text, add_special_tokens=False)
        ids += toks
        labels += toks if trained else [-100] * len(toks)
        if trained:  # end of the assistant turn
            ids.append(tokenizer.eos_token_id)
            labels.append(tokenizer.eos_token_id)
    if max_len is not None and len(ids) > max_len:
        ids, labels = ids[-max_len:], labels[-max_len:]
    return ids, labels


# --- token strings and bytes (byte-level BPE) ---------------------------------------------------

@lru_cache(maxsize=1)
def _unicode_to_byte() -> dict[str, int]:
    """Inverse of GPT-2's byte -> printable-unicode table used by byte-level BPE."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def token_bytes(tokenizer, token_id: int) -> bytes:
    """The exact bytes a token stands for (byte-level BPE), or its UTF-8 text otherwise."""
    piece = tokenizer.convert_ids_to_tokens(int(token_id))
    table = _unicode_to_byte()
    if piece and all(ch in table for ch in piece) and piece not in tokenizer.all_special_tokens:
        return bytes(table[ch] for ch in piece)
    return tokenizer.decode([int(token_id)]).encode("utf-8")


def token_entry(tokenizer, token_id: int, logprob: float) -> dict:
    b = token_bytes(tokenizer, token_id)
    return {"token": b.decode("utf-8", errors="replace"), "logprob": float(logprob), "bytes": list(b)}


# --- generation with logprobs ---------------------------------------------------------------------

def _cache_kw() -> str:
    import inspect

    from transformers import LlamaForCausalLM

    return "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"


_CACHE_KW = _cache_kw()  # transformers >= 5.2x renamed past_key_values to cache


def _cache_of(out):
    return out["cache"] if "cache" in out else out["past_key_values"]


class ContextLengthError(ValueError):
    """The conversation does not fit the model's context (the API's ``context_length_exceeded``)."""


@dataclass
class Generation:
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top: list[list[tuple[int, float]]] = field(default_factory=list)
    finish_reason: str = "length"
    prompt_tokens: int = 0


@torch.no_grad()
def generate(model, tokenizer, messages: Messages, *, max_tokens: int = 16, temperature: float = 0.0,
             top_logprobs: int = 0, seed: int | None = None, max_len: int = 512) -> Generation:
    """Generate an assistant reply token by token with a KV cache.

    ``temperature == 0`` is greedy decoding. Reported log-probabilities are those of the model's
    untempered distribution (``log_softmax`` of the logits), whatever the sampling temperature.
    The EOS token ends the reply and, as in the chat completions API, is not reported.
    """
    device = next(model.parameters()).device
    ids, _ = encode_chat(tokenizer, messages, add_generation_prompt=True)
    if len(ids) >= max_len:
        raise ContextLengthError(f"the conversation has {len(ids)} tokens; this model's context is {max_len} "
                                 "tokens. Shorten the messages")
    gen = Generation(prompt_tokens=len(ids))
    g = torch.Generator(device="cpu")
    if seed is not None:
        g.manual_seed(int(seed))
    out = model(input_ids=torch.tensor([ids], device=device), use_cache=True)
    past, logits = _cache_of(out), out.logits[0, -1]
    for _ in range(max_tokens):
        lp = torch.log_softmax(logits.float(), dim=-1)
        if temperature and temperature > 0:
            probs = torch.softmax(logits.float() / temperature, dim=-1).cpu()
            tok = int(torch.multinomial(probs, 1, generator=g))
        else:
            tok = int(lp.argmax())
        if tok == tokenizer.eos_token_id:
            gen.finish_reason = "stop"
            break
        gen.token_ids.append(tok)
        gen.logprobs.append(float(lp[tok]))
        if top_logprobs:
            v, i = lp.topk(min(top_logprobs, lp.numel()))
            gen.top.append(list(zip(i.tolist(), v.tolist())))
        else:
            gen.top.append([])
        out = model(input_ids=torch.tensor([[tok]], device=device), use_cache=True, **{_CACHE_KW: past})
        past, logits = _cache_of(out), out.logits[0, -1]
    return gen


@torch.no_grad()
def teacher_forced_nll(model, tokenizer, messages: Messages, target: str, max_len: int = 512) -> float:
    """Exact NLL of ``target`` as the assistant reply (its tokens, not the EOS after them).

    For checking the estimates read from the chat completions API.
    """
    prompt, _ = encode_chat(tokenizer, messages, add_generation_prompt=True)
    tgt = tokenizer.encode(target, add_special_tokens=False)
    device = next(model.parameters()).device
    logits = model(input_ids=torch.tensor([prompt + tgt], device=device)).logits[0].float()
    lp = torch.log_softmax(logits[len(prompt) - 1:-1], dim=-1)
    return float(-lp.gather(-1, torch.tensor(tgt, device=device)[:, None]).sum())


# --- supervised fine-tuning -----------------------------------------------------------------------

def _collate(batch: list[tuple[list[int], list[int]]], pad_id: int, device):
    T = max(len(i) for i, _ in batch)
    ids = torch.full((len(batch), T), pad_id, dtype=torch.long)
    lab = torch.full((len(batch), T), -100, dtype=torch.long)
    att = torch.zeros((len(batch), T), dtype=torch.long)
    for r, (i, l) in enumerate(batch):
        ids[r, :len(i)] = torch.tensor(i)
        lab[r, :len(l)] = torch.tensor(l)
        att[r, :len(i)] = 1
    return ids.to(device), lab.to(device), att.to(device)


def train_chat(model, tokenizer, examples: Sequence[Messages], *, n_epochs: int, batch_size: int,
               learning_rate: float, seed: int = 0, settings: TrainSettings | None = None,
               progress: Callable[[int, int, float], None] | None = None,
               should_stop: Callable[[], bool] | None = None) -> dict:
    """Fine-tune ``model`` in place on chat examples (loss on assistant tokens only).

    Returns ``{"steps", "trained_tokens", "final_loss"}``; ``trained_tokens`` counts every token
    of every example once per epoch, as a hosted endpoint bills it.
    """
    s = settings or TrainSettings()
    device = next(model.parameters()).device
    enc = [encode_chat(tokenizer, ex, max_len=s.max_len) for ex in examples]
    enc = [e for e in enc if any(v != -100 for v in e[1])]
    if not enc:
        raise ValueError("no training example has an assistant message to learn")
    rng = np.random.default_rng(seed)
    bs = max(1, min(batch_size, len(enc)))
    steps_per_epoch = math.ceil(len(enc) / bs)
    total = steps_per_epoch * n_epochs
    opt = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=s.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, (lambda t: 1.0 - t / total) if s.lr_schedule == "linear" else (lambda t: 1.0))
    model.train()
    step, loss_v, tokens = 0, float("nan"), 0
    for _epoch in range(n_epochs):
        order = rng.permutation(len(enc))
        for b in range(steps_per_epoch):
            if should_stop is not None and should_stop():
                model.eval()
                raise InterruptedError("training cancelled")
            batch = [enc[i] for i in order[b * bs:(b + 1) * bs]]
            tokens += sum(len(i) for i, _ in batch)
            ids, lab, att = _collate(batch, tokenizer.pad_token_id, device)
            logits = model(input_ids=ids, attention_mask=att).logits[:, :-1].float()
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), lab[:, 1:].reshape(-1),
                                   ignore_index=-100)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if s.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip)
            opt.step()
            sched.step()
            step += 1
            loss_v = float(loss.detach())
            if progress is not None:
                progress(step, total, loss_v)
    model.eval()
    return {"steps": step, "trained_tokens": tokens, "final_loss": loss_v}


def load_model(path: str | Path, device: str | torch.device = "cpu"):
    """Load a model + tokenizer saved with ``save_pretrained`` (no network)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path}: no model saved there (config.json missing)")
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True).to(device)
    model.eval()
    return model, tok
