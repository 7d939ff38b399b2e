"""rules blackbox_theta0, blackbox_losses: fine-tuning jobs / BDPL prompts and losses from logprobs."""
from daunce_core.runner import run_script
from daunce_core.steps import blackbox as study


def main(sm):
    cfg = study.load_config(sm.config)
    model = sm.wildcards.bbmodel
    server_log = str(sm.log[0]).removesuffix(".log") + ".server.log"
    if sm.rule == "blackbox_theta0":
        study.fit_theta0(cfg, model, sm.input.train, sm.input.query, sm.output[0], work_dir=sm.params.work,
                         base_dir=sm.input.get("base"), server_log=server_log)
    elif sm.rule == "blackbox_losses":
        fit = study.api_losses if sm.wildcards.access == "api" else study.strict_losses
        fit(cfg, model, sm.input.train, sm.input.query, sm.input.theta0, sm.output[0], work_dir=sm.params.work,
            server_log=server_log)
    else:
        raise ValueError(f"scripts/blackbox_fit.py does not run rule {sm.rule!r}")


run_script(snakemake, main)  # noqa: F821
