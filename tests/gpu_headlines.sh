#!/usr/bin/env bash
# Re-measure the GPU numbers quoted in the READMEs, each with the command its README gives.
# Run from the repository root on a machine with MLX's CUDA backend (or a Mac); each run of this script
# is one sample, one row of the READMEs' tables, which quote the range and median over separate machines.
#   bash tests/gpu_headlines.sh 2>&1 | tee headlines.log
# Prints each benchmark's own output; the lines starting with "headline:" are the numbers quoted.
# With 2 or more GPUs it also runs llama's tensor-parallel and gpt2's data-parallel rows on 2 (and on 4).
set -uo pipefail
python=$(command -v "${PYTHON:-python3}")
export PYTHONUNBUFFERED=1
gpus=$(nvidia-smi -L 2>/dev/null | wc -l)
echo "headline: $(date -u +%F) mlx $($python -c 'import mlx.core as mx; print(mx.__version__, mx.default_device())')" \
     "$gpus x $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)"

run() {  # run a command, print its output, and prefix the lines matched by $1 with "headline: SCRIPT"
  local pattern=$1 script=""; shift
  for word in "$@"; do case $word in *.py) script=$word; break;; esac; done
  echo "\$ $*"
  "$@" 2>&1 | tee /tmp/headline.out
  grep -E "$pattern" /tmp/headline.out | sed "s|^|headline: $script |"
}

launch() {  # mlx.launch with this Python (without --python it would execute the script itself)
  mlx.launch -n "$1" --backend nccl --python "$python" "${@:2}"
}

# bert/README.md
run '^ *(32x128|8x128|1x16) ' $python bert/benchmark.py --device gpu --dtype float16 --shapes 32x128 8x128 1x16 --repeats 30
# llama/README.md: float16 7B and 8B shapes, then the quantized 7B shape
run '^ *(prompt|decoding) |copy bandwidth|host time' $python llama/benchmark.py --device gpu --preset 7b --dtype float16 --max-tokens 128 --repeats 3
run '^ *(prompt|decoding) |copy bandwidth|host time' $python llama/benchmark.py --device gpu --preset 8b --dtype float16 --max-tokens 128 --repeats 3
run 'bit|float16 |host time' $python llama/benchmark.py --device gpu --preset 7b --dtype float16 --max-tokens 128 --repeats 3 --quantize 4 8
# gpt2/README.md: the training step at nanoGPT's size
run '^ {4,}nanogpt ' $python gpt2/benchmark.py --device gpu --config nanogpt --steps 20 --repeats 3

if [ "$gpus" -ge 2 ]; then
  # llama/README.md: tensor parallelism (13B on 1 and 2 GPUs; 70B on 4)
  run '^ROW |host time' $python llama/benchmark_tp.py --preset 13b
  run '^ROW |host time' launch 2 llama/benchmark_tp.py --preset 13b
  [ "$gpus" -ge 4 ] && run '^ROW |host time' launch 4 llama/benchmark_tp.py --preset 70b
  # gpt2/README.md: data-parallel scaling, batch 32 per GPU, both frameworks
  rm -f /tmp/headline-ddp.jsonl
  for n in 1 2 4; do
    [ "$gpus" -ge "$n" ] || break
    torchrun --standalone --nproc_per_node "$n" gpt2/benchmark_ddp.py torch --batch-size 32 --steps 10 --repeats 3 --json /tmp/headline-ddp.jsonl
    launch "$n" gpt2/benchmark_ddp.py mlx --batch-size 32 --steps 10 --repeats 3 --json /tmp/headline-ddp.jsonl
  done
  run '^ *(mlx|torch) ' $python gpt2/benchmark_ddp.py table /tmp/headline-ddp.jsonl
fi
