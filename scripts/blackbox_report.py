"""rules blackbox_score, fig4: DAUNCE scores of the black-box losses; precision@10 and the table."""
from daunce_core.runner import run_script
from daunce_core.steps import blackbox as study


def main(sm):
    cfg = study.load_config(sm.config)
    if sm.rule == "blackbox_score":
        study.score(sm.input[0], sm.output[0], cfg.measure)
    elif sm.rule == "fig4":
        models, access = list(sm.params.models), list(sm.params.access)
        pairs = [(m, a) for m in models for a in access]
        study.fig4(cfg, train_path=sm.input.train, query_path=sm.input.query,
                   theta0_jsons=dict(zip(models, sm.input.theta0)), scores=dict(zip(pairs, sm.input.scores)),
                   out_md=sm.output.md, out_csv=sm.output.csv)
    else:
        raise ValueError(f"scripts/blackbox_report.py does not run rule {sm.rule!r}")


run_script(snakemake, main)  # noqa: F821
