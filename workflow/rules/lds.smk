rule lds_chunk:
    """LDS ground truth: retrain from scratch on a chunk of the subset masks, over seeds; keep the
    margins of the split's own queries (lds.select_fraction: selection queries, the rest test)."""
    input:
        split="results/{experiment}/data/split.npz",
    output:
        "results/{experiment}/lds/{split}/chunk{chunk}.h5",
    log:
        "results/{experiment}/logs/lds/{split}/chunk{chunk}.log",
    benchmark:
        "results/{experiment}/benchmarks/lds/{split}/chunk{chunk}.tsv"
    params:
        settings=step_settings("data", "model", "base", "lds", drop=LDS_NOT_RETRAIN),
        masks=lambda wildcards: chunk_range(lds_masks(wildcards.split), CFG.lds.chunk_size, wildcards.chunk),
    conda:
        "../envs/daunce.yaml"
    script:
        "../../scripts/lds_chunk.py"


rule gather_ground_truth:
    input:
        lds_chunk_files,
    output:
        "results/{experiment}/lds/{split}.h5",
    log:
        "results/{experiment}/logs/lds/{split}/gather.log",
    conda:
        "../envs/daunce.yaml"
    script:
        "../../scripts/gather.py"


rule lds_eval:
    """LDS of one method's scores on the test masks and test queries, raw and thresholded (every
    method alike), with CIs of one bootstrap over masks and queries together (its replicates kept
    for the paired differences); DAUNCE's rows name the learning rate its selection chose."""
    input:
        unpack(lds_eval_inputs),
    output:
        "results/{experiment}/lds/eval/{method}/{measure}.json",
    log:
        "results/{experiment}/logs/lds/eval/{method}/{measure}.log",
    params:
        settings=step_settings("lds.threshold", "lds.bootstrap", "lds.seed"),
    conda:
        "../envs/daunce.yaml"
    script:
        "../../scripts/lds_eval.py"


rule lds_table:
    """results/<experiment>/lds.csv: every evaluation's rows; lds_paired.csv: paired differences with
    bootstrap CIs (thresholded - raw per method; each DAUNCE row - each baseline)."""
    input:
        evals=lds_eval_files,
        config=EFFECTIVE_CONFIG,
    output:
        lds=report(
            f"results/{EXP}/lds.csv",
            caption="../report/lds.rst",
            category="LDS",
            labels={"table": "LDS of every method"},
        ),
        paired=f"results/{EXP}/lds_paired.csv",
    log:
        f"results/{EXP}/logs/lds_table.log",
    params:
        daunce=CFG.daunce.variants,
    conda:
        "../envs/daunce.yaml"
    script:
        "../../scripts/lds_table.py"


rule k_curve:
    """Figure 6's data: LDS of the first K' perturbed models (test masks, test queries)."""
    input:
        losses=f"results/{EXP}/daunce/{{variant}}/losses.h5",
        ground_truth=f"results/{EXP}/lds/test.h5",
    output:
        f"results/{EXP}/lds/k_curve/{{variant}}.csv",
    log:
        f"results/{EXP}/logs/lds/k_curve_{{variant}}.log",
    params:
        settings=step_settings("daunce.k_curve", "lds.bootstrap", "lds.seed"),
        measure="correlation",
    conda:
        "../envs/daunce.yaml"
    script:
        "../../scripts/k_curve.py"
