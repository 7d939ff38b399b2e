"""Small helpers shared by the library: device selection and threads.

torch is imported only by the functions that use it, so a job that never touches torch (gather,
LDS, tables, figures) does not pay its import."""
from __future__ import annotations

import importlib.abc
import os
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def pick_device(pref: str = "auto") -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; ``"cpu"``/``"cuda"``/``"cuda:1"`` as given."""
    import torch

    pref = (pref or "auto").lower()
    if pref == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if pref.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {pref!r} requested but CUDA is not available on this machine")
    return torch.device(pref)


class _ThreadsOnImport(importlib.abc.MetaPathFinder):
    """Calls ``torch.set_num_threads(n)`` as soon as ``import torch`` has run, before any caller
    sees the module: the same state as setting it right after an eager import. A lookup that does
    not import (``importlib.util.find_spec("torch")``) leaves it waiting for the real import."""

    def __init__(self, n: int):
        self.n = n

    def find_spec(self, name, path=None, target=None):
        if name != "torch":
            return None
        for finder in sys.meta_path:  # the finder that would have found torch without this one
            if finder is not self and hasattr(finder, "find_spec"):
                spec = finder.find_spec(name, path, target)
                if spec is not None:
                    break
        else:
            return None
        if spec.loader is None:
            return spec
        real, hook = spec.loader, self

        class Loader(importlib.abc.Loader):
            def create_module(self, spec):
                return real.create_module(spec)

            def exec_module(self, module):
                if hook in sys.meta_path:
                    sys.meta_path.remove(hook)
                module.__loader__ = module.__spec__.loader = real  # torch sees its own loader
                real.exec_module(module)
                module.set_num_threads(hook.n)

        spec.loader = Loader()
        return spec


def set_threads(n: int | None) -> None:
    """Use ``n`` CPU threads for torch (the rule's ``threads``), never more than the machine has:
    at once when torch is loaded, else the moment it is imported (a job that never imports torch
    never loads it)."""
    if not n:
        return
    n = max(1, min(int(n), os.cpu_count() or 1))
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(n)
        return
    for f in [f for f in sys.meta_path if isinstance(f, _ThreadsOnImport)]:
        sys.meta_path.remove(f)
    sys.meta_path.insert(0, _ThreadsOnImport(n))
