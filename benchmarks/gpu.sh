#!/usr/bin/env bash
# The speed issue's GPU figures, prepared to run as they are on a lent H100/H200 (the device tool),
# where python3 holds a CUDA build of PyTorch and transformers; mistral-torch runs from src/.
#
#   bash benchmarks/gpu.sh [all|prefill|decode] [OUT_DIR]      (OUT_DIR: $OUT, else benchmarks/results)
#
# 7B shape (mistral-7b-v0.1, random weights), bf16, batch 1, side by side in one process each:
#   prefill: 512 tokens, ours and transformers, against the bf16 matmul peak measured between rounds
#            (the target: >= 60 % of it);
#   decode:  128 tokens after 64, ours eager and compiled (CUDA graphs), transformers eager and with
#            its static cache + torch.compile, % of the HBM roofline (a 1 GiB device copy between
#            rounds; targets: >= 85 %, >= 1.3x transformers static + compile).
# Each part stops at its own time limit (PREFILL_LIMIT=200, DECODE_LIMIT=380 seconds), so together they
# fit one 10-minute device command; alone, a part may take longer (DECODE_LIMIT=560 ... decode). The JSON,
# logs and the GPU's name land in OUT_DIR.
set -uo pipefail
cd "$(dirname "$0")/.."
part=${1:-all}
out=${2:-${OUT:-benchmarks/results}}
mkdir -p "$out"
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
$py -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" \
    | tee -a "$out/gpu.txt"
status=0
if [[ $part == all || $part == prefill ]]; then
    timeout ${PREFILL_LIMIT:-200} $py benchmarks/bench_prefill.py --device cuda --preset mistral-7b-v0.1 --dtypes bf16 \
        --prompt 512 --repeats 5 --no-llama --out "$out/prefill_cuda.json" 2>&1 | tee "$out/prefill_cuda.log" || status=1
fi
if [[ $part == all || $part == decode ]]; then
    timeout ${DECODE_LIMIT:-380} $py benchmarks/bench_decode.py --device cuda --preset mistral-7b-v0.1 --dtypes bf16 \
        --batches 1 --prompt 64 --new 128 --repeats 3 --no-llama --out "$out/decode_cuda.json" 2>&1 \
        | tee "$out/decode_cuda.log" || status=1
fi
exit $status
