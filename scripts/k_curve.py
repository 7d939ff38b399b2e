"""rule k_curve: LDS against the number of perturbed models."""
from daunce_core.runner import experiment_config, run_script
from daunce_core.steps.vision import k_curve


def main(sm):
    k_curve(experiment_config(sm), sm.input.losses, sm.input.ground_truth, sm.params.measure, sm.output[0],
            variant=sm.wildcards.variant)


run_script(snakemake, main)  # noqa: F821
