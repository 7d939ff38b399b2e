"""What the user gives DAUNCE: a :class:`Task` computes per-example losses (or margins) from a
model and a batch, in the manner of kronfluence's ``Task``; :class:`ClassificationTask` is a
classifier's, :class:`LMTask` a Hugging Face causal LM's on prompt/response pairs."""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from . import objectives as obj

__all__ = ["Task", "ClassificationTask", "LMTask"]


class Task:
    """How to compute the per-example quantities DAUNCE needs from a model and a batch.

    Override :meth:`loss`; or :meth:`logits` and :meth:`loss_from_logits` when the loss is a
    function of the model's outputs (then the first-order term is computed in logit space).
    :meth:`measurement` is the query function (default: the variant's signal); DAUNCE-T
    (``daunce_t``) needs a margin (:meth:`margin` or :meth:`margin_from_logits`). Every function
    returns one value per example of the batch, [B], and must not mix examples.
    """

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """Per-example training loss ``L_i(theta)`` [B]."""
        if _overrides(self, "logits") and _overrides(self, "loss_from_logits"):
            return self.loss_from_logits(self.logits(model, batch), batch)
        raise NotImplementedError(f"{type(self).__name__}: define loss(model, batch), or logits(model, batch) "
                                  "and loss_from_logits(logits, batch)")

    def logits(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """The model's outputs ``g(theta, x_i)`` [B, ...] that the loss is a function of (optional)."""
        raise NotImplementedError

    def loss_from_logits(self, logits: torch.Tensor, batch: Any) -> torch.Tensor:
        """``L_i`` from the outputs [B] (optional, with :meth:`logits`)."""
        raise NotImplementedError

    def margin(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """TRAK's margin ``log p / (1 - p)`` [B], the signal of ``daunce_t`` (optional)."""
        if _overrides(self, "logits") and _overrides(self, "margin_from_logits"):
            return self.margin_from_logits(self.logits(model, batch), batch)
        raise NotImplementedError(f"{type(self).__name__}: variant daunce_t records margins; define "
                                  "margin(model, batch) or margin_from_logits(logits, batch)")

    def margin_from_logits(self, logits: torch.Tensor, batch: Any) -> torch.Tensor:
        """The margin from the outputs [B] (optional, with :meth:`logits`)."""
        raise NotImplementedError

    def measurement(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """The function of a query whose attribution is sought [B] (optional)."""
        raise NotImplementedError


class ClassificationTask(Task):
    """A classifier on ``(inputs, labels)`` batches: logits ``model(inputs)``, the cross-entropy
    loss and TRAK's margin (:mod:`daunce_core.objectives`)."""

    def logits(self, model, batch):
        return model(batch[0])

    def loss_from_logits(self, logits, batch):
        return obj.cross_entropy(logits, batch[1])

    def margin_from_logits(self, logits, batch):
        return obj.margin(logits, batch[1])


@dataclasses.dataclass
class LMTask:
    """A Hugging Face causal LM on ``{"prompt", "response"[, "id"]}`` examples, LoRA fits.

    The loss is the mean response-token NLL (:mod:`daunce_core.lm.sequences`); ``steps``
    defaults to ``epochs`` passes over the subset ``D^k`` at ``batch_size``.
    """

    tokenizer: Any
    template: str = "{prompt}"
    max_length: int = 1024
    rank: int = 64
    alpha: float = 16.0
    target_modules: Any = "all-linear"
    steps: int | None = None
    micro_batch_size: int = 8
    eval_batch_size: int = 16

    def __post_init__(self) -> None:
        from .lm.data import check_template
        check_template(self.template, "LMTask.template")


def _overrides(task: Any, name: str) -> bool:
    return getattr(type(task), name, None) is not getattr(Task, name)


def _signal_fns(task: Task, signal: str) -> tuple[Callable, Callable | None]:
    """(signal(model, batch), signal_from_logits(logits, batch) or None) of a Task.

    The Task's own ``loss`` (``margin``) wins over its logit functions: it may compute more than
    a function of the outputs, so its first-order term is taken in parameter space.
    """
    if _overrides(task, signal):
        return getattr(task, signal), None
    if _overrides(task, "logits") and _overrides(task, f"{signal}_from_logits"):
        return getattr(task, signal), getattr(task, f"{signal}_from_logits")
    what = "variant daunce_t records margins; define" if signal == "margin" else "define"
    raise TypeError(f"{type(task).__name__}: {what} {signal}(model, batch), or logits(model, batch) and "
                    f"{signal}_from_logits(logits, batch)")
