"""rule regime: results/<experiment>/regime.pdf and regime.csv -- LDS against storage and compute."""
from daunce_core.figures import regime_figure, regime_rows
from daunce_core.runner import run_script


def main(sm):
    rows = regime_rows(list(sm.params.entries), sm.input.lds, sm.input.theta_0,
                       selection_benchmarks=list(sm.params.selection_benchmarks))
    regime_figure(rows, sm.output.pdf, sm.output.csv, title=sm.wildcards.experiment)


run_script(snakemake, main)  # noqa: F821
