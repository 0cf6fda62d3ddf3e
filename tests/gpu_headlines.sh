#!/usr/bin/env bash
# Re-measure the GPU headline numbers quoted in the READMEs, one command each, as the READMEs give them.
# Run from the repository root on a machine with MLX's CUDA backend (or a Mac); each run of this script
# is one sample: the READMEs quote the range and median over runs on separate machines (leases).
#   bash tests/gpu_headlines.sh 2>&1 | tee headlines.log
# Prints each benchmark's own table; the lines starting with "headline:" are the numbers quoted.
set -uo pipefail
python=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
echo "headline: $(date -u +%F) mlx $($python -c 'import mlx.core as mx; print(mx.__version__, mx.default_device())')" \
     "$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)"

run() {  # run a benchmark command, print its output, and prefix the rows matched by $1 with "headline:"
  local pattern=$1; shift
  echo "\$ $*"
  "$@" 2>&1 | tee /tmp/headline.out
  grep -E "$pattern" /tmp/headline.out | sed "s|^|headline: $2 |"
}

run '^ *(32x128|8x128|1x16) ' $python bert/benchmark.py --device gpu --dtype float16 --shapes 32x128 8x128 1x16 --repeats 30
run '^ *(prompt|decoding) |copy bandwidth|host time' $python llama/benchmark.py --device gpu --preset 7b --dtype float16 --max-tokens 128 --repeats 3
run '^ *(prompt|decoding) |copy bandwidth|host time' $python llama/benchmark.py --device gpu --preset 8b --dtype float16 --max-tokens 128 --repeats 3
run 'bit|float16 ' $python llama/benchmark.py --device gpu --preset 7b --dtype float16 --max-tokens 128 --repeats 3 --quantize 4 8
run '^ {4,}nanogpt ' $python gpt2/benchmark.py --device gpu --config nanogpt --steps 20 --repeats 3
