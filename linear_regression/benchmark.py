"""Time full-batch SGD for linear and logistic regression: MLX against PyTorch, same data, same run.

    python linear_regression/benchmark.py
    python linear_regression/benchmark.py --num-iters 200 --repeats 1     # quick

On Linux CPU, preload OpenBLAS first (see the README): the mlx[cpu] wheel's bundled BLAS is slow.
The preload would also replace PyTorch's own MKL (and slow it down), so when LD_PRELOAD is set
PyTorch is timed in a child process started without it. What is timed, and each timing as it
ends with the time left, goes to stderr; the table to stdout.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import mlx.core as mx
import numpy as np
import torch
from main import positive_int, seed, warn_if_reference_blas
from model import logistic_loss, sgd, squared_loss


def torch_sgd(loss_fn, X, y, num_iters, lr):
    """The same full-batch gradient descent with PyTorch autograd."""
    w = 1e-2 * torch.randn(X.shape[1])
    for _ in range(num_iters):
        w.requires_grad_(True)
        (grad,) = torch.autograd.grad(loss_fn(w, X, y), w)
        w = (w - lr * grad).detach()
    return w


def torch_squared_loss(w, X, y):
    return 0.5 * torch.mean(torch.square(X @ w - y))


def torch_logistic_loss(w, X, y):
    logits = X @ w
    return torch.mean(torch.nn.functional.softplus(logits) - y * logits)


def median_seconds(fn, repeats):
    fn()  # warm up (MLX compiles the step on its first call)
    times = []
    for _ in range(repeats):
        tic = time.perf_counter()
        fn()
        times.append(time.perf_counter() - tic)
    return statistics.median(times)


def say_timed(label, seconds, start, runs_done, runs_total):
    """A progress line on stderr: this timing's median and the time left, from the mean time per run so far."""
    elapsed = time.perf_counter() - start
    left = elapsed / runs_done * (runs_total - runs_done)
    print(
        f"{label}: median {seconds:.3f} s a run; {elapsed:.0f} s so far, about {left:.0f} s to go",
        file=sys.stderr,
        flush=True,
    )


def make_data(args):
    """The same float32 data for both frameworks: X, linear targets, binary logistic targets."""
    rng = np.random.default_rng(args.seed)
    X = rng.standard_normal((args.num_examples, args.num_features)).astype(np.float32)
    w_star = rng.standard_normal(args.num_features).astype(np.float32)
    y_linear = X @ w_star + 1e-2 * rng.standard_normal(args.num_examples).astype(
        np.float32
    )
    y_logistic = (X @ w_star > 0).astype(np.float32)
    return X, {"linear": (y_linear, 0.01), "logistic": (y_logistic, 0.1)}


FRAMEWORK_NAMES = {"torch": "PyTorch", "mlx": "MLX"}
# Per framework: its SGD loop, its two losses, and how it takes a numpy array.
FRAMEWORKS = {
    "torch": (
        torch_sgd,
        {"linear": torch_squared_loss, "logistic": torch_logistic_loss},
        torch.from_numpy,
    ),
    "mlx": (sgd, {"linear": squared_loss, "logistic": logistic_loss}, mx.array),
}


def rates(framework, args, start, timings_before=0, timings_total=2):
    """{task: SGD iterations per second} for one framework, each timing said on stderr as it ends."""
    run_sgd, losses, to_array = FRAMEWORKS[framework]
    X, tasks = make_data(args)
    X = to_array(X)
    result = {}
    for name, (y, lr) in tasks.items():
        seconds = median_seconds(
            lambda: run_sgd(losses[name], X, to_array(y), args.num_iters, lr),
            args.repeats,
        )
        result[name] = args.num_iters / seconds
        timings_before += 1
        say_timed(
            f"{FRAMEWORK_NAMES[framework]} {name}",
            seconds,
            start,
            timings_before * (1 + args.repeats),
            timings_total * (1 + args.repeats),
        )
    return result


def torch_in_child(argv):
    """Rerun this script for PyTorch alone, without LD_PRELOAD; returns its iterations/s.
    Its progress lines reach stderr directly."""
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
            f"error: the PyTorch child process failed (exit status {result.returncode}); its message is above"
        )
    return json.loads(result.stdout.splitlines()[-1])


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(
        description="SGD iterations per second, MLX vs PyTorch, on the CPU."
    )
    parser.add_argument(
        "--num-features",
        type=positive_int,
        default=100,
        help="weight dimension (default: 100)",
    )
    parser.add_argument(
        "--num-examples",
        type=positive_int,
        default=1000,
        help="rows of X (default: 1000)",
    )
    parser.add_argument(
        "--num-iters",
        type=positive_int,
        default=2000,
        help="SGD iterations per timed run (default: 2000)",
    )
    parser.add_argument(
        "--repeats",
        type=positive_int,
        default=5,
        help="timed runs; the median is reported (default: 5)",
    )
    parser.add_argument(
        "--seed", type=seed, default=0, help="random seed, 0 to 2**64 - 1 (default: 0)"
    )
    parser.add_argument(
        "--only", choices=["torch"], help=argparse.SUPPRESS
    )  # used by torch_in_child
    args = parser.parse_args(argv)

    start = time.perf_counter()
    if args.only == "torch":
        print(json.dumps(rates("torch", args, start, timings_total=2)))
        return
    mx.set_default_device(mx.cpu)
    warn_if_reference_blas()
    print(
        f"timing {args.num_iters} SGD iterations on {args.num_examples} x {args.num_features}, linear and "
        f"logistic, MLX then PyTorch, {1 + args.repeats} runs each (1 warm-up)",
        file=sys.stderr,
        flush=True,
    )
    mlx_rate = rates("mlx", args, start, timings_total=4)
    separate = "LD_PRELOAD" in os.environ
    torch_rate = (
        torch_in_child(argv)
        if separate
        else rates("torch", args, start, timings_before=2, timings_total=4)
    )

    print(
        f"MLX {mx.__version__} on {mx.default_device()}; PyTorch {torch.__version__} "
        f"({torch.get_num_threads()} threads{', in a child process without LD_PRELOAD' if separate else ''})"
    )
    print(
        f"{args.num_examples} x {args.num_features}, median of {args.repeats} runs of {args.num_iters} iterations"
    )
    print(f"{'task':<10} {'MLX it/s':>10} {'PyTorch it/s':>13} {'MLX/PyTorch':>12}")
    for name in mlx_rate:
        # A ratio above 1 means MLX is faster.
        print(
            f"{name:<10} {mlx_rate[name]:>10.0f} {torch_rate[name]:>13.0f} {mlx_rate[name] / torch_rate[name]:>11.2f}x"
        )


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # a benchmark writes nothing
        print("interrupted", file=sys.stderr)
        sys.exit(130)
