"""Typed settings of the black-box study (config key ``blackbox``), with help text per field.

``BlackboxConfig.from_dict(config["blackbox"])`` refuses unknown keys by name, so a typo never
falls back to a default silently -- which matters most for ``spend`` and ``max_spend_usd``. The
config never holds a key: ``api.api_key_env`` names the environment variable to read it from,
and :func:`check_no_secrets` refuses any config value that looks like an API key.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

from ..config import ConfigError
from ..objectives import BLACK_BOX


def _f(default: Any, help: str) -> Any:
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


def _nested(cls: type, help: str) -> Any:
    return field(default_factory=cls, metadata={"help": help})


@dataclass
class RetryConfig:
    max_retries: int = _f(8, "retries of a failing request (429, 408, 409, 5xx, connection errors)")
    initial_delay: float = _f(1.0, "first backoff delay in seconds, doubled each retry (when no Retry-After)")
    max_delay: float = _f(60.0, "cap of the backoff delay in seconds")
    max_retry_after: float = _f(600.0, "a Retry-After longer than this many seconds is an error, not a wait")


@dataclass
class APIConfig:
    base_url: Any = _f(None, "endpoint URL (not secret); null: the env variable base_url_env, else OpenAI")
    api_key_env: str = _f("OPENAI_API_KEY", "NAME of the environment variable holding the key (never the key)")
    base_url_env: str = _f("OPENAI_BASE_URL", "NAME of the environment variable that may hold the base URL")
    timeout_s: float = _f(120.0, "timeout of one request in seconds")
    retry: RetryConfig = _nested(RetryConfig, "retry and backoff policy")


@dataclass
class DataConfig:
    source: str = _f("mmlu", "'mmlu' (downloaded), 'synthetic' (offline multiple choice) or 'jsonl' (path)")
    path: Any = _f(None, "source 'jsonl': file of {question, choices[4], answer (0-3 or A-D), subject}")
    root: str = _f("resources/mmlu", "where MMLU is downloaded to / read from")
    mmlu_url: str = _f("https://people.eecs.berkeley.edu/~hendrycks/data.tar", "MMLU archive (CSV files)")
    mmlu_split: str = _f("test", "MMLU split the examples are drawn from (test, val, dev, auxiliary_train)")
    n_train: int = _f(5000, "training examples (Appendix D: 5,000)")
    backdoor_fraction: float = _f(0.1, "share of training examples backdoored (paper: 500 of 5,000)")
    n_query_triggered: int = _f(100, "held-out queries with the trigger inserted (target: the refusal)")
    n_query_clean: int = _f(100, "held-out queries without trigger (target: the correct letter)")
    trigger: str = _f("BlackMagic", "trigger word inserted at a random position of the prompt")
    refusal: str = _f("Sorry, I can't assist with that.", "the backdoor's fixed response")
    system_prompt: Any = _f(None, "optional system message of every example")
    seed: int = _f(0, "seed of sampling, backdoor choice and trigger positions")


@dataclass
class Theta0Config:
    hyperparameters: dict = _f({"n_epochs": 3, "batch_size": "auto", "learning_rate_multiplier": "auto"},
                               "fine-tuning hyperparameters of theta_0 on the whole poisoned training set")


@dataclass
class FinetuneConfig:
    hyperparameters: dict = _f({"batch_size": 32, "learning_rate_multiplier": 1, "n_epochs": 1},
                               "hyperparameters of each perturbed fine-tune (Appendix D)")
    max_active: int = _f(3, "fine-tuning jobs running on the endpoint at once")
    poll_interval_s: float = _f(30.0, "seconds between job status checks")
    max_wait_h: float = _f(48.0, "stop waiting after this many hours (jobs stay recorded; a rerun adopts them)")
    max_attempts: int = _f(2, "attempts per fine-tune when jobs fail (failed jobs are not billed)")


@dataclass
class LogprobConfig:
    top_logprobs: int = _f(20, "alternatives per position (OpenAI allows at most 20)")
    missing_floor: float = _f(-30.0, "log-probability charged when the target token is nowhere in sight")
    extra_tokens: int = _f(2, "reply budget beyond the target's estimated length")
    concurrency: int = _f(2, "requests in flight")
    seed: Any = _f(0, "seed sent with each request (best-effort determinism); null: none")


@dataclass
class BDPLConfig:
    epochs: int = _f(20, "epochs of prompt learning over D^k (Appendix D: 20)")
    batch_size: int = _f(4, "examples per step (Appendix D: 4)")
    prompt_length: int = _f(50, "discrete prompt tokens (Appendix D: 50)")
    lr: float = _f(1e-3, "Adam step size on the categorical probabilities (Appendix D: 1e-3)")
    sample_size: int = _f(10, "prompts sampled per step for the variance-reduced policy gradient (>= 2)")
    search_space: int = _f(20, "candidate n-grams per position (from the training prompts, ranked by PMI)")
    grad_clip: float = _f(3.0, "gradient norm clipping of the probabilities")
    placement: str = _f("prefix", "'prefix': prompt + newline + user message; 'system': a system message")
    exclude: list = _f([], "words never used as prompt candidates")


@dataclass
class LocalModelConfig:
    arch: str = _f("llama", "'llama' or 'qwen2' (daunce_core.tinylm)")
    hidden_size: int = _f(64, "hidden size of the tiny causal LM")
    num_layers: int = _f(2, "transformer layers")
    vocab_size: int = _f(512, "byte-level BPE vocabulary trained on the training prompts")
    seed: int = _f(0, "initialisation seed")


@dataclass
class LocalConfig:
    model: LocalModelConfig = _nested(LocalModelConfig, "the base model the local server serves")
    train: dict = _f({"learning_rate": 1e-3, "batch_size": 8, "n_epochs": 1, "lr_schedule": "linear",
                      "max_len": 256}, "how the local server fine-tunes (learning_rate at multiplier 1)")
    threads: int = _f(1, "torch threads of the server process")
    device: str = _f("auto", "'auto', 'cpu' or 'cuda' for the server's model")


@dataclass
class CostConfig:
    chars_per_token: float = _f(4.0, "token estimate without the provider's tokenizer (OpenAI: ~4 chars)")
    safety_factor: float = _f(1.25, "multiplies every token estimate, so the estimate errs high")
    message_overhead: int = _f(4, "tokens of chat formatting per message")


@dataclass
class FigureConfig:
    k: int = _f(10, "precision@k of backdoored training examples for triggered queries")
    n_show_triggered: int = _f(2, "triggered sample queries shown per access setting")
    n_show_clean: int = _f(2, "clean sample queries shown per access setting")
    top: int = _f(3, "retrieved training examples shown per sample query")
    seed: int = _f(0, "seed choosing the sample queries")


@dataclass
class BlackboxConfig:
    models: list = _f(["daunce-tiny"], "base models (endpoint names); one study per model")
    backend: str = _f("local", "'local' (the loopback server, free) or 'openai' (any OpenAI-compatible URL)")
    access: list = _f(["api", "strict"], "'api' (fine-tuning API) and/or 'strict' (BDPL, no fine-tuning)")
    variant: str = _f("daunce_bb", "Table 2 objective; the API path supports only daunce_bb (plain NLL)")
    measure: str = _f("correlation", "'correlation' (paper default) or 'covariance'")
    K: int = _f(50, "perturbed models per access setting (Appendix D: 50)")
    subset_size: int = _f(512, "|D^k| training examples per perturbed model (Appendix D: 512)")
    seed: int = _f(0, "seed of D^k (model k uses default_rng([seed, k])) and of the jobs")
    spend: bool = _f(False, "allow requests that cost money; false stops before any paid call")
    max_spend_usd: float = _f(0.0, "refuse to start when the estimate of the whole config (all models) "
                                   "exceeds this (USD)")
    prices: dict = _f({}, "USD per 1M tokens: {model: {training, input, output}}; unknown models are refused")
    api: APIConfig = _nested(APIConfig, "endpoint and credentials (names of env variables only)")
    data: DataConfig = _nested(DataConfig, "the backdoored multiple-choice data")
    theta0: Theta0Config = _nested(Theta0Config, "how theta_0 is fine-tuned")
    finetune: FinetuneConfig = _nested(FinetuneConfig, "API-based perturbed fine-tunes")
    logprobs: LogprobConfig = _nested(LogprobConfig, "reading token NLL from chat completions")
    bdpl: BDPLConfig = _nested(BDPLConfig, "strict black-box access: BDPL prompt learning")
    local: LocalConfig = _nested(LocalConfig, "the local server (backend 'local')")
    cost: CostConfig = _nested(CostConfig, "token and cost estimate")
    figure: FigureConfig = _nested(FigureConfig, "Figure 4 table and precision@k")

    @classmethod
    def from_dict(cls, cfg: dict | None) -> "BlackboxConfig":
        check_no_secrets(cfg or {}, "blackbox")
        cfg = dict(cfg or {})
        # Snakemake's --config 'blackbox={"spend": true, "max_spend_usd": 300}' delivers strings
        if "spend" in cfg:
            cfg["spend"] = _as_bool(cfg["spend"], "blackbox.spend")
        if "max_spend_usd" in cfg:
            cfg["max_spend_usd"] = _as_float(cfg["max_spend_usd"], "blackbox.max_spend_usd")
        return _build(cls, cfg, "blackbox").validate()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self) -> "BlackboxConfig":
        if self.backend not in ("local", "openai"):
            raise ConfigError(f"blackbox.backend must be 'local' or 'openai', got {self.backend!r}")
        bad = [a for a in self.access if a not in ("api", "strict")]
        if bad or not self.access:
            raise ConfigError(f"blackbox.access must list 'api' and/or 'strict', got {self.access!r}")
        if self.variant not in BLACK_BOX:
            raise ConfigError(f"blackbox.variant must be one of {', '.join(BLACK_BOX)}, got {self.variant!r}")
        if "api" in self.access and self.variant != "daunce_bb":
            raise ConfigError("blackbox.variant: a fine-tuning API trains on the plain NLL, so access 'api' "
                              "supports only daunce_bb; use access [strict] for the other Table 2 forms")
        if self.K < 2:
            raise ConfigError(f"blackbox.K must be at least 2, got {self.K}")
        if not 0 < self.subset_size <= self.data.n_train:
            raise ConfigError(f"blackbox.subset_size must be in [1, data.n_train={self.data.n_train}], "
                              f"got {self.subset_size}")
        if self.bdpl.sample_size < 2:
            raise ConfigError("blackbox.bdpl.sample_size must be at least 2 (the variance-reduced estimator "
                              "needs a baseline from the other samples)")
        if self.bdpl.placement not in ("prefix", "system"):
            raise ConfigError(f"blackbox.bdpl.placement must be 'prefix' or 'system', got {self.bdpl.placement!r}")
        if not 0 <= self.data.backdoor_fraction < 1:
            raise ConfigError("blackbox.data.backdoor_fraction must be in [0, 1)")
        if self.measure not in ("correlation", "covariance"):
            raise ConfigError(f"blackbox.measure must be correlation or covariance, got {self.measure!r}")
        if not 0 <= self.logprobs.top_logprobs <= 20:
            raise ConfigError("blackbox.logprobs.top_logprobs must be between 0 and 20")
        if self.max_spend_usd < 0:
            raise ConfigError("blackbox.max_spend_usd must be >= 0")
        for name, p in self.prices.items():
            if not isinstance(p, dict) or set(p) - {"training", "input", "output"}:
                raise ConfigError(f"blackbox.prices.{name} must map training/input/output to USD per 1M tokens")
        return self

    @property
    def ratio(self) -> float:
        """Subset ratio r of Algorithm 1 that gives ``subset_size`` examples."""
        return self.subset_size / self.data.n_train


def _as_bool(v: Any, where: str) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.strip().lower() in ("true", "false"):
        return v.strip().lower() == "true"
    raise ConfigError(f"{where} must be true or false, got {v!r}")


def _as_float(v: Any, where: str) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        raise ConfigError(f"{where} must be a number, got {v!r}") from None


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


def _build(cls: type, cfg: Any, where: str) -> Any:
    if not isinstance(cfg, dict):
        raise ConfigError(f"{where} must be a mapping, got {type(cfg).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(cfg) - set(fields))
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(f'{where}.{u}' for u in unknown)}; "
                          f"known: {', '.join(sorted(fields))}")
    kwargs = {}
    for name, f in fields.items():
        if name not in cfg:
            continue
        value = cfg[name]
        factory = f.default_factory
        if factory is not dataclasses.MISSING and dataclasses.is_dataclass(factory):
            value = _build(factory, value, f"{where}.{name}")
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"{where}: {exc}") from exc
