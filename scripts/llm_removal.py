"""rule llm_removal: remove a method's top N training examples, retrain per seed, count flipped queries."""
from daunce_core.lm.distributed import relaunch
from daunce_core.runner import run_script
from daunce_core.steps.llm import LLMSettings, device, removal_job


def main(sm):
    scores = sm.input.get("scores") if hasattr(sm.input, "get") else getattr(sm.input, "scores", None)
    removal_job(LLMSettings.from_config(sm.config), sm.wildcards.method, int(sm.wildcards.N), scores,
                sm.params.base, sm.input.train, sm.input.queries, sm.input.eval, sm.output[0], device(sm.config))


# a SLURM job with several GPUs on its node runs this script again under torchrun, one rank per GPU
if not relaunch():
    run_script(snakemake, main)  # noqa: F821
