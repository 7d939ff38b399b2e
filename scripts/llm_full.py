"""rule llm_full: theta_0 (seed 0) and the other full-data seeds; which queries they all solve."""
import logging

from daunce_core.lm.distributed import relaunch
from daunce_core.runner import run_script
from daunce_core.steps.llm import LLMSettings, device, full_models


def main(sm):
    info = full_models(LLMSettings.from_config(sm.config), sm.params.base, sm.input.train, sm.input.query,
                       sm.output.theta_0, sm.output.eval, sm.output.queries, device(sm.config))
    if info:  # empty on the ranks > 0 of torchrun
        logging.getLogger("daunce").info("full-data accuracy per seed %s; %d queries solved by all seeds",
                                         info["accuracy"], len(info["selected"]))


# a SLURM job with several GPUs on its node runs this script again under torchrun, one rank per GPU
if not relaunch():
    run_script(snakemake, main)  # noqa: F821
