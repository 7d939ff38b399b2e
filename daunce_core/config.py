"""Typed experiment settings, built from the (schema-validated) Snakemake config.

Library users need no Snakemake: ``ExperimentConfig.from_dict(yaml.safe_load(open(...)))``.
The tree is built by :func:`daunce_core.settings.build`: every field carries its meaning in
``metadata["help"]``, unknown keys and wrongly typed values are refused by name, so a typo never
silently falls back to a default. Each field also declares its range or choices (``ge=``,
``choices=``, ...), from which workflow/schemas/config.schema.yaml is generated
(``daunce_core.schema.workflow_schema``); :meth:`ExperimentConfig.validate` applies them, so ``daunce fit``, the
library and the workflow refuse the same values.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .settings import ConfigError, build, check_limits, nested, setting, to_dict

__all__ = ["ConfigError", "DataConfig", "ModelConfig", "TrainConfig", "DaunceConfig", "LDSConfig",
           "StudyConfig", "StudySetting", "ExperimentConfig", "study_setting_config", "OTHER_STAGES", "Q_FORMS",
           "fit_variant", "q_weighted", "MislabelConfig", "ApiDefaults", "DEFAULTS", "MEASURES", "OPTIONS",
           "api_options"]

# Scoring forms fitted as another variant: "daunce_t_q" is DAUNCE-T's models scored with TRAK's Q,
# (1 - p_i(theta_0)) on the training side, applied after normalising (docs/daunce_t_factor.md).
Q_FORMS = {"daunce_t_q": "daunce_t"}


def fit_variant(variant: str) -> str:
    """The variant whose perturbed fits a method uses (``daunce_t`` for ``daunce_t_q``)."""
    return Q_FORMS.get(variant, variant)


def q_weighted(variant: str) -> bool:
    """Whether a method's scores carry TRAK's Q on the training side."""
    return variant in Q_FORMS

# choices of daunce.lr_schedule and daunce.first_order (the first of each is the default)
LR_SCHEDULES = ("constant", "cosine")
FIRST_ORDER = ("margin", "cross_entropy")
OPTIMIZERS = ("sgd", "adam")
# daunce.variants: the perturbed objectives (daunce_core.objectives.VARIANTS, which imports torch)
# and the scoring forms of Q_FORMS
VARIANTS = ("daunce", "daunce_e", "daunce_t", *Q_FORMS, "daunce_m", "daunce_bb", "daunce_e_bb", "daunce_t_bb")
# matched-noise DAUNCE (docs/matched_noise.md): its own scale, damping and subset ratio, and covariance
MATCHED_VARIANTS = ("daunce_m",)

# Top-level config keys of stages with their own settings (validated by the workflow schema).
OTHER_STAGES = ("baselines", "llm", "blackbox", "figures", "scoring")


BUILTIN_DATASETS = ("digits", "cifar10", "imagefolder", "npz", "fashion_mnist")
DATASETS_HELP = ("'digits', 'cifar10', 'fashion_mnist' (offline), 'imagefolder', 'npz' or a torchvision.datasets "
                 "class name (MNIST, FashionMNIST, CIFAR100, SVHN, ...)")


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

    name: str = setting("digits",
                        required=True, help="dataset: 'digits' (sklearn, bundled), 'cifar10', any torchvision dataset "
                        "class ('MNIST', 'FashionMNIST', 'CIFAR100', 'SVHN', ...), 'imagefolder' "
                        "(one sub-folder per class under root) or 'npz' (root is the .npz file)")
    root: str = setting("resources/data",
                        fill=True, help="folder datasets are downloaded to / read from; the image folder "
                        "for 'imagefolder'; the .npz file for 'npz'")
    n_train: int = setting(1000, "training examples (0 = all)", ge=0, why="0 = all")
    n_query: int = setting(300, "query examples (the LDS validation queries; 0 = all)", ge=0, why="0 = all")
    split_seed: int = setting(0, "seed of the train/query split (digits)")
    download: bool = setting(True, "allow downloading the dataset when it is not under root")
    image_size: int | list | None = setting(None, "resize every image to S or [H, W] (image folders with mixed sizes); "
                              "null: sizes must agree", ge=1, items=int, schema={'minItems': 2, 'maxItems': 2})
    manifest: str | None = setting(None, "image folder: the id manifest (relative path per id), never "
                            "written into the image folder; null: results/<experiment>/data/manifest.csv. "
                            "Adding files never renumbers the others")
    idx_dir: str = setting("/usr/share/datasets/fashion-mnist", "fashion_mnist: the folder of its four idx .gz "
                           "files (Debian package dataset-fashion-mnist)")
    pad: int = setting(0, "fashion_mnist: zero pixels added on every side (2: 28x28 -> 32x32)", ge=0)


@dataclass
class ModelConfig:
    """The architecture of theta_0, of every retrain and of the perturbed models."""

    arch: str = setting("mlp",
                        required=True, help="'mlp', 'resnet9', a torchvision model name ('resnet18', ...) or a factory "
                        "'package.module:function' called with (input shape, number of classes)")
    hidden: list = setting([64], "hidden layer widths of the MLP", items=int, ge=1)
    width: float = setting(1.0, "channel multiplier of ResNet-9", gt=0)


@dataclass
class TrainConfig:
    """The base recipe: theta_0 and every LDS / removal retrain use it."""

    epochs: int = setting(30, "epochs", ge=1, required=True)
    batch_size: int = setting(64, "minibatch size", ge=1)
    optimizer: str = setting("sgd", "'sgd' (momentum) or 'adam'", choices=OPTIMIZERS)
    lr: float = setting(0.05, "peak learning rate", gt=0, required=True)
    momentum: float = setting(0.9, "SGD momentum", ge=0)
    nesterov: bool = setting(True, "Nesterov momentum")
    weight_decay: float = setting(5e-4, "L2 weight decay", ge=0)
    label_smoothing: float = setting(0.0, "label smoothing of the cross-entropy", ge=0, le=1)
    lr_schedule: str = setting("linear", "'constant', 'linear' (decay to 0) or 'triangle' (warm-up then decay)",
                               choices=("constant", "linear", "triangle"))
    augment: bool = setting(False, "random flips and 2-pixel translations (images only)")
    seed: int = setting(0, "seed of theta_0's initialisation and data order")
    precision: str = setting("fp32", "'fp32' or 'bf16': bf16 autocast of the forward (fp32 master weights, "
                             "optimiser states and BatchNorm statistics) in theta_0, the retrains and the "
                             "perturbed fits", choices=("fp32", "bf16"))
    channels_last: bool = setting(False, "lay images and convolution weights out channels-last (NHWC) in "
                                  "theta_0, the retrains and the perturbed fits (a GPU speed option)")
    compile: bool = setting(False, "torch.compile the vmapped forward of theta_0, the retrains and the "
                            "perturbed fits (compiles at every trainer call: once per theta_0 or retrain job, once per "
                            "learning rate of a perturbed job; a GPU speed option)")


@dataclass
class DaunceConfig:
    """The K perturbed fits of Algorithm 1 and the learning-rate search (Appendix B)."""

    K: int = setting(200, "number of perturbed models (docs/defaults.md: 200 beat 100 on every problem)", ge=2,
                     why="a covariance needs two models", required=True)
    ratio: float = setting(0.3, "subset ratio r of each perturbed model (Algorithm 1)", gt=0, le=1, required=True)
    epochs: int = setting(1, "epochs of perturbed training over the subset D^k", ge=1)
    batch_size: int = setting(64, "minibatch size of perturbed training", ge=1)
    optimizer: str = setting("sgd", "'sgd' or 'adam'", choices=OPTIMIZERS)
    momentum: float = setting(0.9, "SGD momentum", ge=0)
    lr_grid: list = setting([1.0, 0.3, 0.1, 0.03, 0.01, 0.003, 0.001], "learning rates searched: by the "
                            "label-free rule (daunce fit, the API: docs/defaults.md), on the LDS selection masks "
                            "(the workflow; Appendix B's grid is 0.1 ... 1e-3)",
                            items=float, gt=0, schema={'minItems': 1}, required=True)
    rho: float = setting(1.0, "perturbation scale: linear-term weight 1 + rho (2 xi - 1); rho=1 is the paper", ge=0)
    gamma: float = setting(1.0, "weight of the loss term of the perturbed objective", gt=0)
    prox: float = setting(0.0, "L2 pull towards theta_0 (weight decay centred at theta_0)", ge=0)
    antithetic: bool = setting(False, "antithetic pairs: models 2j and 2j+1 share subset and batch order, with xi "
                               "and 1 - xi (needs an even K). false: independent draws (the paper)",
                               fill=True)
    common_batches: bool = setting(False, "common random numbers: every model takes the same positional batch "
                                   "order of its subset. false: a batch order per model (the paper)", fill=True)
    lr_schedule: str = setting("constant", "learning-rate schedule of the perturbed fits: 'constant' or 'cosine' "
                               "(annealed to 0 over the fit's steps, the authors' code)",
                               choices=LR_SCHEDULES, fill=True)
    first_order: str = setting("margin", "DAUNCE-T's first-order term: 'margin' (the margin's logit gradient, "
                               "Table 1) or 'cross_entropy' (the loss's, -(1 - p) times it: the authors' code); "
                               "the loss-signal variants always use the loss's, the black-box forms have none",
                               choices=FIRST_ORDER, fill=True)
    seed: int = setting(0, "seed of the perturbations; model k uses default_rng([seed, k])")
    chunk_size: int = setting(50, "perturbed models trained together in one job", ge=1)
    variants: list = setting(["daunce", "daunce_e", "daunce_t"], "variants to run (Tables 1 and 2), and "
                             "daunce_t_q: DAUNCE-T's fits scored with TRAK's Q, 1 - p_i(theta_0), on the "
                             "training side, and daunce_m: matched noise, labels drawn from theta_0", items=str,
                             choices=VARIANTS, schema={'minItems': 1}, required=True)
    k_curve: list = setting([5, 10, 20, 50, 100], "K values of Figure 6 (prefixes of the K models); unset: "
                            "these, those above K replaced by K", items=int, ge=2)
    select_measure: str = setting("correlation", "measure used to select the learning rate",
                                  choices=("correlation", "covariance"))
    trace_every: int = setting(10, "Figure 3: log each model's gradient norm of the full objective, its ERM "
                               "term and its first-order term every N steps (and at the last); one extra "
                               "backward pass per logged step. 0 = off", ge=0, why="0 = off")
    batchnorm: str = setting("eval", "BatchNorm in the perturbed fits: 'eval' (theta_0's statistics, frozen) or "
                             "'train' (the authors' code: minibatch statistics; the running statistics are "
                             "updated and used to compute the signals)", choices=("eval", "train"))
    augment: bool = setting(False, "augment the perturbed fits as the authors do: RandomCrop(32, padding=4) "
                            "(zero padding) and horizontal flips, drawn per model (images only)")
    matched_scale: float = setting(0.1, "daunce_m: scale of the first-order term with the label drawn from "
                                   "theta_0 (in place of rho); small keeps the fits in the linear regime "
                                   "(docs/matched_noise.md)", gt=0)
    matched_prox: float = setting(0.01, "daunce_m: proximal damping lambda/2 ||theta - theta_0||^2 of its fits "
                                  "(in place of prox): the damping of its Gauss-Newton influence limit "
                                  "(docs/defaults.md: 0.01 on three problems)", ge=0)
    matched_ratio: float = setting(1.0, "daunce_m: subset ratio r of its fits (in place of ratio)", gt=0, le=1)
    matched_epochs: int = setting(20, "daunce_m: epochs of its fits (in place of epochs; docs/defaults.md)", ge=1)

    def for_variant(self, variant: str) -> DaunceConfig:
        """The settings a variant's fits use: daunce_m's ``matched_*`` in place of rho, prox, ratio
        and epochs."""
        if variant not in MATCHED_VARIANTS:
            return self
        return dataclasses.replace(self, rho=self.matched_scale, prox=self.matched_prox, ratio=self.matched_ratio,
                                   epochs=self.matched_epochs)

    def measure_for(self, variant: str) -> str:
        """The measure a variant's learning rate is selected with: covariance for daunce_m (whose limit
        is an influence function only as a covariance), else ``select_measure``."""
        return "covariance" if variant in MATCHED_VARIANTS else self.select_measure


def _daunce_default(name: str):
    f = next(f for f in dataclasses.fields(DaunceConfig) if f.name == name)
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


@dataclass(frozen=True)
class ApiDefaults:
    """The defaults of the library calls, declared once: ``daunce_core.api.fit_losses`` /
    ``scores``, ``daunce_core.attribute.daunce_scores`` / ``perturbed_losses`` and the learning-rate
    rule read these (their signatures take them from :data:`DEFAULTS`). The lr grid, the lr rule's
    pilot K, ratio, batch size, rho, gamma, seed and chunk size are :class:`DaunceConfig`'s own
    defaults (``daunce fit`` reads those; the pilot K is its K), and so are a variant's own ratio,
    rho, prox and fit length (:meth:`DaunceConfig.for_variant`: matched noise's ``matched_*``). The
    variant, measure, K (500: the pilot's 200 models at the chosen lr and 300 more), fit length of
    the other variants, estimator options and learning-rate rule are the API's, chosen
    by ``benchmarks/defaults_study.py`` (docs/defaults.md); the workflow's embedded
    config/config.yaml is a paper reproduction and sets its own (several variants, an lr grid
    judged on selection masks)."""

    variant: str         # a classifier on (inputs, labels) tensors (ClassificationTask)
    task_variant: str    # any other Task, an LMTask, or top-k files (variant needs dense scores)
    measure: str
    K: int
    ratio: float
    batch_size: int
    min_steps: int       # the fit length of variants without their own (every variant but daunce_m, whose
    #                      length is matched_epochs): the fewest epochs giving every model this many steps
    lr: str              # "auto": the label-free rule over lr_grid (daunce_core.api.pick_lr)
    lr_grid: tuple
    lr_pilot_K: int      # lr="auto": the rule reads this many models per lr, then the chosen lr is fitted to K
    rho: float
    gamma: float
    seed: int
    chunk_size: int
    few_steps: int       # fewer optimiser steps per perturbed model than this: a warning
    antithetic: bool     # the estimator options of the variants not in OPTIONS: DaunceConfig's (the paper's)
    common_batches: bool
    lr_schedule: str
    first_order: str


# The measure each variant's scores take by default in the library calls (docs/defaults.md): covariance
# where the study found it at least as good, correlation (the paper's) elsewhere.
MEASURES = {"daunce_m": "covariance", "daunce_t": "covariance", "daunce_t_q": "covariance"}

# The estimator options a variant's fits take by default in the library calls, where they differ from
# DEFAULTS' (the paper's): antithetic pairs and common batch orders raised matched noise's LDS
# (docs/defaults.md); for DAUNCE and DAUNCE-T, with their random subsets, they did not (docs/quality.md).
OPTIONS = {"daunce_m": {"antithetic": True, "common_batches": True}}

_API_VARIANT = "daunce_m"  # docs/defaults.md: above the previous default on all three of the study's problems
DEFAULTS = ApiDefaults(variant=_API_VARIANT, task_variant="daunce", measure=MEASURES.get(_API_VARIANT, "correlation"),
                       K=500, ratio=_daunce_default("ratio"),
                       batch_size=_daunce_default("batch_size"), min_steps=50,
                       lr="auto", lr_grid=tuple(_daunce_default("lr_grid")), lr_pilot_K=_daunce_default("K"),
                       rho=_daunce_default("rho"),
                       gamma=_daunce_default("gamma"), seed=_daunce_default("seed"),
                       chunk_size=_daunce_default("chunk_size"), few_steps=10,
                       **{k: _daunce_default(k)
                          for k in ("antithetic", "common_batches", "lr_schedule", "first_order")})


def api_options(variant: str) -> dict:
    """The estimator options (antithetic, common_batches) a variant's fits take in the library calls
    unless given: :data:`OPTIONS`' for the variant, else :data:`DEFAULTS`' (the paper's)."""
    return {"antithetic": DEFAULTS.antithetic, "common_batches": DEFAULTS.common_batches,
            **OPTIONS.get(fit_variant(variant), {})}


SPEARMAN = "a Spearman correlation over masks needs two"


@dataclass
class ThresholdSetting:
    """The keys of ``lds.threshold`` (kept a dict in :class:`LDSConfig`; checked against this)."""

    kind: str = setting("none", "none, soft, hard or topk", choices=("none", "soft", "hard", "topk"), required=True)
    quantile: float | None = setting(None, "soft/hard: the per-query |score| quantile below which scores are "
                                     "cut", ge=0, lt=1)
    k: int | None = setting(None, "topk: the number of largest (signed) scores kept per query, i.e. its k most "
                            "helpful training examples; the others are set to 0", ge=1)


@dataclass
class LDSConfig:
    """The LDS ground truth and its evaluation (Appendix B, equations 8-9)."""

    alpha: float = setting(0.5, "subset fraction of each LDS mask", gt=0, lt=1, required=True)
    M: int = setting(100, "number of test masks (reported)", ge=2, why=SPEARMAN, required=True)
    M_select: int = setting(50, "number of selection masks (every tuning: DAUNCE's learning rate, the "
                            "baselines' knobs; a mask stream disjoint from the test masks)", ge=2, why=SPEARMAN)
    select_fraction: float = setting(0.3, "share of the queries kept for selection (a seeded choice); the "
                                     "selection masks' ground truth holds only these, the reported LDS "
                                     "only the others (the test queries)", gt=0, lt=1,
                                     why="some queries for selection, the rest for the reported LDS")
    seeds: int = setting(3, "retrains per mask, averaged", ge=1, required=True)
    seed: int = setting(0, "seed of the masks and retrains")
    chunk_size: int = setting(100, "retrains per job", ge=1)
    bootstrap: int = setting(2000, "bootstrap resamples (masks and queries drawn together) for the 95% CI", ge=100)
    threshold: dict = setting({"kind": "hard", "quantile": 0.9},
                         "score thresholding applied to every method, reported beside the raw LDS (no "
                         "selection uses it): kind none|soft|hard|topk, with a per-query |score| quantile "
                         "(soft/hard) or k, the number of largest (signed) scores kept (topk)",
                         mapping=ThresholdSetting)


STUDY_VARIANTS = ("daunce", "daunce_e", "daunce_t", "daunce_t_q")  # white-box forms (Table 1)


@dataclass
class StudySetting:
    """One point of the quality study: ``daunce.*`` overrides of the experiment's defaults."""

    name: str = setting("default", "the setting's name (letters, digits, '_', '.', '-'): its file and its "
                        "row of quality.csv")
    daunce: dict = setting({}, "overrides of daunce.* keys, each checked against the daunce section's "
                           "schema (DaunceConfig); an lr_grid given here is searched whole")
    theta0s: int = setting(1, "independently trained theta_0s (base.seed + s, s = 0..theta0s-1) the K models "
                           "are spread over, K / theta0s each; the per-theta_0 scores are averaged")


@dataclass
class StudyConfig:
    """The quality landscape (docs/quality.md): results/quality.pdf; off unless ``enabled``."""

    enabled: bool | str = setting(False, "run the study rules (results/quality.pdf); true/false, or its "
                                  "string form, which snakemake --config delivers",
                                  schema={'pattern': '^(true|false|True|False)$'})
    variants: list = setting(["daunce", "daunce_e", "daunce_t"], "white-box variants studied",
                             items=str, choices=STUDY_VARIANTS, why="the white-box forms",
                             schema={'minItems': 1})
    lr_around: int | None = setting(1, "learning rates searched: the default's choice (its "
                                    "daunce/<variant>/selection.json) and this many neighbours each side "
                                    "in daunce.lr_grid; null: all of daunce.lr_grid. A setting's own "
                                    "lr_grid override is searched whole", ge=0, why="null: the whole lr grid")
    settings: list = setting([{"name": "default"}], "the settings studied: {name, daunce: {key: value}, "
                             "theta0s}; settings that differ only in K share one fit (prefixes, as in "
                             "Figure 6)",
                             items=dict, schema={'minItems': 1, 'items': {'required': ['name']}})

    def validate(self) -> StudyConfig:
        if isinstance(self.enabled, str):  # --config study='{enabled: true}' delivers the string 'true'
            if self.enabled.lower() not in ("true", "false"):
                raise ConfigError(f"study.enabled must be true or false, got {self.enabled!r}")
            self.enabled = self.enabled.lower() == "true"
        if not self.variants:
            raise ConfigError(f"study.variants: empty; choose among the white-box forms {', '.join(STUDY_VARIANTS)}")
        if not self.settings:
            raise ConfigError("study.settings is empty; give at least {name: default}")
        names = [s.name for s in self.parsed()]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ConfigError(f"study.settings: the name(s) {', '.join(dup)} appear more than once; names "
                              "must be unique (each is a file and a row)")
        return self

    def parsed(self) -> list[StudySetting]:
        """The settings as :class:`StudySetting`; unknown keys and ``daunce.*`` keys refused by name."""
        out = []
        for i, raw in enumerate(self.settings):
            label = f"study.settings[{i}]" + (f" ({raw.get('name')})" if isinstance(raw, dict) else "")
            s = build(StudySetting, raw, label, coerce=True)
            if not re.fullmatch(r"[A-Za-z0-9_.-]+", s.name):
                raise ConfigError(f"{label}.name must use letters, digits, '_', '.' or '-' (it names a "
                                  f"file), got {s.name!r}")
            if s.theta0s < 1:
                raise ConfigError(f"{label}.theta0s must be at least 1, got {s.theta0s}")
            # the override keys and types, against the daunce section's own schema (the dataclass)
            s.daunce = to_dict(build(DaunceConfig, s.daunce, f"{label}.daunce", coerce=True, validate=False))
            s.daunce = {k: v for k, v in s.daunce.items() if k in (raw.get("daunce") or {})}
            out.append(s)
        return out


# the baselines a mislabel run may score: daunce_core.baselines' METHODS and EXTRA, and TRAK at a
# projection size its name fixes (trak_k<N>, daunce_core.baselines.common.TRAK_K); tests keep them equal
MISLABEL_BASELINES = ("trak", "ekfac", "logra", "graddot", "tracin", "exact_if", "trak_ens", "if_iter")
MISLABEL_TRAK_K = r"trak_k[1-9][0-9]*"


def mislabel_baseline(name: str) -> bool:
    """Whether the mislabel step scores the baseline ``name``: one of MISLABEL_BASELINES or trak_k<N>."""
    return name in MISLABEL_BASELINES or re.fullmatch(MISLABEL_TRAK_K, str(name)) is not None


@dataclass
class MislabelConfig:
    """Mislabelled-example detection by self-influence (docs/mislabel.md): results/mislabel.csv."""

    enabled: bool | str = setting(False, "in the default target; true/false, or its string form, which "
                                  "snakemake --config delivers")
    fraction: float = setting(0.1, "share of the training labels flipped to another class (dattri: 0.1)",
                              gt=0, lt=1)
    seed: int = setting(0, "seed of which labels flip and to which class")
    methods: list = setting([], "methods ranked by self-influence: DAUNCE variants (covariance) and "
                            "baselines, trak_k<N> (TRAK with proj_dim N) among them; empty: every "
                            "daunce.variants and baselines.methods entry (not the limit_/lin_ references)",
                            items=str, schema={"items": {"anyOf": [
                                {"type": "string", "enum": list(VARIANTS + MISLABEL_BASELINES)},
                                {"type": "string", "pattern": f"^{MISLABEL_TRAK_K}$",
                                 "description": "TRAK with proj_dim N"}]}})
    settings: str = setting("defaults", "each method's knobs: 'defaults' (DAUNCE: the middle of "
                            "daunce.lr_grid; baselines: their baselines.<method> values, exact IF the middle "
                            "of its damping_grid) or 'lds' (what the LDS selection chose for that method)",
                            choices=("defaults", "lds"))
    bootstrap: int = setting(2000, "resamples of the examples for the AUC's 95% CI", ge=1)

    def validate(self) -> MislabelConfig:
        if isinstance(self.enabled, str):  # --config mislabel='{enabled: true}' delivers the string 'true'
            if self.enabled.lower() not in ("true", "false"):
                raise ConfigError(f"mislabel.enabled must be true or false, got {self.enabled!r}")
            self.enabled = self.enabled.lower() == "true"
        for i, m in enumerate(self.methods):
            if m not in VARIANTS and not mislabel_baseline(m):
                raise ConfigError(f"mislabel.methods[{i}] must be one of {', '.join(VARIANTS + MISLABEL_BASELINES)} "
                                  f"or trak_k<N> (TRAK with proj_dim N), got {m!r}")
        if len(set(self.methods)) != len(self.methods):
            raise ConfigError(f"mislabel.methods lists a method twice: {self.methods}")
        return self

    def method_list(self, variants: list, baselines: list) -> list:
        """The methods scored: ``methods``, or (empty) the experiment's DAUNCE ``variants`` and its
        ``baselines`` that are baselines of the paper (not the limit_/lin_ references)."""
        if self.methods:
            return list(self.methods)
        return list(variants) + [m for m in baselines if mislabel_baseline(m)]


@dataclass
class ExperimentConfig:
    """One experiment of Section 4.1: every setting of its steps, by section."""

    experiment: str = setting("digits_mlp", "name; intermediate results go to results/<experiment>/",
                              pattern=r"^[A-Za-z0-9_.-]+$", why="letters, digits, '_', '.' or '-': it names "
                              "a folder", required=True)
    device: str = setting("auto", "'auto', 'cpu', 'cuda' or 'cuda:N'",
                          pattern=r"^(auto|cpu|cuda(:[0-9]+)?)$", fill=True)
    data: DataConfig = nested(DataConfig, required=True)
    model: ModelConfig = nested(ModelConfig, required=True)
    base: TrainConfig = nested(TrainConfig, required=True)
    daunce: DaunceConfig = nested(DaunceConfig, required=True)
    lds: LDSConfig = nested(LDSConfig, required=True)
    study: StudyConfig = nested(StudyConfig)
    mislabel: MislabelConfig = nested(MislabelConfig)

    @classmethod
    def from_dict(cls, cfg: dict[str, Any], *, ignore: tuple[str, ...] = OTHER_STAGES) -> ExperimentConfig:
        """Build from a config dict; keys of other stages (``ignore``) are passed over.

        Range checks are :meth:`validate`'s (called by the workflow's steps), so a partial
        config can be built first and checked once complete.
        """
        # the study is switched from the command line (--config study='{enabled: true}'), whose
        # values arrive as strings: its section alone is parsed as command-line overrides
        rest = {k: v for k, v in cfg.items() if k not in ("study", "mislabel")}
        out = build(cls, rest, "", ignore=ignore, validate=False)
        out.study = build(StudyConfig, cfg.get("study"), "study", coerce=True, validate=False)
        out.mislabel = build(MislabelConfig, cfg.get("mislabel"), "mislabel", coerce=True, validate=False)
        if "k_curve" not in (rest.get("daunce") if isinstance(rest.get("daunce"), dict) else {}):
            out.daunce.k_curve = default_k_curve(out.daunce.K)
        if out.data.name == "imagefolder" and out.data.manifest is None:  # beside the results, not the images
            out.data.manifest = f"results/{out.experiment}/data/manifest.csv"
        return out

    def validate(self) -> ExperimentConfig:
        """Check every key: the ranges and choices each :func:`setting` declares (those of
        workflow/schemas/config.schema.yaml), then the checks across keys; a ConfigError names
        the first bad key."""
        check_limits(self)
        th = build(ThresholdSetting, self.lds.threshold, "lds.threshold")
        self.lds.threshold = {key: getattr(th, key) for key in self.lds.threshold}  # as typed (k: 2.0 -> 2)
        if not known_dataset(self.data.name):
            raise ConfigError(f"data.name: unknown dataset {self.data.name!r}; choose {DATASETS_HELP}")
        d = self.daunce
        if d.antithetic and d.K % 2:
            raise ConfigError(f"daunce.K must be even with daunce.antithetic (models 2j, 2j+1 form a pair), got {d.K}")
        if d.augment and any(v in MATCHED_VARIANTS for v in d.variants):
            raise ConfigError("daunce.variants: daunce_m draws each label from theta_0 on the stored input, so it "
                              "takes no augmentation; set daunce.augment: false or drop daunce_m")
        if any(k > d.K for k in d.k_curve):
            raise ConfigError(f"daunce.k_curve values must lie in [2, K={d.K}] (Figure 6's K values), got "
                              f"{d.k_curve}; set daunce.k_curve to values <= {d.K}, e.g. {default_k_curve(d.K)}")
        check_cross_fields(self)
        self.study.validate()
        self.mislabel.validate()
        if self.study.enabled:
            for s in self.study.parsed():
                study_setting_config(self, s)
        return self



def default_k_curve(K: int) -> list[int]:
    """daunce.k_curve when the config leaves it unset: the default's values, those above ``K``
    replaced by ``K`` itself (so ``daunce: {K: 4}`` alone is a valid config)."""
    default = DaunceConfig().k_curve
    return default if max(default) <= K else [k for k in default if k < K] + [K]


def study_setting_config(cfg: ExperimentConfig, s: StudySetting) -> ExperimentConfig:
    """``cfg`` with the study setting ``s``'s ``daunce.*`` overrides applied, range-checked like the
    experiment's own daunce section (the error names the setting). Figure 3's trace is off in
    study fits unless the setting asks for it: it costs a backward pass and changes no model."""
    d = {**to_dict(cfg.daunce), "trace_every": 0, **s.daunce}
    d["k_curve"] = [k for k in d["k_curve"] if k <= d["K"]] or [d["K"]]  # Figure 6's K, unused here
    label = f"study setting {s.name!r}"
    daunce = build(DaunceConfig, d, f"{label}: daunce", coerce=True, validate=False)
    if daunce.K % s.theta0s:
        raise ConfigError(f"{label}: K={daunce.K} must be a multiple of theta0s={s.theta0s} (K / theta0s "
                          "models per theta_0)")
    out = dataclasses.replace(cfg, daunce=daunce, study=StudyConfig())
    try:
        out.validate()
    except ConfigError as exc:
        raise ConfigError(f"{label}: {exc}") from exc
    return out


# --- cross-field checks, run at parse time so a bad config fails before any job -----------------

# (train, query) pool sizes known without a download. digits is one pool of 1797 examples that the
# split divides; the others draw train from their train split and queries from their test split.
KNOWN_SIZES: dict[str, tuple[int, int | None]] = {
    "digits": (1797, None),
    "cifar10": (50000, 10000), "CIFAR10": (50000, 10000), "CIFAR100": (50000, 10000),
    "MNIST": (60000, 10000), "FashionMNIST": (60000, 10000), "KMNIST": (60000, 10000),
}
THRESHOLD_NEEDS = {"none": (), "soft": ("quantile",), "hard": ("quantile",), "topk": ("k",)}


# the most models one setting trains (daunce.K, lds.M, lds.M_select): each is a training run, and
# the losses files hold K x (n + m) numbers (the paper's largest K is 200)
MAX_MODELS = 100_000


def npz_rows(path: str | Path) -> tuple[int, int] | None:
    """The rows of ``X_train`` and ``X_query`` of an .npz file, read from the arrays' headers (no
    data); None when the file cannot be read so (the data step then names what is wrong)."""
    import zipfile

    import numpy as np

    readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    rows = []
    try:
        with zipfile.ZipFile(path) as z:
            for key in ("X_train", "X_query"):
                with z.open(f"{key}.npy") as fh:
                    read = readers.get(np.lib.format.read_magic(fh))
                    if read is None:
                        return None
                    shape = read(fh)[0]
                rows.append(int(shape[0]) if shape else 0)
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return None
    return rows[0], rows[1]


def known_split_sizes(data: DataConfig) -> tuple[int, int] | None:
    """(n_train, n_query) the data rule will produce, when the dataset's size is known offline (an
    npz file's from its headers); None for folders and datasets of unknown size. 0 in the config
    means all."""
    sizes = KNOWN_SIZES.get(data.name)
    if data.name == "npz":
        sizes = npz_rows(data.root)
        if sizes is not None and 0 in sizes:
            which = "X_train" if sizes[0] == 0 else "X_query"
            raise ConfigError(f"data.root {data.root}: {which} has no rows; daunce needs training and query "
                              "examples (the LDS is measured on the queries)")
    if sizes is None:
        return None
    train_pool, query_pool = sizes
    if query_pool is None:  # one pool: the queries come from what the training set leaves
        n = data.n_train or train_pool
        if n > train_pool:
            raise ConfigError(f"data.n_train={data.n_train} but {data.name} has only {train_pool} examples; "
                              f"lower data.n_train")
        m = data.n_query or train_pool - n
        if n + m > train_pool or m == 0:
            raise ConfigError(f"data.n_train + data.n_query = {n} + {data.n_query or 'all'} but {data.name} has "
                              f"{train_pool} examples in total; lower one of them (n_train + n_query <= "
                              f"{train_pool - 1} with at least one query)")
        return n, m
    for key, asked, pool in (("n_train", data.n_train, train_pool), ("n_query", data.n_query, query_pool)):
        if asked > pool:
            raise ConfigError(f"data.{key}={asked} but {data.root if data.name == 'npz' else data.name} has only "
                              f"{pool} examples in that split; "
                              f"lower data.{key} (0 = all)")
    return data.n_train or train_pool, data.n_query or query_pool


def check_cross_fields(cfg: ExperimentConfig) -> None:
    """Checks that involve several keys (called by :meth:`ExperimentConfig.validate`)."""
    sizes = known_split_sizes(cfg.data)
    d, lds = cfg.daunce, cfg.lds
    for key, count in (("daunce.K", d.K), ("lds.M", lds.M), ("lds.M_select", lds.M_select)):
        if count > MAX_MODELS:
            raise ConfigError(f"{key}={count} models is more than {MAX_MODELS:,}: each is a training run and "
                              f"the losses hold {key.split('.')[1]} x (n + m) numbers (the paper's largest K is "
                              f"200); lower {key}")
    if not d.lr_grid:
        raise ConfigError("daunce.lr_grid is empty; give at least one learning rate")
    tags = [f"{lr:g}" for lr in d.lr_grid]  # the workflow's file names (lr{tag}/)
    if len(set(tags)) != len(tags):
        raise ConfigError(f"daunce.lr_grid has learning rates that print alike ({tags}); every rate gets "
                          f"its folder lr<rate>/, so make them distinct")
    if not d.variants:
        raise ConfigError("daunce.variants is empty; name at least one of daunce, daunce_e, daunce_t (+ _bb)")
    th = lds.threshold  # its keys, types and ranges: ThresholdSetting's (checked by validate)
    kind = th.get("kind", "none")
    for key in THRESHOLD_NEEDS[kind]:
        if th.get(key) is None:
            what = ("k, the number of largest (signed) scores kept per query" if key == "k"
                    else "quantile, the per-query |score| quantile below which scores are cut")
            raise ConfigError(f"lds.threshold: kind {kind!r} needs {what} (lds.threshold.{key})")
    if kind == "topk" and sizes is not None and th["k"] > sizes[0]:
        raise ConfigError(f"lds.threshold.k={th['k']} exceeds the {sizes[0]} training examples; lower it")


def check_figures(figures: dict | None, cfg: ExperimentConfig) -> dict:
    """The config's ``figures`` section with its defaults, checked against the experiment:
    ``variant`` (of Figures 5 and 6) must be run, ``query`` (Figure 5) must be a query index."""
    out = {"variant": cfg.daunce.variants[0], "query": 0, **(figures or {})}
    if out["variant"] not in cfg.daunce.variants:
        raise ConfigError(f"figures.variant {out['variant']!r} is not among daunce.variants {cfg.daunce.variants}; "
                          f"choose one of them or add it to daunce.variants")
    q = out["query"]
    if isinstance(q, bool) or not isinstance(q, int) or q < 0:
        raise ConfigError(f"figures.query must be a query index >= 0, got {q!r}")
    sizes = known_split_sizes(cfg.data)
    n_query = sizes[1] if sizes is not None else (cfg.data.n_query or None)
    if n_query is not None and q >= n_query:
        raise ConfigError(f"figures.query={q} but there are {n_query} queries (data.n_query); choose 0..{n_query - 1}")
    return out


def read_config_file(path: str | Path) -> dict:
    """A YAML config file as a dict; a syntax error names the file, line and column.

    (Snakemake's own message for a bad ``--configfile`` names neither, and PyYAML's spans lines.)
    """
    import yaml

    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file ({exc.strerror or exc})") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        what = exc.problem or exc.context or "invalid YAML"
        if exc.context and exc.problem:
            started = f" started at line {exc.context_mark.line + 1}" if exc.context_mark else ""
            what += f" ({exc.context}{started})"
        if "\\t" in what:
            what += "; indent with spaces, not tabs"
        raise ConfigError(f"{where}: YAML syntax error: {what}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: YAML syntax error: {' '.join(str(exc).split())}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file is a mapping of keys (experiment: ..., data: ...), "
                          f"got a {type(data).__name__}")
    return data


@dataclass
class FiguresConfig:
    """The figures' choices (checked against the experiment by :func:`check_figures`)."""

    variant: str = setting(None, "the variant of Figures 5 and 6 (unset: the first of daunce.variants)")
    query: int = setting(0, "the query shown in Figure 5", ge=0)


@dataclass
class ScoringConfig:
    """How the scores files are computed (never what they hold)."""

    memory_gb: float = setting(4.0, "memory a dense scores computation may use (GB)", gt=0)
