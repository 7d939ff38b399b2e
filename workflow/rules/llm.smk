# Section 4.2 / Appendix C: LLM fine-tuning attribution and most-influential-subset removal.
#   snakemake -c2 results/fig2.pdf                                    the miniature (tiny LM, CPU)
#   snakemake -n --configfile=config/paper/llm_math.yaml results/fig2.pdf   the paper-scale plan
# theta_0 = a full fine-tune of llm.model; DAUNCE = K LoRA perturbed fits on theta_0; LoGra from
# dattri; each removal job retrains from llm.model for every seed.
import math

from daunce_core.lm.settings import LLMSettings

LLM = LLMSettings.from_config(config)
LLM_RES = config.get("llm", {}).get("resources", {})
LLM_GPU = int(LLM_RES.get("gpu", 1))
LLM_MEM = int(LLM_RES.get("mem_mb", 200000))
LLM_RUNTIME = int(LLM_RES.get("runtime", 720))
# Tiny models on a shared CPU run best on one thread (two threads spin-wait on each small op).
LLM_THREADS = int(LLM_RES.get("threads", 1))
LLM_TINY = LLM.model == "tiny"


wildcard_constraints:
    N=r"\d+",


def llm_base(wildcards=None):
    """The pre-trained model every full fine-tune starts from: the miniature's or llm.model."""
    return f"results/{EXP}/llm/base_model" if LLM_TINY else LLM.model


def llm_base_input(wildcards):
    """The base model as a file dependency (only when the workflow makes it)."""
    return [llm_base()] if LLM_TINY else []


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


if "llm" in config:  # a config without the section asks for no LLM study
    EXTRA_FINAL_OUTPUTS.append("results/fig2.pdf")


rule llm_data:
    """Training and query sets as jsonl: the synthetic task, or the hub datasets (NuminaMath-CoT /
    MATH, AutoIF / IFEval) sampled with their seeds."""
    output:
        train="results/{experiment}/llm/data/train.jsonl",
        query="results/{experiment}/llm/data/query.jsonl",
        pretrain="results/{experiment}/llm/data/pretrain.jsonl",
    log:
        "results/{experiment}/logs/llm/data.log",
    script:
        "../../scripts/llm_data.py"


rule llm_pretrain:
    """The miniature's stand-in for a hub checkpoint: a tokenizer and a tiny LM pre-trained on
    additions (only when llm.model is 'tiny')."""
    input:
        pretrain="results/{experiment}/llm/data/pretrain.jsonl",
        train="results/{experiment}/llm/data/train.jsonl",
        query="results/{experiment}/llm/data/query.jsonl",
    output:
        directory("results/{experiment}/llm/base_model"),
    log:
        "results/{experiment}/logs/llm/pretrain.log",
    benchmark:
        "results/{experiment}/benchmarks/llm/pretrain.tsv"
    threads: LLM_THREADS
    script:
        "../../scripts/llm_pretrain.py"


rule llm_full:
    """theta_0 and the full-data seeds (Appendix C): full fine-tunes, greedy answers to every
    query, the queries all seeds solve."""
    input:
        unpack(llm_full_inputs),
    output:
        theta_0=directory("results/{experiment}/llm/full/theta_0"),
        eval="results/{experiment}/llm/full/eval.json",
        queries="results/{experiment}/llm/full/queries.jsonl",
    log:
        "results/{experiment}/logs/llm/full.log",
    benchmark:
        "results/{experiment}/benchmarks/llm/full.tsv"
    params:
        base=llm_base(),
    threads: LLM_THREADS
    resources:
        gpu=LLM_GPU,
        mem_mb=LLM_MEM,
        runtime=3 * LLM_RUNTIME,
    script:
        "../../scripts/llm_full.py"


rule llm_daunce_chunk:
    """Algorithm 1 with LoRA: one chunk of perturbed fits on theta_0 (theta_0's logits from the
    same model with its adapter disabled) and every example's response NLL under each."""
    input:
        theta_0="results/{experiment}/llm/full/theta_0",
        train="results/{experiment}/llm/data/train.jsonl",
        queries="results/{experiment}/llm/full/queries.jsonl",
    output:
        "results/{experiment}/llm/daunce/lr{lr}/chunk{chunk}.h5",
    log:
        "results/{experiment}/logs/llm/daunce/lr{lr}/chunk{chunk}.log",
    benchmark:
        "results/{experiment}/benchmarks/llm/daunce/lr{lr}/chunk{chunk}.tsv"
    threads: LLM_THREADS
    resources:
        gpu=LLM_GPU,
        mem_mb=LLM_MEM,
        runtime=LLM_RUNTIME,
    script:
        "../../scripts/llm_daunce_chunk.py"


rule llm_gather:
    """Concatenate the chunks of one learning rate along K."""
    input:
        llm_chunk_files,
    output:
        "results/{experiment}/llm/daunce/lr{lr}/losses.h5",
    log:
        "results/{experiment}/logs/llm/daunce/lr{lr}/gather.log",
    script:
        "../../scripts/gather.py"


rule llm_select_lr:
    """The LoRA learning rate of the grid whose scores flip the most *selection* queries (a
    disjoint part of the solved queries; Figure 2 reports the rest)."""
    input:
        unpack(llm_full_inputs),
        losses=llm_lr_losses,
        eval="results/{experiment}/llm/full/eval.json",
        queries="results/{experiment}/llm/full/queries.jsonl",
    output:
        losses="results/{experiment}/llm/daunce/losses.h5",
        selection="results/{experiment}/llm/daunce/selection.json",
    log:
        "results/{experiment}/logs/llm/daunce/select_lr.log",
    params:
        lrs=LLM.lr_tags(),
        base=llm_base(),
    threads: LLM_THREADS
    resources:
        gpu=LLM_GPU,
        mem_mb=LLM_MEM,
        runtime=len(LLM.lr_grid) * LLM_RUNTIME,
    script:
        "../../scripts/llm_select_lr.py"


rule llm_score:
    """DAUNCE scores: correlation (or covariance) of the K LoRA models' losses (eq. 6)."""
    input:
        "results/{experiment}/llm/daunce/losses.h5",
    output:
        "results/{experiment}/llm/scores/daunce.h5",
    log:
        "results/{experiment}/logs/llm/scores/daunce.log",
    threads: LLM_THREADS
    script:
        "../../scripts/llm_score.py"


rule llm_logra:
    """LoGra (dattri's LoGraAttributor) on theta_0, projection rank x rank per layer."""
    input:
        theta_0="results/{experiment}/llm/full/theta_0",
        train="results/{experiment}/llm/data/train.jsonl",
        queries="results/{experiment}/llm/full/queries.jsonl",
    output:
        "results/{experiment}/llm/scores/logra.h5",
    log:
        "results/{experiment}/logs/llm/scores/logra.log",
    benchmark:
        "results/{experiment}/benchmarks/llm/logra.tsv"
    threads: LLM_THREADS
    resources:
        gpu=LLM_GPU,
        mem_mb=LLM_MEM,
        runtime=LLM_RUNTIME,
    script:
        "../../scripts/llm_logra.py"


rule llm_removal:
    """One point of Figure 2: remove the method's top N (summed scores over the solved test
    queries; random: a fresh ranking per seed; none: N = 0), fine-tune again from the base model
    for every removal seed (the same seeds for every point), share of queries now wrong."""
    wildcard_constraints:
        method=r"[a-z_]+",
    input:
        unpack(llm_removal_inputs),
    output:
        "results/{experiment}/llm/removal/{method}/N{N}.json",
    log:
        "results/{experiment}/logs/llm/removal/{method}/N{N}.log",
    benchmark:
        "results/{experiment}/benchmarks/llm/removal/{method}/N{N}.tsv"
    params:
        base=llm_base(),
    threads: LLM_THREADS
    resources:
        gpu=LLM_GPU,
        mem_mb=LLM_MEM,
        runtime=3 * LLM_RUNTIME,
    script:
        "../../scripts/llm_removal.py"


rule fig2:
    """Figure 2: most-influential-subset removal, DAUNCE and LoGra against random removal, and the
    paired differences over the retrain seeds with 95% t-intervals (the table holds both)."""
    input:
        llm_removal_files,
    output:
        pdf=report(
            "results/fig2.pdf",
            caption="../report/fig2.rst",
            category="Figures",
            labels={"figure": "2"},
        ),
        csv="results/llm_removal.csv",
    log:
        f"results/{EXP}/logs/fig2.log",
    params:
        title=f"{LLM.task}: {LLM.model}",
    script:
        "../../scripts/llm_fig2.py"
