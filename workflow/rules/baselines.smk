# Figure 1a's baselines (issue 4): one rule per method, each through its authors' library, on the
# experiment's theta_0. Every rule writes results/{experiment}/scores/<method>/score.h5 in the
# common dense layout (positive = helpful), which lds_eval (measure "score") evaluates with the same
# thresholding as DAUNCE. results/cost.md gathers the benchmark files of the same run.
from daunce_core.baselines import METHODS as ALL_BASELINES, BaselinesConfig

BASELINES_CFG = BaselinesConfig.from_config(config)
BASELINE_METHODS.extend(m for m in BASELINES_CFG.methods if m in ALL_BASELINES)
BASELINE_EVAL_FILES.extend(
    expand("results/{experiment}/lds/eval/{method}/score.json", experiment=EXP, method=BASELINE_METHODS)
)
EXTRA_FINAL_OUTPUTS.append("results/cost.md")


rule baseline_trak:
    """TRAK through traker: one model (theta_0, no ensemble), margin output, projection dimension
    baselines.trak.proj_dim (the paper's 20,480 on CIFAR-10)."""
    input:
        split="results/{experiment}/data/split.npz",
        theta_0="results/{experiment}/base/theta_0.safetensors",
    output:
        "results/{experiment}/scores/trak/score.h5",
    log:
        "results/{experiment}/logs/baselines/trak.log",
    benchmark:
        "results/{experiment}/benchmarks/baselines/trak.tsv"
    params:
        method="trak",
    threads: 2
    resources:
        # a GPU only when config device is cuda (common.smk, gpu_request); memory and minutes
        # sized for the embedded default -- profiles/slurm's set-resources sets paper-scale values
        gpu=gpu_request,
        mem_mb=4000,
        runtime=60,
    script:
        "../../scripts/baseline.py"


rule baseline_ekfac:
    """The EK-FAC influence function through kronfluence: empirical-Fisher EK-FAC factors on every
    Linear/Conv2d layer, margin measurement, kronfluence's heuristic damping."""
    input:
        split="results/{experiment}/data/split.npz",
        theta_0="results/{experiment}/base/theta_0.safetensors",
    output:
        "results/{experiment}/scores/ekfac/score.h5",
    log:
        "results/{experiment}/logs/baselines/ekfac.log",
    benchmark:
        "results/{experiment}/benchmarks/baselines/ekfac.tsv"
    params:
        method="ekfac",
    threads: 2
    resources:
        # a GPU only when config device is cuda (common.smk, gpu_request); memory and minutes
        # sized for the embedded default -- profiles/slurm's set-resources sets paper-scale values
        gpu=gpu_request,
        mem_mb=4000,
        runtime=60,
    script:
        "../../scripts/baseline.py"


rule baseline_logra:
    """LoGra through dattri's LoGraAttributor: each layer's gradient projected to rank x rank
    (baselines.logra.rank; the paper's 128), preconditioned by its empirical Fisher."""
    input:
        split="results/{experiment}/data/split.npz",
        theta_0="results/{experiment}/base/theta_0.safetensors",
    output:
        "results/{experiment}/scores/logra/score.h5",
    log:
        "results/{experiment}/logs/baselines/logra.log",
    benchmark:
        "results/{experiment}/benchmarks/baselines/logra.tsv"
    params:
        method="logra",
    threads: 2
    resources:
        # a GPU only when config device is cuda (common.smk, gpu_request); memory and minutes
        # sized for the embedded default -- profiles/slurm's set-resources sets paper-scale values
        gpu=gpu_request,
        mem_mb=4000,
        runtime=60,
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
        method="graddot",
    threads: 2
    resources:
        # a GPU only when config device is cuda (common.smk, gpu_request); memory and minutes
        # sized for the embedded default -- profiles/slurm's set-resources sets paper-scale values
        gpu=gpu_request,
        mem_mb=4000,
        runtime=60,
    script:
        "../../scripts/baseline.py"


rule baseline_tracin:
    """TracIn through dattri over baselines.tracin.checkpoints checkpoints of theta_0's own training,
    weighted by their learning rates. The base rule keeps no checkpoints, so this job replays the
    base recipe (same seed and data order: the same trajectory), snapshots the parameters at evenly
    spaced steps and checks that the last snapshot equals theta_0 on disk; the replay is part of
    TracIn's measured cost."""
    input:
        split="results/{experiment}/data/split.npz",
        theta_0="results/{experiment}/base/theta_0.safetensors",
    output:
        "results/{experiment}/scores/tracin/score.h5",
    log:
        "results/{experiment}/logs/baselines/tracin.log",
    benchmark:
        "results/{experiment}/benchmarks/baselines/tracin.tsv"
    params:
        method="tracin",
    threads: 2
    resources:
        # a GPU only when config device is cuda (common.smk, gpu_request); memory and minutes
        # sized for the embedded default -- profiles/slurm's set-resources sets paper-scale values
        gpu=gpu_request,
        mem_mb=4000,
        runtime=60,
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
        method="exact_if",
    threads: 2
    resources:
        # a GPU only when config device is cuda (common.smk, gpu_request); memory and minutes
        # sized for the embedded default -- profiles/slurm's set-resources sets paper-scale values
        gpu=gpu_request,
        mem_mb=4000,
        runtime=60,
    script:
        "../../scripts/baseline.py"


def cost_inputs(wildcards):
    """LDS table, scores and losses files whose jobs' benchmark files the cost table reads."""
    out = {"lds": "results/lds.csv"}
    for v in WHITE_BOX:
        out[f"losses_{v}"] = f"results/{EXP}/daunce/{v}/losses.h5"
        out[f"score_{v}"] = f"results/{EXP}/scores/{v}/correlation.h5"
    for m in BASELINE_METHODS:
        out[f"score_{m}"] = f"results/{EXP}/scores/{m}/score.h5"
    return out


def cost_entries(wildcards):
    """What results/cost.md lists: DAUNCE's white-box variants, then the baselines."""
    n_chunks = math.ceil(CFG.daunce.K / CFG.daunce.chunk_size)
    entries = [
        {
            "kind": "daunce",
            "method": v,
            "fit_benchmarks": [f"results/{EXP}/benchmarks/daunce/{v}/chunk{c}.tsv" for c in range(n_chunks)],
            "score_benchmark": f"results/{EXP}/benchmarks/scores/{v}/correlation.tsv",
            "grid": len(LR_TAGS),
            "losses": f"results/{EXP}/daunce/{v}/losses.h5",
        }
        for v in WHITE_BOX
    ]
    entries += [
        {
            "kind": "baseline",
            "method": m,
            "benchmark": f"results/{EXP}/benchmarks/baselines/{m}.tsv",
            "scores": f"results/{EXP}/scores/{m}/score.h5",
        }
        for m in BASELINE_METHODS
    ]
    return entries


rule cost:
    """results/cost.md: wall time, CPU time, peak memory and storage per training example of every
    method on the same model, from the benchmark files of this run."""
    input:
        unpack(cost_inputs),
    output:
        report(
            "results/cost.md",
            caption="../report/cost.rst",
            category="Tables",
            labels={"table": "cost of each method"},
        ),
    log:
        f"results/{EXP}/logs/cost.log",
    params:
        entries=cost_entries,
        base_benchmark=f"results/{EXP}/benchmarks/base.tsv",
        experiment=EXP,
    script:
        "../../scripts/cost.py"
