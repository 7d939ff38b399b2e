"""rule llm_score: DAUNCE scores of the LLM experiment (correlation or covariance across K)."""
from daunce_core.llm import LLMSettings
from daunce_core.pipeline import score_losses
from daunce_core.runner import run_script


def main(sm):
    score_losses(sm.input[0], sm.output[0], LLMSettings.from_config(sm.config).measure, method="daunce")


run_script(snakemake, main)  # noqa: F821
