"""rule data: load the dataset and record the split."""
from daunce_core.pipeline import prepare_data
from daunce_core.runner import experiment_config, run_script


def main(sm):
    prepare_data(experiment_config(sm), sm.output[0])


run_script(snakemake, main)  # noqa: F821
