"""rules baseline_<method>: one baseline attribution method on theta_0 -> scores/<method>/score.h5; rule
reference_responses: the linear responses its limit and linearised methods share."""
from daunce_core.baselines import BaselinesConfig, reference_responses, run_baseline
from daunce_core.runner import experiment_config, run_script


def main(sm):
    bcfg = BaselinesConfig.from_config(dict(sm.config))
    if sm.rule == "reference_responses":
        reference_responses(sm.wildcards.key, experiment_config(sm), bcfg, sm.input.split, sm.input.theta_0,
                            sm.output[0])
        return
    run_baseline(sm.params.method, experiment_config(sm), bcfg, sm.input.split, sm.input.theta_0, sm.output[0],
                 select_gt=getattr(sm.input, "select", None), responses=getattr(sm.input, "responses", None))


run_script(snakemake, main)  # noqa: F821
