#!/usr/bin/env bash
# A prepared GPU check (issue 14, item 3): images/s, tokens/s and peak memory of the workflow's
# trainers on one GPU -- ResNet-9 on CIFAR-shaped synthetic data, and 7-8B-shaped transformer
# layers (LoRA and full fine-tuning, bf16) -- in at most 8 minutes. What each figure is:
# benchmarks/gpu_check.py's docstring.
#
#   benchmarks/gpu_check.sh                          the GPU (device cuda), report in benchmarks/out/gpu_check.json
#   benchmarks/gpu_check.sh --device cpu --tiny      the same code at toy sizes, in seconds (no GPU figures)
#
# Any option is passed to gpu_check.py (--out, --llm, --llm-steps, --no-vision, --budget-s).
# Python: $PYTHON if set, else the checkout's .venv/bin/python (./dev), else `python` on PATH
# (an active conda environment).
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ -n "${PYTHON:-}" ]]; then
  py=$PYTHON
elif [[ -x .venv/bin/python ]]; then
  py=.venv/bin/python
else
  py=python
fi

# the GPU as the driver reports it, for the record (nothing to report without one)
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi

# 480 s = 8 minutes. gpu_check.py starts no new measurement after --budget-s (420 s) and writes its
# report after every measurement, so a run cut short here still leaves what it measured.
exec timeout --kill-after=15 480 "$py" benchmarks/gpu_check.py "$@"
