"""rule lds_table: every LDS evaluation in one csv."""
from daunce_core.lds import lds_table
from daunce_core.runner import run_script


def main(sm):
    lds_table(list(sm.input.evals), sm.output[0])


run_script(snakemake, main)  # noqa: F821
