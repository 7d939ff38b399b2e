"""Typed experiment settings, built from the (schema-validated) Snakemake config.

Library users need no Snakemake: ``ExperimentConfig.from_dict(yaml.safe_load(open(...)))``.
Every field carries its meaning in ``metadata["help"]``; unknown keys are refused by name so a
typo never silently falls back to a default.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


# Top-level config keys of stages with their own settings (validated by the workflow schema).
OTHER_STAGES = ("baselines", "llm", "blackbox", "figures", "scoring")


class ConfigError(ValueError):
    """A configuration value is missing, unknown or out of range; the message names the key."""


def _f(default: Any, help: str, **kw: Any) -> Any:
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


@dataclass
class DataConfig:
    name: str = _f("digits", "dataset: 'digits' (sklearn, bundled) or 'cifar10' (torchvision)")
    root: str = _f("resources/data", "folder datasets are downloaded to / read from")
    n_train: int = _f(1000, "training examples (0 = all)")
    n_query: int = _f(300, "query examples (the LDS validation queries; 0 = all)")
    split_seed: int = _f(0, "seed of the train/query split (digits)")
    download: bool = _f(True, "allow downloading the dataset when it is not under root")


@dataclass
class ModelConfig:
    arch: str = _f("mlp", "'mlp' or 'resnet9'")
    hidden: list = _f([64], "hidden layer widths of the MLP")
    width: float = _f(1.0, "channel multiplier of ResNet-9")


@dataclass
class TrainConfig:
    """The base recipe: theta_0 and every LDS / removal retrain use it."""

    epochs: int = _f(30, "epochs")
    batch_size: int = _f(64, "minibatch size")
    optimizer: str = _f("sgd", "'sgd' (momentum) or 'adam'")
    lr: float = _f(0.05, "peak learning rate")
    momentum: float = _f(0.9, "SGD momentum")
    nesterov: bool = _f(True, "Nesterov momentum")
    weight_decay: float = _f(5e-4, "L2 weight decay")
    label_smoothing: float = _f(0.0, "label smoothing of the cross-entropy")
    lr_schedule: str = _f("linear", "'constant', 'linear' (decay to 0) or 'triangle' (warm-up then decay)")
    augment: bool = _f(False, "random flips and 2-pixel translations (images only)")
    seed: int = _f(0, "seed of theta_0's initialisation and data order")


@dataclass
class DaunceConfig:
    K: int = _f(100, "number of perturbed models")
    ratio: float = _f(0.3, "subset ratio r of each perturbed model (Algorithm 1)")
    epochs: int = _f(1, "epochs of perturbed training over the subset D^k")
    batch_size: int = _f(64, "minibatch size of perturbed training")
    optimizer: str = _f("sgd", "'sgd' or 'adam'")
    momentum: float = _f(0.9, "SGD momentum")
    lr_grid: list = _f([1e-1, 3e-2, 1e-2, 3e-3, 1e-3], "learning rates searched (Appendix B)")
    rho: float = _f(1.0, "perturbation scale: linear-term weight 1 + rho (2 xi - 1); rho=1 is the paper")
    gamma: float = _f(1.0, "weight of the loss term of the perturbed objective")
    prox: float = _f(0.0, "L2 pull towards theta_0 (weight decay centred at theta_0)")
    seed: int = _f(0, "seed of the perturbations; model k uses default_rng([seed, k])")
    chunk_size: int = _f(50, "perturbed models trained together in one job")
    variants: list = _f(["daunce", "daunce_e", "daunce_t"], "variants to run")
    k_curve: list = _f([5, 10, 20, 50, 100], "K values of Figure 6 (prefixes of the K models)")
    select_measure: str = _f("correlation", "measure used to select the learning rate")


@dataclass
class LDSConfig:
    alpha: float = _f(0.5, "subset fraction of each LDS mask")
    M: int = _f(100, "number of test masks (reported)")
    M_select: int = _f(50, "number of selection masks (learning-rate search only; disjoint from the test masks)")
    seeds: int = _f(3, "retrains per mask, averaged")
    seed: int = _f(0, "seed of the masks and retrains")
    chunk_size: int = _f(100, "retrains per job")
    bootstrap: int = _f(2000, "bootstrap resamples of the queries for the 95% CI")
    threshold: dict = _f({"kind": "hard", "quantile": 0.9},
                         "score thresholding applied to every method: kind none|soft|hard|topk, "
                         "with a per-query |score| quantile (soft/hard) or k (topk)")


@dataclass
class ExperimentConfig:
    experiment: str = _f("digits_mlp", "name; intermediate results go to results/<experiment>/")
    device: str = _f("auto", "'auto', 'cpu' or 'cuda'")
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    base: TrainConfig = field(default_factory=TrainConfig)
    daunce: DaunceConfig = field(default_factory=DaunceConfig)
    lds: LDSConfig = field(default_factory=LDSConfig)

    @classmethod
    def from_dict(cls, cfg: dict[str, Any], *, ignore: tuple[str, ...] = OTHER_STAGES) -> "ExperimentConfig":
        """Build from a config dict; keys of other stages (``ignore``) are passed over."""
        return _build(cls, cfg, "config", ignore)

    def validate(self) -> "ExperimentConfig":
        d = self.daunce
        if not 0.0 < d.ratio <= 1.0:
            raise ConfigError(f"daunce.ratio must be in (0, 1], got {d.ratio}")
        if d.K < 2:
            raise ConfigError(f"daunce.K must be at least 2 (a covariance needs two models), got {d.K}")
        if d.chunk_size < 1:
            raise ConfigError(f"daunce.chunk_size must be at least 1, got {d.chunk_size}")
        if not 0.0 < self.lds.alpha < 1.0:
            raise ConfigError(f"lds.alpha must be in (0, 1), got {self.lds.alpha}")
        if any(k > d.K or k < 2 for k in d.k_curve):
            raise ConfigError(f"daunce.k_curve values must lie in [2, K={d.K}], got {d.k_curve}")
        return self


def _build(cls: type, cfg: Any, where: str, ignore: tuple[str, ...] = ()) -> Any:
    if not isinstance(cfg, dict):
        raise ConfigError(f"{where} must be a mapping, got {type(cfg).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(cfg) - set(fields) - set(ignore))
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(f'{where}.{u}'.removeprefix('config.') for u in unknown)}; "
                          f"known: {', '.join(sorted(fields))}")
    kwargs = {}
    for name, f in fields.items():
        if name not in cfg:
            continue
        value = cfg[name]
        if dataclasses.is_dataclass(f.default_factory) if f.default_factory is not dataclasses.MISSING else False:
            value = _build(f.default_factory, value, f"{where}.{name}")
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"{where}: {exc}") from exc
