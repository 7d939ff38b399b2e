"""Typed experiment settings, built from the (schema-validated) Snakemake config.

Library users need no Snakemake: ``ExperimentConfig.from_dict(yaml.safe_load(open(...)))``.
The tree is built by :func:`daunce_core.settings.build`: every field carries its meaning in
``metadata["help"]``, unknown keys and wrongly typed values are refused by name, so a typo never
silently falls back to a default.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .settings import ConfigError, build, nested, setting

__all__ = ["ConfigError", "DataConfig", "ModelConfig", "TrainConfig", "DaunceConfig", "LDSConfig",
           "ExperimentConfig", "OTHER_STAGES", "Q_FORMS", "fit_variant", "q_weighted"]

# Scoring forms fitted as another variant: "daunce_t_q" is DAUNCE-T's models scored with TRAK's Q,
# (1 - p_i(theta_0)) on the training side, applied after normalising (docs/daunce_t_factor.md).
Q_FORMS = {"daunce_t_q": "daunce_t"}


def fit_variant(variant: str) -> str:
    """The variant whose perturbed fits a method uses (``daunce_t`` for ``daunce_t_q``)."""
    return Q_FORMS.get(variant, variant)


def q_weighted(variant: str) -> bool:
    """Whether a method's scores carry TRAK's Q on the training side."""
    return variant in Q_FORMS

# Top-level config keys of stages with their own settings (validated by the workflow schema).
OTHER_STAGES = ("baselines", "llm", "blackbox", "figures", "scoring")


BUILTIN_DATASETS = ("digits", "cifar10", "imagefolder", "npz")
DATASETS_HELP = ("'digits', 'cifar10', 'imagefolder', 'npz' or a torchvision.datasets class name "
                 "(MNIST, FashionMNIST, CIFAR100, SVHN, ...)")


def torchvision_dataset(name: str) -> type | None:
    """The torchvision dataset class called ``name``, or None (imports torchvision only then)."""
    if not name.isidentifier() or name in BUILTIN_DATASETS:
        return None
    import torchvision

    cls = getattr(torchvision.datasets, name, None)
    if isinstance(cls, type) and issubclass(cls, torchvision.datasets.VisionDataset):
        return cls
    return None


def known_dataset(name: str) -> bool:
    """Whether ``data.name`` names a dataset :func:`daunce_core.data.load_dataset` can load."""
    return name in BUILTIN_DATASETS or name == "CIFAR10" or torchvision_dataset(name) is not None


@dataclass
class DataConfig:
    """The dataset and its train/query split, with stable example ids."""

    name: str = setting("digits", "dataset: 'digits' (sklearn, bundled), 'cifar10', any torchvision dataset "
                        "class ('MNIST', 'FashionMNIST', 'CIFAR100', 'SVHN', ...), 'imagefolder' "
                        "(one sub-folder per class under root) or 'npz' (root is the .npz file)")
    root: str = setting("resources/data", "folder datasets are downloaded to / read from; the image folder "
                        "for 'imagefolder'; the .npz file for 'npz'")
    n_train: int = setting(1000, "training examples (0 = all)")
    n_query: int = setting(300, "query examples (the LDS validation queries; 0 = all)")
    split_seed: int = setting(0, "seed of the train/query split (digits)")
    download: bool = setting(True, "allow downloading the dataset when it is not under root")
    image_size: int | list | None = setting(None, "resize every image to S or [H, W] (image folders with mixed sizes); "
                              "null: sizes must agree")
    manifest: str | None = setting(None, "image folder: the id manifest (relative path per id); null: "
                            "<root>/daunce_manifest.csv. Adding files never renumbers the others")


@dataclass
class ModelConfig:
    """The architecture of theta_0, of every retrain and of the perturbed models."""

    arch: str = setting("mlp", "'mlp', 'resnet9', a torchvision model name ('resnet18', ...) or a factory "
                        "'package.module:function' called with (input shape, number of classes)")
    hidden: list = setting([64], "hidden layer widths of the MLP")
    width: float = setting(1.0, "channel multiplier of ResNet-9")


@dataclass
class TrainConfig:
    """The base recipe: theta_0 and every LDS / removal retrain use it."""

    epochs: int = setting(30, "epochs")
    batch_size: int = setting(64, "minibatch size")
    optimizer: str = setting("sgd", "'sgd' (momentum) or 'adam'")
    lr: float = setting(0.05, "peak learning rate")
    momentum: float = setting(0.9, "SGD momentum")
    nesterov: bool = setting(True, "Nesterov momentum")
    weight_decay: float = setting(5e-4, "L2 weight decay")
    label_smoothing: float = setting(0.0, "label smoothing of the cross-entropy")
    lr_schedule: str = setting("linear", "'constant', 'linear' (decay to 0) or 'triangle' (warm-up then decay)")
    augment: bool = setting(False, "random flips and 2-pixel translations (images only)")
    seed: int = setting(0, "seed of theta_0's initialisation and data order")


@dataclass
class DaunceConfig:
    """The K perturbed fits of Algorithm 1 and the learning-rate search (Appendix B)."""

    K: int = setting(100, "number of perturbed models")
    ratio: float = setting(0.3, "subset ratio r of each perturbed model (Algorithm 1)")
    epochs: int = setting(1, "epochs of perturbed training over the subset D^k")
    batch_size: int = setting(64, "minibatch size of perturbed training")
    optimizer: str = setting("sgd", "'sgd' or 'adam'")
    momentum: float = setting(0.9, "SGD momentum")
    lr_grid: list = setting([1e-1, 3e-2, 1e-2, 3e-3, 1e-3], "learning rates searched (Appendix B)")
    rho: float = setting(1.0, "perturbation scale: linear-term weight 1 + rho (2 xi - 1); rho=1 is the paper")
    gamma: float = setting(1.0, "weight of the loss term of the perturbed objective")
    prox: float = setting(0.0, "L2 pull towards theta_0 (weight decay centred at theta_0)")
    seed: int = setting(0, "seed of the perturbations; model k uses default_rng([seed, k])")
    chunk_size: int = setting(50, "perturbed models trained together in one job")
    variants: list = setting(["daunce", "daunce_e", "daunce_t"], "variants to run (Tables 1 and 2), and "
                             "daunce_t_q: DAUNCE-T's fits scored with TRAK's Q, 1 - p_i(theta_0), on the "
                             "training side")
    k_curve: list = setting([5, 10, 20, 50, 100], "K values of Figure 6 (prefixes of the K models)")
    select_measure: str = setting("correlation", "measure used to select the learning rate")
    trace_every: int = setting(10, "Figure 3: log each model's gradient norm of the full objective, its ERM "
                               "term and its first-order term every N steps (and at the last); one extra "
                               "backward pass per logged step. 0 = off")


@dataclass
class LDSConfig:
    """The LDS ground truth and its evaluation (Appendix B, equations 8-9)."""

    alpha: float = setting(0.5, "subset fraction of each LDS mask")
    M: int = setting(100, "number of test masks (reported)")
    M_select: int = setting(50, "number of selection masks (every tuning: DAUNCE's learning rate, the "
                            "baselines' knobs; a mask stream disjoint from the test masks)")
    select_fraction: float = setting(0.3, "share of the queries kept for selection (a seeded choice); the "
                                     "selection masks' ground truth holds only these, the reported LDS "
                                     "only the others (the test queries)")
    seeds: int = setting(3, "retrains per mask, averaged")
    seed: int = setting(0, "seed of the masks and retrains")
    chunk_size: int = setting(100, "retrains per job")
    bootstrap: int = setting(2000, "bootstrap resamples of the queries for the 95% CI")
    threshold: dict = setting({"kind": "hard", "quantile": 0.9},
                         "score thresholding applied to every method: kind none|soft|hard|topk, "
                         "with a per-query |score| quantile (soft/hard) or k (topk)")


@dataclass
class ExperimentConfig:
    """One experiment of Section 4.1: every setting of its steps, by section."""

    experiment: str = setting("digits_mlp", "name; intermediate results go to results/<experiment>/")
    device: str = setting("auto", "'auto', 'cpu' or 'cuda'")
    data: DataConfig = nested(DataConfig)
    model: ModelConfig = nested(ModelConfig)
    base: TrainConfig = nested(TrainConfig)
    daunce: DaunceConfig = nested(DaunceConfig)
    lds: LDSConfig = nested(LDSConfig)

    @classmethod
    def from_dict(cls, cfg: dict[str, Any], *, ignore: tuple[str, ...] = OTHER_STAGES) -> "ExperimentConfig":
        """Build from a config dict; keys of other stages (``ignore``) are passed over.

        Range checks are :meth:`validate`'s (called by the workflow's steps), so a partial
        config can be built first and checked once complete.
        """
        return build(cls, cfg, "", ignore=ignore, validate=False)

    def validate(self) -> "ExperimentConfig":
        if not known_dataset(self.data.name):
            raise ConfigError(f"data.name: unknown dataset {self.data.name!r}; choose {DATASETS_HELP}")
        d = self.daunce
        if not 0.0 < d.ratio <= 1.0:
            raise ConfigError(f"daunce.ratio must be in (0, 1], got {d.ratio}")
        if d.K < 2:
            raise ConfigError(f"daunce.K must be at least 2 (a covariance needs two models), got {d.K}")
        if d.chunk_size < 1:
            raise ConfigError(f"daunce.chunk_size must be at least 1, got {d.chunk_size}")
        if d.trace_every < 0:
            raise ConfigError(f"daunce.trace_every must be 0 (off) or a number of steps, got {d.trace_every}")
        if not 0.0 < self.lds.alpha < 1.0:
            raise ConfigError(f"lds.alpha must be in (0, 1), got {self.lds.alpha}")
        if not 0.0 < self.lds.select_fraction < 1.0:
            raise ConfigError(f"lds.select_fraction must be in (0, 1) (some queries for selection, the "
                              f"rest for the reported LDS), got {self.lds.select_fraction}")
        if any(k > d.K or k < 2 for k in d.k_curve):
            raise ConfigError(f"daunce.k_curve values must lie in [2, K={d.K}], got {d.k_curve}")
        return self

