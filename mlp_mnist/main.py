"""Train an MLP on MNIST with MLX.

    python mlp_mnist/main.py                 # downloads MNIST to ~/.cache/mlx-examples
    python mlp_mnist/main.py --data-dir DIR  # your copy of the four IDX files

Prints the test accuracy and the seconds of every epoch, then saves the weights
(safetensors, the model configuration in the metadata) for `convert.py`. A loss that
diverges (NaN, or above the untrained model's) stops the run and saves nothing.
"""

import sys

try:  # Ctrl-C while the libraries load ends with one line too
    import argparse
    import json
    import os
    import time
    from pathlib import Path

    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim
    import mnist
    import numpy as np
    from mlx.utils import tree_flatten
    from model import MLP, loss_fn
except KeyboardInterrupt:
    print("interrupted", file=sys.stderr)
    sys.exit(130)


def write_atomically(path, write):
    """write(binary file) fills a temporary file, renamed to `path` when whole: a
    reader finds the old file or the new one, never half of one. Also for convert.py."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def whole_number(low, high):
    def parse(text):
        if not text.isdigit() or not low <= int(text) <= high:
            raise argparse.ArgumentTypeError(f"must be from {low} to {high}")
        return int(text)

    return parse


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="Train a multi-layer perceptron on MNIST with MLX.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add = parser.add_argument
    add("--data-dir", type=Path, help="the four IDX files, else downloaded")
    add("--num-layers", type=whole_number(1, 16), default=2, help="hidden layers")
    add("--hidden-dim", type=whole_number(1, 4096), default=256, help="their width")
    add("--batch-size", type=whole_number(1, 2**20), default=128, help="images")
    add("--epochs", type=whole_number(1, 10**6), default=10, help="passes")
    add("--lr", type=float, default=1e-3, help="Adam's learning rate")
    add("--seed", type=whole_number(0, 2**32 - 1), default=0, help="random seed")
    add("--save", type=Path, default="mlp_mnist.safetensors", help="the weights")
    device = "gpu" if mx.is_available(mx.gpu) else "cpu"
    add("--device", choices=["cpu", "gpu"], default=device, help="where to train")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    mx.set_default_device(getattr(mx, args.device))
    np.random.seed(args.seed)
    mx.random.seed(args.seed)

    data = map(mx.array, mnist.load(args.data_dir))
    train_images, train_labels, test_images, test_labels = data
    dims = dict(input_dim=train_images.shape[1], output_dim=10)
    config = dict(num_layers=args.num_layers, hidden_dim=args.hidden_dim, **dims)
    model = MLP(**config)
    optimizer = optim.Adam(learning_rate=args.lr)
    loss_and_grad_fn = nn.value_and_grad(model, loss_fn)
    initial_loss = loss_fn(model, train_images, train_labels).item()

    # The compiled step reads and updates the model's and the optimizer's arrays: they
    # are its implicit inputs and outputs. It is traced once, then reused.
    state = [model.state, optimizer.state]

    def step(X, y):
        loss, grads = loss_and_grad_fn(model, X, y)
        optimizer.update(model, grads)
        return loss

    step = mx.compile(step, inputs=state, outputs=state)

    for epoch in range(1, args.epochs + 1):
        tic = time.perf_counter()
        losses = []
        perm = mx.array(np.random.permutation(train_labels.size))
        for start in range(0, train_labels.size, args.batch_size):
            ids = perm[start : start + args.batch_size]  # the last batch may be smaller
            losses.append(step(train_images[ids], train_labels[ids]))
            mx.eval(state)  # runs the step's graph, and keeps it from growing
        loss = mx.mean(mx.stack(losses)).item()
        if not loss <= initial_loss:  # NaN fails the comparison too
            sys.exit(
                f"error: training diverged: the mean loss of epoch {epoch} is "
                f"{loss:.4g}, the untrained model's {initial_loss:.4g}; nothing was "
                f"saved. Try a smaller --lr than {args.lr}"
            )
        toc = time.perf_counter()
        accuracy = mx.mean(mx.argmax(model(test_images), axis=1) == test_labels).item()
        print(f"Epoch {epoch}: Test accuracy {accuracy:.4f}, Time {toc - tic:.3f} (s)")

    weights = dict(tree_flatten(model.parameters()))
    metadata = {"config": json.dumps(config)}
    write_atomically(args.save, lambda f: mx.save_safetensors(f, weights, metadata))
    print(f"Saved weights to {args.save}")


if __name__ == "__main__":
    try:
        main()
        sys.stdout.flush()  # a closed or full stdout is found here, not at exit
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except ValueError as e:  # data that cannot be read, --device gpu without one
        sys.exit(f"error: {e}")
    except (
        OSError
    ) as e:  # --save, or stdout closed (`| head -c1`) or full (`> /dev/full`)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(f"error: {e}")
