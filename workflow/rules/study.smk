# The quality landscape (docs/quality.md): DAUNCE's LDS against compute over the
# settings of config `study:`, beside every baseline of results/<experiment>/lds.csv. Off by default and outside
# `rule all`; the input functions (rules/common.smk) refuse results/<experiment>/quality.pdf while it is off:
#   snakemake -c2 results/quality.pdf --config study='{enabled: true}'


rule study_theta0:
    """An extra theta_0 for the ensembles of the study: the base recipe with seed base.seed + s."""
    input:
        split="results/{experiment}/data/split.npz",
    output:
        state="results/{experiment}/study/theta0/seed{s}/theta_0.safetensors",
        metrics="results/{experiment}/study/theta0/seed{s}/metrics.json",
    log:
        "results/{experiment}/logs/study/theta0_seed{s}.log",
    benchmark:
        "results/{experiment}/benchmarks/study/theta0_seed{s}.tsv"
    wildcard_constraints:
        s=r"[1-9]\d*",
    params:
        settings=step_settings("data", "model", "base"),
    conda:
        "../envs/daunce.yaml"
    script:
        "../../scripts/study.py"


rule study_group:
    """One group of study settings (those that differ only in K share the fit of the largest) for
    one variant: perturbed fits over the setting's lr grid, the lr chosen on the selection masks,
    its selection and test LDS and its compute, whole grid included."""
    input:
        unpack(study_group_inputs),
    output:
        "results/{experiment}/study/{variant}/{group}.json",
    log:
        "results/{experiment}/logs/study/{variant}/{group}.log",
    benchmark:
        "results/{experiment}/benchmarks/study/{variant}/{group}.tsv"
    wildcard_constraints:
        group=r"[A-Za-z0-9_.-]+",
    params:
        settings=study_group_settings,
    conda:
        "../envs/daunce.yaml"
    script:
        "../../scripts/study.py"


rule study_table:
    """quality.csv: every study point and every row of results/lds.csv with its compute; grid.csv:
    every (variant, setting, lr) with its selection and test LDS."""
    input:
        unpack(study_table_inputs),
    output:
        quality=report(
            f"results/{EXP}/study/quality.csv",
            caption="../report/quality.rst",
            category="Quality study",
            labels={"table": "quality"},
        ),
        grid=f"results/{EXP}/study/grid.csv",
    log:
        f"results/{EXP}/logs/study/table.log",
    params:
        baselines=study_baseline_sources,
    conda:
        "../envs/daunce.yaml"
    script:
        "../../scripts/study.py"


rule quality_figure:
    """results/<experiment>/quality.pdf: test LDS against compute, DAUNCE's settings and the baselines."""
    input:
        study_figure_input,
    output:
        report(
            f"results/{EXP}/quality.pdf",
            caption="../report/quality.rst",
            category="Quality study",
            labels={"figure": "quality"},
        ),
    log:
        f"results/{EXP}/logs/study/figure.log",
    conda:
        "../envs/daunce.yaml"
    script:
        "../../scripts/study.py"
