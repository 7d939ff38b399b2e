"""Causal language models for DAUNCE (Section 4.2 / Appendix C), with transformers + PEFT.

One module per concept; the imports point one way (the steps in :mod:`daunce_core.steps.llm` ->
``training``, ``generation``, ``hub``, ``tiny`` and :mod:`daunce_core.fit.lm` -> ``sequences`` ->
:mod:`daunce_core.objectives`):

* :mod:`.settings` -- the ``llm`` config section as typed settings;
* :mod:`.data` -- the synthetic miniature and the hub datasets, answer checking;
* :mod:`.sequences` -- templates, encoding, batches, per-example signals and the perturbed
  objective of a sequence in logit space;
* :mod:`.training` -- full fine-tuning and the learning-rate schedules;
* :mod:`.generation` -- greedy generation (vLLM on CUDA when installed) and answer checking;
* :mod:`.distributed` -- torchrun: FSDP2 sharding, rank slices, gathering, SLURM's re-exec;
* :mod:`.hub` -- loading and saving models and tokenizers, with one-line offline errors;
* :mod:`.tiny` -- the tiny models and tokenizers made on the spot for offline runs and tests.

The workflow steps of ``workflow/rules/llm.smk`` are :mod:`daunce_core.steps.llm`.

The LoRA perturbed fits are :class:`daunce_core.fit.lm.LoraFitter` (the fitter contract).
"""
