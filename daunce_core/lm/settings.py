"""The ``llm`` section of the config as typed settings (Section 4.2 / Appendix C).

Every key of ``llm`` in ``config/config.yaml`` is a field below, with its default and a help text;
:func:`daunce_core.settings.build` makes the tree, names unknown keys with their dotted names
(``llm.daunce.rnk``) and raises :class:`daunce_core.settings.ConfigError`. Cluster resources are
not experiment facts and have no key here: they live in the workflow's profiles.
"""
from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass
from typing import Any

from .. import objectives
from ..settings import ConfigError, build, nested, setting

__all__ = ["FinetuneConfig", "LoraFitConfig", "DaunceSettings", "LLMSettings", "TASKS", "TASK_DATA"]

TASKS = ("synthetic", "math", "ifeval")
LORA_VARIANTS = tuple(v for v in objectives.VARIANTS if not objectives.is_matched(v))
# The paper's data sources per task: (training set, query set).
TASK_DATA = {"math": ("numinamath", "math"), "ifeval": ("autoif", "ifeval")}


@dataclass
class FinetuneConfig:
    """Full fine-tuning (theta_0 and every removal retrain). Paper: lr 2e-5, batch 64, 1 epoch."""

    lr: float = setting(2e-5, "peak learning rate of AdamW", gt=0)
    batch_size: int = setting(64, "examples per optimiser step", ge=1)
    micro_batch_size: int = setting(8, "examples per forward pass (gradient accumulation up to batch_size)", ge=1)
    epochs: int = setting(1, "passes over the training set", ge=1)
    weight_decay: float = setting(0.0, "AdamW weight decay", ge=0)
    warmup_ratio: float = setting(0.03, "share of the steps with a linear warm-up", ge=0, le=1)
    schedule: str = setting("cosine", "'constant', 'linear' or 'cosine' decay after the warm-up",
                            choices=('constant', 'linear', 'cosine'))
    max_grad_norm: float = setting(1.0, "gradient clipping (0 = off)", ge=0)
    max_length: int = setting(1024, "tokens per example (prompt truncated from the left first)", ge=4)
    gradient_checkpointing: bool = setting(False, "trade compute for activation memory (large models)")
    master_weights: bool = setting(True, "fp32 weights, gradients and AdamW states with bf16 compute on CUDA, "
                                         "whatever llm.dtype loads, with or without torchrun; false trains the "
                                         "loaded dtype as it is (half the memory with llm.dtype bfloat16, but "
                                         "AdamW steps below bf16's resolution are lost)")


@dataclass
class LoraFitConfig:
    """A LoRA perturbed fit (Appendix C: rank 64, alpha 16, AdamW, 30 steps, batch 64)."""

    variant: str = setting("daunce", "DAUNCE variant (objectives.VARIANTS but daunce_m, which draws a "
                           "classifier's labels)", choices=LORA_VARIANTS)
    lr: float = setting(3e-4, "initial learning rate of AdamW")
    steps: int = setting(30, "optimiser steps per perturbed model", ge=1)
    batch_size: int = setting(64, "examples per step, drawn from the subset D^k", ge=1)
    micro_batch_size: int = setting(8, "examples per forward pass", ge=1)
    rank: int = setting(64, "LoRA rank", ge=1)
    alpha: float = setting(16.0, "LoRA alpha", gt=0)
    dropout: float = setting(0.0, "LoRA dropout (0 keeps the fit deterministic)", ge=0, le=1)
    target_modules: str | list = setting("all-linear", "modules given adapters: 'all-linear' or a list of names")
    weight_decay: float = setting(0.0, "AdamW weight decay", ge=0)
    schedule: str = setting("linear", "'constant', or 'linear' or 'cosine' decay to zero over the steps "
                            "after the warm-up (the authors' code: cosine, 3% warm-up)",
                            choices=('constant', 'linear', 'cosine'))
    warmup_ratio: float = setting(0.0, "share of the steps with a linear warm-up (at least one step when > 0)",
                                  ge=0, lt=1)
    ratio: float = setting(0.3, "subset ratio r", gt=0, le=1)
    rho: float = setting(1.0, "perturbation scale (objectives.perturbed_objective)", ge=0)
    gamma: float = setting(1.0, "loss-term weight (objectives.perturbed_objective)", gt=0)
    seed: int = setting(0, "perturbation seed; model k uses default_rng([seed, k])")
    max_length: int = setting(1024, "tokens per example", ge=4)
    eval_batch_size: int = setting(16, "examples per forward pass when recording losses", ge=1)


@dataclass
class DaunceSettings(LoraFitConfig):
    """``llm.daunce``: the LoRA fit of every perturbed model, plus how many, in which chunks, at
    which learning rates, and how their losses become scores (equation 6)."""

    lr: float | None = setting(None, "not set here: each chunk's learning rate comes from lr_grid")
    K: int = setting(100, "perturbed models (Appendix C: 100)", ge=2)
    chunk_size: int = setting(10, "perturbed models per job", ge=1)
    lr_grid: list = setting([1e-3, 3e-4, 1e-4], "LoRA learning rates tried; select_lr keeps one",
                            items=float, gt=0, schema={'minItems': 1})
    measure: str = setting("correlation", "'correlation' or 'covariance' of the K losses",
                           choices=('correlation', 'covariance'))

    def validate(self) -> None:
        if self.lr is not None:
            raise ConfigError("llm.daunce.lr: the LoRA learning rates are llm.daunce.lr_grid (one value "
                              "for a single rate); remove llm.daunce.lr")

    def fit_config(self, lr: float, max_length: int) -> LoraFitConfig:
        """The fit of one learning rate; only :class:`LoraFitConfig`'s fields, as losses files record."""
        keep = {f.name: getattr(self, f.name) for f in dataclasses.fields(LoraFitConfig)}
        return LoraFitConfig(**{**keep, "lr": float(lr), "max_length": int(max_length)})


@dataclass
class SyntheticData:
    """``llm.data.synthetic``: the miniature's task (see :func:`daunce_core.lm.data.synthetic_task`)."""

    n_ops: int = setting(8, "operator symbols", ge=1)
    n_train: int = setting(320, "training examples over all operators", ge=1)
    queries_per_op: int = setting(12, "query examples per operator", ge=1)
    skew: float = setting(0.8, "geometric ratio of the training examples per operator", gt=0, le=1)
    max_operand: int = setting(9, "largest operand", ge=1)
    seed: int = setting(0, "seed of the task (and of the pre-training corpus)")
    pretrain_n: int = setting(4000, "additions in the tiny model's pre-training corpus", ge=1)

    def task_kwargs(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "pretrain_n"}


@dataclass
class SourceData:
    """``llm.data.train`` / ``llm.data.query``: a hub dataset or a local file."""

    name: str | None = setting(None, "numinamath, math, autoif or ifeval (default: the task's)",
                               choices=('numinamath', 'math', 'autoif', 'ifeval'))
    source: str | None = setting(None, "hub id or local .jsonl/.json/.parquet path (default: the name's hub id)")
    n: int = setting(0, "examples sampled (0 = all)", ge=0)
    seed: int = setting(0, "sampling seed")


@dataclass
class DataSettings:
    """``llm.data``: where the training and query sets come from."""

    synthetic: SyntheticData = nested(SyntheticData)
    train: SourceData = nested(SourceData, "the training set (math and ifeval tasks)")
    query: SourceData = nested(SourceData, "the query set (math and ifeval tasks)")


@dataclass
class TinyPretrain:
    """``llm.tiny.pretrain``: pre-training the miniature's model on additions."""

    epochs: int = setting(15, "passes over the pre-training corpus", ge=1)
    batch_size: int = setting(64, "examples per step", ge=1)
    lr: float = setting(3e-3, "peak learning rate of AdamW", gt=0)
    seed: int = setting(0, "initialisation and data-order seed")


@dataclass
class TinySettings:
    """``llm.tiny``: the miniature's pre-trained LM (when ``llm.model`` is ``tiny``)."""

    arch: str = setting("llama", "'llama' or 'qwen2'", choices=('llama', 'qwen2'))
    vocab_size: int = setting(300, "byte-level BPE vocabulary (>= 260: bytes and specials)", ge=260)
    hidden_size: int = setting(64, "hidden width", ge=8)
    num_layers: int = setting(2, "transformer blocks", ge=1)
    num_heads: int = setting(4, "attention heads", ge=1)
    max_position_embeddings: int = setting(64, "longest sequence", ge=8)
    pretrain: TinyPretrain = nested(TinyPretrain)


@dataclass
class GenerationSettings:
    """``llm.generation``: greedy decoding of the answers (the paper's evaluations are greedy)."""

    max_new_tokens: int = setting(512, "tokens generated per answer", ge=1)
    batch_size: int = setting(16, "prompts per generate call", ge=1)


@dataclass
class SelectSettings:
    """``llm.select``: judging the LoRA learning rate on the selection queries."""

    fraction: float = setting(0.3, "share of the solved queries used to pick the lr (only with several lrs)",
                              ge=0, lt=1)
    N: int = setting(500, "examples removed when judging an lr", ge=1)


@dataclass
class LograSettings:
    """``llm.logra``: the LoGra baseline (dattri)."""

    proj_dim: int = setting(4096, "per-layer projection, a perfect square (4096 = LoRA rank 64)", ge=1)
    damping: float | None = setting(None, "damping of the Fisher inverse (null: dattri's default)")
    hessian: str = setting("eFIM", "'eFIM' (LoGra) or 'Identity' (projected grad-dot)", choices=('eFIM', 'Identity'))
    batch_size: int = setting(8, "examples per backward pass", ge=1)


@dataclass
class RemovalSettings:
    """``llm.removal``: the points of Figure 2."""

    N: list = setting([500, 1000], "training examples removed, one point each (N = 0, a retrain on the "
                                   "full data, is always added)", items=int, ge=1, schema={'minItems': 1})
    methods: list = setting(["daunce", "logra", "random"], "daunce, logra and/or random",
                            items=str, choices=('daunce', 'logra', 'random'), schema={'minItems': 1})
    seed: int = setting(0, "seed of random removal, of the selection/test split and of the query cap")
    seeds: int = setting(3, "retrain seeds per point, shared by every method and N (Appendix C: 3); "
                            "they follow the full-data seeds, so N = 0 measures the retraining noise", ge=1)
    queries: int = setting(0, "test queries evaluated, a seeded choice among the solved ones (0 = all; "
                              "Appendix C: 2,000 MATH, 200 IFEval)", ge=0)


@dataclass
class LLMSettings:
    """The ``llm`` section of the config (see the ``llm`` section of ``config/config.yaml`` for every key)."""

    task: str = setting("synthetic", "synthetic (miniature), math (NuminaMath-CoT -> MATH) or ifeval "
                                     "(AutoIF -> IFEval)", choices=TASKS)
    model: str = setting("tiny", "'tiny' (pre-trained in the workflow), a hub id or a local model folder")
    dtype: str = setting("float32", "float32, bfloat16 or float16", choices=('float32', 'bfloat16', 'float16'))
    template: str = setting("{prompt}", "text around each prompt ({prompt} is replaced); the response follows")
    query_target: str = setting("reference", "a query's loss is on its 'reference' response or theta_0's "
                                             "'generated' one", choices=('reference', 'generated'))
    seeds: int = setting(3, "full-data models and every removal retrain (Appendix C: 3)", ge=1)
    data: DataSettings = nested(DataSettings)
    tiny: TinySettings = nested(TinySettings)
    finetune: FinetuneConfig = nested(FinetuneConfig)
    generation: GenerationSettings = nested(GenerationSettings)
    daunce: DaunceSettings = nested(DaunceSettings)
    select: SelectSettings = nested(SelectSettings)
    logra: LograSettings = nested(LograSettings)
    removal: RemovalSettings = nested(RemovalSettings)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> LLMSettings:
        """Build from the workflow config (its ``llm`` key); :class:`ConfigError` names bad keys."""
        return build(cls, config.get("llm"), "llm")

    def validate(self) -> LLMSettings:
        """The checks across keys (each key's range and choices: its setting, checked by build)."""
        from .data import check_template
        try:
            check_template(self.template, "llm.template")
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if self.task == "ifeval" and self.query_target == "reference":
            raise ConfigError("llm.query_target: IFEval has no reference responses; use 'generated' "
                              "(theta_0's own correct answer is the query's target)")
        if self.model == "tiny" and self.task != "synthetic":
            raise ConfigError("llm.model 'tiny' is the miniature's pre-trained toy; the math and ifeval "
                              "tasks need a hub model id or a local model folder")
        if not self.lr_grid:
            raise ConfigError("llm.daunce.lr_grid is empty; give at least one LoRA learning rate")
        return self

    # The run-level keys of llm.daunce, where the workflow reads them.
    @property
    def K(self) -> int:
        return self.daunce.K

    @property
    def chunk_size(self) -> int:
        return self.daunce.chunk_size

    @property
    def lr_grid(self) -> list:
        return self.daunce.lr_grid

    @property
    def measure(self) -> str:
        return self.daunce.measure

    def removal_seeds(self) -> list[int]:
        """The retrain seeds of every removal point: after the full-data seeds ``0..seeds-1``
        that chose the queries, so that the full-data retrain (N = 0) is not solved by selection."""
        return list(range(self.seeds, self.seeds + self.removal.seeds))

    def removal_N(self) -> list[int]:
        """The removal sizes of Figure 2 other than 0 (N = 0 is one shared full-data retrain)."""
        return sorted({int(n) for n in self.removal.N if int(n) > 0})

    def removal_points(self) -> list[tuple[str, int]]:
        """Every ``(method, N)`` of Figure 2: each method at each N > 0, and ``("none", 0)``, the
        full-data retrain shared by all methods."""
        return [(m, n) for m in self.removal.methods for n in self.removal_N()] + [("none", 0)]

    def lr_tags(self) -> list[str]:
        """The learning rates as the workflow's ``{lr}`` wildcard spells them."""
        return [f"{lr:g}" for lr in self.lr_grid]

    def gen_kw(self) -> dict[str, Any]:
        """Keyword arguments of :func:`daunce_core.lm.generation.evaluate_answers`."""
        return {"template": self.template, "max_new_tokens": self.generation.max_new_tokens,
                "batch_size": self.generation.batch_size, "max_length": self.finetune.max_length}
