# Figure 1a's baselines: one rule per method, each through its authors' library, on the
# experiment's theta_0. Each method's knobs are tuned like DAUNCE's learning rate:
# the grid baselines.tune.<method> (at most baselines.max_settings settings, the size of DAUNCE's lr
# grid), judged on the LDS selection masks and selection queries (input "select"). Every rule writes results/{experiment}/scores/<method>/score.h5 in the
# common dense layout (positive = helpful), which lds_eval (measure "score") evaluates with the same
# thresholding as DAUNCE. results/{experiment}/cost.md gathers the benchmark files of the same run.
rule baseline_trak:
    """TRAK through traker: one model (theta_0, no ensemble), margin output; projection dimension
    and ridge lambda tuned over baselines.tune.trak on the selection masks (the paper's 20,480)."""
    input:
        split="results/{experiment}/data/split.npz",
        theta_0="results/{experiment}/base/theta_0.safetensors",
        select="results/{experiment}/lds/select.h5",
    output:
        "results/{experiment}/scores/trak/score.h5",
    log:
        "results/{experiment}/logs/baselines/trak.log",
    benchmark:
        "results/{experiment}/benchmarks/baselines/trak.tsv"
    params:
        settings=baseline_settings("trak"),
        method="trak",
    conda:
        "../envs/daunce.yaml"
    script:
        "../../scripts/baseline.py"


rule baseline_ekfac:
    """The EK-FAC influence function through kronfluence: empirical-Fisher EK-FAC factors on every
    Linear/Conv2d layer, margin measurement; damping tuned over baselines.tune.ekfac (null:
    kronfluence's heuristic) on the selection masks."""
    input:
        split="results/{experiment}/data/split.npz",
        theta_0="results/{experiment}/base/theta_0.safetensors",
        select="results/{experiment}/lds/select.h5",
    output:
        "results/{experiment}/scores/ekfac/score.h5",
    log:
        "results/{experiment}/logs/baselines/ekfac.log",
    benchmark:
        "results/{experiment}/benchmarks/baselines/ekfac.tsv"
    params:
        settings=baseline_settings("ekfac"),
        method="ekfac",
    conda:
        "../envs/daunce.yaml"
    script:
        "../../scripts/baseline.py"


rule baseline_logra:
    """LoGra through dattri's LoGraAttributor: each layer's gradient projected to rank x rank
    (the paper's 128), preconditioned by its damped empirical Fisher; rank and damping tuned over
    baselines.tune.logra on the selection masks."""
    input:
        split="results/{experiment}/data/split.npz",
        theta_0="results/{experiment}/base/theta_0.safetensors",
        select="results/{experiment}/lds/select.h5",
    output:
        "results/{experiment}/scores/logra/score.h5",
    log:
        "results/{experiment}/logs/baselines/logra.log",
    benchmark:
        "results/{experiment}/benchmarks/baselines/logra.tsv"
    params:
        settings=baseline_settings("logra"),
        method="logra",
    conda:
        "../envs/daunce.yaml"
    script:
        "../../scripts/baseline.py"


rule baseline_graddot:
    """Gradient dot product through dattri (TracInAttributor at theta_0, weight 1, no projection)."""
    input:
        split="results/{experiment}/data/split.npz",
        theta_0="results/{experiment}/base/theta_0.safetensors",
    output:
        "results/{experiment}/scores/graddot/score.h5",
    log:
        "results/{experiment}/logs/baselines/graddot.log",
    benchmark:
        "results/{experiment}/benchmarks/baselines/graddot.tsv"
    params:
        settings=baseline_settings("graddot"),
        method="graddot",
    conda:
        "../envs/daunce.yaml"
    script:
        "../../scripts/baseline.py"


rule baseline_tracin:
    """TracIn through dattri over checkpoints of theta_0's own training, weighted by their learning
    rates; the number of checkpoints tuned over baselines.tune.tracin on the selection masks. The base rule keeps no checkpoints, so this job replays the
    base recipe (same seed and data order: the same trajectory), snapshots the parameters at evenly
    spaced steps and checks that the last snapshot equals theta_0 on disk; the replay is part of
    TracIn's measured cost."""
    input:
        split="results/{experiment}/data/split.npz",
        theta_0="results/{experiment}/base/theta_0.safetensors",
        select="results/{experiment}/lds/select.h5",
    output:
        "results/{experiment}/scores/tracin/score.h5",
    log:
        "results/{experiment}/logs/baselines/tracin.log",
    benchmark:
        "results/{experiment}/benchmarks/baselines/tracin.tsv"
    params:
        settings=baseline_settings("tracin"),
        method="tracin",
    conda:
        "../envs/daunce.yaml"
    script:
        "../../scripts/baseline.py"


rule baseline_exact_if:
    """Exact influence (upper reference, small models only): the full Gauss-Newton (or Hessian)
    matrix in float64 and a Cholesky solve; damping picked on the LDS *selection* masks."""
    input:
        split="results/{experiment}/data/split.npz",
        theta_0="results/{experiment}/base/theta_0.safetensors",
        select="results/{experiment}/lds/select.h5",
    output:
        "results/{experiment}/scores/exact_if/score.h5",
    log:
        "results/{experiment}/logs/baselines/exact_if.log",
    benchmark:
        "results/{experiment}/benchmarks/baselines/exact_if.tsv"
    params:
        settings=baseline_settings("exact_if"),
        method="exact_if",
    conda:
        "../envs/daunce.yaml"
    script:
        "../../scripts/baseline.py"


rule reference_responses:
    """The linear responses P = Z M^-1 S^T, at every damping of baselines.limits.damping_grid, that
    the limit_* and lin_* methods of one curvature form and signal share (key: hessian_loss,
    fisher_loss, fisher_margin; daunce_core/baselines/limits.py): one curvature and one solve per
    damping for all of them. A temporary file, removed once they are scored."""
    input:
        split="results/{experiment}/data/split.npz",
        theta_0="results/{experiment}/base/theta_0.safetensors",
    output:
        temp("results/{experiment}/references/{key}.npz"),
    log:
        "results/{experiment}/logs/baselines/responses_{key}.log",
    benchmark:
        "results/{experiment}/benchmarks/references/{key}.tsv"
    wildcard_constraints:
        key="|".join(RESPONSE_KEYS),
    params:
        settings=lambda wildcards: reference_responses_settings(wildcards.key),
    conda:
        "../envs/daunce.yaml"
    script:
        "../../scripts/baseline.py"


rule baseline_reference:
    """Each DAUNCE variant's Theorem-1 limit (limit_*) and DAUNCE's scores of its
    linearised fits at the run's K with the real fits' subsets and xi (lin_*), exact at exact IF's
    scale (daunce_core/baselines/limits.py); damping chosen on the LDS *selection* masks, from the
    responses its curvature form and signal share (rule reference_responses)."""
    input:
        unpack(reference_responses_input),
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
        method=REFERENCE_PATTERN,
    params:
        settings=lambda wildcards: baseline_settings(wildcards.method),
        method=lambda wildcards: wildcards.method,
    conda:
        "../envs/daunce.yaml"
    script:
        "../../scripts/baseline.py"


rule cost:
    """results/<experiment>/cost.md: wall time, CPU time, peak memory and storage per training example of every
    method on the same model, from the benchmark files of this run."""
    input:
        unpack(cost_inputs),
    output:
        report(
            f"results/{EXP}/cost.md",
            caption="../report/cost.rst",
            category="Tables",
            labels={"table": "cost of each method"},
        ),
    log:
        f"results/{EXP}/logs/cost.log",
    params:
        entries=cost_entries,
        base_benchmark=f"results/{EXP}/benchmarks/base.tsv",
        selection_benchmarks=selection_benchmarks(),
        experiment=EXP,
    conda:
        "../envs/daunce.yaml"
    script:
        "../../scripts/cost.py"
