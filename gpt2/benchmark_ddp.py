"""Data-parallel scaling of GPT-2 small training: MLX (mlx.launch) against PyTorch DDP
(torchrun).

    python gpt2/benchmark_ddp.py mlx                           # MLX, 1 GPU
    mlx.launch -n 4 --backend nccl gpt2/benchmark_ddp.py mlx   # MLX, 4 GPUs
    torchrun --nproc_per_node 4 gpt2/benchmark_ddp.py torch    # PyTorch DDP, 4 GPUs
    python gpt2/benchmark_ddp.py table results.jsonl           # the runs' --json lines

Every process trains GPT-2 small (124M: 12 layers, 12 heads, 768 wide, vocabulary 50304,
context 1024) on random tokens, with --batch-size sequences per GPU (the global batch
grows with the GPUs: weak scaling). A step is forward and backward in bfloat16 on
float32 weights, the all-reduce that averages the gradients over the GPUs, and AdamW.
Each side has its usual best settings:

- MLX: the step compiled with mx.compile; all weights cast to bfloat16 inside it
  (float32 master weights, float32 loss); gradients averaged by nn.average_gradients
  (32 MiB buckets) inside the compiled step, after the backward pass, over NCCL
  (distributed.average, as main.py).
- PyTorch: nanogpt_reference.py's TorchGPT (the same GPT) with torch.compile, bfloat16
  autocast, fused AdamW, TF32 for what stays float32, and DistributedDataParallel, which
  all-reduces 25 MiB gradient buckets during the backward pass.

Rank 0 prints tokens/s per GPU (the median of --repeats timings of --steps steps, after
--warmup steps) and, with --json FILE, appends it there as one line; `table` reads those
lines and prints each run beside the 1-GPU run of its framework.
"""

import argparse
import json
import os
import statistics
import sys
import time
from functools import partial

import numpy as np

GPT2_SMALL = dict(n_layer=12, n_head=12, n_embd=768, vocab_size=50304, block_size=1024)
GPT2_LABEL = "GPT-2 small (124M parameters)"
TINY = dict(
    n_layer=2, n_head=2, n_embd=32, vocab_size=96, block_size=32
)  # for tests on a CPU


def random_batches(c, batch_size, count=4, seed=0):
    """`count` (batch_size, block_size + 1) int32 token arrays; inputs are [:, :-1],
    labels [:, 1:]."""
    rng = np.random.default_rng(seed)
    return [
        rng.integers(0, c["vocab_size"], (batch_size, c["block_size"] + 1)).astype(
            np.int32
        )
        for _ in range(count)
    ]


def time_steps(run_step, steps, repeats, warmup, say):
    """Seconds per step: the median and range of `repeats` timings of `steps` steps,
    after `warmup` steps. run_step(i, sync) runs step i and waits for it to finish when
    sync is true. say() shows progress."""
    tic = time.perf_counter()
    for i in range(warmup):
        run_step(i, sync=True)
        say(
            f"warm-up step {i + 1}/{warmup} done after "
            f"{time.perf_counter() - tic:.1f} s"
        )
    per_step = (time.perf_counter() - tic) / max(warmup, 1)
    say(f"timing {repeats} x {steps} steps, about {per_step * repeats * steps:.0f} s")
    times = []
    for r in range(repeats):
        tic = time.perf_counter()
        for i in range(steps):
            run_step(i, sync=i == steps - 1)
        times.append((time.perf_counter() - tic) / steps)
        say(f"timing {r + 1}/{repeats}: {1e3 * times[-1]:.1f} ms/step")
    return statistics.median(times), min(times), max(times)


# ---- MLX ---------------------------------------------------------------------------


def run_mlx(args, c):
    import distributed
    import mlx.core as mx
    from main import warn_if_reference_blas

    group = distributed.init()
    say = (
        partial(
            print, f"[mlx, {group.size()} process(es)]", file=sys.stderr, flush=True
        )
        if group.rank() == 0
        else (lambda *args: None)
    )
    say(
        f"{'a tiny GPT' if args.tiny else GPT2_LABEL} on {mx.default_device()}, batch "
        f"{args.batch_size} x {c['block_size']} per process: {args.warmup} warm-up "
        f"steps (they compile), then {args.repeats} x {args.steps}"
        + (
            "; on a CPU each GPT-2 small step takes minutes"
            if mx.default_device() == mx.cpu and not args.tiny
            else ""
        )
    )
    if group.rank() == 0:
        warn_if_reference_blas()
    step, state = mlx_train_step(args, c, group)

    data = [
        (mx.array(b[:, :-1]), mx.array(b[:, 1:]))
        for b in random_batches(c, args.batch_size, seed=group.rank())
    ]
    mx.eval(state, data)

    def run_step(i, sync):
        loss = step(*data[i % len(data)])
        mx.eval(
            state, loss
        )  # as main.py: each step's weights exist before the next batch is fed

    seconds = time_steps(run_step, args.steps, args.repeats, args.warmup, say)
    peak = mx.get_peak_memory() / 2**30
    return (
        group.rank(),
        group.size(),
        seconds,
        f"MLX {mx.__version__}, {args.dtype}, peak {peak:.1f} GiB",
        str(mx.default_device()),
    )


def mlx_train_step(args, c, group):
    """The compiled training step of a new GPT and AdamW, and the state it updates."""
    import distributed
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim
    from model import GPT, GPTConfig

    dtype = {"bfloat16": mx.bfloat16, "float32": mx.float32}[args.dtype]
    mx.random.seed(0)
    model = GPT(GPTConfig(**c))
    optimizer = optim.AdamW(6e-4, betas=[0.9, 0.95], weight_decay=0.1)
    optimizer.init(model.trainable_parameters())

    def loss_fn(params, x, y):
        model.update(
            nn.utils.tree_map(lambda p: p.astype(dtype), params)
        )  # compute in `dtype`
        return nn.losses.cross_entropy(model(x).astype(mx.float32), y, reduction="mean")

    loss_and_grad = mx.value_and_grad(loss_fn)
    state = [model.state, optimizer.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def step(x, y):
        master = model.trainable_parameters()
        loss, grads = loss_and_grad(
            master, x, y
        )  # float32 gradients of the float32 weights
        model.update(master)
        grads, loss = distributed.average(grads, loss, group)
        optimizer.update(model, grads)
        return loss

    return step, state


# ---- PyTorch: nanoGPT's model, DistributedDataParallel
# -----------------------------------------


def run_torch(args, c):
    import torch
    import torch.distributed as dist

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, size = dist.get_rank(), dist.get_world_size()
    say = (
        partial(print, f"[torch, {size} process(es)]", file=sys.stderr, flush=True)
        if rank == 0
        else (lambda *args: None)
    )
    device = (
        torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        if cuda
        else torch.device("cpu")
    )
    say(
        f"{'a tiny GPT' if args.tiny else GPT2_LABEL} on {device}, batch "
        f"{args.batch_size} x {c['block_size']} per process: {args.warmup} warm-up "
        f"steps, then {args.repeats} x {args.steps}"
    )
    model, optimizer = torch_ddp_model(c, device, cuda)
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[args.dtype]
    data = [
        torch.from_numpy(b).long().to(device)
        for b in random_batches(c, args.batch_size, seed=rank)
    ]

    def run_step(i, sync):
        b = data[i % len(data)]
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = model(b[:, :-1], b[:, 1:])
        loss.backward()  # DDP all-reduces the gradient buckets as they are ready
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if sync and cuda:
            torch.cuda.synchronize()

    seconds = time_steps(run_step, args.steps, args.repeats, args.warmup, say)
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0
    name = torch.cuda.get_device_name() if cuda else "cpu"
    result = (
        rank,
        size,
        seconds,
        f"PyTorch {torch.__version__}, {args.dtype}, peak {peak:.1f} GiB",
        name,
    )
    dist.barrier()  # every rank done before any tears the group down
    dist.destroy_process_group()
    return result


def torch_ddp_model(c, device, cuda):
    """A new TorchGPT on `device`, compiled on CUDA, wrapped in DDP; and its AdamW."""
    import torch
    from nanogpt_reference import (
        TorchGPT,
    )  # the same GPT in PyTorch; dropout 0 here, flash attention
    from torch.nn.parallel import DistributedDataParallel

    if cuda:
        torch.cuda.set_device(device)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(0)
    model = TorchGPT({**c, "dropout": 0.0}).to(device)
    if cuda:
        model = torch.compile(model)
    model = DistributedDataParallel(
        model, device_ids=[device.index] if cuda else None, gradient_as_bucket_view=True
    )
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=6e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=cuda
    )
    return model, optimizer


# ---- The table
# ----------------------------------------------------------------------------------


def print_table(path):
    runs = sorted(
        (json.loads(line) for line in open(path) if line.strip()),
        key=lambda r: (r["framework"], r["gpus"]),
    )
    one_gpu = {
        r["framework"]: r["tokens_per_s_per_gpu"] for r in runs if r["gpus"] == 1
    }
    print(
        f"{'framework':>9} {'GPUs':>4} {'ms/step':>8} {'tokens/s per GPU':>17} "
        f"{'range':>17} {'vs 1 GPU':>8}  notes"
    )
    for r in runs:
        ratio = (
            r["tokens_per_s_per_gpu"] / one_gpu[r["framework"]]
            if r["framework"] in one_gpu
            else float("nan")
        )
        low, high = r["range"]
        print(
            f"{r['framework']:>9} {r['gpus']:>4} {r['ms_per_step']:>8.1f} "
            f"{r['tokens_per_s_per_gpu']:>17,.0f} "
            f"{f'{low:,.0f}-{high:,.0f}':>17} {ratio:>7.1%}  {r['notes']}"
        )


def report(args, c, size, median, fastest, slowest, notes, device):
    tokens = args.batch_size * c["block_size"]
    result = dict(
        framework=args.framework,
        gpus=size,
        ms_per_step=1e3 * median,
        tokens_per_s_per_gpu=tokens / median,
        range=[tokens / slowest, tokens / fastest],
        batch_per_gpu=args.batch_size,
        ctx_len=c["block_size"],
        notes=f"{notes}, batch {args.batch_size} x {c['block_size']} per GPU, {device}",
    )
    print(json.dumps(result), flush=True)
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(result) + "\n")


def parse_args():
    parser = argparse.ArgumentParser(
        description="Tokens/s per GPU of GPT-2 small data-parallel training, MLX "
        "(under mlx.launch) or PyTorch DDP (under torchrun)."
    )
    parser.add_argument(
        "framework",
        choices=["mlx", "torch", "table"],
        help="mlx or torch: time training steps; table: print the --json lines of "
        "earlier runs",
    )
    parser.add_argument(
        "path", nargs="?", help="for table: the file the runs' --json wrote"
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=16,
        help="sequences per GPU per step (default: 16)",
    )
    parser.add_argument(
        "--ctx-len", type=int, help="context length (default: GPT-2's 1024)"
    )
    parser.add_argument(
        "--dtype",
        choices=["bfloat16", "float32"],
        default="bfloat16",
        help="compute dtype; weights and AdamW stay float32 (default: bfloat16)",
    )
    parser.add_argument(
        "--steps", type=int, default=10, help="steps per timing (default: 10)"
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="timings; the median is reported (default: 3)",
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=3,
        help="untimed steps first, for compilation (default: 3)",
    )
    parser.add_argument(
        "--json", help="append rank 0's result to this file as one JSON line"
    )
    parser.add_argument(
        "--tiny",
        action="store_true",
        help="a 2-layer model of width 32 (for tests on a CPU)",
    )
    args = parser.parse_args()
    check_args(parser, args)
    return args


def check_args(parser, args):
    if args.framework == "table":
        if not args.path or not os.path.isfile(args.path):
            parser.error("table needs the file that the runs' --json wrote")
        return
    if (
        min(args.batch_size, args.steps, args.repeats) < 1
        or args.warmup < 0
        or (args.ctx_len or 1) < 1
    ):
        parser.error(
            "--batch-size, --ctx-len, --steps and --repeats must be at least 1, "
            "--warmup at least 0"
        )


def table(path):
    """The `table` command: print_table, or one line if the file is not --json's."""
    try:
        print_table(path)
    except (
        ValueError,
        KeyError,
        TypeError,
    ) as e:  # a line that is not one of --json's
        sys.exit(
            f"error: {path} holds a line that is not a result of --json "
            f"({type(e).__name__}: {e})"
        )


def time_training(args, c):
    """run_mlx or run_torch, with one line instead of a traceback if it fails."""
    try:
        return (run_mlx if args.framework == "mlx" else run_torch)(args, c)
    except (
        Exception
    ) as e:  # a backend that is missing, a GPU out of memory: one line, not a traceback
        sys.exit(
            f"error: {args.framework} on this process failed: {type(e).__name__}: {e}"
        )


def main():
    args = parse_args()
    if args.framework == "table":
        return table(args.path)
    c = {
        **GPT2_SMALL,
        **(TINY if args.tiny else {}),
        **({"block_size": args.ctx_len} if args.ctx_len else {}),
    }

    rank, size, (median, fastest, slowest), notes, device = time_training(args, c)
    if rank == 0:
        report(args, c, size, median, fastest, slowest, notes, device)
    if args.framework == "torch":
        # PyTorch 2.13's gloo (CPU) aborts now and then at interpreter exit ("terminate
        # called without an active exception", ~1 run in 10 on this 2-core CPU), after
        # all the work: leave without the teardown.
        sys.stdout.flush()
        os._exit(0)


if __name__ == "__main__":
    main()
