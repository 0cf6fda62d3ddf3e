"""Decoding speed of a tensor-parallel Llama: MLX (tp.py, under mlx.launch) and
transformers' own tensor parallelism (tp_plan="auto", under torchrun), on random float16
weights.

    python3 llama/benchmark_tp.py --preset 13b  # MLX, one GPU
    # MLX, two GPUs; four GPUs; PyTorch (transformers) on two:
    mlx.launch -n 2 --backend nccl --python python3 llama/benchmark_tp.py --preset 13b
    mlx.launch -n 4 --backend nccl --python python3 llama/benchmark_tp.py --preset 70b
    torchrun --nproc-per-node 2 llama/benchmark_tp.py --preset 13b \
        --framework transformers
    # A quick check on a CPU:
    mlx.launch -n 2 --backend ring --python python llama/benchmark_tp.py --preset tiny

MLX builds the model directly sharded: every rank draws only its own slices of the split
weights (and the same replicated ones, from a seed shared by all ranks), so no file is
read and no process ever holds the whole model: a 70B-shaped model needs 138 GB in
float16, a quarter of it per GPU on four.

transformers builds a model with tp_plan="auto" only in from_pretrained: rank 0 builds
the random model on its GPU and saves it to a temporary folder, and every rank loads its
shards from there (needs the `accelerate` package). A 70B-shaped model does not fit on
one GPU to be built that way (and its 138 GB would have to be written and read back), so
transformers runs the 13B shape only.

Decoding is one sequence, greedy, --max-tokens new tokens after a --prompt-tokens
prompt, as in benchmark.py: MLX through Llama.generate (as llama.py runs it);
transformers through generate(), minus a generate() of one token (the prompt pass).
tokens/s are the median of --repeats runs after a warm-up run. Each rank reads its share
of the weights once per token, so tokens/s x bytes per rank is the memory bandwidth each
GPU achieves. Only rank 0 prints. The last line is a row of the README's table.
"""

import argparse
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten
from model import Llama, ModelArgs, warn_if_reference_blas
from timing import generate_runs, host_seconds, say
from tp import (
    ShardingError,
    init_group,
    keep_together,
    shard,
    stop_if_any_failed,
    weight_bytes,
)

from llama import in_range

# Llama 2 13B and 70B (70B: grouped-query attention with 8 key/value heads); "tiny" for
# a quick check.
PRESETS = {
    "tiny": dict(
        dim=256, n_layers=2, n_heads=8, n_kv_heads=4, hidden_dim=512, vocab_size=1000
    ),
    "13b": dict(
        dim=5120,
        n_layers=40,
        n_heads=40,
        n_kv_heads=40,
        hidden_dim=13824,
        vocab_size=32000,
    ),
    "70b": dict(
        dim=8192,
        n_layers=80,
        n_heads=64,
        n_kv_heads=8,
        hidden_dim=28672,
        vocab_size=32000,
    ),
}


# ---- MLX -----------------------------------------------------------------------------


def random_model(args, group, dtype, seed):
    """A Llama with random weights, split over `group` (None: whole), each weight
    drawn at its final shape."""
    model = Llama(args)  # unevaluated: the default initialization is never computed
    if group is not None:
        shard(model, group)
    rank = group.rank() if group is not None else 0
    for i, (prefix, module) in enumerate(
        [("layers", layer) for layer in model.layers]
        + [
            ("tok_embeddings", model.tok_embeddings),
            ("norm", model.norm),
            ("output", model.output),
        ]
    ):
        weights = []
        for j, (name, p) in enumerate(tree_flatten(module.parameters())):
            if "norm" in name or prefix == "norm":
                weights.append((name, mx.ones(p.shape, dtype)))
                continue
            # Split weights differ per rank; replicated ones (embedding, output) must
            # be the same on all.
            replicated = prefix != "layers"
            key = mx.random.key(hash((seed, i, j, 0 if replicated else rank)) % 2**31)
            weights.append(
                (name, mx.random.normal(p.shape, dtype, scale=0.02, key=key))
            )
        module.update(tree_unflatten(weights))
        mx.eval(
            module.parameters()
        )  # one block at a time: never more than one block of float32 temporaries
    return model


def time_mlx(model, prompt, max_tokens, repeats, label=None, watchdog=None):
    """Decoded tokens per second of each run of model.generate (after a warm-up run),
    and prompt seconds."""

    # The step started ahead (with its all_sums) finishes before the next run.
    def after_run():
        mx.synchronize()
        if watchdog:
            watchdog.progress()

    runs = generate_runs(
        model, prompt, max_tokens, repeats, after_run=after_run, label=label
    )
    return [1 / seconds for _, seconds in runs], statistics.median(
        seconds for seconds, _ in runs
    )


def start_group(options, args):
    """The process group (None for one process) and its watchdog, once every process
    knows that the model splits over the group."""
    group, error, watchdog = None, None, None
    try:
        group = init_group()
        watchdog = keep_together(group, options.timeout)
        if group is not None:
            shard(Llama(args), group)  # checks that the heads split; builds nothing
    except ShardingError as e:
        error = str(e)
    stop_if_any_failed(group, error)
    return group, watchdog


def run_mlx(options):
    dtype = getattr(mx, options.dtype)
    args = ModelArgs(**PRESETS[options.preset], max_seq_len=4096)
    group, watchdog = start_group(options, args)
    n = group.size() if group is not None else 1
    rank = group.rank() if group is not None else 0
    if rank == 0:
        warn_if_reference_blas()
        say(
            f"building a random {options.preset}-shaped {options.dtype} Llama split "
            f"over {n} process{'es' * (n > 1)}, "
            f"then timing {options.repeats} runs of {options.max_tokens} tokens after "
            "a warm-up run"
        )

    tic = time.perf_counter()
    model = random_model(args, group, dtype, options.seed)
    build_seconds = time.perf_counter() - tic
    if rank == 0:
        say(f"built in {build_seconds:.1f} s")
    split, replicated = weight_bytes(model)
    prompt = (
        np.random.default_rng(options.seed)
        .integers(3, args.vocab_size, options.prompt_tokens)
        .tolist()
    )
    watchdog.progress()
    rates, prompt_seconds = time_mlx(
        model,
        prompt,
        options.max_tokens,
        options.repeats,
        "MLX" if rank == 0 else None,
        watchdog,
    )
    build, launch = host_seconds(model, prompt)
    if rank != 0:
        return
    # Bytes read per decoded token on one rank: its slices, the output layer (whole),
    # the norms; the embedding is a lookup of one row.
    per_rank = split + replicated - model.tok_embeddings.weight.nbytes
    where = processes(n, mx.default_device() == mx.gpu)
    report(
        "MLX",
        options,
        where,
        rates,
        per_rank,
        split * n + replicated,
        prompt_seconds,
        build_seconds,
    )
    print(
        f"MLX host time per decoding step (rank 0): {build * 1e3:.2f} ms building the "
        f"graph + {launch * 1e3:.2f} ms "
        f"launching it, against {1e3 / statistics.median(rates):.2f} ms per token",
        flush=True,
    )


def processes(n, gpu):
    return (
        f"{n} GPU{'s' if n > 1 else ''}"
        if gpu
        else f"{n} CPU process{'es' if n > 1 else ''}"
    )


def report(
    framework, options, where, rates, per_rank, total, prompt_seconds, build_seconds
):
    median = statistics.median(rates)
    print(
        f"{framework}, {options.preset}-shaped, {options.dtype}, {where}: weights "
        f"{total / 1e9:.2f} GB, "
        f"{per_rank / 1e9:.2f} GB read per token per rank; built in "
        f"{build_seconds:.1f} s; "
        f"prompt {options.prompt_tokens} tokens in {prompt_seconds * 1e3:.1f} ms",
        flush=True,
    )
    print(
        f"{framework}, {options.preset}, {where}: decoding {median:.1f} tokens/s "
        f"(median of {len(rates)}, "
        f"range {min(rates):.1f}-{max(rates):.1f}), {median * per_rank / 1e12:.2f} "
        "TB/s of weights per rank",
        flush=True,
    )
    print(
        f"ROW | {framework} | {options.preset} | {where} | {median:.1f} | "
        f"{min(rates):.1f}-{max(rates):.1f} | {median * per_rank / 1e12:.2f} |",
        flush=True,
    )


# ---- transformers --------------------------------------------------------------------


def hf_config(preset, dtype):
    from transformers import LlamaConfig

    p = PRESETS[preset]
    return LlamaConfig(
        hidden_size=p["dim"],
        num_hidden_layers=p["n_layers"],
        num_attention_heads=p["n_heads"],
        num_key_value_heads=p["n_kv_heads"],
        intermediate_size=p["hidden_dim"],
        vocab_size=p["vocab_size"],
        max_position_embeddings=4096,
        dtype=dtype,
    )


def hf_model(options, device):
    """transformers' LlamaForCausalLM with random weights: whole on one device, or,
    under torchrun, split over its processes by tp_plan="auto"."""
    import torch
    import torch.distributed as dist
    from transformers import LlamaForCausalLM

    dtype = getattr(torch, options.dtype)
    config = hf_config(options.preset, options.dtype)

    # Random weights, made directly in `dtype` on `device` (13B: 7 s on an H100).
    def build():
        torch.manual_seed(options.seed)
        default = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with torch.device(device):
                return LlamaForCausalLM(config).eval()
        finally:
            torch.set_default_dtype(default)

    if (
        "WORLD_SIZE" not in os.environ
    ):  # not started by torchrun: the whole model on one device
        return build()
    # tp_plan="auto" is an argument of from_pretrained only, so the model goes through
    # a checkpoint: rank 0 builds it and saves it, and every rank loads its shards.
    # (from_pretrained can also initialize weights that a checkpoint lacks, but for
    # 13B that took over 60 s, on the CPU, on the H100 machine.)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    folder = (
        Path(tempfile.gettempdir()) / f"benchmark_tp_{options.preset}_{os.getppid()}"
    )  # the same on every rank
    rank = dist.get_rank()
    tic = time.perf_counter()
    try:
        if rank == 0:
            whole = build()
            whole.save_pretrained(folder)
            del whole
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
        dist.barrier()
        saved = time.perf_counter()
        model = LlamaForCausalLM.from_pretrained(
            folder, tp_plan="auto", dtype=dtype
        ).eval()
        dist.barrier()
    finally:  # an error, Ctrl-C or SIGTERM too
        if rank == 0:
            shutil.rmtree(folder, ignore_errors=True)
    if rank == 0:
        print(
            f"transformers: random checkpoint built and saved in {saved - tic:.1f} s, "
            "loaded with "
            f'tp_plan="auto" in {time.perf_counter() - saved:.1f} s',
            flush=True,
        )
    return model


def time_torch(model, prompt, max_tokens, repeats, device):
    """Decoded tokens per second of each run after a warm-up: generate() for max_tokens
    tokens minus generate() for one (the prompt pass and generate's own setup); and the
    seconds of that one."""
    import torch

    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    ids = torch.tensor([prompt], device=device)

    def seconds(n):
        sync()
        tic = time.perf_counter()
        model.generate(
            ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0
        )
        sync()
        return time.perf_counter() - tic

    rates, prompt_seconds = [], []
    with torch.inference_mode():
        for i in range(repeats + 1):
            tic = time.perf_counter()
            prompt_seconds.append(seconds(1))
            rates.append((max_tokens - 1) / (seconds(max_tokens) - prompt_seconds[-1]))
            if i == 0 and int(os.environ.get("RANK", 0)) == 0:
                run = time.perf_counter() - tic
                say(
                    f"transformers: warm-up run {run:.1f} s; {repeats} timed runs, "
                    f"about {repeats * run:.0f} s"
                )
    return rates[1:], statistics.median(prompt_seconds[1:])


def run_transformers(options):
    import torch

    world_size, rank = (
        int(os.environ.get("WORLD_SIZE", 1)),
        int(os.environ.get("RANK", 0)),
    )
    device = "cpu"
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    if rank == 0:
        say(
            f"building a random {options.preset}-shaped {options.dtype} Llama for "
            f"transformers over {world_size} "
            f"process{'es' * (world_size > 1)}, then timing {options.repeats} runs "
            "after a warm-up run"
        )
    tic = time.perf_counter()
    model = hf_model(options, device)
    build_seconds = time.perf_counter() - tic
    device = str(next(model.parameters()).device)
    prompt = (
        np.random.default_rng(options.seed)
        .integers(3, PRESETS[options.preset]["vocab_size"], options.prompt_tokens)
        .tolist()
    )
    rates, prompt_seconds = time_torch(
        model, prompt, options.max_tokens, options.repeats, device
    )
    if rank != 0:
        return
    total = 0
    for p in (
        model.parameters()
    ):  # under tp_plan the parameters are DTensors: whole shapes, local shards
        total += p.numel() * p.element_size()
    per_rank = (
        total - model.model.embed_tokens.weight.numel() * 2
    ) / world_size  # approximately: the split share
    where = processes(world_size, device.startswith("cuda"))
    report(
        "transformers",
        options,
        where,
        rates,
        per_rank,
        total,
        prompt_seconds,
        build_seconds,
    )


def main():
    parser = argparse.ArgumentParser(
        description="Decoding tokens/s of a tensor-parallel Llama with random weights: "
        "MLX under mlx.launch, transformers under torchrun."
    )
    parser.add_argument(
        "--framework",
        choices=["mlx", "transformers"],
        default="mlx",
        help="mlx (start with mlx.launch) or transformers (start with torchrun) "
        "(default: mlx)",
    )
    parser.add_argument(
        "--preset",
        choices=list(PRESETS),
        default="13b",
        help="model shape (default: 13b)",
    )
    parser.add_argument(
        "--dtype",
        choices=["float16", "bfloat16", "float32"],
        default="float16",
        help="weight dtype (default: float16)",
    )
    parser.add_argument(
        "--max-tokens",
        type=in_range(int, 2, 2048),
        default=64,
        help="tokens to generate per run, at least 2 (default: 64)",
    )
    parser.add_argument(
        "--prompt-tokens",
        type=in_range(int, 1, 2048),
        default=128,
        help="prompt length (default: 128)",
    )
    parser.add_argument(
        "--repeats",
        type=in_range(int, 1, 1000),
        default=3,
        help="timed runs after one warm-up run (default: 3)",
    )
    parser.add_argument(
        "--seed",
        type=in_range(int, 0, 2**31 - 1),
        default=0,
        help="random seed for the weights and the prompt (default: 0)",
    )
    parser.add_argument(
        "--timeout",
        type=in_range(float, 0),
        default=600,
        help="MLX with several processes: stop them all when the run makes no progress "
        "for this many seconds; 0: never (default: 600)",
    )
    options = parser.parse_args()
    if options.framework == "mlx":
        run_mlx(options)
    else:
        run_transformers(options)


if __name__ == "__main__":
    signal.signal(
        signal.SIGTERM, lambda number, frame: sys.exit("stopped by SIGTERM")
    )  # so that finally blocks run
    try:
        main()
    except (
        KeyboardInterrupt
    ):  # one process (under mlx.launch, tp.keep_together ends each rank)
        print("interrupted", file=sys.stderr)
        sys.exit(130)
