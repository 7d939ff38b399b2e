"""rule cost: results/<experiment>/cost.md from the benchmark files of the run."""
from daunce_core.baselines.cost import startup_baseline, write_cost_table
from daunce_core.runner import run_script


def main(sm):
    write_cost_table(list(sm.params.entries), sm.input.lds, sm.params.base_benchmark, sm.output[0],
                     experiment=sm.params.experiment, startup=startup_baseline(),
                     selection_benchmarks=list(sm.params.selection_benchmarks))


run_script(snakemake, main)  # noqa: F821
