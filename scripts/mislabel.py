"""rules mislabel_*: mislabelled-example detection by self-influence (daunce_core.steps.mislabel)."""
from daunce_core.baselines import BaselinesConfig
from daunce_core.runner import experiment_config, run_script
from daunce_core.steps import mislabel as M


def main(sm):
    cfg = experiment_config(sm)
    inp = sm.input
    if sm.rule == "mislabel_base":
        M.train_noisy_base(cfg, inp.split, sm.output.state, sm.output.metrics, sm.output.flips)
    elif sm.rule == "mislabel_daunce":
        M.daunce_signals(cfg, inp.split, inp.flips, inp.theta_0, sm.wildcards.variant, sm.output[0],
                         selection_path=getattr(inp, "selection", None))
    elif sm.rule == "mislabel_baseline":
        M.baseline_self_influence(sm.wildcards.method, cfg, BaselinesConfig.from_config(dict(sm.config)), inp.split,
                                  inp.flips, inp.theta_0, sm.output[0], scores_path=getattr(inp, "scores", None))
    elif sm.rule == "mislabel_table":
        M.table(cfg, dict(zip(sm.params.methods, inp.files)), inp.flips, sm.output.csv, sm.output.md)
    else:
        raise ValueError(f"scripts/mislabel.py: no step for rule {sm.rule!r}")


run_script(snakemake, main)  # noqa: F821
