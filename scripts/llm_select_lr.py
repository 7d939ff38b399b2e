"""rule llm_select_lr: the LoRA learning rate, judged on the selection queries only."""
import logging

from daunce_core.lm.distributed import relaunch
from daunce_core.runner import run_script
from daunce_core.steps.llm import LLMSettings, device, select_lr


def main(sm):
    lr = select_lr(LLMSettings.from_config(sm.config), list(sm.input.losses), sm.params.lrs, sm.input.eval,
                   sm.params.base, sm.input.train, sm.input.queries, sm.output.losses, sm.output.selection,
                   device(sm.config))
    logging.getLogger("daunce").info("selected lr %g (%s)", lr, sm.output.selection)


# a SLURM job with several GPUs on its node runs this script again under torchrun, one rank per GPU
if not relaunch():
    run_script(snakemake, main)  # noqa: F821
