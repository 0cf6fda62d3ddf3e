"""Perplexity of a converted Llama (or a GGUF file) on a text file, in sliding windows.

    python llama/perplexity.py weights.safetensors tokenizer.model --data input.txt
    python llama/perplexity.py SmolLM2-135M-Instruct.Q4_1.gguf --data input.txt

The text is tokenized whole (with BOS where the tokenizer adds one) and read in windows
of --window tokens (the model's context by default), each starting --stride tokens after
the one before: every token is predicted once, by the first window that holds it, seeing
up to window - stride tokens before it. Perplexity is exp(mean negative log-likelihood)
over all the tokens predicted, the same sum as transformers' "Perplexity of fixed-length
models" guide. The number goes to stdout, the count and speed to stderr."""

import argparse
import math
import sys
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from model import WeightsError, load_model, warn_if_reference_blas
from tokenizer import TokenizerError, load_tokenizer

from llama import in_range


def negative_log_likelihood(model, tokens, window, stride):
    """(sum of -log p(token | the tokens before it in its window), tokens predicted)."""
    total, count, end = 0.0, 0, 0
    for begin in range(0, len(tokens), stride):
        start, end = max(end, begin + 1), min(begin + window, len(tokens))
        if start >= end:
            break
        logits = model(mx.array(tokens[begin : end - 1])[None])[0]  # (T - 1, vocab)
        targets = mx.array(tokens[begin + 1 : end])
        losses = nn.losses.cross_entropy(logits.astype(mx.float32), targets)
        total += (
            losses[start - begin - 1 :].sum().item()
        )  # only tokens not scored before
        count += end - start
        if end == len(tokens):
            break
    return total, count


def load(weights, tokenizer):
    """(model, tokenizer) from the files on the command line; a .gguf may bring its
    tokenizer, or be the tokenizer."""
    if Path(weights).suffix == ".gguf":
        from gguf_file import load_gguf

        model, _ = load_gguf(weights, dtype=mx.float32)
        tokenizer = tokenizer or weights
    elif tokenizer is None:
        raise TokenizerError(
            "give the tokenizer after the weights (only a .gguf has its own)"
        )
    else:
        model = load_model(weights)
    if Path(tokenizer).suffix == ".gguf":  # the tokenizer in a GGUF file's metadata
        from gguf_file import GGUFTokenizer

        return model, GGUFTokenizer(tokenizer)
    return model, load_tokenizer(tokenizer, model.args.vocab_size)


def read_text(path):
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeError) as e:
        raise ValueError(f"cannot read --data {path} as UTF-8 text: {e}") from None
    if not text.strip():
        raise ValueError(f"--data {path} is empty")
    return text


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("weights", help="a file from convert.py, or a .gguf")
    parser.add_argument(
        "tokenizer", nargs="?", help="as for llama.py (a .gguf: optional)"
    )
    parser.add_argument("--data", required=True, help="a UTF-8 text file")
    parser.add_argument(
        "--window",
        type=in_range(int, 2),
        help="tokens per forward pass (default: the model's context)",
    )
    parser.add_argument(
        "--stride",
        type=in_range(int, 1),
        help="tokens from one window's start to the next (default: half the window)",
    )
    args = parser.parse_args()
    text = read_text(args.data)
    model, tokenizer = load(args.weights, args.tokenizer)
    warn_if_reference_blas()
    window = min(args.window or model.args.max_seq_len, model.args.max_seq_len)
    stride = args.stride or max(window // 2, 1)
    if stride > window:
        parser.error(f"--stride {stride} is longer than the window {window}")
    tokens = tokenizer.prompt(text)
    if len(tokens) < 2:
        raise ValueError(f"--data {args.data} is a single token; give more text")
    tic = time.perf_counter()
    total, count = negative_log_likelihood(model, tokens, window, stride)
    seconds = time.perf_counter() - tic
    print(f"{math.exp(total / count):.4f}")
    print(
        f"[{count} tokens predicted in windows of {window}, stride {stride}: "
        f"{seconds:.1f} s, {len(tokens) / seconds:.1f} tokens/s]",
        file=sys.stderr,
    )


if __name__ == "__main__":
    try:
        main()
    except (WeightsError, TokenizerError, ValueError) as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)
