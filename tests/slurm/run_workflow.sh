#!/usr/bin/env bash
# Run the workflow through SLURM with the user's profile (profiles/slurm, with CI's overrides
# profiles/ci-slurm layered on top) and check that every job ran as a SLURM job.
#
#   tests/slurm/start_cluster.sh && tests/slurm/run_workflow.sh; tests/slurm/start_cluster.sh stop
#
# Four runs in a fresh folder ($1, default a new temporary one), each bounded by timeout -s KILL:
#   1. one perturbed chunk alone (then its files' modification times are recorded);
#   2. the full target list, killed with SIGKILL right after its first SLURM submission (a
#      crash of the Snakemake driver), and its SLURM jobs cancelled;
#   3. --unlock, then the same command again: it must finish, never redo the chunk of run 1,
#      and every one of its jobs must be a SLURM job that slurmctld saw exit with status 0;
#   4. a job that fails (CIFAR-10 absent, download off): it must be retried per the profile,
#      then reported with its log path, and the run must exit non-zero.
# Environment: DAUNCE_SLURM_CONFIG (default tests/slurm/config.yaml; config/config.yaml runs
# the embedded default), DAUNCE_SLURM_TARGETS (default: the DAUNCE figures and tables),
# DAUNCE_SLURM_TIMEOUT (seconds per run, default 1200), SNAKEMAKE (default .venv/bin/snakemake).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"
# the jobs import this checkout's daunce_core whatever the virtual environment points at
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
SNAKEMAKE=${SNAKEMAKE:-$ROOT/.venv/bin/snakemake}
CONFIG=$(realpath "${DAUNCE_SLURM_CONFIG:-tests/slurm/config.yaml}")
LIMIT=${DAUNCE_SLURM_TIMEOUT:-1200}
read -r -a TARGETS <<< "${DAUNCE_SLURM_TARGETS:-results/fig1a.pdf results/fig1b.pdf results/table3.md results/fig5.pdf results/fig6.pdf}"
WORK=${1:-$(mktemp -d /tmp/daunce-slurm-run.XXXXXX)}
mkdir -p "$WORK"
WORK=$(realpath "$WORK")

say() { echo "[slurm-run] $*" >&2; }
fail() { say "FAIL: $*"; exit 1; }
sinfo -h >/dev/null 2>&1 || fail "no SLURM controller answers; run tests/slurm/start_cluster.sh"

# every SLURM job id a Snakemake log names
slurm_ids() { grep -o 'submitted with SLURM jobid [0-9]*' "$1" | awk '{print $NF}' || true; }

cancel_jobs_of() {  # scancel what a killed run left in SLURM, and wait until it is gone
  local ids
  ids=$(slurm_ids "$1" | tr '\n' ' ')
  [ -n "${ids// /}" ] || return 0
  scancel $ids 2>/dev/null || true
  for _ in $(seq 60); do
    [ -z "$(squeue -h -t PENDING,RUNNING,COMPLETING -j "${ids// /,}" 2>/dev/null)" ] && return 0
    sleep 1
  done
  say "warning: jobs $ids still in the queue"
}

# whatever happens, leave no job of these runs in the queue
cleanup() { for f in "$WORK"/run*.log; do [ -f "$f" ] && cancel_jobs_of "$f"; done; return 0; }
trap cleanup EXIT

# the workflow through both profiles, in $WORK
# (--configfile takes every word up to the next option: it never comes last)
SMK=("$SNAKEMAKE" -s "$ROOT/workflow/Snakefile" --directory "$WORK" --configfile "$CONFIG"
     --profile "$ROOT/profiles/slurm" --profile "$ROOT/profiles/ci-slurm")
smk() {  # smk LOG [args...]: one bounded run
  local log=$1
  shift
  timeout -s KILL "$LIMIT" "${SMK[@]}" "$@" > "$log" 2>&1
}

EXP=$(SMK_CONFIG=$CONFIG "$ROOT/.venv/bin/python" -c \
  'import os, yaml; print(yaml.safe_load(open(os.environ["SMK_CONFIG"]))["experiment"])')
say "workdir $WORK, config $CONFIG (experiment $EXP)"
t0=$(date +%s)

# --- 1. one chunk alone ---------------------------------------------------------------------
CHUNK=$("$SNAKEMAKE" -s "$ROOT/workflow/Snakefile" --directory "$WORK" --configfile "$CONFIG" -n \
        "${TARGETS[@]}" 2>/dev/null | grep -o "results/$EXP/daunce/daunce/lr[^ ,]*/chunk0.h5" | sort -u)
[ -n "$CHUNK" ] || fail "no perturbed chunk 0 of variant daunce in the plan"
smk "$WORK/run1.log" $CHUNK || fail "run 1 (one chunk) failed: $WORK/run1.log"
stamp_before=$(cd "$WORK" && stat -c '%n %Y' $CHUNK)
say "run 1: $(echo "$CHUNK" | wc -l) chunk file(s) written by $(slurm_ids "$WORK/run1.log" | wc -l) SLURM jobs"

# --- 2. a crash: SIGKILL the driver after its first submission --------------------------------
timeout -s KILL "$LIMIT" "${SMK[@]}" "${TARGETS[@]}" > "$WORK/run2.log" 2>&1 &
guard=$!   # the timeout process; Snakemake is its child
for _ in $(seq 120); do
  [ -n "$(slurm_ids "$WORK/run2.log")" ] && break
  kill -0 "$guard" 2>/dev/null || break
  sleep 1
done
[ -n "$(slurm_ids "$WORK/run2.log")" ] || fail "run 2 never submitted a job: $WORK/run2.log"
for pid in $(pgrep -P "$guard" || true); do kill -KILL "$pid" 2>/dev/null || true; done
wait "$guard" 2>/dev/null || true
cancel_jobs_of "$WORK/run2.log"
say "run 2: driver killed after submitting SLURM job(s) $(slurm_ids "$WORK/run2.log" | tr '\n' ' ')"

# --- 3. rerun: resume, finish, every job a SLURM job -----------------------------------------
# what a user does after a crash: release the dead driver's lock, then the same command again
"${SMK[@]}" --unlock > "$WORK/unlock.log" 2>&1 || fail "--unlock failed: $WORK/unlock.log"
t3=$(date +%s)
smk "$WORK/run3.log" "${TARGETS[@]}" || { tail -40 "$WORK/run3.log" >&2; fail "run 3 failed: $WORK/run3.log"; }
t3=$(( $(date +%s) - t3 ))
for t in "${TARGETS[@]}"; do
  [ -s "$WORK/$t" ] || fail "run 3 did not make $t"
  # a top-level target is a copy of the experiment's own file (rule view)
  own="results/$EXP/${t#results/}"
  case "$t" in results/*/*) ;; *) cmp -s "$WORK/$t" "$WORK/$own" || fail "run 3: $t is not a copy of $own";; esac
done
[ "$(cd "$WORK" && stat -c '%n %Y' $CHUNK)" = "$stamp_before" ] || fail "run 3 rewrote the chunk finished in run 1"
grep -q "chunk0.h5" <(grep -A3 '^rule perturbed_chunk:' "$WORK/run3.log" | grep "output:.*/daunce/daunce/") \
  && fail "run 3 scheduled the chunk finished in run 1 again"

rules=$(grep -cE '^rule [A-Za-z0-9_]+:' "$WORK/run3.log" || true)
# effective_config (a template rendered inside the driver) and view (the top-level copy of a
# table or figure) run on the submitting host by design (workflow/Snakefile): the only rules
# allowed outside SLURM
local_rules=$(grep -E '^localrule [A-Za-z0-9_]+:' "$WORK/run3.log" | grep -vE '^localrule (effective_config|view):' || true)
ids=$(slurm_ids "$WORK/run3.log")
n_ids=$(echo "$ids" | grep -c . || true)
[ -z "$local_rules" ] || fail "run 3 ran jobs outside SLURM: $local_rules"
[ "$rules" -gt 0 ] && [ "$rules" = "$n_ids" ] || fail "run 3: $rules jobs but $n_ids SLURM submissions"
grep -q "steps (100%) done" "$WORK/run3.log" || fail "run 3 did not report 100% done"
CTLD_LOG=$(scontrol show config | awk -F' = ' '/^SlurmctldLogFile/ {print $2}')
for id in $ids; do
  grep -q "_job_complete: JobId=$id WEXITSTATUS 0" "$CTLD_LOG" \
    || fail "SLURM job $id is not a completed job with exit status 0 in $CTLD_LOG"
done
say "run 3: $rules jobs, all SLURM jobs (ids $(echo $ids | tr ' ' ','); each completed with exit 0 in slurmctld's log), $t3 s; chunk of run 1 kept"
grep -E '^rule [A-Za-z0-9_]+:' "$WORK/run3.log" | sort | uniq -c | sed 's/^/[slurm-run]   /' >&2

# --- 4. a failing job: retried, then reported with its log path ------------------------------
printf 'experiment: %s_fail\ndata: {name: cifar10, root: %s/no-data, download: false}\n' "$EXP" "$WORK" > "$WORK/fail.yaml"
if smk "$WORK/run4.log" "results/${EXP}_fail/data/split.npz" --configfile "$CONFIG" "$WORK/fail.yaml"; then
  fail "run 4 succeeded although its data rule cannot"
fi
n_fail=$(slurm_ids "$WORK/run4.log" | wc -l)
[ "$n_fail" -ge 2 ] || fail "run 4: the failing job was submitted $n_fail time(s), not retried ($WORK/run4.log)"
grep -q "results/${EXP}_fail/logs/data.log" "$WORK/run4.log" || fail "run 4 does not name the rule's log"
grep -q "CIFAR-10 is not under" "$WORK/run4.log" || fail "run 4 does not show the job's error"
say "run 4: failing job submitted $n_fail times (retries from the profile), reported with its log path"

say "OK in $(( $(date +%s) - t0 )) s; logs in $WORK"
