rule perturbed_chunk:
    """Algorithm 1: fit one chunk of perturbed models from theta_0, for every learning rate of
    the grid, and record every example's loss (margin for DAUNCE-T) under each model. Models are
    keyed by (seed, k), so how K is chunked changes nothing."""
    input:
        split="results/{experiment}/data/split.npz",
        theta_0="results/{experiment}/base/theta_0.safetensors",
    output:
        expand("results/{{experiment}}/daunce/{{variant}}/lr{lr}/chunk{{chunk}}.h5", lr=LR_TAGS),
    log:
        "results/{experiment}/logs/daunce/{variant}/chunk{chunk}.log",
    benchmark:
        "results/{experiment}/benchmarks/daunce/{variant}/chunk{chunk}.tsv"
    params:
        settings=daunce_fit_settings,
        models=lambda wildcards: chunk_range(CFG.daunce.K, CFG.daunce.chunk_size, wildcards.chunk),
        lrs=LR_TAGS,
    conda:
        "../envs/daunce.yaml"
    script:
        "../../scripts/daunce_chunk.py"


rule gather_losses:
    """Concatenate the chunks of each learning rate of one variant along K: one job per variant,
    as perturbed_chunk fits every learning rate of a chunk in one job (a job per learning rate
    would pay a process start-up for a few file copies)."""
    input:
        daunce_chunk_files,
    output:
        expand("results/{{experiment}}/daunce/{{variant}}/lr{lr}/losses.h5", lr=LR_TAGS),
    log:
        "results/{experiment}/logs/daunce/{variant}/gather.log",
    conda:
        "../envs/daunce.yaml"
    script:
        "../../scripts/gather.py"


rule select_lr:
    """Appendix B's learning-rate grid search, judged on the LDS *selection* masks and selection
    queries only; selection.json records on_edge when the choice is an end of the grid."""
    input:
        losses=lr_grid_losses,
        ground_truth="results/{experiment}/lds/select.h5",
    output:
        losses="results/{experiment}/daunce/{variant}/losses.h5",
        selection="results/{experiment}/daunce/{variant}/selection.json",
    log:
        "results/{experiment}/logs/daunce/{variant}/select_lr.log",
    benchmark:
        "results/{experiment}/benchmarks/daunce/{variant}/select_lr.tsv"
    params:
        settings=step_settings("daunce.select_measure"),
        lrs=LR_TAGS,
    conda:
        "../envs/daunce.yaml"
    script:
        "../../scripts/select_lr.py"


rule score:
    """Attribution scores: covariance or correlation of losses across the K models (eq. 6)."""
    input:
        "results/{experiment}/daunce/{variant}/losses.h5",
    output:
        "results/{experiment}/scores/{variant}/{measure}.h5",
    log:
        "results/{experiment}/logs/scores/{variant}/{measure}.log",
    benchmark:
        "results/{experiment}/benchmarks/scores/{variant}/{measure}.tsv"
    conda:
        "../envs/daunce.yaml"
    script:
        "../../scripts/score.py"
