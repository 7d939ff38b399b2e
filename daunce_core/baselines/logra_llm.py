"""LoGra for causal LMs through dattri's ``LoGraAttributor`` -- the LLM baseline of Figure 2.

Each Linear layer's per-example gradient of the mean response-token NLL is projected by a
Kronecker pair of Gaussian projections (``proj_dim = 64^2``, the paper's "LoRA rank 64"),
preconditioned by the projected empirical Fisher and scored ``g_query^T F^-1 g_train``
(positive = helpful); it works on plain and PEFT models alike. The LLM steps
(:mod:`daunce_core.steps.llm`) call it. Why dattri and what is projected:
docs/design.md#daunce_corebaselineslogra_llmpy-logra-for-causal-lms."""
from __future__ import annotations

import logging
import tempfile
from collections.abc import Sequence
from types import SimpleNamespace

import numpy as np
import torch
from torch import nn

from ..lm.sequences import collate, sequence_signal

log = logging.getLogger(__name__)

__all__ = ["logra_scores", "linear_layer_names"]


class _PerExampleLoss(nn.Module):
    """Wraps a causal LM so that ``forward(**batch).loss`` is the sum of per-example mean NLLs."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, input_ids, attention_mask, labels):  # noqa: D401
        logits = self.lm(input_ids=input_ids, attention_mask=attention_mask).logits
        return SimpleNamespace(loss=sequence_signal("loss", logits, labels).sum())


def _train_loss(model, batch, device):
    return model(**{k: v.to(device) for k, v in batch.items()}).loss


def _keep_model(model, checkpoint):
    return model


def linear_layer_names(model: nn.Module, prefix: str = "") -> list[str]:
    """Names of the ``nn.Linear`` modules inside the transformer blocks (not the output head).

    For a PEFT model these are the LoRA adapter's Linear modules and the wrapped base layers.
    """
    names = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and ".layers." in f".{name}" and "lm_head" not in name:
            names.append(prefix + name)
    if not names:
        raise ValueError("LoGra: the model has no nn.Linear layers inside transformer blocks "
                         "('.layers.' in the module name); pass layer names explicitly")
    return names



def logra_scores(
    model: nn.Module,
    train_enc: Sequence[dict],
    query_enc: Sequence[dict],
    *,
    pad_id: int,
    proj_dim: int = 4096,
    damping: float | None = None,
    hessian: str = "eFIM",
    batch_size: int = 8,
    layer_names: Sequence[str] | None = None,
    device=None,
) -> np.ndarray:
    """LoGra scores ``[n_train, n_query]`` (positive = the training example helps the query).

    Args:
        model: theta_0 (a ``transformers`` causal LM, plain or PEFT-wrapped).
        train_enc / query_enc: examples from :func:`daunce_core.lm.sequences.encode_examples`.
        pad_id: padding token id.
        proj_dim: projected dimension per layer, a perfect square (4096 = LoRA rank 64).
        damping: damping of the Fisher inverse (None: dattri's default, 0.1 x mean eigenvalue).
        hessian: ``"eFIM"`` (LoGra) or ``"Identity"`` (projected grad-dot).
        batch_size: examples per backward pass.
        layer_names: Linear modules to project (default :func:`linear_layer_names`).
    """
    from dattri.algorithm.logra import LoGraAttributor
    from dattri.task import AttributionTask
    from torch.utils.data import DataLoader

    device = str(device or next(model.parameters()).device)
    wrapped = _PerExampleLoss(model).to(device)
    wrapped.eval()
    for p in wrapped.parameters():
        p.requires_grad_(True)
    names = list(layer_names) if layer_names else linear_layer_names(model, prefix="lm.")

    def loader(enc):
        return DataLoader(list(enc), batch_size=batch_size, shuffle=False,
                          collate_fn=lambda items: collate(items, pad_id))

    task = AttributionTask(loss_func=_train_loss, model=wrapped, checkpoints=wrapped.state_dict(),
                           checkpoints_load_func=_keep_model)
    # dattri writes batch_metadata.json to its cache folder (the working folder by default).
    with tempfile.TemporaryDirectory(prefix="logra_") as cache:
        attributor = LoGraAttributor(task=task, layer_names=names, hessian=hessian, damping=damping,
                                     device=device, proj_dim=proj_dim, offload="cpu", cache_dir=cache)
        torch.manual_seed(0)  # the random projections
        attributor.cache(loader(train_enc))
        scores = attributor.attribute(loader(train_enc), loader(query_enc))
    scores = scores.detach().float().cpu().numpy()
    if scores.shape != (len(train_enc), len(query_enc)):
        raise RuntimeError(f"LoGra returned scores of shape {scores.shape}, expected "
                           f"({len(train_enc)}, {len(query_enc)})")
    return scores
