#!/usr/bin/env bash
# Issue 5's GPU table: `modfx bench` in bf16 at a size that fills an H100/H200, forward and forward + backward,
# then a capacity sweep, each under a time limit so that a partial run still leaves its files.
#
#     OUT=benchmarks/results/gpu BUDGET_S=540 bash benchmarks/gpu.sh
#
# Runs from the repository root with the machine's own python3 (torch, sympy, tabulate, matplotlib there).
set -u
OUT=${OUT:-benchmarks/results/gpu}
BUDGET_S=${BUDGET_S:-900}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
start=$SECONDS
left() { echo $((BUDGET_S - (SECONDS - start))); }

MODEL="--model llama --layers 12 --d-model 2048 --heads 16 --vocab 32000 --batch 8 --seq 4096"
RUN="--dtype bfloat16 --device cuda --repeat 10 --warmup 2"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  python3 -c "import torch, sys; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'python', sys.version.split()[0])"
  timeout 210 python3 -m modfx bench $MODEL $RUN --json "$OUT/gpu_forward.json"
} 2>&1 | tee "$OUT/gpu_forward.txt"
timeout $(( $(left) > 270 ? 270 : $(left) )) python3 -m modfx bench $MODEL $RUN --backward \
  --json "$OUT/gpu_backward.json" 2>&1 | tee "$OUT/gpu_backward.txt"
timeout "$(left)" python3 benchmarks/capacity_sweep.py --device cuda --dtype bfloat16 --tag h200 \
  --layers 4 --d-model 2048 --heads 16 --vocab 32000 --batch 8 --seq 4096 \
  --capacities 0.125 0.25 0.5 1.0 --repeat 10 --warmup 2 --out "$OUT" 2>&1 | tee "$OUT/capacity_sweep_h200.txt"
ls -la "$OUT"
