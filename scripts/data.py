"""rule data: load the dataset and record the split."""
from daunce_core.runner import experiment_config, run_script
from daunce_core.steps.vision import prepare_data


def main(sm):
    prepare_data(experiment_config(sm), sm.output[0])


run_script(snakemake, main)  # noqa: F821
