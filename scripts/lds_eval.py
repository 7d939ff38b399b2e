"""rule lds_eval: LDS of one scores file."""
from daunce_core.pipeline import evaluate_scores
from daunce_core.runner import experiment_config, run_script


def main(sm):
    evaluate_scores(experiment_config(sm), sm.input.scores, sm.input.ground_truth, sm.wildcards.method,
                    sm.wildcards.measure, sm.output[0])


run_script(snakemake, main)  # noqa: F821
