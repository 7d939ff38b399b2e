rule base:
    """theta_0: the model trained on the full training set with the base recipe."""
    input:
        split="results/{experiment}/data/split.npz",
    output:
        state="results/{experiment}/base/theta_0.safetensors",
        metrics="results/{experiment}/base/metrics.json",
    log:
        "results/{experiment}/logs/base.log",
    benchmark:
        "results/{experiment}/benchmarks/base.tsv"
    params:
        settings=step_settings("data", "model", "base"),
    conda:
        "../envs/daunce.yaml"
    script:
        "../../scripts/base.py"
