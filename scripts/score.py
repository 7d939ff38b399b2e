"""rule score: covariance / correlation scores of a losses file."""
from daunce_core.pipeline import score_losses
from daunce_core.runner import run_script


def main(sm):
    score_losses(sm.input[0], sm.output[0], sm.wildcards.measure)


run_script(snakemake, main)  # noqa: F821
