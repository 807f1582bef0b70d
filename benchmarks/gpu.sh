#!/usr/bin/env bash
# Issue 5's GPU runs, each under a time limit so that a partial run still leaves its files in $OUT:
#   bench   `modfx bench`, reference llama in bf16 at a size that fills an H100/H200, forward and fwd+bwd
#   sweep   capacity sweep (measured vs FLOP-ideal speedup), 4 layers of the same width
#   hf      `modfx bench --hf llama` (transformers' LlamaForCausalLM from a config), fwd+bwd
#   decode  decode throughput with KV caches, dense vs MoD, batch 1 and 64
#   routing routing ops per routed block, alone and in context, fwd+bwd (benchmarks/bench_routing.py)
#
#     OUT=benchmarks/results/gpu BUDGET_S=540 STAGES="bench sweep" bash benchmarks/gpu.sh
#
# Runs from the repository root with the machine's own python3 (torch, sympy, tabulate, matplotlib there).
set -u
OUT=${OUT:-benchmarks/results/gpu}
BUDGET_S=${BUDGET_S:-900}
STAGES=${STAGES:-bench sweep hf decode routing}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
start=$SECONDS
limit() { local left=$((BUDGET_S - (SECONDS - start))); echo $(( left > $1 ? $1 : left )); }
has() { [[ " $STAGES " == *" $1 "* ]]; }

SIZE="--layers 12 --d-model 2048 --heads 16 --vocab 32000 --batch 8 --seq 4096"
RUN="--dtype bfloat16 --device cuda --repeat 10 --warmup 2"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  python3 -c "import torch, sys; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'python', sys.version.split()[0])"
} 2>&1 | tee "$OUT/gpu_env.txt"
if has bench; then
  timeout "$(limit 210)" python3 -m modfx bench --model llama $SIZE $RUN --json "$OUT/gpu_forward.json" 2>&1 \
    | tee "$OUT/gpu_forward.txt"
  timeout "$(limit 270)" python3 -m modfx bench --model llama $SIZE $RUN --backward --json "$OUT/gpu_backward.json" \
    2>&1 | tee "$OUT/gpu_backward.txt"
fi
if has sweep; then
  timeout "$(limit 200)" python3 benchmarks/capacity_sweep.py --device cuda --dtype bfloat16 --tag h200 \
    --layers 4 --d-model 2048 --heads 16 --vocab 32000 --batch 8 --seq 4096 \
    --capacities 0.125 0.25 0.5 1.0 --repeat 10 --warmup 2 --out "$OUT" 2>&1 | tee "$OUT/capacity_sweep_h200.txt"
fi
if has hf; then
  timeout "$(limit 200)" python3 -m modfx bench --hf llama $SIZE $RUN --backward --json "$OUT/gpu_hf_llama_backward.json" \
    2>&1 | tee "$OUT/gpu_hf_llama_backward.txt"
fi
if has decode; then
  timeout "$(limit 300)" python3 benchmarks/decode.py --device cuda --dtype bfloat16 --layers 12 --d-model 2048 \
    --heads 16 --prompt 128 --new 256 --batch 1 64 --json "$OUT/gpu_decode.json" 2>&1 | tee "$OUT/gpu_decode.txt"
fi
if has routing; then
  timeout "$(limit 300)" python3 benchmarks/bench_routing.py --device cuda --dtype bfloat16 --d-model 2048 --heads 16 \
    --seq 4096 --batch 8 --ops --backward 2>&1 | tee "$OUT/gpu_routing_backward.txt"
fi
ls -la "$OUT"
