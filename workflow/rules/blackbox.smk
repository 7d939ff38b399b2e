# Section 5 / Appendix D: data attribution with black-box access, the backdoor study (Figure 4).
#   snakemake -c2 results/fig4.md                         the miniature (local OpenAI-compatible server)
#   snakemake -n --configfile=config/paper/blackbox_gpt.yaml results/fig4.md     the paper's plan
# Per base model: poisoned multiple-choice data -> theta_0 (a fine-tuning job) -> K perturbed
# "models" per access setting (api: fine-tuning jobs on D^k; strict: BDPL prompts on D^k) ->
# losses from chat-completion logprobs -> scores -> precision@10 and the table.
# Nothing costs money unless blackbox.spend is true and the estimate fits blackbox.max_spend_usd;
# paid work is recorded under .../work/ (manifests), never a Snakemake output, so a failed or
# killed job keeps it and the rerun adopts it. Input functions: common.smk.
rule blackbox_data:
    """The multiple-choice training set with 10% backdoored examples, and held-out queries
    (triggered and clean). MMLU is downloaded here in the paper's setting."""
    input:
        blackbox_source_inputs,
    output:
        train="results/{experiment}/blackbox/data/train.jsonl",
        query="results/{experiment}/blackbox/data/query.jsonl",
    log:
        "results/{experiment}/logs/blackbox/data.log",
    params:
        settings=step_settings("blackbox.data"),
    conda:
        "../envs/daunce.yaml"
    script:
        "../../scripts/blackbox_data.py"


rule blackbox_local_base:
    """The local server's base model (backend local): a tokenizer and a tiny Llama-style LM."""
    input:
        train="results/{experiment}/blackbox/data/train.jsonl",
    output:
        directory("results/{experiment}/blackbox/{bbmodel}/local_base"),
    log:
        "results/{experiment}/logs/blackbox/{bbmodel}/local_base.log",
    params:
        settings=step_settings("blackbox.local.model", "blackbox.local.train"),
    conda:
        "../envs/daunce.yaml"
    script:
        "../../scripts/blackbox_data.py"


rule blackbox_estimate:
    """Tokens and US dollars the whole study would cost for one base model. Spends nothing."""
    input:
        unpack(blackbox_data_files),
    output:
        "results/{experiment}/blackbox/{bbmodel}/cost_estimate.json",
    log:
        "results/{experiment}/logs/blackbox/{bbmodel}/estimate.log",
    params:
        settings=step_settings(*BLACKBOX_ESTIMATE),
    conda:
        "../envs/daunce.yaml"
    script:
        "../../scripts/blackbox_data.py"


rule blackbox_theta0:
    """theta_0: the base model fine-tuned (a fine-tuning job) on the whole poisoned training set;
    its greedy replies to the queries. Refuses to start if spending is not allowed."""
    input:
        unpack(blackbox_theta0_inputs),
    output:
        "results/{experiment}/blackbox/{bbmodel}/theta0.json",
    log:
        "results/{experiment}/logs/blackbox/{bbmodel}/theta0.log",
    benchmark:
        "results/{experiment}/benchmarks/blackbox/{bbmodel}/theta0.tsv"
    params:
        settings=step_settings(
            "blackbox.backend",
            "blackbox.api.base_url",
            "blackbox.local.train",
            "blackbox.seed",
            "blackbox.theta0",
            "blackbox.logprobs.extra_tokens",
            "blackbox.logprobs.seed",
            "blackbox.data",
        ),
        work="results/{experiment}/blackbox/{bbmodel}/work/theta0",
    conda:
        "../envs/daunce.yaml"
    script:
        "../../scripts/blackbox_fit.py"


rule blackbox_losses:
    """K perturbed models on D^k (api: fine-tuning jobs of theta_0; strict: BDPL prompts for
    theta_0) and the NLL of every training and query example under each, from logprobs."""
    input:
        unpack(blackbox_losses_inputs),
    output:
        "results/{experiment}/blackbox/{bbmodel}/losses/{access}.h5",
    log:
        "results/{experiment}/logs/blackbox/{bbmodel}/losses_{access}.log",
    benchmark:
        "results/{experiment}/benchmarks/blackbox/{bbmodel}/losses_{access}.tsv"
    params:
        settings=blackbox_losses_settings,
        work="results/{experiment}/blackbox/{bbmodel}/work/{access}",
    conda:
        "../envs/daunce.yaml"
    script:
        "../../scripts/blackbox_fit.py"


rule blackbox_score:
    """DAUNCE scores of one access setting: correlation (or covariance) of losses across K."""
    input:
        "results/{experiment}/blackbox/{bbmodel}/losses/{access}.h5",
    output:
        "results/{experiment}/blackbox/{bbmodel}/scores/{access}.h5",
    log:
        "results/{experiment}/logs/blackbox/{bbmodel}/score_{access}.log",
    params:
        settings=step_settings("blackbox.measure"),
    conda:
        "../envs/daunce.yaml"
    script:
        "../../scripts/blackbox_report.py"


rule fig4:
    """Figure 4: precision@10 of backdoored training examples for triggered queries under both
    access settings, and sample queries with their top retrieved training examples."""
    input:
        unpack(blackbox_fig4_inputs),
    output:
        md=report(
            f"results/{EXP}/fig4.md",
            caption="../report/fig4.rst",
            category="Tables",
            labels={"figure": "4"},
        ),
        csv=f"results/{EXP}/blackbox/precision.csv",
    log:
        f"results/{EXP}/logs/fig4.log",
    params:
        models=BB.models,
        access=BB.access,
    conda:
        "../envs/daunce.yaml"
    script:
        "../../scripts/blackbox_report.py"
