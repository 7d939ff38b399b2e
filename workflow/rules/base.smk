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
    threads: 2
    resources:
        # a GPU only when config device is cuda; memory and minutes sized for the embedded
        # default -- profiles/slurm's set-resources sets the paper-scale values
        gpu=gpu_request,
        mem_mb=4000,
        runtime=60,
    script:
        "../../scripts/base.py"
