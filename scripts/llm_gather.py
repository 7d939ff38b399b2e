"""rule llm_gather: concatenate the chunks of one learning rate along K."""
from daunce_core.runner import run_script
from daunce_core.store import concat_losses


def main(sm):
    concat_losses(list(sm.input), sm.output[0])


run_script(snakemake, main)  # noqa: F821
