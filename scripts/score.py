"""rule score: covariance / correlation scores of a losses file."""
from daunce_core.runner import run_script
from daunce_core.steps.vision import score_variant


def main(sm):
    score_variant(sm.wildcards.variant, sm.input[0], sm.output[0], sm.wildcards.measure,
                  memory_gb=float(sm.config.get("scoring", {}).get("memory_gb", 4.0)), threads=sm.threads)


run_script(snakemake, main)  # noqa: F821
