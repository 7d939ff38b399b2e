"""Black-box DAUNCE (Section 5, Appendix D): attribution for models whose weights are hidden.

Two access settings, one procedure (Algorithm 1 with the Table 2 objective, ``daunce_bb``):

* **API-based access** -- perturbed model k is a fine-tuning job of theta_0 on the subset ``D^k``
  (:mod:`.finetune`: upload, create, wait, adopt; batch 32, learning-rate multiplier 1, 1 epoch
  in the paper). The endpoint's supervised loss *is* Table 2's Hessian form: no first-order term,
  only the subset perturbs.
* **Strict access** -- no fine-tuning: perturbed "model" k is theta_0 with a discrete prompt
  learned on ``D^k`` by BDPL from log-probabilities alone (:mod:`.bdpl`).

Either way every training and query example's loss under each of the K models is read from the
chat completions' ``logprobs`` (:mod:`.logprobs`: exact when greedy decoding reproduces the
target; a target token missing from the top logprobs is charged the upper bound
``min(p_N, 1 - sum p)`` on its probability), written as a losses HDF5 file and scored by
:func:`daunce_core.scoring.score_file` like every other DAUNCE variant. The two ways of fitting
implement the fitter contract (:mod:`daunce_core.fit.contract`) as adapters over this package:
:class:`daunce_core.fit.endpoint.APIFitter` and :class:`daunce_core.fit.bdpl.BDPLFitter`.

Safety with money and keys:

* :mod:`.manifest` -- every upload, job and finished model is recorded atomically before and
  after each request; a crash or rerun adopts what exists and never launches a job twice;
* :mod:`.client` -- retries with backoff honouring ``Retry-After``; 401/403 and quota errors fail
  at once with a clear message; keys come from environment variables only and are redacted from
  every log record;
* :mod:`.cost` -- an estimate of tokens and dollars before anything is sent, and no paid request
  unless ``blackbox.spend: true`` and the estimate is within ``blackbox.max_spend_usd``.

:mod:`daunce_core.localapi` is a local OpenAI-compatible server (stdlib HTTP on loopback, a small
transformers model that fine-tunes for real) so the whole path runs offline with the real
``openai`` client; pointing it at OpenAI is a matter of base URL and key. :mod:`.config` holds the
typed settings (``blackbox`` config section) that every runner here takes directly.
:mod:`daunce_core.steps.blackbox` holds the workflow's steps,
:mod:`.backdoor` the backdoored multiple-choice data and the Figure 4 table.

Command line (no Snakemake): ``python -m daunce_core.blackbox estimate --configfile FILE``.
"""
