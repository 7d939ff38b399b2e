# Mislabelled-example detection by self-influence (daunce_core/steps/mislabel.py, docs/mislabel.md):
# mislabel.fraction of the training labels flipped, theta_0 retrained on them, every method of
# mislabel.methods ranks the training examples by self-influence; results/<experiment>/mislabel.csv holds the
# AUCs. Generic over the experiment: it reads only the experiment's data, model, base, daunce and
# baselines sections. Knobs: mislabel.settings (defaults | lds), never the flipped labels.
# Input functions: common.smk.
rule mislabel_base:
    """Flip mislabel.fraction of the training labels (keyed by mislabel.seed) and train theta_0 on
    them with the base recipe."""
    input:
        split="results/{experiment}/data/split.npz",
    output:
        state="results/{experiment}/mislabel/theta_0.safetensors",
        metrics="results/{experiment}/mislabel/metrics.json",
        flips="results/{experiment}/mislabel/flips.npz",
    log:
        "results/{experiment}/logs/mislabel/base.log",
    benchmark:
        "results/{experiment}/benchmarks/mislabel/base.tsv"
    params:
        settings=step_settings(*MISLABEL_KEYS),
    conda:
        "../envs/daunce.yaml"
    script:
        "../../scripts/mislabel.py"


rule mislabel_daunce:
    """A DAUNCE variant's K perturbed fits on the noisy data (daunce's settings, one lr): every
    training example's signal under each model (a Q form's are its fit variant's fits)."""
    input:
        unpack(mislabel_inputs),
    output:
        "results/{experiment}/mislabel/daunce/{variant}/signals.npz",
    log:
        "results/{experiment}/logs/mislabel/daunce/{variant}.log",
    benchmark:
        "results/{experiment}/benchmarks/mislabel/daunce/{variant}.tsv"
    params:
        settings=step_settings(*MISLABEL_KEYS, "mislabel.settings", "daunce",
                               drop=("daunce.chunk_size", "daunce.variants", "daunce.k_curve",
                                     "daunce.select_measure", "daunce.trace_every")),
    conda:
        "../envs/daunce.yaml"
    script:
        "../../scripts/mislabel.py"


rule mislabel_baseline:
    """A baseline's self-influence on the noisy data: the diagonal of its scores with the training
    set as queries and the training loss as query function (trak_k<N>: baselines.trak with
    proj_dim N; trak_ens and if_iter: their baselines sections)."""
    input:
        unpack(mislabel_inputs),
    output:
        "results/{experiment}/mislabel/self/{method}.npz",
    log:
        "results/{experiment}/logs/mislabel/{method}.log",
    benchmark:
        "results/{experiment}/benchmarks/mislabel/{method}.tsv"
    wildcard_constraints:
        method="|".join(MISLABEL_BASELINES) or "(?!)",
    params:
        settings=lambda wildcards: mislabel_baseline_settings(wildcards.method),
    conda:
        "../envs/daunce.yaml"
    script:
        "../../scripts/mislabel.py"


rule mislabel_table:
    """results/<experiment>/mislabel.csv and .md: each method's AUC of detecting the flipped labels, with a 95%
    bootstrap CI over the examples, beside a random ranking's 0.5."""
    input:
        flips=f"results/{EXP}/mislabel/flips.npz",
        files=[mislabel_file(m) for m in MISLABEL_METHODS],
        config=EFFECTIVE_CONFIG,
    output:
        csv=f"results/{EXP}/mislabel.csv",
        md=f"results/{EXP}/mislabel.md",
    log:
        f"results/{EXP}/logs/mislabel/table.log",
    params:
        methods=MISLABEL_METHODS,
        settings=step_settings("mislabel.bootstrap", "mislabel.methods"),
    conda:
        "../envs/daunce.yaml"
    script:
        "../../scripts/mislabel.py"
