# Input functions and names shared by the rules. All logic of the DAG's shape lives here.
import math

from daunce_core.config import ExperimentConfig

EXP = config["experiment"]
CFG = ExperimentConfig.from_dict(config).validate()

WHITE_BOX = [v for v in CFG.daunce.variants if not v.endswith("_bb")]
BLACK_BOX = [v for v in CFG.daunce.variants if v.endswith("_bb")]
MEASURES = ["correlation", "covariance"]
LR_TAGS = [f"{lr:g}" for lr in CFG.daunce.lr_grid]
# Filled in by rules/baselines.smk when it is included before this file's users run.
BASELINE_METHODS = []
BASELINE_EVAL_FILES = []
EXTRA_FINAL_OUTPUTS = []


wildcard_constraints:
    experiment=r"[A-Za-z0-9_.-]+",
    variant=r"daunce(_e|_t)?(_bb)?",
    measure=r"correlation|covariance|score",
    method=r"[a-z0-9_]+",
    lr=r"[0-9.e+-]+",
    chunk=r"\d+",
    split=r"test|select",


def exp_config():
    """The config as the library reads it (passed to every script)."""
    return CFG


def gpu_request(wildcards):
    """GPUs a training job (base, perturbed_chunk, lds_chunk) asks the scheduler for.

    One when the config's ``device`` is CUDA (``config/paper/*.yaml``), none otherwise: the
    embedded default (``device: auto``) requests no GPU, so it runs on a CPU-only SLURM node.
    The trainers read the same key (``daunce_core.utils.pick_device``), so a job never asks for
    a GPU it will not use, and ``device: cuda`` fails loudly on a node without one.
    """
    return 1 if CFG.device.startswith("cuda") else 0


def daunce_chunk_files(wildcards):
    n = math.ceil(CFG.daunce.K / CFG.daunce.chunk_size)
    return expand(
        "results/{experiment}/daunce/{variant}/lr{lr}/chunk{chunk}.h5",
        experiment=wildcards.experiment,
        variant=wildcards.variant,
        lr=wildcards.lr,
        chunk=range(n),
    )


def lr_grid_losses(wildcards):
    return expand(
        "results/{experiment}/daunce/{variant}/lr{lr}/losses.h5",
        experiment=wildcards.experiment,
        variant=wildcards.variant,
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


def lds_eval_files(wildcards=None):
    """Every (method, measure) evaluated on the LDS test masks."""
    files = expand(
        "results/{experiment}/lds/eval/{variant}/{measure}.json",
        experiment=EXP,
        variant=CFG.daunce.variants,
        measure=MEASURES,
    )
    return files + baseline_eval_files()


def baseline_eval_files():
    """LDS evaluations of the baselines (filled in by rules/baselines.smk when included)."""
    return BASELINE_EVAL_FILES


def figure_variant():
    return config.get("figures", {}).get("variant", CFG.daunce.variants[0])


def fig5_inputs(wildcards):
    """The data split and the scores (per measure) of the variant Figure 5 shows."""
    out = {"split": f"results/{EXP}/data/split.npz"}
    out.update({m: f"results/{EXP}/scores/{figure_variant()}/{m}.h5" for m in MEASURES})
    return out


def fig1a_methods(wildcards):
    """Methods of Figure 1a: the white-box DAUNCE variants, then the baselines."""
    return WHITE_BOX + BASELINE_METHODS


def get_final_output():
    out = [
        "results/lds.csv",
        "results/fig1a.pdf",
        "results/table3.md",
        "results/table3.csv",
        "results/fig6.pdf",
        "results/fig5.pdf",
    ]
    if BLACK_BOX:
        out.append("results/fig1b.pdf")
    return out + EXTRA_FINAL_OUTPUTS
