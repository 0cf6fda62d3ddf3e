"""Time full-batch SGD for linear and logistic regression: MLX vs PyTorch, same data.

    python linear_regression/benchmark.py
    python linear_regression/benchmark.py --num-iters 200 --repeats 1     # quick

On Linux CPU, preload OpenBLAS first (see the README): the mlx[cpu] wheel's bundled BLAS
is slow. The preload would also replace PyTorch's own MKL (and slow it down), so when
LD_PRELOAD is set PyTorch is timed in a child process started without it. Progress goes
to stderr; the table (iterations per second, median and range over the runs) to stdout.
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
from main import number
from model import logistic_loss, sgd, squared_loss


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


def seconds(fn, repeats):
    """The seconds of each of `repeats` calls, after one to warm up (MLX compiles)."""
    fn()
    times = []
    for _ in range(repeats):
        tic = time.perf_counter()
        fn()
        times.append(time.perf_counter() - tic)
    return times


def say_timed(label, seconds, start, runs_done, runs_total):
    """A progress line on stderr: this timing's median and the time left."""
    elapsed = time.perf_counter() - start
    left = elapsed / runs_done * (runs_total - runs_done)
    print(
        f"{label}: median {seconds:.3f} s a run; {elapsed:.0f} s so far, about "
        f"{left:.0f} s to go",
        file=sys.stderr,
        flush=True,
    )


def make_data(args):
    """The same float32 data for both frameworks: X, linear and logistic targets."""
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
    """{task: [SGD iterations per second of each run]} for one framework."""
    run_sgd, losses, to_array = FRAMEWORKS[framework]
    X, tasks = make_data(args)
    X = to_array(X)
    result = {}
    for name, (y, lr) in tasks.items():
        times = seconds(
            lambda: run_sgd(losses[name], X, to_array(y), args.num_iters, lr),
            args.repeats,
        )
        result[name] = [args.num_iters / t for t in times]
        timings_before += 1
        say_timed(
            f"{FRAMEWORK_NAMES[framework]} {name}",
            statistics.median(times),
            start,
            timings_before * (1 + args.repeats),
            timings_total * (1 + args.repeats),
        )
    return result


def torch_in_child(argv):
    """Rerun this script for PyTorch alone, without LD_PRELOAD; returns its rates.
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
            f"error: the PyTorch child process failed (exit status "
            f"{result.returncode}); its message is above"
        )
    return json.loads(result.stdout.splitlines()[-1])


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description="SGD iterations per second, MLX vs PyTorch, on the CPU."
    )
    parser.add_argument(
        "--num-features",
        type=number(int, 0),
        default=100,
        help="weight dimension (default: 100)",
    )
    parser.add_argument(
        "--num-examples",
        type=number(int, 0),
        default=1000,
        help="rows of X (default: 1000)",
    )
    parser.add_argument(
        "--num-iters",
        type=number(int, 0),
        default=2000,
        help="SGD iterations per timed run (default: 2000)",
    )
    parser.add_argument(
        "--repeats",
        type=number(int, 0),
        default=5,
        help="timed runs; the median is reported (default: 5)",
    )
    parser.add_argument(
        "--seed",
        type=number(int, -1, 2**64),
        default=0,
        help="random seed, 0 to 2**64 - 1 (default: 0)",
    )
    parser.add_argument(
        "--only", choices=["torch"], help=argparse.SUPPRESS
    )  # used by torch_in_child
    return parser.parse_args(argv)


def print_table(args, mlx_rate, torch_rate, separate):
    threads = f"{torch.get_num_threads()} threads"
    if separate:
        threads += ", in a child process without LD_PRELOAD"
    print(f"MLX {mx.__version__} on {mx.default_device()}; PyTorch {torch.__version__}")
    print(
        f"{args.num_examples} x {args.num_features}, {args.num_iters} iterations a "
        f"run, median (range) of {args.repeats} runs; PyTorch: {threads}"
    )
    print(f"{'task':<10} {'MLX it/s':>22} {'PyTorch it/s':>22} {'MLX/PyTorch':>12}")
    for name in mlx_rate:
        # A ratio above 1 means MLX is faster.
        cells = []
        for rates_of_runs in (mlx_rate[name], torch_rate[name]):
            median = statistics.median(rates_of_runs)
            low, high = min(rates_of_runs), max(rates_of_runs)
            cells.append((median, f"{median:.0f} ({low:.0f}-{high:.0f})"))
        (mlx, mlx_cell), (pt, pt_cell) = cells
        print(f"{name:<10} {mlx_cell:>22} {pt_cell:>22} {mlx / pt:>11.2f}x")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    start = time.perf_counter()
    if args.only == "torch":
        print(json.dumps(rates("torch", args, start, timings_total=2)))
        return
    mx.set_default_device(mx.cpu)
    warn_if_reference_blas()
    print(
        f"timing {args.num_iters} SGD iterations on {args.num_examples} x "
        f"{args.num_features}, linear and logistic, MLX then PyTorch, "
        f"{1 + args.repeats} runs each (1 warm-up)",
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
    print_table(args, mlx_rate, torch_rate, separate)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # a benchmark writes nothing
        print("interrupted", file=sys.stderr)
        sys.exit(130)
