"""rule llm_data: the training and query sets (and the miniature's pre-training corpus) as jsonl."""
import logging

from daunce_core.runner import run_script
from daunce_core.steps.llm import LLMSettings, prepare_data


def main(sm):
    info = prepare_data(LLMSettings.from_config(sm.config), sm.output.train, sm.output.query, sm.output.pretrain)
    logging.getLogger("daunce").info("data: %s", info)


run_script(snakemake, main)  # noqa: F821
