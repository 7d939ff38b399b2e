"""rules baseline_<method>: one baseline attribution method on theta_0 -> scores/<method>/score.h5."""
from daunce_core.baselines import BaselinesConfig, run_baseline
from daunce_core.runner import experiment_config, run_script


def main(sm):
    run_baseline(sm.params.method, experiment_config(sm), BaselinesConfig.from_config(dict(sm.config)),
                 sm.input.split, sm.input.theta_0, sm.output[0], select_gt=getattr(sm.input, "select", None))


run_script(snakemake, main)  # noqa: F821
