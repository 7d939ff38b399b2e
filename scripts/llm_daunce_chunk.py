"""rule llm_daunce_chunk: one chunk of LoRA perturbed fits from theta_0 and their per-example losses."""
from daunce_core.lm.distributed import relaunch
from daunce_core.runner import run_script
from daunce_core.steps.llm import LLMSettings, daunce_chunk, device


def main(sm):
    daunce_chunk(LLMSettings.from_config(sm.config), sm.input.theta_0, sm.input.train, sm.input.queries,
                 float(sm.wildcards.lr), int(sm.wildcards.chunk), sm.output[0], device(sm.config))


# a SLURM job with several GPUs on its node runs this script again under torchrun, one rank per GPU
if not relaunch():
    run_script(snakemake, main)  # noqa: F821
