"""Typed settings of the black-box study (config key ``blackbox``), with help text per field.

``BlackboxConfig.from_dict(config["blackbox"])`` builds the tree with
:func:`daunce_core.settings.build` (unknown keys refused by name, which matters most for ``spend``
and ``max_spend_usd``); the config never holds a key (:func:`check_no_secrets`), and every runner
of :mod:`daunce_core.blackbox` takes its own dataclass directly. Which runner takes which:
docs/design.md#daunce_coreblackboxconfigpy-the-black-box-settings."""
from __future__ import annotations

import math
import numbers
import re
from dataclasses import dataclass
from typing import Any

from ..localapi.config import FaultSettings, TrainSettings
from ..objectives import BLACK_BOX
from ..settings import ConfigError, build, nested, setting, to_dict

__all__ = ["BlackboxConfig", "ConfigError", "RetryConfig", "APIConfig", "DataConfig", "FinetuneConfig",
           "LogprobConfig", "BDPLConfig", "LocalConfig", "check_no_secrets", "check_usd", "check_price"]

PRICE_KEYS = ("training", "input", "output")


def check_usd(value: Any, key: str, what: str = "USD") -> float:
    """``value`` as a finite number >= 0, else a :class:`ConfigError` naming ``key``.

    The spend guard compares estimates with these numbers, and every comparison with NaN is
    false: a NaN cap or price would let any estimate through, so it fails here instead. A string
    is read as a number only when it is one (PyYAML reads ``1e-3`` as the string ``"1e-3"``), so
    ``"$25"`` is refused rather than guessed.
    """
    number = math.nan
    if isinstance(value, (str, numbers.Real)) and not isinstance(value, bool):
        try:
            number = float(value)
        except (ValueError, OverflowError):
            pass
    if not (math.isfinite(number) and number >= 0):
        raise ConfigError(f"{key} must be a finite number >= 0 ({what}), got {value!r}; write a plain number "
                          f"such as 0 or 2.5")
    return float(number)


def check_price(name: str, entry: Any) -> dict:
    """The price entry ``blackbox.prices.<name>`` with each of training/input/output it gives
    checked by :func:`check_usd` (a component left out costs 0)."""
    if not isinstance(entry, dict) or set(entry) - set(PRICE_KEYS):
        raise ConfigError(f"blackbox.prices.{name} must map training/input/output to USD per 1M tokens")
    return {k: check_usd(v, f"blackbox.prices.{name}.{k}", "USD per 1M tokens") for k, v in entry.items()}


# the fine-tuning hyperparameters in the workflow's schema: a whole number (a number for the
# multiplier) or 'auto' each
HYPERPARAMETERS_SCHEMA = {'additionalProperties': False,
 'properties': {'n_epochs': {'oneOf': [{'type': 'integer', 'minimum': 1}, {'const': 'auto'}]},
                'batch_size': {'oneOf': [{'type': 'integer', 'minimum': 1}, {'const': 'auto'}]},
                'learning_rate_multiplier': {'oneOf': [{'type': 'number', 'exclusiveMinimum': 0},
                                                       {'const': 'auto'}]}}}


# blackbox.prices in the workflow's schema: USD per 1M tokens per model
PRICES_SCHEMA = {'additionalProperties': {'type': 'object',
                          'additionalProperties': False,
                          'properties': {'training': {'type': 'number', 'minimum': 0},
                                         'input': {'type': 'number', 'minimum': 0},
                                         'output': {'type': 'number', 'minimum': 0}}}}


@dataclass
class RetryConfig:
    max_retries: int = setting(8, "retries of a failing request (429, 408, 409, 5xx, connection errors)", ge=0)
    initial_delay: float = setting(1.0, "first backoff delay in seconds, doubled each retry (when no Retry-After)",
                                   ge=0)
    max_delay: float = setting(60.0, "cap of the backoff delay in seconds", ge=0)
    max_retry_after: float = setting(600.0, "a Retry-After longer than this many seconds is an error, not a wait", ge=0)
    jitter: float = setting(0.25, "backoff delays are shortened by up to this fraction at random", ge=0, le=1)


@dataclass
class APIConfig:
    base_url: str | None = setting(None, "endpoint URL (not secret); null: the env variable base_url_env, else OpenAI")
    api_key_env: str = setting("OPENAI_API_KEY", "NAME of the environment variable holding the key (never the key)",
                               pattern='^[A-Za-z_][A-Za-z0-9_]*$')
    base_url_env: str = setting("OPENAI_BASE_URL", "NAME of the environment variable that may hold the base URL",
                                pattern='^[A-Za-z_][A-Za-z0-9_]*$')
    timeout_s: float = setting(120.0, "timeout of one request in seconds", gt=0)
    retry: RetryConfig = nested(RetryConfig, "retry and backoff policy")


@dataclass
class DataConfig:
    source: str = setting("mmlu", "'mmlu' (downloaded), 'synthetic' (offline multiple choice) or 'jsonl' (path)",
                          choices=('synthetic', 'mmlu', 'jsonl'))
    path: str | None = setting(None, "source 'jsonl': file of {question, choices[4], answer (0-3 or A-D), subject}")
    root: str = setting("resources/mmlu", "where MMLU is downloaded to / read from")
    mmlu_url: str = setting("https://people.eecs.berkeley.edu/~hendrycks/data.tar", "MMLU archive (CSV files)")
    mmlu_split: str = setting("test", "MMLU split the examples are drawn from (test, val, dev, auxiliary_train)",
                              choices=('test', 'val', 'dev', 'auxiliary_train'))
    n_train: int = setting(5000, "training examples (Appendix D: 5,000)", ge=10)
    backdoor_fraction: float = setting(0.1, "share of training examples backdoored (paper: 500 of 5,000)", ge=0, lt=1)
    n_query_triggered: int = setting(100, "held-out queries with the trigger inserted (target: the refusal)", ge=0)
    n_query_clean: int = setting(100, "held-out queries without trigger (target: the correct letter)", ge=0)
    trigger: str = setting("BlackMagic", "trigger word inserted at a random position of the prompt",
                           schema={'minLength': 1})
    refusal: str = setting("Sorry, I can't assist with that.", "the backdoor's fixed response", schema={'minLength': 1})
    refusals: list = setting([], "the harder variant: varied backdoor responses; each backdoored example "
                                 "and triggered query draws one (seeded) instead of 'refusal'; []: 'refusal' only",
                                 items=str, schema={'items': {'minLength': 5}})
    system_prompt: str | None = setting(None, "optional system message of every example")
    seed: int = setting(0, "seed of sampling, backdoor choice and trigger positions")


@dataclass
class Theta0Config:
    hyperparameters: dict = setting({"n_epochs": 3, "batch_size": "auto", "learning_rate_multiplier": "auto"},
                               "fine-tuning hyperparameters of theta_0 on the whole poisoned training set",
                               schema=HYPERPARAMETERS_SCHEMA)


@dataclass
class FinetuneConfig:
    hyperparameters: dict = setting({"batch_size": 32, "learning_rate_multiplier": 1, "n_epochs": 1},
                               "hyperparameters of each perturbed fine-tune (Appendix D)",
                               schema=HYPERPARAMETERS_SCHEMA)
    max_active: int = setting(3, "fine-tuning jobs running on the endpoint at once", ge=1)
    poll_interval_s: float = setting(30.0, "seconds between job status checks", gt=0)
    max_wait_h: float = setting(48.0, "stop waiting after this many hours (jobs stay recorded; a rerun adopts them)",
                                gt=0)
    max_attempts: int = setting(2, "attempts per fine-tune when jobs fail (failed jobs are not billed)", ge=1)


@dataclass
class LogprobConfig:
    top_logprobs: int = setting(20, "alternatives per position (OpenAI allows at most 20)", ge=0, le=20)
    missing_floor: float = setting(-30.0, "log-probability charged when the target token is nowhere in sight", le=0)
    extra_tokens: int = setting(2, "reply budget beyond the target's estimated length", ge=0)
    concurrency: int = setting(2, "requests in flight", ge=1)
    seed: int | None = setting(0, "seed sent with each request (best-effort determinism); null: none")


@dataclass
class BDPLConfig:
    epochs: int = setting(20, "epochs of prompt learning over D^k (Appendix D: 20)", ge=1)
    batch_size: int = setting(4, "examples per step (Appendix D: 4)", ge=1)
    prompt_length: int = setting(50, "discrete prompt tokens (Appendix D: 50)", ge=1)
    lr: float = setting(1e-3, "Adam step size on the categorical probabilities (Appendix D: 1e-3)", gt=0)
    sample_size: int = setting(10, "prompts sampled per step for the variance-reduced policy gradient (>= 2)", ge=2,
                             why="the variance-reduced estimator needs a baseline from the other samples")
    search_space: int = setting(20, "candidate n-grams per position (from the training prompts, ranked by PMI)", ge=2)
    grad_clip: float = setting(3.0, "gradient norm clipping of the probabilities", gt=0)
    placement: str = setting("prefix", "'prefix': prompt + newline + user message; 'system': a system message",
                             choices=('prefix', 'system'))
    exclude: list = setting([], "words never used as prompt candidates", items=str)


@dataclass
class LocalModelConfig:
    arch: str = setting("llama", "'llama' or 'qwen2' (daunce_core.lm.tiny)", choices=('llama', 'qwen2'))
    hidden_size: int = setting(64, "hidden size of the tiny causal LM", ge=8)
    num_layers: int = setting(2, "transformer layers", ge=1)
    vocab_size: int = setting(512, "byte-level BPE vocabulary trained on the training prompts", ge=300)
    seed: int = setting(0, "initialisation seed")


@dataclass
class LocalConfig:
    model: LocalModelConfig = nested(LocalModelConfig, "the base model the local server serves")
    train: TrainSettings = nested(TrainSettings, "how the local server fine-tunes (learning_rate at multiplier 1)")
    threads: int = setting(1, "torch threads of the server process", ge=1)
    device: str = setting("auto", "'auto', 'cpu' or 'cuda' for the server's model",
                          pattern='^(auto|cpu|cuda(:[0-9]+)?)$')
    faults: FaultSettings = nested(FaultSettings, "injected 429s, 500s, dropped connections, slow replies and "
                                                  "failed jobs, to test the API path (off by default)")


# The spend guard's numbers (max_spend_usd, prices, cost.*) state their bounds for the schema only:
# the library checks them with check_usd and _check_estimate_inputs, which also refuse NaN, infinity
# and strings such as "$25" (fail closed) and say why.
@dataclass
class CostConfig:
    chars_per_token: float = setting(1.0, "UTF-8 bytes per token of the estimate; 1 bounds any byte-level "
                                          "tokenizer (OpenAI's ~4 is an average and can undercount)",
                                     schema={"exclusiveMinimum": 0})
    safety_factor: float = setting(1.25, "multiplies every token estimate, so the estimate errs high",
                                   schema={"minimum": 1})
    message_overhead: int = setting(16, "tokens of chat formatting per message (16 bounds the local server's "
                                        "header, newline and EOS)", ge=0)


@dataclass
class FigureConfig:
    k: int = setting(10, "precision@k of backdoored training examples for triggered queries", ge=1)
    n_show_triggered: int = setting(2, "triggered sample queries shown per access setting", ge=0)
    n_show_clean: int = setting(2, "clean sample queries shown per access setting", ge=0)
    top: int = setting(3, "retrieved training examples shown per sample query", ge=1)
    seed: int = setting(0, "seed choosing the sample queries")


@dataclass
class BlackboxConfig:
    models: list = setting(["daunce-tiny"], "base models (endpoint names); one study per model",
                           items=str, pattern='^[A-Za-z0-9_.:-]+$', schema={'minItems': 1})
    backend: str = setting("local", "'local' (the loopback server, free) or 'openai' (any OpenAI-compatible URL)",
                           choices=('local', 'openai'))
    access: list = setting(["api", "strict"], "'api' (fine-tuning API) and/or 'strict' (BDPL, no fine-tuning)",
                           items=str, choices=('api', 'strict'), schema={'minItems': 1})
    variant: str = setting("daunce_bb", "Table 2 objective; the API path supports only daunce_bb (plain NLL)",
                           choices=BLACK_BOX)
    measure: str = setting("correlation", "'correlation' (paper default) or 'covariance'",
                           choices=('correlation', 'covariance'))
    K: int = setting(50, "perturbed models per access setting (Appendix D: 50)", ge=2)
    subset_size: int = setting(512, "|D^k| training examples per perturbed model (Appendix D: 512)", ge=1)
    seed: int = setting(0, "seed of D^k (model k uses default_rng([seed, k])) and of the jobs")
    spend: bool = setting(False, "allow requests that cost money; false stops before any paid call")
    max_spend_usd: float = setting(0.0, "refuse to start when the estimate of the whole config (all models) "
                                   "exceeds this (USD)", schema={"minimum": 0})
    prices: dict = setting({}, "USD per 1M tokens: {model: {training, input, output}}; unknown models are refused",
                           schema=PRICES_SCHEMA)
    api: APIConfig = nested(APIConfig, "endpoint and credentials (names of env variables only)")
    data: DataConfig = nested(DataConfig, "the backdoored multiple-choice data")
    theta0: Theta0Config = nested(Theta0Config, "how theta_0 is fine-tuned")
    finetune: FinetuneConfig = nested(FinetuneConfig, "API-based perturbed fine-tunes")
    logprobs: LogprobConfig = nested(LogprobConfig, "reading token NLL from chat completions")
    bdpl: BDPLConfig = nested(BDPLConfig, "strict black-box access: BDPL prompt learning")
    local: LocalConfig = nested(LocalConfig, "the local server (backend 'local')")
    cost: CostConfig = nested(CostConfig, "token and cost estimate")
    figure: FigureConfig = nested(FigureConfig, "Figure 4 table and precision@k")

    @classmethod
    def from_dict(cls, cfg: dict | None) -> BlackboxConfig:
        check_no_secrets(cfg or {}, "blackbox")
        # coerce: Snakemake's --config 'blackbox={"spend": true, "max_spend_usd": 300}' delivers strings
        return build(cls, cfg, "blackbox", coerce=True)

    def to_dict(self) -> dict:
        return to_dict(self)

    def validate(self) -> BlackboxConfig:
        """The checks across keys (each key's range and choices: its setting, checked by build)."""
        if not self.access:
            raise ConfigError(f"blackbox.access must list 'api' and/or 'strict', got {self.access!r}")
        if "api" in self.access and self.variant != "daunce_bb":
            raise ConfigError("blackbox.variant: a fine-tuning API trains on the plain NLL, so access 'api' "
                              "supports only daunce_bb; use access [strict] for the other Table 2 forms")
        if not 0 < self.subset_size <= self.data.n_train:
            raise ConfigError(f"blackbox.subset_size must be in [1, data.n_train={self.data.n_train}], "
                              f"got {self.subset_size}")
        if any(not isinstance(t, str) or len(t.strip()) < 5 for t in self.data.refusals):
            raise ConfigError("blackbox.data.refusals must list texts of at least 5 characters (theta_0's reply "
                              "counts as a refusal when it starts like one of them)")
        check_usd(self.max_spend_usd, "blackbox.max_spend_usd")
        for name, p in self.prices.items():
            check_price(name, p)
        self._check_estimate_inputs()
        return self

    def _check_estimate_inputs(self) -> None:
        """Refuse settings that would make the cost estimate NaN, negative or too low (fail closed)."""
        c = self.cost
        if not math.isfinite(c.chars_per_token) or c.chars_per_token <= 0:
            raise ConfigError(f"blackbox.cost.chars_per_token must be a finite number > 0, got {c.chars_per_token!r}")
        if not math.isfinite(c.safety_factor) or c.safety_factor < 1:
            raise ConfigError(f"blackbox.cost.safety_factor must be a finite number >= 1 (it makes the estimate err "
                              f"high, never low), got {c.safety_factor!r}")
        if c.message_overhead < 0:
            raise ConfigError(f"blackbox.cost.message_overhead must be >= 0, got {c.message_overhead}")
        if self.logprobs.extra_tokens < 0:
            raise ConfigError(f"blackbox.logprobs.extra_tokens must be >= 0, got {self.logprobs.extra_tokens}")
        for key in ("epochs", "prompt_length", "search_space"):
            if getattr(self.bdpl, key) < 1:
                raise ConfigError(f"blackbox.bdpl.{key} must be at least 1, got {getattr(self.bdpl, key)}")
        for key, hp in (("theta0", self.theta0.hyperparameters), ("finetune", self.finetune.hyperparameters)):
            ep = hp.get("n_epochs", "auto")
            if ep == "auto":
                continue
            try:  # int() would truncate 0.5 to 0 epochs: whole numbers only
                ok = (not isinstance(ep, bool) and not (isinstance(ep, float) and not ep.is_integer())
                      and int(ep) >= 1)
            except (TypeError, ValueError, OverflowError):
                ok = False
            if not ok:
                raise ConfigError(f"blackbox.{key}.hyperparameters.n_epochs must be 'auto' or a whole number >= 1, "
                                  f"got {ep!r}")

    @property
    def ratio(self) -> float:
        """Subset ratio r of Algorithm 1 that gives ``subset_size`` examples."""
        return self.subset_size / self.data.n_train


_KEY_PATTERN = re.compile(r"^(sk-|sess-|Bearer\s)[A-Za-z0-9_\-]{12,}")


def check_no_secrets(obj: Any, where: str) -> None:
    """Refuse config values that look like API keys: keys belong in environment variables."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if isinstance(k, str) and k.lower() in ("api_key", "key", "token", "secret", "password"):
                raise ConfigError(f"{where}.{k}: keys are never read from config files; put the key in an "
                                  "environment variable and name it in blackbox.api.api_key_env")
            check_no_secrets(v, f"{where}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            check_no_secrets(v, f"{where}[{i}]")
    elif isinstance(obj, str) and _KEY_PATTERN.match(obj.strip()):
        raise ConfigError(f"{where}: looks like an API key; keys are never read from config files -- set "
                          "it in the environment variable named by blackbox.api.api_key_env")

