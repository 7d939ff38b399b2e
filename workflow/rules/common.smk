# Names and input functions shared by the rules: all logic of the DAG's shape lives here.
# Everything is computed from `config` alone (read-only names, or functions called when the DAG is
# built), so no rule file fills a list another one reads and the include order does not matter.
# Threads and resources are not here either: they come from the profiles (profiles/*/config.yaml).
import hashlib
import json
import math
import os

import yaml
from snakemake.logging import logger

from daunce_core.baselines import REFERENCE, BaselinesConfig, base_method, is_method
from daunce_core.baselines.limits import RESPONSE_KEYS, response_key
from daunce_core.steps.blackbox import load_config as blackbox_load_config
from daunce_core.config import MATCHED_VARIANTS, ExperimentConfig, check_figures, fit_variant
from daunce_core.data import IMAGE_SUFFIXES
from daunce_core.fit.chunks import chunk_models
from daunce_core.lm.settings import LLMSettings
from daunce_core.settings import to_dict

EXP = config["experiment"]
CFG = ExperimentConfig.from_dict(config).validate()
FIGURES = check_figures(config.get("figures"), CFG)  # variant run, query in range
LLM = LLMSettings.from_config(config)
BB = blackbox_load_config(config)
BASELINES = BaselinesConfig.from_config(config).validate()
if ":" in CFG.model.arch:  # a factory by import path: importable, and takes (in_shape, num_classes)
    from daunce_core.models import resolve_factory

    resolve_factory(CFG.model.arch)
for _note in BASELINES.thinned:  # grids longer than a short daunce.lr_grid: thinned, said once
    logger.info(_note)

WHITE_BOX = [v for v in CFG.daunce.variants if not v.endswith("_bb")]
BLACK_BOX = [v for v in CFG.daunce.variants if v.endswith("_bb")]
MEASURES = ["correlation", "covariance"]
LR_TAGS = [f"{lr:g}" for lr in CFG.daunce.lr_grid]


wildcard_constraints:
    experiment=r"[A-Za-z0-9_.-]+",
    variant=r"daunce(_e|_t|_m)?(_bb|_q)?",
    measure=r"correlation|covariance|score",
    method=r"[a-z0-9_]+",
    lr=r"[0-9.e+-]+",
    chunk=r"\d+",
    split=r"test|select",
    N=r"\d+",
    bbmodel=r"[A-Za-z0-9_.:-]+",
    access=r"api|strict",


# --- the effective config: what this run uses, written beside its results --------------------

EFFECTIVE_CONFIG = f"results/{EXP}/config.yaml"


def effective_config_text():
    """The config as the workflow sees it: config/config.yaml, then each --configfile merged onto
    it (dicts key by key, lists replaced whole), then --config, then the schema's defaults."""
    plain = json.loads(json.dumps(config))  # OrderedDicts (JSON configs) -> dicts, for safe_dump
    return (
        "# The effective config of the last run of this experiment (step effective_config):\n"
        "# config/config.yaml with every --configfile merged onto it (lists replaced whole, sections\n"
        "# kept), then --config and the schema's defaults. Rerun it alone with\n"
        "#   snakemake --replace-workflow-config --configfile <this file>\n"
        + yaml.safe_dump(plain, sort_keys=False, default_flow_style=None, width=100)
    )


# --- what reruns when the config changes: each step's settings as a param ---------------------
# Snakemake reruns a job whose params differ from those recorded with its outputs (the "params"
# rerun trigger, on by default), and every job downstream of it. So each rule that computes
# something carries `settings`: a digest of exactly the config keys its step reads, taken from
# the typed config this run uses (defaults filled in, numbers typed: writing a default out, or
# 1.0e-3 for 0.001, changes nothing). Keys a step does not read never rerun it: changing
# figures.* redraws figures, never refits. docs/configuration.md lists what reruns on what.

# Keys that decide where, how fast or in what memory a step runs, never its numbers: no step's
# digest holds them (the effective config still records them).
NEVER_RERUN = (
    "device",
    "data.download",
    "base.channels_last",
    "base.compile",
    "baselines.batch_size",
    "scoring.memory_gb",
    "study.enabled",
    "llm.finetune.micro_batch_size",
    "llm.finetune.gradient_checkpointing",
    "llm.generation.batch_size",
    "llm.logra.batch_size",
    "blackbox.data.root",
    "blackbox.api.timeout_s",
    "blackbox.api.retry",
    "blackbox.finetune.max_active",
    "blackbox.finetune.poll_interval_s",
    "blackbox.finetune.max_wait_h",
    "blackbox.finetune.max_attempts",
    "blackbox.logprobs.concurrency",
    "blackbox.local.threads",
    "blackbox.local.device",
    "blackbox.local.faults",
)

# daunce.* keys the perturbed fits do not read: how many models and which chunk (the chunk's
# model range is its own param), which variants exist, and what later steps do with the losses
DAUNCE_NOT_FIT = ("daunce.K", "daunce.chunk_size", "daunce.variants", "daunce.k_curve", "daunce.select_measure")
# matched-noise DAUNCE's settings, read by daunce_m (and its limit) only, in place of rho, prox and ratio
MATCHED_KEYS = ("daunce.matched_scale", "daunce.matched_prox", "daunce.matched_ratio", "daunce.matched_epochs")
MATCHED_REPLACES = ("daunce.rho", "daunce.prox", "daunce.ratio", "daunce.epochs")
MATCHED_REFERENCE = ("limit_daunce_m",)  # the references that read them
# lds.* keys the retrains do not read: how many masks and which chunk (its own param), and how the
# LDS is computed from the ground truth
LDS_NOT_RETRAIN = ("lds.M", "lds.M_select", "lds.chunk_size", "lds.bootstrap", "lds.threshold")
LLM_DAUNCE_NOT_FIT = ("llm.daunce.K", "llm.daunce.chunk_size", "llm.daunce.lr_grid", "llm.daunce.measure")
# a full fine-tune and its greedy answers (theta_0, the learning-rate judge's and removal's retrains)
LLM_FINETUNE = ("llm.model", "llm.dtype", "llm.template", "llm.task", "llm.finetune", "llm.generation")
# what the black-box cost estimate reads (every model's study: its totals cover them all)
BLACKBOX_ESTIMATE = tuple(
    f"blackbox.{k}"
    for k in (
        "models",
        "access",
        "K",
        "subset_size",
        "seed",
        "theta0",
        "finetune.hyperparameters",
        "bdpl",
        "logprobs.extra_tokens",
        "prices",
        "cost",
        "spend",
        "max_spend_usd",
    )
)


def _settings_tree():
    """Every section as the steps read it: the typed settings of each (plain dicts)."""
    tree = to_dict(CFG)
    tree.update(baselines=to_dict(BASELINES), llm=to_dict(LLM), blackbox=to_dict(BB),
                figures=dict(FIGURES), scoring=dict(config.get("scoring") or {}))
    return tree


SETTINGS_TREE = _settings_tree()


def _pick(tree, key, drop):
    """The value at dotted ``key`` without the dotted keys of ``drop`` below it (a KeyError names
    a key that does not exist: a typo in a rule file)."""
    value = tree
    for part in key.split("."):
        value = value[part]
    value = json.loads(json.dumps(value))  # a copy; fails on anything JSON cannot hold
    prefix = f"{key}."
    for d in drop:
        if d.startswith(prefix):
            *path, last = d.removeprefix(prefix).split(".")
            sub = value
            for part in path:
                sub = sub.get(part, {}) if isinstance(sub, dict) else {}
            if isinstance(sub, dict):
                sub.pop(last, None)
    return value


def step_settings(*keys, drop=(), **derived):
    """The digest of the config ``keys`` (dotted) a step reads, without ``drop`` and
    NEVER_RERUN, plus ``derived`` values (e.g. whether the lr grid has several values): the
    first 12 hex digits of the sha256 of their JSON (sorted keys)."""
    picked = {key: _pick(SETTINGS_TREE, key, tuple(drop) + NEVER_RERUN) for key in keys if key not in NEVER_RERUN}
    picked.update(derived)
    return hashlib.sha256(json.dumps(picked, sort_keys=True).encode()).hexdigest()[:12]


def chunk_range(total, chunk_size, chunk):
    """The model (or mask) indices of one chunk, "lo-hi" (hi excluded): a chunk's content depends
    on K (or M) and the chunk size only through this range, so a larger K adds chunks and leaves
    the finished ones alone."""
    ks = chunk_models(total, chunk_size, int(chunk))
    return f"{ks[0]}-{ks[-1] + 1}"


def lds_masks(split):
    """How many masks the LDS split has: lds.M (test) or lds.M_select (select)."""
    return CFG.lds.M if split == "test" else CFG.lds.M_select


def data_inputs(wildcards):
    """The dataset file Snakemake watches: the npz file data.root (a rewritten file reruns rule
    data and all that follows). Absent, the step itself says what is wrong (data.root)."""
    if CFG.data.name == "npz" and os.path.isfile(CFG.data.root):
        return [CFG.data.root]
    return []


def image_folder_listing(wildcards=None):
    """An image folder's images, as a digest of (relative path, size, mtime) of each: an added,
    removed or rewritten image reruns rule data (a folder as input would see only entries of its
    top level). The manifest is not part of it: it lies under results/<experiment>/data/, never in the
    image folder."""
    root = CFG.data.root
    if CFG.data.name != "imagefolder" or not os.path.isdir(root):
        return ""
    rows = []
    for top, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES and not name.startswith("."):
                st = os.stat(os.path.join(top, name))
                rows.append([os.path.relpath(os.path.join(top, name), root), st.st_size, st.st_mtime_ns])
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:12]


def daunce_fit_settings(wildcards):
    """The digest of what one variant's perturbed fits read: daunce_m reads its matched_* keys in
    place of rho, prox and ratio, the other variants never read them."""
    own = MATCHED_REPLACES if wildcards.variant in MATCHED_VARIANTS else MATCHED_KEYS
    return step_settings("data", "model", "base", "daunce", drop=DAUNCE_NOT_FIT + own)


def baseline_settings(method):
    """A baseline's keys: data, model and base (theta_0's recipe: TracIn replays it), the
    method's own section and grid, the budget (selection uses the raw LDS); the references read
    DAUNCE's perturbations and exact IF's curvature too."""
    base = base_method(method)[0]  # trak_k<N>: trak with its proj_dim fixed by the name
    own = {"trak": ["trak"], "ekfac": ["ekfac"], "logra": ["logra"], "graddot": [], "tracin": ["tracin"],
           "exact_if": ["exact_if"], "exact_if_corr": ["exact_if"], "trak_ens": ["trak_ens"],
           "if_iter": ["if_iter"]}.get(base, ["limits", "exact_if"])
    keys = ["data", "model", "base", "baselines.measurement", "baselines.max_settings"]
    keys += [f"baselines.{s}" for s in own]
    if method in REFERENCE and method != "exact_if_corr":
        keys.append("daunce")
    tune = SETTINGS_TREE["baselines"]["tune"] or {}
    matched = () if method in MATCHED_REFERENCE else MATCHED_KEYS
    return step_settings(*keys, drop=("daunce.variants", "daunce.k_curve", "daunce.select_measure") + matched,
                         tune=tune.get(base), **({"name": method} if method != base else {}))


def reference_responses_input(wildcards):
    """A limit or linearised method's shared responses file (rule reference_responses); none for
    the methods with a kernel of their own (limit_daunce_m, exact_if_corr)."""
    key = response_key(wildcards.method)
    return {"responses": f"results/{wildcards.experiment}/references/{key}.npz"} if key else {}


def reference_responses_settings(key):
    """The keys the responses of ``key`` read: those of a reference method of that key."""
    return baseline_settings(next(m for m in REFERENCE if response_key(m) == key))


def blackbox_losses_settings(wildcards):
    """The perturbations of one access setting: fine-tunes (api) or BDPL prompts (strict)."""
    own = "blackbox.finetune.hyperparameters" if wildcards.access == "api" else "blackbox.bdpl"
    return step_settings("blackbox.backend", "blackbox.api.base_url", "blackbox.local.train", "blackbox.variant",
                         "blackbox.K", "blackbox.subset_size", "blackbox.seed", "blackbox.logprobs", "blackbox.data",
                         own)


def study_group_settings(wildcards):
    """A study group: the experiment's fits and LDS settings, lr_around and the group's own settings."""
    from daunce_core.steps.study import group_of

    return step_settings("data", "model", "base", "daunce", "lds", "study.lr_around",
                         drop=("daunce.variants", "daunce.k_curve", "lds.chunk_size") + MATCHED_KEYS,
                         group=to_dict(group_of(CFG, wildcards.group)))


def llm_source_inputs(wildcards):
    """The LLM task's local data files (llm.data.train/query.source when it is a file)."""
    if LLM.task == "synthetic":
        return []
    return [s for s in (LLM.data.train.source, LLM.data.query.source) if s and os.path.isfile(s)]


def blackbox_source_inputs(wildcards):
    """The black-box study's jsonl source (blackbox.data.path with source jsonl)."""
    path = BB.data.path
    return [path] if BB.data.source == "jsonl" and path and os.path.isfile(str(path)) else []


# --- the final tables and figures: each experiment's own, and the top-level view --------------
# Every final table and figure is written to results/<experiment>/<name>, so two experiments
# (configs with different `experiment` names) never overwrite each other's; two configs with the
# same name share one folder, and the later run replaces the earlier's files (docs/configuration.md).
# results/<name> is a copy of the file of the experiment of the current config (rule view in
# workflow/Snakefile), kept so that `snakemake results/fig1a.pdf` and the default target leave the
# familiar top-level files; scripts, tests and the README generators read the experiment's own.
VIEW_NAMES = (
    "lds.csv",
    "lds_paired.csv",
    "fig1a.pdf",
    "fig1b.pdf",
    "table3.md",
    "table3.csv",
    "fig6.pdf",
    "fig5.pdf",
    "fig3.pdf",
    "cost.md",
    "fig2.pdf",
    "llm_removal.csv",
    "fig4.md",
    "mislabel.csv",
    "mislabel.md",
    "quality.pdf",
)
VIEW_PATTERN = "|".join(n.replace(".", r"\.") for n in VIEW_NAMES)  # rule view's {name}


def experiment_file(name):
    """The experiment's own copy of a final table or figure: results/<experiment>/<name>."""
    return f"results/{EXP}/{name}"


def get_final_output():
    """Every figure and table the config asks for: Section 4.1's always, Figure 1b when the
    config has black-box variants, the cost table, Figure 2 with an `llm` section and Figure 4
    with a `blackbox` section; each in results/<experiment>/ and its view in results/."""
    names = ["lds.csv", "lds_paired.csv", "fig1a.pdf", "table3.md", "table3.csv", "fig6.pdf", "fig5.pdf"]
    if BLACK_BOX:
        names.append("fig1b.pdf")
    names.append("cost.md")
    if CFG.daunce.trace_every > 0:  # Figure 3 needs the per-step log of the perturbed fits
        names.append("fig3.pdf")
    if "llm" in config:  # a config without the section asks for no LLM study
        names += ["fig2.pdf", "llm_removal.csv"]
    if "blackbox" in config:  # a config without the section asks for no black-box study
        names.append("fig4.md")
    if CFG.mislabel.enabled:  # mislabelled-example detection (rules/mislabel.smk)
        names += ["mislabel.csv", "mislabel.md"]
    return [experiment_file(n) for n in names] + [f"results/{n}" for n in names]


# --- Section 4.1: DAUNCE, LDS, figures ---------------------------------------------------------


def daunce_chunk_files(wildcards):
    """Every chunk file of the variant, learning rate by learning rate (the order of LR_TAGS, as
    rule gather_losses's outputs), chunk by chunk within each."""
    n = math.ceil(CFG.daunce.K / CFG.daunce.chunk_size)
    return [
        f"results/{wildcards.experiment}/daunce/{wildcards.variant}/lr{lr}/chunk{c}.h5"
        for lr in LR_TAGS
        for c in range(n)
    ]


def lr_grid_losses(wildcards):
    """The grid's losses files of the variant's fits (daunce_t_q is scored from daunce_t's)."""
    return expand(
        "results/{experiment}/daunce/{variant}/lr{lr}/losses.h5",
        experiment=wildcards.experiment,
        variant=fit_variant(wildcards.variant),
        lr=LR_TAGS,
    )


def lds_chunk_files(wildcards):
    M = CFG.lds.M if wildcards.split == "test" else CFG.lds.M_select
    n = math.ceil(M / CFG.lds.chunk_size)
    return expand(
        "results/{experiment}/lds/{split}/chunk{chunk}.h5",
        experiment=wildcards.experiment,
        split=wildcards.split,
        chunk=range(n),
    )


def lds_eval_inputs(wildcards):
    """Scores and the test ground truth; for a DAUNCE variant also its learning-rate selection
    (the baselines carry theirs in the scores file)."""
    exp = wildcards.experiment
    out = {
        "scores": f"results/{exp}/scores/{wildcards.method}/{wildcards.measure}.h5",
        "ground_truth": f"results/{exp}/lds/test.h5",
    }
    if wildcards.method in CFG.daunce.variants:
        out["selection"] = f"results/{exp}/daunce/{wildcards.method}/selection.json"
    return out


def lds_eval_files(wildcards=None):
    """Every (method, measure) evaluated on the LDS test masks."""
    files = expand(
        "results/{experiment}/lds/eval/{variant}/{measure}.json",
        experiment=EXP,
        variant=CFG.daunce.variants,
        measure=MEASURES,
    )
    return files + baseline_eval_files()


def figure_variant():
    return FIGURES["variant"]


def fig5_inputs(wildcards):
    """The data split and the scores (per measure) of the variant Figure 5 shows."""
    out = {"split": f"results/{EXP}/data/split.npz", "config": EFFECTIVE_CONFIG}
    out.update({m: f"results/{EXP}/scores/{figure_variant()}/{m}.h5" for m in MEASURES})
    return out


def fig3_vision_chunks():
    """Chunk files of every lr of the figure variant's fits ({lr tag: [files]}); Figure 3 reads the
    selected lr's (its trace group)."""
    n = math.ceil(CFG.daunce.K / CFG.daunce.chunk_size)
    v = fit_variant(figure_variant())
    return {lr: [f"results/{EXP}/daunce/{v}/lr{lr}/chunk{c}.h5" for c in range(n)] for lr in LR_TAGS}


def fig3_llm_chunks():
    """The LLM's chunk files per lr ({} without an llm section)."""
    if "llm" not in config:
        return {}
    n = math.ceil(LLM.K / LLM.chunk_size)
    return {lr: [f"results/{EXP}/llm/daunce/lr{lr}/chunk{c}.h5" for c in range(n)] for lr in LLM.lr_tags()}


def fig3_inputs(wildcards):
    out = {
        "vision_selection": f"results/{EXP}/daunce/{figure_variant()}/selection.json",
        "vision": [f for files in fig3_vision_chunks().values() for f in files],
        "config": EFFECTIVE_CONFIG,
    }
    if "llm" in config:
        out["llm_selection"] = f"results/{EXP}/llm/daunce/selection.json"
        out["llm"] = [f for files in fig3_llm_chunks().values() for f in files]
    return out


def fig1a_methods(wildcards):
    """Methods of Figure 1a: the white-box DAUNCE variants, then the baselines (not the limits and
    linearised fits: references for DAUNCE, in results/<experiment>/lds.csv)."""
    return WHITE_BOX + [m for m in baseline_methods() if m not in REFERENCE]


# --- Figure 1a's baselines and the cost table (rules/baselines.smk) -----------------------------


def baseline_methods():
    """The baselines the config's `baselines.methods` asks for, in its order."""
    return [m for m in BASELINES.methods if is_method(m)]


REFERENCE_PATTERN = "|".join(REFERENCE)  # rule baseline_reference's methods (limit_*, lin_*)


def baseline_eval_files():
    """LDS evaluations of the baselines (lds_eval with measure "score")."""
    return expand("results/{experiment}/lds/eval/{method}/score.json", experiment=EXP, method=baseline_methods())


def cost_inputs(wildcards):
    """LDS table, scores and losses files whose jobs' benchmark files the cost table reads."""
    out = {"lds": experiment_file("lds.csv")}
    out["select"] = f"results/{EXP}/lds/select.h5"
    for v in WHITE_BOX:
        out[f"losses_{v}"] = f"results/{EXP}/daunce/{v}/losses.h5"
        out[f"score_{v}"] = f"results/{EXP}/scores/{v}/correlation.h5"
    for m in baseline_methods():
        out[f"score_{m}"] = f"results/{EXP}/scores/{m}/score.h5"
    return out


def selection_benchmarks(wildcards=None):
    """Benchmark files of the selection ground truth's retrain jobs: tuning cost shared by every
    tuned method (results/<experiment>/cost.md)."""
    n = math.ceil(CFG.lds.M_select / CFG.lds.chunk_size)
    return [f"results/{EXP}/benchmarks/lds/select/chunk{c}.tsv" for c in range(n)]


def cost_entries(wildcards):
    """What results/<experiment>/cost.md lists: DAUNCE's white-box variants, then the baselines."""
    n_chunks = math.ceil(CFG.daunce.K / CFG.daunce.chunk_size)
    entries = [
        {
            "kind": "daunce",
            "method": v,
            "fit_benchmarks": [f"results/{EXP}/benchmarks/daunce/{fit_variant(v)}/chunk{c}.tsv" for c in range(n_chunks)],
            "score_benchmark": f"results/{EXP}/benchmarks/scores/{v}/correlation.tsv",
            "grid": len(LR_TAGS),
            "losses": f"results/{EXP}/daunce/{v}/losses.h5",
            "select_benchmark": f"results/{EXP}/benchmarks/daunce/{v}/select_lr.tsv",
            "selection": f"results/{EXP}/daunce/{v}/selection.json",
        }
        for v in WHITE_BOX
    ]
    entries += [
        {
            "kind": "baseline",
            "method": m,
            "benchmark": f"results/{EXP}/benchmarks/baselines/{m}.tsv",
            "scores": f"results/{EXP}/scores/{m}/score.h5",
        }
        for m in baseline_methods()
    ]
    return entries


# --- Section 4.2: LLM fine-tuning attribution (rules/llm.smk) ----------------------------------


def llm_base(wildcards=None):
    """The pre-trained model every full fine-tune starts from: the miniature's or llm.model."""
    return f"results/{EXP}/llm/base_model" if LLM.model == "tiny" else LLM.model


def llm_base_input(wildcards):
    """The base model as a file dependency (only when the workflow makes it)."""
    return [llm_base()] if LLM.model == "tiny" else []


def llm_full_inputs(wildcards):
    return {
        "train": f"results/{wildcards.experiment}/llm/data/train.jsonl",
        "query": f"results/{wildcards.experiment}/llm/data/query.jsonl",
        "base": llm_base_input(wildcards),
    }


def llm_chunk_files(wildcards):
    return expand(
        "results/{experiment}/llm/daunce/lr{lr}/chunk{chunk}.h5",
        experiment=wildcards.experiment,
        lr=wildcards.lr,
        chunk=range(math.ceil(LLM.K / LLM.chunk_size)),
    )


def llm_lr_losses(wildcards):
    return expand(
        "results/{experiment}/llm/daunce/lr{lr}/losses.h5",
        experiment=wildcards.experiment,
        lr=LLM.lr_tags(),
    )


def llm_removal_inputs(wildcards):
    exp = wildcards.experiment
    out = {
        "train": f"results/{exp}/llm/data/train.jsonl",
        "queries": f"results/{exp}/llm/full/queries.jsonl",
        "eval": f"results/{exp}/llm/full/eval.json",
        "base": llm_base_input(wildcards),
    }
    if wildcards.method not in ("random", "none"):
        out["scores"] = f"results/{exp}/llm/scores/{wildcards.method}.h5"
    return out


def llm_removal_files(wildcards=None):
    """Every point of Figure 2: each method at each N > 0, and the full-data retrain (N = 0,
    method 'none') that measures the retraining noise for all methods."""
    return [f"results/{EXP}/llm/removal/{m}/N{N}.json" for m, N in LLM.removal_points()]


# --- Section 5: black-box access, the backdoor study (rules/blackbox.smk) ----------------------


def blackbox_data_files(wildcards):
    return {
        "train": f"results/{wildcards.experiment}/blackbox/data/train.jsonl",
        "query": f"results/{wildcards.experiment}/blackbox/data/query.jsonl",
    }


def blackbox_theta0_inputs(wildcards):
    """Data, the cost estimate and, for the local server, its base model. The estimate only has to
    come first: the step estimates again from the config before any paid call, so a re-estimate
    (a price or max_spend_usd changed) never re-plans a fit (ancient)."""
    out = blackbox_data_files(wildcards)
    out["estimate"] = ancient(f"results/{wildcards.experiment}/blackbox/{wildcards.bbmodel}/cost_estimate.json")
    if BB.backend == "local":
        out["base"] = f"results/{wildcards.experiment}/blackbox/{wildcards.bbmodel}/local_base"
    return out


def blackbox_losses_inputs(wildcards):
    out = blackbox_data_files(wildcards)
    out["theta0"] = f"results/{wildcards.experiment}/blackbox/{wildcards.bbmodel}/theta0.json"
    out["estimate"] = ancient(f"results/{wildcards.experiment}/blackbox/{wildcards.bbmodel}/cost_estimate.json")
    return out


def blackbox_fig4_inputs(wildcards):
    """Every (base model, access setting) score file, theta_0 of every model, and the data."""
    out = {
        "train": f"results/{EXP}/blackbox/data/train.jsonl",
        "query": f"results/{EXP}/blackbox/data/query.jsonl",
        "config": EFFECTIVE_CONFIG,
    }
    out["theta0"] = [f"results/{EXP}/blackbox/{m}/theta0.json" for m in BB.models]
    out["scores"] = [f"results/{EXP}/blackbox/{m}/scores/{a}.h5" for m in BB.models for a in BB.access]
    return out


# --- the quality landscape study (rules/study.smk) ----------------------------


def study_groups():
    """The study's groups of settings (daunce_core.steps.study.groups); an error while the study is off."""
    from daunce_core.steps.study import groups

    if not CFG.study.enabled:
        raise ValueError(
            "the quality study is off (study.enabled: false); run it with "
            "--config study='{enabled: true}' (docs/quality.md)"
        )
    return groups(CFG)


def study_group_inputs(wildcards):
    """Data, theta_0 (and the group's extra theta_0s), both ground truths and, for a grid centred
    on the default's choice, the default's selection record of the variant."""
    from daunce_core.config import fit_variant
    from daunce_core.steps.study import group_of, needs_default_selection

    study_groups()  # refuses while the study is off
    exp = wildcards.experiment
    group = group_of(CFG, wildcards.group)
    extra = range(1, group.theta0s)
    out = {
        "split": f"results/{exp}/data/split.npz",
        "theta0": [f"results/{exp}/base/theta_0.safetensors"]
        + [f"results/{exp}/study/theta0/seed{s}/theta_0.safetensors" for s in extra],
        "theta0_metrics": [f"results/{exp}/study/theta0/seed{s}/metrics.json" for s in extra],
        "select": f"results/{exp}/lds/select.h5",
        "test": f"results/{exp}/lds/test.h5",
    }
    if needs_default_selection(CFG, group):
        out["selection"] = f"results/{exp}/daunce/{wildcards.variant}/selection.json"
    return out


def study_group_files(wildcards=None):
    return [f"results/{EXP}/study/{v}/{g.name}.json" for v in CFG.study.variants for g in study_groups()]


def study_baseline_sources(wildcards=None):
    """{baseline: {benchmark, scores}}: where the quality table reads each baseline's compute."""
    return {
        m: {"benchmark": f"results/{EXP}/benchmarks/baselines/{m}.tsv", "scores": f"results/{EXP}/scores/{m}/score.h5"}
        for m in baseline_methods()
    }


def study_table_inputs(wildcards):
    sources = study_baseline_sources()
    return {
        "groups": study_group_files(),
        "lds": experiment_file("lds.csv"),
        "split": f"results/{EXP}/data/split.npz",
        "scores": [s["scores"] for s in sources.values()],  # their benchmark files come with them
        "config": EFFECTIVE_CONFIG,
    }


def study_figure_input(wildcards):
    study_groups()  # refuses while the study is off
    return f"results/{EXP}/study/quality.csv"


# --- mislabelled-example detection (rules/mislabel.smk) -----------------------------------------

MISLABEL_METHODS = CFG.mislabel.method_list(CFG.daunce.variants, BASELINES.methods)
MISLABEL_BASELINES = [m for m in MISLABEL_METHODS if not m.startswith("daunce")]
MISLABEL_FROM_LDS = CFG.mislabel.settings == "lds"
MISLABEL_KEYS = ("data", "model", "base", "mislabel.fraction", "mislabel.seed")


def mislabel_file(method):
    """A method's file of the table: DAUNCE's signals (of its fit variant) or a baseline's self-scores."""
    if method.startswith("daunce"):  # a Q form shares its fit variant's fits, unless its own lr was selected
        return f"results/{EXP}/mislabel/daunce/{method if MISLABEL_FROM_LDS else fit_variant(method)}/signals.npz"
    return f"results/{EXP}/mislabel/self/{method}.npz"


def mislabel_baseline_settings(method):
    """A baseline's mislabel keys: the noisy data's, the mislabel settings and the section of the
    method that runs (trak_k<N>: baselines.trak, its proj_dim fixed by the name, in the path)."""
    base = base_method(method)[0]
    return step_settings(*MISLABEL_KEYS, "mislabel.settings",
                         *[f"baselines.{b}" for b in [base] if b in SETTINGS_TREE["baselines"]])


def mislabel_inputs(wildcards):
    exp = wildcards.experiment
    out = {"split": f"results/{exp}/data/split.npz", "flips": f"results/{exp}/mislabel/flips.npz",
           "theta_0": f"results/{exp}/mislabel/theta_0.safetensors"}
    if MISLABEL_FROM_LDS and getattr(wildcards, "variant", None):
        out["selection"] = f"results/{exp}/daunce/{wildcards.variant}/selection.json"
    elif MISLABEL_FROM_LDS:
        out["scores"] = f"results/{exp}/scores/{wildcards.method}/score.h5"
    return out
