"""rule llm_daunce_chunk: one chunk of LoRA perturbed fits from theta_0 and their per-example losses."""
from daunce_core.lm.steps import LLMSettings, device, daunce_chunk
from daunce_core.runner import run_script


def main(sm):
    daunce_chunk(LLMSettings.from_config(sm.config), sm.input.theta_0, sm.input.train, sm.input.queries,
                 float(sm.wildcards.lr), int(sm.wildcards.chunk), sm.output[0], device(sm.config))


run_script(snakemake, main)  # noqa: F821
