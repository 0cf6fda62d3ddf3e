"""A small random Llama, as in the MLX documentation's walkthrough: no files needed.

    python llama/main.py

Builds the model (12 layers, vocabulary 8192, dims 512, feed-forward 1024, 8 heads),
shows that nothing is computed until it is evaluated, processes a 6-token prompt and
generates 10 tokens, timing each stage. The tokens are meaningless (the weights are
random); the timings are not.
"""

import os
import signal


def stop_at_once(signum, frame):
    os.write(2, b"\ninterrupted\n")
    os._exit(130)


if __name__ == "__main__":
    # Ctrl-C while the imports below run ends the process with one line (as llama.py).
    signal.signal(signal.SIGINT, stop_at_once)

# ruff: noqa: E402 (the imports below come after that guard)
import argparse
import math
import sys
import time

import mlx.core as mx
import mlx.nn as nn
from model import Llama, ModelArgs


def in_range(kind, low, high=math.inf):
    """An argparse type: a finite `kind` (int or float) from `low` to `high` (as
    llama.py's)."""
    bounds = f"at least {low}" + (f" and at most {high}" if high < math.inf else "")

    def parse(text):
        value = kind(text)
        if not low <= value <= high or abs(value) == math.inf:  # NaN fails too
            number = "a whole number" if kind is int else "a finite number"
            raise argparse.ArgumentTypeError(f"must be {number} {bounds}, not {text}")
        return value

    parse.__name__ = kind.__name__  # argparse's "invalid int value: 'x'"
    return parse


def parse_args():
    """The flags, and the ModelArgs they describe."""
    parser = argparse.ArgumentParser(
        description="Run a small random-weight Llama: lazy evaluation and generation.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add = parser.add_argument
    positive = in_range(int, 1, 2**31 - 1)
    add("--n-layers", type=in_range(int, 1, 1024), default=12, help="blocks")
    add("--vocab-size", type=positive, default=8192, help="vocabulary size")
    add("--dim", type=positive, default=512, help="model width")
    add("--hidden-dim", type=positive, default=1024, help="feed-forward width")
    add("--n-heads", type=positive, default=8, help="attention heads")
    add("--max-tokens", type=positive, default=10, help="tokens to generate")
    add("--temp", type=in_range(float, 0), default=0.0, help="0 is greedy")
    add("--seed", type=in_range(int, 0, 2**64 - 1), default=0, help="random seed")
    args = parser.parse_args()
    try:
        model_args = ModelArgs(
            dim=args.dim,
            n_layers=args.n_layers,
            n_heads=args.n_heads,
            vocab_size=args.vocab_size,
            hidden_dim=args.hidden_dim,
        )
    except ValueError as e:  # say, a width that the heads do not divide
        parser.error(str(e))
    return args, model_args


def main():
    signal.signal(signal.SIGINT, signal.default_int_handler)
    args, model_args = parse_args()
    mx.random.seed(args.seed)

    tic = time.perf_counter()
    model = Llama(model_args)
    n_params = sum(p.size for _, p in nn.utils.tree_flatten(model.parameters()))
    print(
        f"Built a {n_params / 1e6:.1f}M-parameter model in "
        f"{1e3 * (time.perf_counter() - tic):.1f} ms; "
        f"memory in use: {mx.get_active_memory() / 2**20:.1f} MiB"
    )
    print(
        "  Nothing is computed yet: the weights are a graph of random-number "
        "operations, not numbers."
    )

    tic = time.perf_counter()
    mx.eval(model.parameters())  # now the random weights are materialized
    print(
        f"mx.eval(model.parameters()) took {1e3 * (time.perf_counter() - tic):.1f} ms; "
        f"memory in use: {mx.get_active_memory() / 2**20:.1f} MiB"
    )

    prompt = mx.array([1, 10, 8, 32, 44, 7])
    tokens, times = [], []
    tic = time.perf_counter()
    for token in model.generate(prompt, temp=args.temp):
        times.append(time.perf_counter() - tic)
        tokens.append(token)
        if len(tokens) == args.max_tokens:
            break
        tic = time.perf_counter()
    print(f"Prompt {prompt.tolist()} -> generated {tokens}")
    print(f"  the prompt pass and the first token: {1e3 * times[0]:.1f} ms")
    if len(times) > 1:
        per_token = sorted(times[1:])[len(times[1:]) // 2]
        print(
            f"  each further token (median): {1e3 * per_token:.1f} ms, "
            f"{1 / per_token:.0f} tokens/s"
        )


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except OSError as e:  # stdout closed (`| head -c1`) or full (`> /dev/full`)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        if isinstance(e, BrokenPipeError):
            sys.exit(1)  # the reader is gone: nobody to tell
        sys.exit(f"error: cannot write the output: {e.strerror}")
