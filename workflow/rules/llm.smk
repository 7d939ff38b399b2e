# Section 4.2 / Appendix C: LLM fine-tuning attribution and most-influential-subset removal.
#   snakemake -c2 results/fig2.pdf                                    the miniature (tiny LM, CPU)
#   snakemake -n --configfile=config/paper/llm_math.yaml results/fig2.pdf   the paper-scale plan
# theta_0 = a full fine-tune of llm.model; DAUNCE = K LoRA perturbed fits on theta_0; LoGra from
# dattri; each removal job retrains from llm.model for every seed. Input functions: common.smk;
# GPU, memory and minutes: profiles/slurm. One thread per job (tiny models on a shared CPU run best
# on one; two spin-wait on each small op).
rule llm_data:
    """Training and query sets as jsonl: the synthetic task, or the hub datasets (NuminaMath-CoT /
    MATH, AutoIF / IFEval) sampled with their seeds."""
    input:
        llm_source_inputs,
    output:
        train="results/{experiment}/llm/data/train.jsonl",
        query="results/{experiment}/llm/data/query.jsonl",
        pretrain="results/{experiment}/llm/data/pretrain.jsonl",
    log:
        "results/{experiment}/logs/llm/data.log",
    params:
        settings=step_settings("llm.task", "llm.data"),
    conda:
        "../envs/daunce.yaml"
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
    params:
        settings=step_settings("llm.tiny"),
    conda:
        "../envs/daunce.yaml"
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
        settings=step_settings(
            *LLM_FINETUNE,
            "llm.seeds",
            "llm.query_target",
            "llm.select.fraction",
            "llm.removal.seed",
            "llm.removal.queries",
            judged=len(LLM.lr_grid) > 1,
        ),
        base=llm_base(),
    conda:
        "../envs/daunce.yaml"
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
    params:
        settings=step_settings(
            "llm.dtype", "llm.template", "llm.finetune.max_length", "llm.daunce", drop=LLM_DAUNCE_NOT_FIT
        ),
        models=lambda wildcards: chunk_range(LLM.K, LLM.chunk_size, wildcards.chunk),
    conda:
        "../envs/daunce.yaml"
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
    conda:
        "../envs/daunce.yaml"
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
        settings=step_settings(*LLM_FINETUNE, "llm.select", "llm.daunce.measure", "llm.daunce.variant"),
        lrs=LLM.lr_tags(),
        base=llm_base(),
    conda:
        "../envs/daunce.yaml"
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
    params:
        settings=step_settings("llm.daunce.measure"),
    conda:
        "../envs/daunce.yaml"
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
    params:
        settings=step_settings("llm.dtype", "llm.template", "llm.finetune.max_length", "llm.logra"),
    conda:
        "../envs/daunce.yaml"
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
        settings=step_settings(*LLM_FINETUNE, "llm.seeds", "llm.removal.seed", "llm.removal.seeds"),
        base=llm_base(),
    conda:
        "../envs/daunce.yaml"
    script:
        "../../scripts/llm_removal.py"


rule fig2:
    """Figure 2: most-influential-subset removal, DAUNCE and LoGra against random removal, and the
    paired differences over the retrain seeds with 95% t-intervals (the table holds both)."""
    input:
        results=llm_removal_files,
        config=EFFECTIVE_CONFIG,
    output:
        pdf=report(
            f"results/{EXP}/fig2.pdf",
            caption="../report/fig2.rst",
            category="Figures",
            labels={"figure": "2"},
        ),
        csv=f"results/{EXP}/llm_removal.csv",
    log:
        f"results/{EXP}/logs/fig2.log",
    params:
        title=f"{LLM.task}: {LLM.model}",
    conda:
        "../envs/daunce.yaml"
    script:
        "../../scripts/llm_fig2.py"
