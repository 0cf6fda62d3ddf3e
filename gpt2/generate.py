"""Generate text with OpenAI's GPT-2: the weights and config that convert.py wrote, loaded into
model.py's GPT and checked, and the BPE tokenizer saved beside them.

    python gpt2/generate.py weights/gpt2.npz --prompt "Hello, my name is" --max-tokens 50

Loading is here too, for convert.py (which checks its output as this file will read it) and for
resume.py: one weights file holds the arrays and, under `config`, the GPTConfig as JSON (save.py).
"""

import argparse
import json
import math
import sys
import zipfile
from dataclasses import asdict, fields
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from model import GPT, GPTConfig, bounded

# ---- Loading: the weights and the config, in one file (written by convert.py or main.py) --------


class WeightsError(Exception):
    """A weights file that is missing, unreadable, or does not fit its model."""


def from_json_array(array):
    """The value stored as the uint8 bytes of its JSON (save.json_array), as the config beside the weights."""
    return json.loads(bytes(memoryview(array)).decode())


def read_config(array, weights, fix="write the file again with convert.py or main.py"):
    """The GPTConfig stored beside `weights`, checked as a whole before anything is built from it:
    each field of its type and in range, and the sizes those of the embeddings and layers stored."""
    try:
        values = from_json_array(array)
        config = GPTConfig(
            **{f.name: values[f.name] for f in fields(GPTConfig) if f.name in values}
        )
    except (ValueError, TypeError) as e:  # not JSON, or not an object
        raise WeightsError(f"its stored config is damaged ({e}); {fix}") from None
    kind = {f.name: type(f.default) for f in fields(GPTConfig)}
    wrong = [
        f"{k} {v!r}"
        for k, v in asdict(config).items()
        if not (type(v) is kind[k] or kind[k] is float and type(v) is int)
        or kind[k] is int
        and v < 1
        or k == "dropout"
        and not 0 <= v < 1
        or k == "layer_norm_eps"
        and not 0 < v < math.inf
    ]
    shapes = {
        "wte.weight": (config.vocab_size, config.n_embd),
        "wpe.weight": (config.block_size, config.n_embd),
    }
    layers = len({k.split(".")[1] for k in weights if k.startswith("h.")})
    if (
        wrong
        or config.n_embd % config.n_head
        or layers != config.n_layer
        or any(
            k not in weights or tuple(weights[k].shape) != shape
            for k, shape in shapes.items()
        )
    ):
        raise WeightsError(
            f"its stored config does not describe its weights ({', '.join(wrong) or asdict(config)}; "
            f"{layers} layers stored); {fix}"
        )
    return config


def check_weights(model, weights):
    """Raise WeightsError naming every missing or unexpected key and every shape that does not fit."""
    expected = dict(nn.utils.tree_flatten(model.parameters()))
    wrong = [
        f"{k} {tuple(weights[k].shape)} (expected {tuple(v.shape)})"
        for k, v in expected.items()
        if k in weights and weights[k].shape != v.shape
    ]
    wrong += [
        f"{k} {str(v.dtype).removeprefix('mlx.core.')} (expected a floating-point dtype)"
        for k, v in weights.items()
        if not mx.issubdtype(v.dtype, mx.floating)
    ]
    problems = [
        f"{label}: {', '.join(items[:6])}{' ...' if len(items) > 6 else ''}"
        for label, items in (
            ("missing", sorted(expected.keys() - weights.keys())),
            ("unexpected", sorted(weights.keys() - expected.keys())),
            ("wrong", wrong),
        )
        if items
    ]
    if problems:
        raise WeightsError("the weights do not fit the model: " + "; ".join(problems))


def read_arrays(path):
    """{name: array} from a .safetensors or .npz file.

    NumPy reads .npz, not mx.load: MLX 0.32 reads .npz members through Python file objects on its
    own I/O threads, and one of those still waiting for the interpreter lock when a script ends
    aborts the process ("terminate called without an active exception"). NumPy has no bfloat16;
    MLX stores it as 2-byte void ("|V2"), which is viewed back as bfloat16 here.
    """
    if path.suffix != ".npz":
        return mx.load(str(path))
    if not zipfile.is_zipfile(path):
        raise ValueError("it is not a .npz (zip) archive")
    with np.load(path, allow_pickle=False) as npz:
        return {
            name: mx.array(a.view(np.uint16)).view(mx.bfloat16)
            if a.dtype == "V2"
            else mx.array(a)
            for name, a in ((name, npz[name]) for name in npz.files)
        }


def load_model(path):
    """The GPT stored in `path` (.npz or .safetensors, by convert.py or main.py), in eval mode."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path} does not exist")
    try:
        weights = read_arrays(path)
    except Exception as e:
        raise WeightsError(f"cannot read {path}: {e}") from None
    if "config" not in weights:
        raise WeightsError(
            f"{path} has no model config; write it with convert.py or main.py"
        )
    model = GPT(
        read_config(
            weights.pop("config"), weights, fix=f"write {path} again with convert.py"
        )
    )
    check_weights(model, weights)
    return model.load_weights(list(weights.items())).eval()


def tokenizer_dir(weights_path):
    """Where convert.py puts the BPE tokenizer: weights/gpt2.npz -> weights/gpt2-tokenizer/."""
    return Path(weights_path).with_name(Path(weights_path).stem + "-tokenizer")


def main():
    parser = argparse.ArgumentParser(
        description="Generate text with GPT-2 weights converted by convert.py."
    )
    parser.add_argument(
        "weights",
        help="the .npz or .safetensors file from convert.py (tokenizer in NAME-tokenizer/ beside it)",
    )
    parser.add_argument(
        "--prompt",
        default="Hello, my name is",
        help="text to continue (default: %(default)r)",
    )
    parser.add_argument(
        "--max-tokens",
        type=bounded(int, 1),
        default=50,
        help="tokens to generate (default: 50)",
    )
    parser.add_argument(
        "--temp",
        type=bounded(float, 0),
        default=0.8,
        help="sampling temperature; 0 is greedy (default: 0.8)",
    )
    parser.add_argument(
        "--top-k",
        type=bounded(int, 1),
        default=200,
        help="sample among the k most likely tokens (default: 200)",
    )
    parser.add_argument(
        "--seed",
        type=bounded(int, 0, 2**63),
        default=0,
        help="random seed for sampling (default: 0)",
    )
    args = parser.parse_args()
    mx.random.seed(args.seed)
    model = load_model(args.weights)
    folder = tokenizer_dir(args.weights)
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except Exception as e:  # a missing folder, missing or damaged files
        sys.exit(
            f"error: no usable tokenizer in {folder} ({type(e).__name__}); convert.py saves it there beside the weights"
        )
    if len(tokenizer) > model.config.vocab_size:
        sys.exit(
            f"error: the tokenizer in {folder} has {len(tokenizer)} tokens but the model only {model.config.vocab_size}"
        )
    prompt = tokenizer.encode(args.prompt)
    if not prompt or len(prompt) >= model.config.block_size:
        sys.exit(
            f"error: the prompt is {len(prompt)} tokens; give some text, shorter than the model's context "
            f"({model.config.block_size})"
        )

    print(args.prompt, end="", flush=True)
    generated, printed = [], 0
    for token in model.generate(prompt, args.max_tokens, args.temp, args.top_k):
        generated.append(token)
        text = tokenizer.decode(generated)
        if not text.endswith(
            "\ufffd"
        ):  # wait for the rest of a character split across tokens
            print(text[printed:], end="", flush=True)
            printed = len(text)
    print(tokenizer.decode(generated)[printed:])


if __name__ == "__main__":
    try:
        main()
    except WeightsError as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:  # Ctrl-C while loading or generating
        sys.exit("\nInterrupted")
