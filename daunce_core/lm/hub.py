"""Loading and saving causal LMs and tokenizers (the Hugging Face hub or local folders).

Offline (``HF_HUB_OFFLINE``) and without a local copy, every loader fails at once with
:class:`ModelUnavailable` and one line saying what to download and which key to point at it.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

__all__ = ["ModelUnavailable", "load_tokenizer", "load_causal_lm", "save_model"]


class ModelUnavailable(RuntimeError):
    """A model or tokenizer is neither on disk nor reachable on the Hugging Face hub."""


def _offline() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _hint(name: str) -> str:
    return (f"'{name}' is not a local folder and could not be fetched from the Hugging Face hub"
            f"{' (offline: HF_HUB_OFFLINE is set)' if _offline() else ''}; download it where there is "
            f"a network (huggingface-cli download {name} --local-dir <dir>) and set llm.model to <dir>")


def _require_reachable(name_or_path: str, filename: str) -> None:
    """Fail at once, with the one-line hint, for a hub model that is neither local nor cached while
    offline (instead of waiting for the hub client's retries)."""
    if Path(name_or_path).exists() or not _offline():
        return
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(name_or_path, filename)
    except Exception:  # not a valid repo id either
        cached = None
    if not isinstance(cached, str):
        raise ModelUnavailable(_hint(name_or_path))


def load_tokenizer(name_or_path: str):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    _require_reachable(name_or_path, "tokenizer_config.json")
    cls = AutoTokenizer
    cfg_file = Path(name_or_path) / "tokenizer_config.json"
    if cfg_file.exists():
        # A tokenizer trained with `tokenizers` (lm.tiny) must load as itself: AutoTokenizer would
        # pick the model type's class (e.g. Qwen2Tokenizer), whose pre-tokenizer splits differently.
        if json.loads(cfg_file.read_text()).get("tokenizer_class") in ("TokenizersBackend", "PreTrainedTokenizerFast"):
            cls = PreTrainedTokenizerFast
    try:
        tok = cls.from_pretrained(name_or_path)
    except (OSError, ValueError) as exc:
        raise ModelUnavailable(_hint(name_or_path)) from exc
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(name_or_path: str, *, dtype: str = "float32", device=None):
    """``AutoModelForCausalLM.from_pretrained`` with a one-line error when the weights are unreachable."""
    from transformers import AutoModelForCausalLM

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(dtype)
    if torch_dtype is None:
        raise ValueError(f"llm.dtype must be float32, bfloat16 or float16, got {dtype!r}")
    _require_reachable(name_or_path, "config.json")
    try:
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=torch_dtype)
    except (OSError, ValueError) as exc:
        raise ModelUnavailable(_hint(name_or_path)) from exc
    if device is not None:
        model.to(device)
    return model


def _new_folder(folder: Path) -> Path:
    """An empty temporary folder beside ``folder``, mode 0777 minus the umask (``mkdtemp``'s is 0700)."""
    import secrets

    for _ in range(100):
        tmp = folder.parent / f".{folder.name}.{secrets.token_hex(4)}"
        try:
            tmp.mkdir(0o777)
        except FileExistsError:
            continue
        return tmp
    raise FileExistsError(f"{folder}: could not create a temporary folder beside it")


def save_model(model, tokenizer, folder: str | os.PathLike) -> None:
    """``save_pretrained`` of model and tokenizer into ``folder``, atomically (temp folder, rename).

    Files and folders get 0666/0777 minus the umask, like the outputs of ``daunce_core.store``:
    safetensors writes the weights 0600 whatever the umask, so they are set after the save.
    """
    import shutil
    import stat

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_folder(folder)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        file_mode = stat.S_IMODE(tmp.stat().st_mode) & 0o666
        for f in tmp.rglob("*"):
            if f.is_file() and not f.is_symlink() and stat.S_IMODE(f.stat().st_mode) != file_mode:
                f.chmod(file_mode)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
