"""rules gather_losses / llm_gather / gather_ground_truth: concatenate chunk files.

gather_losses makes one losses file per learning rate: its inputs are the chunks of each output in
turn, the same number per output."""
from daunce_core import store
from daunce_core.fit import chunks
from daunce_core.runner import run_script


def main(sm):
    paths, outs = list(sm.input), list(sm.output)
    if sm.rule == "gather_ground_truth":
        store.concat_ground_truth(paths, outs[0])
        return
    per = len(paths) // len(outs)
    if per * len(outs) != len(paths):
        raise ValueError(f"rule {sm.rule}: {len(paths)} chunk files do not split evenly over {len(outs)} outputs")
    for i, out in enumerate(outs):
        chunks.gather(paths[i * per:(i + 1) * per], out)


run_script(snakemake, main)  # noqa: F821
