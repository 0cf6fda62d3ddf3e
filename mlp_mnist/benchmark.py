"""Time one training step (forward, backward, Adam) of the MNIST MLP: MLX vs PyTorch.

    python mlp_mnist/benchmark.py
    python mlp_mnist/benchmark.py --steps 5 --repeats 1        # quick

Random MNIST-shaped data, no download. MLX runs main.py's compiled step. Prints the
median and range of the step time of each framework, and the ratio of the medians.
On Linux CPU, preload OpenBLAS first (see the README): the mlx[cpu] wheel's bundled BLAS
is slow. The preload would also replace PyTorch's own MKL (and slow it down), so when
LD_PRELOAD is set PyTorch is timed in a child process started without it. Progress goes
to stderr, the table to stdout.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import torch
from convert import TorchMLP
from main import whole_number
from model import MLP, loss_fn


def warn_if_reference_blas():
    """mlx[cpu] on Linux ships netlib's reference BLAS (about 30x slower matmul)."""
    if not sys.platform.startswith("linux"):
        return
    with open("/proc/self/maps") as f:
        libs = {line.split()[-1] for line in f if "/" in line}
    reference = any("mlx_cpu.libs/libblas" in lib for lib in libs)
    openblas = any(lib.rsplit("/", 1)[-1].startswith("libopenblas") for lib in libs)
    if reference and not openblas:
        print(
            "warning: MLX uses the slow reference BLAS bundled with mlx[cpu]; "
            "see README.md to preload OpenBLAS",
            file=sys.stderr,
        )


def mlx_steps(config, X, y, lr):
    """A function that runs `n` training steps in MLX, compiled as in main.py."""
    model = MLP(**config)
    optimizer = optim.Adam(learning_rate=lr)
    loss_and_grad_fn = nn.value_and_grad(model, loss_fn)
    X, y = mx.array(X), mx.array(y)
    state = [model.state, optimizer.state]

    def step(X, y):
        loss, grads = loss_and_grad_fn(model, X, y)
        optimizer.update(model, grads)
        return loss

    step = mx.compile(step, inputs=state, outputs=state)

    def run(n):
        for _ in range(n):
            step(X, y)
            mx.eval(state)

    return run


def torch_steps(config, X, y, lr, device):
    model = TorchMLP(**config).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    X, y = torch.from_numpy(X).to(device), torch.from_numpy(y).long().to(device)

    def run(n):
        for _ in range(n):
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(X), y)
            loss.backward()
            optimizer.step()
        if device == "cuda":
            torch.cuda.synchronize()

    return run


def ms_per_step(run, steps, repeats):
    """Milliseconds a step in each of `repeats` runs of `steps` steps (3 to warm up)."""
    run(3)
    times = []
    for _ in range(repeats):
        tic = time.perf_counter()
        run(steps)
        times.append((time.perf_counter() - tic) / steps * 1e3)
    return times


class Progress:
    """After each timing, a line on stderr with its result and the time left."""

    def __init__(self, steps_total):
        self.steps_total, self.steps_done, self.start = (
            steps_total,
            0,
            time.perf_counter(),
        )

    def timed(self, label, ms, steps):
        self.steps_done += steps
        elapsed = time.perf_counter() - self.start
        left = elapsed / self.steps_done * (self.steps_total - self.steps_done)
        print(
            f"{label}: median {ms:.3f} ms a step; {elapsed:.0f} s so far, about "
            f"{left:.0f} s to go",
            file=sys.stderr,
            flush=True,
        )


def time_all(name, make_run, data, args, progress):
    """{batch size: [ms per step of each run]} of make_run(X, y) for each batch size."""
    result = {}
    for b, (X, y) in data.items():
        result[b] = ms_per_step(make_run(X, y), args.steps, args.repeats)
        median = statistics.median(result[b])
        progress.timed(f"{name} batch {b}", median, 3 + args.steps * args.repeats)
    return result


def torch_in_child(argv):
    """Rerun this script for PyTorch alone, without LD_PRELOAD; returns its
    {batch: [ms per step]}. Its progress lines reach stderr directly."""
    print(
        "PyTorch, in a child process without LD_PRELOAD:", file=sys.stderr, flush=True
    )
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    result = subprocess.run(
        [sys.executable, __file__, *argv, "--only", "torch"],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    if result.returncode != 0:
        sys.exit(
            f"error: the PyTorch child process failed (exit status "
            f"{result.returncode}); its message is above"
        )
    return {int(k): v for k, v in json.loads(result.stdout.splitlines()[-1]).items()}


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description="MLP training-step time, MLX vs PyTorch, random MNIST-shaped data."
    )
    parser.add_argument(
        "--num-layers",
        type=whole_number(1, 16),
        default=2,
        help="hidden layers (default: 2)",
    )
    parser.add_argument(
        "--hidden-dim",
        type=whole_number(1, 2**20),
        default=256,
        help="hidden width (default: 256)",
    )
    parser.add_argument(
        "--batch-size",
        type=whole_number(1, 2**20),
        nargs="+",
        default=[128, 1024],
        help="batch sizes to time (default: 128 1024)",
    )
    parser.add_argument(
        "--steps",
        type=whole_number(1, 2**20),
        default=50,
        help="steps per timed run (default: 50)",
    )
    parser.add_argument(
        "--repeats",
        type=whole_number(1, 2**20),
        default=5,
        help="timed runs; the median is reported (default: 5)",
    )
    parser.add_argument(
        "--device",
        choices=["cpu", "gpu"],
        default="cpu",
        help="cpu, or gpu (MLX's GPU backend vs PyTorch on CUDA) (default: cpu)",
    )
    parser.add_argument(
        "--seed",
        type=whole_number(0, 2**32 - 1),
        default=0,
        help="random seed, 0 to 2**32 - 1 (default: 0)",
    )
    parser.add_argument(
        "--only", choices=["torch"], help=argparse.SUPPRESS
    )  # used by torch_in_child
    return parser.parse_args(argv)


def select_device(args):
    """Set MLX's default device; returns PyTorch's device name."""
    if args.device == "gpu":
        if not mx.is_available(mx.gpu) or not torch.cuda.is_available():
            sys.exit(
                "error: --device gpu needs MLX's GPU backend and PyTorch with CUDA; "
                "use --device cpu"
            )
        mx.set_default_device(mx.gpu)
        return "cuda"
    mx.set_default_device(mx.cpu)
    if args.only is None:  # the PyTorch child does not use MLX
        warn_if_reference_blas()
    return "cpu"


def random_data(args):
    """{batch size: (X, y)} of random MNIST-shaped inputs and labels."""
    rng = np.random.default_rng(args.seed)
    data = {}
    for batch_size in args.batch_size:
        X = rng.random((batch_size, 784), dtype=np.float32)
        y = rng.integers(0, 10, batch_size).astype(np.uint32)
        data[batch_size] = X, y
    return data


def print_table(args, config, t_mlx, t_torch, torch_device, separate):
    threads = f"{torch.get_num_threads()} threads"
    if separate:
        threads += ", in a child process without LD_PRELOAD"
    print(
        f"MLX {mx.__version__} on {mx.default_device()}; PyTorch {torch.__version__} "
        f"on {torch_device} ({threads})"
    )
    print(f"MLP {config}; median (range) of {args.repeats} runs of {args.steps} steps")
    print(
        f"{'batch':>6} {'MLX ms/step':>26} {'PyTorch ms/step':>26} {'PyTorch/MLX':>12}"
    )
    for b in t_mlx:
        # A ratio above 1 means MLX is faster.
        mlx, pt = statistics.median(t_mlx[b]), statistics.median(t_torch[b])
        mlx_range = f"{mlx:.3f} ({min(t_mlx[b]):.3f}-{max(t_mlx[b]):.3f})"
        pt_range = f"{pt:.3f} ({min(t_torch[b]):.3f}-{max(t_torch[b]):.3f})"
        print(f"{b:>6} {mlx_range:>26} {pt_range:>26} {pt / mlx:>11.2f}x")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    torch_device = select_device(args)
    config = dict(
        num_layers=args.num_layers,
        input_dim=784,
        hidden_dim=args.hidden_dim,
        output_dim=10,
    )
    data = random_data(args)

    steps = len(data) * (
        3 + args.steps * args.repeats
    )  # of one framework, every batch size

    def time_torch(progress):
        return time_all(
            "PyTorch",
            lambda X, y: torch_steps(config, X, y, 1e-3, torch_device),
            data,
            args,
            progress,
        )

    if args.only == "torch":
        print(json.dumps(time_torch(Progress(steps))))
        return
    print(
        f"timing training steps of an MLP of {args.num_layers} x {args.hidden_dim} at "
        f"batch sizes {' '.join(map(str, data))}: MLX then PyTorch, {args.repeats} "
        f"runs of {args.steps} steps each (and 3 warm-up steps)",
        file=sys.stderr,
        flush=True,
    )
    progress = Progress(2 * steps)
    t_mlx = time_all(
        "MLX", lambda X, y: mlx_steps(config, X, y, 1e-3), data, args, progress
    )
    separate = torch_device == "cpu" and "LD_PRELOAD" in os.environ
    t_torch = torch_in_child(argv) if separate else time_torch(progress)
    print_table(args, config, t_mlx, t_torch, torch_device, separate)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # a benchmark writes nothing
        print("interrupted", file=sys.stderr)
        sys.exit(130)
