"""Fit linear regression and logistic regression to synthetic data with SGD.

    python linear_regression/main.py
    python linear_regression/main.py --num-features 10 --num-iters 1000 --seed 1

Each fit says what it runs at once, its progress and the time left every 2 s on stderr, and its
result on stdout. A loss that becomes NaN or infinite (a learning rate too large) stops the run
with one line and exit status 1.
"""

import argparse
import math
import os
import sys
import time

import mlx.core as mx
from model import (
    accuracy,
    logistic_loss,
    make_linear_data,
    make_logistic_data,
    sgd,
    squared_loss,
)


def warn_if_reference_blas():
    """mlx[cpu] on Linux ships netlib's reference BLAS (~30x slower matmul) unless OpenBLAS is preloaded."""
    if not sys.platform.startswith("linux"):
        return
    with open("/proc/self/maps") as f:
        libs = {line.split()[-1] for line in f if "/" in line}
    reference = any("mlx_cpu.libs/libblas" in lib for lib in libs)
    openblas = any(lib.rsplit("/", 1)[-1].startswith("libopenblas") for lib in libs)
    if reference and not openblas:
        print(
            "warning: MLX is using the reference BLAS bundled with mlx[cpu] (slow matmul); "
            "see README.md to preload OpenBLAS",
            file=sys.stderr,
        )


def positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be a positive integer, got {text!r}"
        ) from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def positive_float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be a positive number, got {text!r}"
        ) from None
    if not (math.isfinite(value) and value > 0):  # refuses nan, inf, 0 and negatives
        raise argparse.ArgumentTypeError(
            f"must be a positive finite number, got {text}"
        )
    return value


def seed(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be an integer from 0 to 2**64 - 1, got {text!r}"
        ) from None
    if not 0 <= value < 2**64:  # the range mx.random.seed takes
        raise argparse.ArgumentTypeError(
            f"must be an integer from 0 to 2**64 - 1, got {text}"
        )
    return value


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="Linear and logistic regression on synthetic data, trained with SGD in MLX."
    )
    parser.add_argument(
        "--num-features",
        type=positive_int,
        default=100,
        help="dimension of the weight vector w (default: 100)",
    )
    parser.add_argument(
        "--num-examples",
        type=positive_int,
        default=1000,
        help="number of synthetic examples (rows of X) (default: 1000)",
    )
    parser.add_argument(
        "--num-iters",
        type=positive_int,
        default=10_000,
        help="full-batch SGD iterations (default: 10000)",
    )
    parser.add_argument(
        "--lr",
        type=positive_float,
        default=0.01,
        help="learning rate for linear regression (default: 0.01)",
    )
    parser.add_argument(
        "--logistic-lr",
        type=positive_float,
        default=0.1,
        help="learning rate for logistic regression (default: 0.1)",
    )
    parser.add_argument(
        "--seed", type=seed, default=0, help="random seed, 0 to 2**64 - 1 (default: 0)"
    )
    args = parser.parse_args(argv)
    # X is (num_examples, num_features) float32; refuse what cannot fit rather than crash allocating it.
    needed, memory = (
        4 * args.num_examples * args.num_features,
        os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"),
    )
    if needed > memory // 2:
        parser.error(
            f"--num-examples {args.num_examples} x --num-features {args.num_features} needs "
            f"{needed / 1e9:.1f} GB for X, more than half of this machine's {memory / 1e9:.1f} GB"
        )
    return args


class Progress:
    """report(iteration, loss) for `sgd`: a line on stderr every 2 s with the time left, from the rate so far."""

    def __init__(self, num_iters):
        self.num_iters, self.start = num_iters, time.perf_counter()
        self.last = self.start

    def __call__(self, iteration, loss):
        now = time.perf_counter()
        if now - self.last >= 2 and iteration < self.num_iters:
            left = (now - self.start) / iteration * (self.num_iters - iteration)
            print(
                f"  iteration {iteration}/{self.num_iters}, loss {loss:.5f}, about {left:.0f} s to go",
                file=sys.stderr,
                flush=True,
            )
            self.last = now


def fit(name, loss_fn, X, y, num_iters, lr, lr_flag):
    """(w, seconds) of `sgd`; a diverging fit ends the program with one line."""
    print(
        f"{name}: {num_iters} SGD iterations on {X.shape[0]} x {X.shape[1]}, {lr_flag} {lr}",
        file=sys.stderr,
    )
    tic = time.perf_counter()
    try:
        w = sgd(loss_fn, X, y, num_iters, lr, report=Progress(num_iters))
    except FloatingPointError as e:
        sys.exit(
            f"error: {name} diverged: {e}; {lr_flag} {lr} is too large for this data, try a smaller one"
        )
    return w, time.perf_counter() - tic


def main(argv=None):
    args = parse_args(argv)
    mx.random.seed(args.seed)
    print(f"Device: {mx.default_device()}")
    if mx.default_device() == mx.cpu:
        warn_if_reference_blas()

    X, y, w_star = make_linear_data(args.num_features, args.num_examples)
    w, seconds = fit(
        "Linear regression", squared_loss, X, y, args.num_iters, args.lr, "--lr"
    )
    loss = squared_loss(w, X, y).item()
    error_norm = mx.linalg.norm(w - w_star).item()
    print(
        f"Linear regression:   Loss {loss:.5f}, |w-w*| = {error_norm:.4f}, "
        f"{seconds:.2f} s ({args.num_iters / seconds:.0f} it/s)"
    )

    X, y, w_star = make_logistic_data(args.num_features, args.num_examples)
    w, seconds = fit(
        "Logistic regression",
        logistic_loss,
        X,
        y,
        args.num_iters,
        args.logistic_lr,
        "--logistic-lr",
    )
    loss = logistic_loss(w, X, y).item()
    acc = accuracy(w, X, y).item()
    print(
        f"Logistic regression: Loss {loss:.5f}, Accuracy {acc:.5f}, "
        f"{seconds:.2f} s ({args.num_iters / seconds:.0f} it/s)"
    )


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # nothing is written, so there is nothing to save
        print("interrupted", file=sys.stderr)
        sys.exit(130)
