"""rules fig1a, fig1b, table3, fig3, fig6, fig5: draw a figure or table from result files."""
from daunce_core import figures
from daunce_core.runner import experiment_config, run_script


def main(sm):
    if sm.rule == "fig1a":
        figures.fig1a(sm.input[0], sm.output[0], list(sm.params.methods))
    elif sm.rule == "fig1b":
        figures.fig1b(sm.input[0], sm.output[0], list(sm.params.white), list(sm.params.black))
    elif sm.rule == "table3":
        figures.table3(sm.input[0], sm.output.md, sm.output.csv, list(sm.params.variants))
    elif sm.rule == "fig6":
        figures.fig6(sm.input[0], sm.output[0], label=sm.params.label)
    elif sm.rule == "fig3":
        vision = {"selection": sm.input.vision_selection, "chunks": dict(sm.params.vision_chunks),
                  "label": sm.params.label}
        llm = ({"selection": sm.input.llm_selection, "chunks": dict(sm.params.llm_chunks), "label": "LLM (LoRA)"}
               if "llm_selection" in sm.input.keys() else None)
        figures.fig3(vision, llm, sm.output[0])
    elif sm.rule == "fig5":
        scores = {k: v for k, v in sm.input.items() if k not in ("split", "config")}
        figures.fig5(experiment_config(sm), sm.input.split, scores, sm.output[0], query=int(sm.params.query))
    else:
        raise ValueError(f"scripts/figures.py does not draw rule {sm.rule!r}")


run_script(snakemake, main)  # noqa: F821
