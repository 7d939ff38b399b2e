"""rule llm_pretrain: the miniature's tokenizer and tiny causal LM, pre-trained on additions."""
import logging

from daunce_core.runner import run_script
from daunce_core.steps.llm import LLMSettings, pretrain_tiny


def main(sm):
    info = pretrain_tiny(LLMSettings.from_config(sm.config), sm.input.pretrain,
                         [sm.input.train, sm.input.query], sm.output[0])
    logging.getLogger("daunce").info("pre-training: %s", info)


run_script(snakemake, main)  # noqa: F821
