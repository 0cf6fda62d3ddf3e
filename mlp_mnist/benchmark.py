"""Time one training step (forward, backward, Adam update) of the MNIST MLP: MLX against PyTorch.

    python mlp_mnist/benchmark.py
    python mlp_mnist/benchmark.py --steps 5 --repeats 1        # quick

Random MNIST-shaped data, no download. Prints the median step time of each framework and the ratio.
On Linux CPU, preload OpenBLAS first (see the README): the mlx[cpu] wheel's bundled BLAS is slow.
The preload would also replace PyTorch's own MKL (and slow it down several times), so when
LD_PRELOAD is set PyTorch is timed in a child process started without it.
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
from main import warn_if_reference_blas
from model import MLP, loss_fn


def mlx_steps(config, X, y, lr):
    """A function that runs `n` training steps in MLX."""
    model = MLP(**config)
    optimizer = optim.Adam(learning_rate=lr)
    loss_and_grad_fn = nn.value_and_grad(model, loss_fn)
    X, y = mx.array(X), mx.array(y)

    def run(n):
        for _ in range(n):
            loss, grads = loss_and_grad_fn(model, X, y)
            optimizer.update(model, grads)
            mx.eval(model.parameters(), optimizer.state)

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


def median_ms_per_step(run, steps, repeats):
    run(3)  # warm up
    times = []
    for _ in range(repeats):
        tic = time.perf_counter()
        run(steps)
        times.append((time.perf_counter() - tic) / steps * 1e3)
    return statistics.median(times)


def torch_in_child(argv):
    """Rerun this script for PyTorch alone, without LD_PRELOAD; returns its {batch: ms/step}."""
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    result = subprocess.run([sys.executable, __file__, *argv, "--only", "torch"],
                            env=env, capture_output=True, text=True, check=True)
    return {int(k): v for k, v in json.loads(result.stdout.splitlines()[-1]).items()}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description="MLP training-step time, MLX vs PyTorch, on random MNIST-shaped data.")
    parser.add_argument("--num-layers", type=int, default=2, help="hidden layers (default: 2)")
    parser.add_argument("--hidden-dim", type=int, default=256, help="hidden width (default: 256)")
    parser.add_argument("--batch-size", type=int, nargs="+", default=[128, 1024],
                        help="batch sizes to time (default: 128 1024)")
    parser.add_argument("--steps", type=int, default=50, help="steps per timed run (default: 50)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs; the median is reported (default: 5)")
    parser.add_argument("--device", choices=["cpu", "gpu"], default="cpu",
                        help="cpu, or gpu (MLX's GPU backend vs PyTorch on CUDA) (default: cpu)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--only", choices=["torch"], help=argparse.SUPPRESS)  # used by torch_in_child
    args = parser.parse_args(argv)

    if args.device == "gpu":
        if not mx.is_available(mx.gpu) or not torch.cuda.is_available():
            sys.exit("error: --device gpu needs MLX's GPU backend and PyTorch with CUDA; use --device cpu")
        mx.set_default_device(mx.gpu)
        torch_device = "cuda"
    else:
        mx.set_default_device(mx.cpu)
        torch_device = "cpu"
        warn_if_reference_blas()

    rng = np.random.default_rng(args.seed)
    config = dict(num_layers=args.num_layers, input_dim=784, hidden_dim=args.hidden_dim, output_dim=10)
    data = {}
    for batch_size in args.batch_size:
        X = rng.random((batch_size, 784), dtype=np.float32)
        y = rng.integers(0, 10, batch_size).astype(np.uint32)
        data[batch_size] = X, y

    def time_torch():
        return {b: median_ms_per_step(torch_steps(config, X, y, 1e-3, torch_device), args.steps, args.repeats)
                for b, (X, y) in data.items()}

    if args.only == "torch":
        print(json.dumps(time_torch()))
        return
    separate = torch_device == "cpu" and "LD_PRELOAD" in os.environ
    t_torch = torch_in_child(argv) if separate else time_torch()
    t_mlx = {b: median_ms_per_step(mlx_steps(config, X, y, 1e-3), args.steps, args.repeats)
             for b, (X, y) in data.items()}

    print(f"MLX {mx.__version__} on {mx.default_device()}; PyTorch {torch.__version__} on {torch_device} "
          f"({torch.get_num_threads()} threads{', in a child process without LD_PRELOAD' if separate else ''})")
    print(f"MLP {config}; median of {args.repeats} runs of {args.steps} steps")
    print(f"{'batch':>6} {'MLX ms/step':>12} {'PyTorch ms/step':>16} {'PyTorch/MLX':>12}")
    for b in data:
        # A ratio above 1 means MLX is faster.
        print(f"{b:>6} {t_mlx[b]:>12.3f} {t_torch[b]:>16.3f} {t_torch[b] / t_mlx[b]:>11.2f}x")


if __name__ == "__main__":
    main()
