"""rule base: train theta_0."""
from daunce_core.runner import experiment_config, run_script
from daunce_core.steps.vision import train_base


def main(sm):
    train_base(experiment_config(sm), sm.input.split, sm.output.state, sm.output.metrics)


run_script(snakemake, main)  # noqa: F821
