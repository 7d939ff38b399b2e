rule data:
    """Load (download when online) the dataset and record the ids of the train/query split."""
    output:
        "results/{experiment}/data/split.npz",
    log:
        "results/{experiment}/logs/data.log",
    conda:
        "../envs/daunce.yaml"
    script:
        "../../scripts/data.py"
