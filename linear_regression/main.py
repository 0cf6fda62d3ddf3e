"""Fit linear regression and logistic regression to synthetic data with SGD.

    python linear_regression/main.py
    python linear_regression/main.py --num-features 10 --num-iters 1000 --seed 1
"""

import argparse
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


def positive_int(text):
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def positive_float(text):
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="Linear and logistic regression on synthetic data, trained with SGD in MLX."
    )
    parser.add_argument("--num-features", type=positive_int, default=100,
                        help="dimension of the weight vector w (default: 100)")
    parser.add_argument("--num-examples", type=positive_int, default=1000,
                        help="number of synthetic examples (rows of X) (default: 1000)")
    parser.add_argument("--num-iters", type=positive_int, default=10_000,
                        help="full-batch SGD iterations (default: 10000)")
    parser.add_argument("--lr", type=positive_float, default=0.01,
                        help="learning rate for linear regression (default: 0.01)")
    parser.add_argument("--logistic-lr", type=positive_float, default=0.1,
                        help="learning rate for logistic regression (default: 0.1)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    mx.random.seed(args.seed)
    print(f"Device: {mx.default_device()}")

    X, y, w_star = make_linear_data(args.num_features, args.num_examples)
    tic = time.perf_counter()
    w = sgd(squared_loss, X, y, args.num_iters, args.lr)
    toc = time.perf_counter()
    loss = squared_loss(w, X, y).item()
    error_norm = mx.linalg.norm(w - w_star).item()
    print(f"Linear regression:   Loss {loss:.5f}, |w-w*| = {error_norm:.4f}, "
          f"{toc - tic:.2f} s ({args.num_iters / (toc - tic):.0f} it/s)")

    X, y, w_star = make_logistic_data(args.num_features, args.num_examples)
    tic = time.perf_counter()
    w = sgd(logistic_loss, X, y, args.num_iters, args.logistic_lr)
    toc = time.perf_counter()
    loss = logistic_loss(w, X, y).item()
    acc = accuracy(w, X, y).item()
    print(f"Logistic regression: Loss {loss:.5f}, Accuracy {acc:.5f}, "
          f"{toc - tic:.2f} s ({args.num_iters / (toc - tic):.0f} it/s)")


if __name__ == "__main__":
    main()
