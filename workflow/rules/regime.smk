# The regime experiment (config/regime/*.yaml, docs/regime.md): the baselines that only it needs by
# default -- TRAK at fixed projection sizes (trak_k<N>), TRAK over an ensemble (trak_ens) and an
# influence function with dattri's iterative solvers (if_iter), usable in any config -- and the
# figure of LDS against storage and compute of every method.
rule baseline_extra:
    """trak_k<N> (TRAK with proj_dim N), trak_ens (TRAK over theta_0 and more models) and if_iter
    (dattri's Arnoldi / CG influence function), tuned over baselines.tune.<trak|trak_ens|if_iter>
    on the selection masks like every baseline (daunce_core/baselines)."""
    input:
        split="results/{experiment}/data/split.npz",
        theta_0="results/{experiment}/base/theta_0.safetensors",
        select="results/{experiment}/lds/select.h5",
    output:
        "results/{experiment}/scores/{method}/score.h5",
    log:
        "results/{experiment}/logs/baselines/{method}.log",
    benchmark:
        "results/{experiment}/benchmarks/baselines/{method}.tsv"
    wildcard_constraints:
        method=r"trak_k[1-9][0-9]*|trak_ens|if_iter",
    params:
        settings=lambda wildcards: baseline_settings(wildcards.method),
        method=lambda wildcards: wildcards.method,
    conda:
        "../envs/daunce.yaml"
    script:
        "../../scripts/baseline.py"


rule regime:
    """results/{experiment}/regime.pdf and regime.csv: every method's LDS (raw and thresholded,
    test masks) against the floats it stores per training example and against its wall time
    (the benchmark files of this run, as results/{experiment}/cost.md counts them)."""
    input:
        unpack(cost_inputs),
        cost="results/{experiment}/cost.md",
        theta_0="results/{experiment}/base/theta_0.safetensors",
    output:
        pdf=report("results/{experiment}/regime.pdf", category="Figures", labels={"figure": "regime"}),
        csv="results/{experiment}/regime.csv",
    log:
        "results/{experiment}/logs/regime.log",
    params:
        entries=cost_entries,
        selection_benchmarks=selection_benchmarks(),
    conda:
        "../envs/daunce.yaml"
    script:
        "../../scripts/regime.py"
