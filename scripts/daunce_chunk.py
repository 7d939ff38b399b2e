"""rule perturbed_chunk: fit one chunk of perturbed models (every lr) and record their losses."""
from daunce_core.runner import experiment_config, run_script
from daunce_core.steps.vision import perturbed_chunk


def main(sm):
    perturbed_chunk(experiment_config(sm), sm.input.split, sm.input.theta_0, sm.wildcards.variant,
                    [float(lr) for lr in sm.params.lrs], int(sm.wildcards.chunk), list(sm.output))


run_script(snakemake, main)  # noqa: F821
