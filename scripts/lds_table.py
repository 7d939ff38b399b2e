"""rule lds_table: every LDS evaluation in one csv, and the paired differences beside it."""
from daunce_core.lds import lds_table, paired_table
from daunce_core.runner import run_script


def main(sm):
    lds_table(list(sm.input.evals), sm.output.lds)
    paired_table(list(sm.input.evals), sm.output.paired, list(sm.params.daunce))


run_script(snakemake, main)  # noqa: F821
