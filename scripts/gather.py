"""rules gather_losses / gather_ground_truth: concatenate chunk files."""
from daunce_core import store
from daunce_core.fit import chunks
from daunce_core.runner import run_script


def main(sm):
    if sm.rule == "gather_ground_truth":
        store.concat_ground_truth(list(sm.input), sm.output[0])
    else:
        chunks.gather(list(sm.input), sm.output[0])


run_script(snakemake, main)  # noqa: F821
