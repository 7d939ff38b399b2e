"""rule select_lr: learning-rate grid search on the LDS selection masks."""
from daunce_core.runner import experiment_config, run_script
from daunce_core.steps.vision import select_lr


def main(sm):
    paths = {float(tag): path for tag, path in zip(sm.params.lrs, sm.input.losses)}
    select_lr(experiment_config(sm), sm.wildcards.variant, paths, sm.input.ground_truth,
              sm.output.losses, sm.output.selection)


run_script(snakemake, main)  # noqa: F821
