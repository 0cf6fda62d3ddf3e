"""Fit linear regression and logistic regression to synthetic data with SGD.

    python linear_regression/main.py
    python linear_regression/main.py --num-features 10 --num-iters 1000 --seed 1

A loss that becomes NaN or infinite (a learning rate too large) stops the run with one
line and exit status 1.
"""

import sys

try:  # Ctrl-C while the libraries load ends with one line too
    import argparse
    import os
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
except KeyboardInterrupt:
    print("interrupted", file=sys.stderr)
    sys.exit(130)


def number(kind, low, high=float("inf")):
    """An argparse type: a `kind` (int or float) with low < value < high; not nan."""

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not low < value < high:
            raise argparse.ArgumentTypeError(f"must be above {low}, below {high}")
        return value

    return parse


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="Linear and logistic regression on synthetic data, SGD in MLX.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add = parser.add_argument
    add("--num-features", type=number(int, 0), default=100, help="length of w")
    add("--num-examples", type=number(int, 0), default=1000, help="rows of X")
    add("--num-iters", type=number(int, 0), default=10_000, help="SGD iterations")
    add("--lr", type=number(float, 0), default=0.01, help="step size, linear")
    add("--logistic-lr", type=number(float, 0), default=0.1, help="step size, logistic")
    add("--seed", type=number(int, -1, 2**64), default=0, help="random seed")
    args = parser.parse_args(argv)
    if args.num_examples * args.num_features > 2**28:  # X is float32: 1 GB at most
        parser.error("--num-examples times --num-features must be at most 2**28")
    return args


def fit(name, loss_fn, X, y, num_iters, lr, lr_flag):
    """(w, seconds) of `sgd`; a diverging fit ends the program with one line."""
    tic = time.perf_counter()
    try:
        w = sgd(loss_fn, X, y, num_iters, lr)
    except FloatingPointError as e:
        sys.exit(
            f"error: {name} diverged: {e}; {lr_flag} {lr} is too large for this "
            "data, try a smaller one"
        )
    return w, time.perf_counter() - tic


def main(argv=None):
    args = parse_args(argv)
    mx.random.seed(args.seed)
    print(f"Device: {mx.default_device()}")

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
        sys.stdout.flush()  # a closed or full stdout is found here, not at exit
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except OSError as e:  # stdout closed (`| head -c1`) or full (`> /dev/full`)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(f"error: cannot write the output: {e.strerror}")
