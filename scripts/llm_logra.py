"""rule llm_logra: LoGra scores of theta_0 (dattri), the LLM baseline of Figure 2."""
from daunce_core.runner import run_script
from daunce_core.steps.llm import LLMSettings, device, logra_scores_file


def main(sm):
    logra_scores_file(LLMSettings.from_config(sm.config), sm.input.theta_0, sm.input.train, sm.input.queries,
                      sm.output[0], device(sm.config))


run_script(snakemake, main)  # noqa: F821
