"""rule llm_score: DAUNCE scores of the LLM experiment (correlation or covariance across K)."""
from daunce_core.runner import run_script
from daunce_core.steps.llm import LLMSettings, daunce_scores


def main(sm):
    daunce_scores(LLMSettings.from_config(sm.config), sm.input[0], sm.output[0])


run_script(snakemake, main)  # noqa: F821
