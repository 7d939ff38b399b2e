"""rule lds_eval: LDS of one scores file."""
import json

from daunce_core.runner import experiment_config, run_script
from daunce_core.steps.vision import evaluate_scores


def main(sm):
    tuning = json.loads(open(sm.input.selection).read()) if "selection" in sm.input.keys() else None
    evaluate_scores(experiment_config(sm), sm.input.scores, sm.input.ground_truth, sm.wildcards.method,
                    sm.wildcards.measure, sm.output[0], tuning=tuning)


run_script(snakemake, main)  # noqa: F821
