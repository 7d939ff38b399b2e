"""rules study_theta0, study_group, study_table, quality_figure: the quality landscape study."""
from daunce_core import figures
from daunce_core.runner import experiment_config, run_script
from daunce_core.steps import study


def main(sm):
    cfg = experiment_config(sm)
    if sm.rule == "study_theta0":
        study.train_theta0(cfg, int(sm.wildcards.s), sm.input.split, sm.output.state, sm.output.metrics)
    elif sm.rule == "study_group":
        study.run_group(cfg, sm.wildcards.variant, sm.wildcards.group, sm.input.split, list(sm.input.theta0),
                        sm.input.select, sm.input.test, sm.output[0],
                        selection_json=sm.input.get("selection"), theta0_metrics=list(sm.input.theta0_metrics))
    elif sm.rule == "study_table":
        study.quality_table(cfg, list(sm.input.groups), sm.input.lds, sm.input.split, dict(sm.params.baselines),
                            sm.output.quality, sm.output.grid)
    elif sm.rule == "quality_figure":
        figures.quality(sm.input[0], sm.output[0])
    else:
        raise ValueError(f"scripts/study.py does not run rule {sm.rule!r}")


run_script(snakemake, main)  # noqa: F821
