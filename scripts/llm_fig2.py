"""rule fig2: Figure 2, the removal curves, and their table."""
from daunce_core import removal
from daunce_core.runner import run_script


def main(sm):
    results = removal.read_results(list(sm.input.results))
    rows = removal.summarise(results)
    removal.write_table(rows, sm.output.csv)
    removal.plot_removal(rows, sm.output.pdf, title=sm.params.title, n_train=results[0].get("n_train"),
                         n_queries=results[0].get("queries"))


run_script(snakemake, main)  # noqa: F821
