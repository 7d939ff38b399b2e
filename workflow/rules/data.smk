rule data:
    """Load (download when online) the dataset and record the ids of the train/query split."""
    input:
        data_inputs,
    output:
        "results/{experiment}/data/split.npz",
    log:
        "results/{experiment}/logs/data.log",
    params:
        settings=step_settings("data"),
        images=image_folder_listing,
    conda:
        "../envs/daunce.yaml"
    script:
        "../../scripts/data.py"
