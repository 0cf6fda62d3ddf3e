"""Train an MLP on MNIST with MLX.

    python mlp_mnist/main.py                         # downloads MNIST once to ~/.cache/mlx-examples/mnist
    python mlp_mnist/main.py --data-dir DIR          # a local copy of the four IDX files (gz or not)

Prints test accuracy and seconds per epoch after every epoch, then saves the weights (safetensors,
with the model configuration in the metadata) for `convert.py`.
"""

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten

import mnist
from model import MLP, loss_fn, predict


def batch_iterate(batch_size, X, y):
    """Shuffled mini-batches of (X, y); the last one may be smaller."""
    perm = mx.array(np.random.permutation(y.size))
    for start in range(0, y.size, batch_size):
        ids = perm[start : start + batch_size]
        yield X[ids], y[ids]


def evaluate(model, X, y, batch_size=10_000):
    correct = 0
    for start in range(0, y.size, batch_size):
        correct += mx.sum(predict(model, X[start : start + batch_size]) == y[start : start + batch_size]).item()
    return correct / y.size


def save_weights(model, config, path):
    """Write the weights and config to `path` atomically (a temporary file renamed into place)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".safetensors")
    os.close(fd)
    try:
        weights = dict(tree_flatten(model.parameters()))
        mx.save_safetensors(tmp, weights, metadata={"config": json.dumps(config)})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def warn_if_reference_blas():
    """mlx[cpu] on Linux ships netlib's reference BLAS (~30x slower matmul) unless OpenBLAS is preloaded."""
    if not sys.platform.startswith("linux"):
        return
    with open("/proc/self/maps") as f:
        libs = {line.split()[-1] for line in f if "/" in line}
    reference = any("mlx_cpu.libs/libblas" in lib for lib in libs)
    openblas = any(lib.rsplit("/", 1)[-1].startswith("libopenblas") for lib in libs)
    if reference and not openblas:
        print("warning: MLX is using the reference BLAS bundled with mlx[cpu] (slow matmul); "
              "see README.md to preload OpenBLAS", file=sys.stderr)


def positive_int(text):
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Train a multi-layer perceptron on MNIST with MLX.")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="folder with the four MNIST IDX files (gz or not); without it MNIST is "
                             f"downloaded once to {mnist.default_cache_dir()}")
    parser.add_argument("--mirror", action="append", default=None, metavar="URL",
                        help="base URL to download the four .gz files from; repeat for fallbacks "
                             f"(default: {' then '.join(mnist.MIRRORS)})")
    parser.add_argument("--num-layers", type=positive_int, default=2, help="hidden layers (default: 2)")
    parser.add_argument("--hidden-dim", type=positive_int, default=256, help="width of each hidden layer (default: 256)")
    parser.add_argument("--batch-size", type=positive_int, default=128, help="mini-batch size (default: 128)")
    parser.add_argument("--epochs", type=positive_int, default=10, help="passes over the training set (default: 10)")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default: 1e-3)")
    parser.add_argument("--seed", type=int, default=0, help="random seed for initialisation and shuffling (default: 0)")
    parser.add_argument("--save", type=Path, default=Path("mlp_mnist.safetensors"),
                        help="where to write the trained weights (default: mlp_mnist.safetensors)")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even when a GPU is available")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.cpu:
        mx.set_default_device(mx.cpu)
    warn_if_reference_blas()
    np.random.seed(args.seed)
    mx.random.seed(args.seed)

    try:
        data = mnist.load(args.data_dir, args.mirror or mnist.MIRRORS)
    except mnist.DataError as e:
        sys.exit(f"error: {e}")
    train_images, train_labels, test_images, test_labels = (
        mx.array(data[k]) for k in ("train_images", "train_labels", "test_images", "test_labels")
    )
    print(f"MNIST: {train_labels.size} training and {test_labels.size} test images on {mx.default_device()}")

    config = dict(num_layers=args.num_layers, input_dim=train_images.shape[1],
                  hidden_dim=args.hidden_dim, output_dim=10)
    model = MLP(**config)
    mx.eval(model.parameters())
    optimizer = optim.Adam(learning_rate=args.lr)
    loss_and_grad_fn = nn.value_and_grad(model, loss_fn)  # differentiates w.r.t. model.trainable_parameters()

    for epoch in range(args.epochs):
        tic = time.perf_counter()
        for X, y in batch_iterate(args.batch_size, train_images, train_labels):
            loss, grads = loss_and_grad_fn(model, X, y)
            optimizer.update(model, grads)
            # One eval per step: runs the forward, backward and update graph, and keeps it from growing.
            mx.eval(model.parameters(), optimizer.state)
        toc = time.perf_counter()
        accuracy = evaluate(model, test_images, test_labels)
        print(f"Epoch {epoch + 1}: Test accuracy {accuracy:.4f}, Time {toc - tic:.3f} (s)", flush=True)

    save_weights(model, config, args.save)
    print(f"Saved weights to {args.save}")


if __name__ == "__main__":
    main()
