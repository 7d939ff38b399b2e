"""Black-box DAUNCE (Section 5, Appendix D): attribution for models whose weights are hidden.

One procedure (Algorithm 1 with the Table 2 objective, ``daunce_bb``) under two access settings:
perturbed model k is a fine-tuning job of theta_0 on ``D^k`` (:mod:`.finetune`), or theta_0 with a
prompt learned on ``D^k`` by BDPL (:mod:`.bdpl`); every loss is read from chat completions'
logprobs (:mod:`.logprobs`) and scored like any other variant. :mod:`.manifest`, :mod:`.client` and
:mod:`.cost` keep money and keys safe; :mod:`daunce_core.fit.endpoint` and
:mod:`daunce_core.fit.bdpl` are its fitters, :mod:`daunce_core.steps.blackbox` its workflow steps.
The parts and their guarantees: docs/design.md#daunce_coreblackbox-black-box-daunce."""
