"""Causal language models for DAUNCE (Section 4.2 / Appendix C), with transformers + PEFT.

One module per concept (:mod:`.settings`, :mod:`.data`, :mod:`.sequences`, :mod:`.training`,
:mod:`.generation`, :mod:`.distributed`, :mod:`.hub`, :mod:`.tiny`), the imports pointing one way
(:mod:`daunce_core.steps.llm` and :mod:`daunce_core.fit.lm` -> the modules here ->
:mod:`daunce_core.objectives`). The LoRA perturbed fits are :class:`daunce_core.fit.lm.LoraFitter`.
What each module holds: docs/design.md#daunce_corelm-causal-language-models."""
