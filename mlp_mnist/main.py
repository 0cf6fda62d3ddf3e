"""Train an MLP on MNIST with MLX.

    python mlp_mnist/main.py                         # downloads MNIST once to ~/.cache/mlx-examples/mnist
    python mlp_mnist/main.py --data-dir DIR          # a local copy of the four IDX files (gz or not)

Says at once what it trains and, after a few seconds, how long it will take; prints test accuracy
and seconds per epoch after every epoch, then saves the weights (safetensors, with the model
configuration in the metadata) for `convert.py`. Ctrl-C (or SIGTERM) stops at the end of the step
under way and saves the weights of exactly that step; a loss that becomes NaN or infinite stops the
run and saves nothing.
"""

import argparse
import json
import math
import os
import signal
import sys
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import mnist
import numpy as np
from mlx.utils import tree_flatten
from model import MLP, loss_fn, predict
from outputs import OutputError, atomic_write, check_writable


def batch_iterate(batch_size, X, y):
    """Shuffled mini-batches of (X, y); the last one may be smaller."""
    perm = mx.array(np.random.permutation(y.size))
    for start in range(0, y.size, batch_size):
        ids = perm[start : start + batch_size]
        yield X[ids], y[ids]


def evaluate(model, X, y, batch_size=10_000):
    correct = 0
    for start in range(0, y.size, batch_size):
        correct += mx.sum(
            predict(model, X[start : start + batch_size])
            == y[start : start + batch_size]
        ).item()
    return correct / y.size


def save_weights(model, config, path, steps):
    """Write the weights, the config and the number of training steps to `path`, atomically."""
    weights = dict(tree_flatten(model.parameters()))
    metadata = {"config": json.dumps(config), "steps": str(steps)}
    atomic_write(path, lambda tmp: mx.save_safetensors(tmp, weights, metadata=metadata))


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


# ---------------------------------------------------------------- flags, checked where they enter


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
            f"must be an integer from 0 to 2**32 - 1, got {text!r}"
        ) from None
    if not 0 <= value < 2**32:  # the range np.random.seed takes
        raise argparse.ArgumentTypeError(
            f"must be an integer from 0 to 2**32 - 1, got {text}"
        )
    return value


def safetensors_path(text):
    if not text.endswith(".safetensors"):
        raise argparse.ArgumentTypeError(
            f"must end in .safetensors, the format convert.py reads, got {text}"
        )
    return Path(text)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="Train a multi-layer perceptron on MNIST with MLX."
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="folder with the four MNIST IDX files (gz or not); without it MNIST is "
        f"downloaded once to {mnist.default_cache_dir()}",
    )
    parser.add_argument(
        "--mirror",
        action="append",
        default=None,
        metavar="URL",
        help="base URL to download the four .gz files from; repeat for fallbacks "
        f"(default: {' then '.join(mnist.MIRRORS)})",
    )
    parser.add_argument(
        "--num-layers", type=positive_int, default=2, help="hidden layers (default: 2)"
    )
    parser.add_argument(
        "--hidden-dim",
        type=positive_int,
        default=256,
        help="width of each hidden layer (default: 256)",
    )
    parser.add_argument(
        "--batch-size",
        type=positive_int,
        default=128,
        help="mini-batch size (default: 128)",
    )
    parser.add_argument(
        "--epochs",
        type=positive_int,
        default=10,
        help="passes over the training set (default: 10)",
    )
    parser.add_argument(
        "--lr",
        type=positive_float,
        default=1e-3,
        help="Adam learning rate (default: 1e-3)",
    )
    parser.add_argument(
        "--seed",
        type=seed,
        default=0,
        help="random seed for initialisation and shuffling, 0 to 2**32 - 1 (default: 0)",
    )
    parser.add_argument(
        "--save",
        type=safetensors_path,
        default=Path("mlp_mnist.safetensors"),
        help="where to write the trained weights, a .safetensors file (default: mlp_mnist.safetensors)",
    )
    parser.add_argument(
        "--cpu", action="store_true", help="run on the CPU even when a GPU is available"
    )
    return parser.parse_args(argv)


def check_fits(config, path):
    """Refuse, before training, a model too large for memory or for the disk that `path` is on."""
    sizes = (
        [config["input_dim"]]
        + [config["hidden_dim"]] * config["num_layers"]
        + [config["output_dim"]]
    )
    parameters = sum((n_in + 1) * n_out for n_in, n_out in zip(sizes[:-1], sizes[1:]))
    memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if (
        4 * 4 * parameters > memory // 2
    ):  # float32 weights, gradients and Adam's two moments
        sys.exit(
            f"error: an MLP of {config['num_layers']} x {config['hidden_dim']} hidden units has {parameters:.3g} "
            f"parameters, {16 * parameters / 1e9:.1f} GB with Adam's state: more than half of this machine's "
            f"{memory / 1e9:.1f} GB; use a smaller --hidden-dim or --num-layers"
        )
    check_writable(path, size=4 * parameters + 4096)


# ---------------------------------------------------------------- training


class Stop:
    """While installed, Ctrl-C or SIGTERM only sets `signal`, and the loop stops at the next step
    boundary; a second one stops at once (KeyboardInterrupt), saving nothing."""

    def __init__(self):
        self.signal = None

    def __enter__(self):
        self.previous = {
            s: signal.signal(s, self.handler) for s in (signal.SIGINT, signal.SIGTERM)
        }
        return self

    def handler(self, signum, frame):
        if self.signal is not None:
            raise KeyboardInterrupt
        self.signal = signum

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


class Progress:
    """Lines on stderr: the estimated total after the first 2 s, then one every 10 s within a long epoch."""

    def __init__(self, epochs, steps_per_epoch):
        self.total, self.steps_per_epoch, self.done = (
            epochs * steps_per_epoch,
            steps_per_epoch,
            0,
        )
        self.start, self.last, self.estimated = (
            time.perf_counter(),
            time.perf_counter(),
            False,
        )

    def step(self, epoch, step, loss):
        self.done += 1
        now = time.perf_counter()
        left = (now - self.start) / self.done * (self.total - self.done)
        if not self.estimated and now - self.start >= 2:
            self.estimated, self.last = True, now
            say(
                f"about {(now - self.start) / self.done * self.steps_per_epoch:.1f} s per epoch, {left:.0f} s to go"
            )
        elif now - self.last >= 10:
            self.last = now
            say(
                f"  epoch {epoch}, step {step}/{self.steps_per_epoch}, loss {loss:.4f}, about {left:.0f} s to go"
            )


def say(message):
    print(message, file=sys.stderr, flush=True)


def train(model, data, args, stop):
    """Train for args.epochs; returns (steps done, where it stopped early or None). Raises
    FloatingPointError, before any further update is used, when the loss is not finite."""
    train_images, train_labels, test_images, test_labels = data
    optimizer = optim.Adam(learning_rate=args.lr)
    loss_and_grad_fn = nn.value_and_grad(
        model, loss_fn
    )  # differentiates w.r.t. model.trainable_parameters()
    steps_per_epoch = math.ceil(train_labels.size / args.batch_size)
    progress, steps = Progress(args.epochs, steps_per_epoch), 0
    for epoch in range(1, args.epochs + 1):
        tic = time.perf_counter()
        for step, (X, y) in enumerate(
            batch_iterate(args.batch_size, train_images, train_labels), 1
        ):
            loss, grads = loss_and_grad_fn(model, X, y)
            optimizer.update(model, grads)
            # One eval per step: runs the forward, backward and update graph, and keeps it from growing.
            mx.eval(loss, model.parameters(), optimizer.state)
            steps, loss = steps + 1, loss.item()
            if not math.isfinite(loss):
                raise FloatingPointError(
                    f"the loss is {loss} at epoch {epoch}, step {step}"
                )
            progress.step(epoch, step, loss)
            if stop.signal is not None:
                return steps, f"epoch {epoch}, step {step} of {steps_per_epoch}"
        toc = time.perf_counter()
        accuracy = evaluate(model, test_images, test_labels)
        print(
            f"Epoch {epoch}: Test accuracy {accuracy:.4f}, Time {toc - tic:.3f} (s)",
            flush=True,
        )
        if stop.signal is not None:
            return steps, f"the end of epoch {epoch}"
    return steps, None


def all_finite(model):
    return all(
        mx.all(mx.isfinite(v)).item() for _, v in tree_flatten(model.parameters())
    )


def main(argv=None):
    args = parse_args(argv)
    if args.cpu:
        mx.set_default_device(mx.cpu)
    if mx.default_device() == mx.cpu:
        warn_if_reference_blas()
    np.random.seed(args.seed)
    mx.random.seed(args.seed)

    arrays = mnist.load(args.data_dir, args.mirror or mnist.MIRRORS)
    data = [
        mx.array(arrays[k])
        for k in ("train_images", "train_labels", "test_images", "test_labels")
    ]
    train_images, train_labels, _, test_labels = data
    config = dict(
        num_layers=args.num_layers,
        input_dim=train_images.shape[1],
        hidden_dim=args.hidden_dim,
        output_dim=10,
    )
    check_fits(config, args.save)
    model = MLP(**config)
    mx.eval(model.parameters())
    print(
        f"MNIST: {train_labels.size} training and {test_labels.size} test images on {mx.default_device()}"
    )
    with Stop() as stop:
        say(
            f"training an MLP of {args.num_layers} x {args.hidden_dim} hidden units, Adam {args.lr}: {args.epochs} "
            f"epochs of {math.ceil(train_labels.size / args.batch_size)} steps of {args.batch_size} images"
        )
        try:
            steps, stopped_at = train(model, data, args, stop)
        except FloatingPointError as e:
            sys.exit(
                f"error: {e}; nothing was saved. Try a smaller --lr than {args.lr}"
            )
    if not all_finite(model):  # a finite loss, then an update that overflowed
        sys.exit(
            f"error: the weights are not finite after {steps} steps; nothing was saved. Try a smaller --lr"
        )
    save_weights(model, config, args.save, steps)
    if stopped_at is not None:
        name = "interrupted" if stop.signal == signal.SIGINT else "terminated (SIGTERM)"
        say(
            f"{name} at {stopped_at}: saved the weights after that step ({steps} steps) to {args.save}"
        )
        sys.exit(128 + stop.signal)
    print(f"Saved weights to {args.save}")


if __name__ == "__main__":
    try:
        main()
    except (mnist.DataError, OutputError) as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:  # before or after training: nothing is half-written
        print("interrupted", file=sys.stderr)
        sys.exit(130)
