"""rules blackbox_data, blackbox_local_base, blackbox_estimate: data, local base model, cost estimate."""
from daunce_core.runner import run_script
from daunce_core.steps import blackbox as study


def main(sm):
    cfg = study.load_config(sm.config)
    if sm.rule == "blackbox_data":
        study.make_data(cfg, sm.output.train, sm.output.query)
    elif sm.rule == "blackbox_local_base":
        study.make_local_base(cfg, sm.input.train, sm.output[0])
    elif sm.rule == "blackbox_estimate":
        study.write_estimate(cfg, sm.wildcards.bbmodel, sm.input.train, sm.input.query, sm.output[0])
    else:
        raise ValueError(f"scripts/blackbox_data.py does not run rule {sm.rule!r}")


run_script(snakemake, main)  # noqa: F821
