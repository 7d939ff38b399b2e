"""rule lds_chunk: LDS ground truth for a chunk of subset masks."""
from daunce_core.runner import experiment_config, run_script
from daunce_core.steps.vision import ground_truth_chunk


def main(sm):
    ground_truth_chunk(experiment_config(sm), sm.input.split, sm.wildcards.split, int(sm.wildcards.chunk),
                       sm.output[0])


run_script(snakemake, main)  # noqa: F821
