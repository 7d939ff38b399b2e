"""Small helpers shared by the library: device selection and seeding."""
from __future__ import annotations

import os

import torch


def pick_device(pref: str = "auto") -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; ``"cpu"``/``"cuda"``/``"cuda:1"`` as given."""
    pref = (pref or "auto").lower()
    if pref == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if pref.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {pref!r} requested but CUDA is not available on this machine")
    return torch.device(pref)


def set_threads(n: int | None) -> None:
    """Use ``n`` CPU threads for torch (the rule's ``threads``), never more than the machine has."""
    if n:
        torch.set_num_threads(max(1, min(int(n), os.cpu_count() or 1)))
