"""rule base: train theta_0."""
from daunce_core.pipeline import train_base
from daunce_core.runner import experiment_config, run_script


def main(sm):
    train_base(experiment_config(sm), sm.input.split, sm.output.state, sm.output.metrics)


run_script(snakemake, main)  # noqa: F821
