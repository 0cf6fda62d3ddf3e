"""Generate text with a GPT: OpenAI's GPT-2 as convert.py wrote it (with its BPE
tokenizer beside it), or a character model trained by main.py (its checkpoint holds the
characters).

    python gpt2/generate.py weights/gpt2.npz --prompt "Hello, I'm" --max-tokens 50
    python gpt2/generate.py checkpoint.safetensors --prompt "ROMEO:" --max-tokens 500

Loading is here too, for convert.py, which checks its output as this file will read it:
a weights file holds the arrays and, under `config`, the GPTConfig as JSON (save.py).
"""

import signal

try:  # Ctrl-C while Python and MLX load: the default action, a quiet exit
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    import argparse
    import json
    import math
    import os
    import sys
    import zipfile
    from dataclasses import asdict, fields
    from pathlib import Path

    import mlx.core as mx
    import mlx.nn as nn
    import numpy as np
    from model import GPT, GPTConfig
finally:  # from here on Ctrl-C raises KeyboardInterrupt: one line
    signal.signal(signal.SIGINT, signal.default_int_handler)

# ---- Loading: the weights and the config, in one file (written by convert.py or
# main.py) --------


class WeightsError(Exception):
    """A weights file that is missing, unreadable, or does not fit its model."""


def from_json_array(array):
    """The value stored as the uint8 bytes of its JSON (save.json_array), as the config
    beside the weights."""
    return json.loads(bytes(memoryview(array)).decode())


def read_config(array, weights, fix="write the file again with convert.py or main.py"):
    """The GPTConfig stored beside `weights`, checked as a whole before anything is
    built from it: each field of its type and in range, and the sizes those of the
    embeddings and layers stored."""
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
            "its stored config does not describe its weights "
            f"({', '.join(wrong) or asdict(config)}; {layers} layers stored); {fix}"
        )
    return config


def check_weights(model, weights):
    """Raise WeightsError naming every missing or unexpected key and every shape that
    does not fit."""
    expected = dict(nn.utils.tree_flatten(model.parameters()))
    wrong = [
        f"{k} {tuple(weights[k].shape)} (expected {tuple(v.shape)})"
        for k, v in expected.items()
        if k in weights and weights[k].shape != v.shape
    ]
    wrong += [
        f"{k} {str(v.dtype).removeprefix('mlx.core.')} (expected a floating-point "
        "dtype)"
        for k, v in weights.items()
        if not mx.issubdtype(v.dtype, mx.floating)
    ]
    wrong += [
        f"{k} is not finite"
        for k, v in weights.items()
        if mx.issubdtype(v.dtype, mx.floating) and not mx.isfinite(v).all().item()
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

    NumPy reads .npz, not mx.load: MLX 0.32 reads .npz members through Python file
    objects on its own I/O threads, and one of those still waiting for the interpreter
    lock when a script ends aborts the process ("terminate called without an active
    exception"). NumPy has no bfloat16; MLX stores it as 2-byte void ("|V2"), which is
    viewed back as bfloat16 here.
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
    """The GPT stored in `path` by convert.py or main.py, in eval mode, and the
    characters of its vocabulary for main.py's (None for convert.py's: BPE)."""
    path = Path(path)
    if path.is_dir():
        raise WeightsError(
            f"{path} is a folder; give the one file convert.py writes from it "
            f"(python gpt2/convert.py {path} weights/gpt2.npz) or main.py's "
            "checkpoint.safetensors"
        )
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
    chars = None
    if "meta" in weights:  # main.py's checkpoint: the weights under model.
        chars = from_json_array(weights["meta"]).get("chars")
        weights = {
            k.removeprefix("model."): v
            for k, v in weights.items()
            if k.startswith("model.") or k == "config"
        }
    fix = f"write {path} again with convert.py or main.py"
    model = GPT(read_config(weights.pop("config"), weights, fix))
    check_weights(model, weights)
    return model.load_weights(list(weights.items())).eval(), chars


def tokenizer_dir(weights_path):
    """Where convert.py puts the BPE tokenizer: weights/gpt2.npz -> gpt2-tokenizer/."""
    return Path(weights_path).with_name(Path(weights_path).stem + "-tokenizer")


class Characters:
    """main.py's vocabulary: each character one token."""

    def __init__(self, chars):
        self.chars = chars
        self.ids = {c: i for i, c in enumerate(chars)}

    def __len__(self):
        return len(self.chars)

    def encode(self, text):
        unknown = sorted(set(text) - self.ids.keys())
        if unknown:
            sys.exit(f"error: the model was not trained on {''.join(unknown)!r}")
        return [self.ids[c] for c in text]

    def decode(self, ids):
        return "".join(self.chars[i] for i in ids)


def load_tokenizer(weights_path, chars):
    if chars is not None:
        return Characters(chars)
    folder = tokenizer_dir(weights_path)
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder)
    except Exception as e:  # a missing folder, missing or damaged files
        raise WeightsError(
            f"no usable tokenizer in {folder} ({type(e).__name__}); convert.py "
            "saves it there beside the weights"
        ) from None


def bounded(kind, low, high=math.inf):
    """An argparse type: a `kind` (int or float) from `low` to below `high`: never
    NaN or infinite."""

    def parse(value):
        try:
            number = kind(value)
        except ValueError:
            number = math.nan  # refused below: NaN is in no range
        if not low <= number < high:
            expected = "an integer" if kind is int else "a finite number"
            below = f" and below {high}" if high < math.inf else ""
            raise argparse.ArgumentTypeError(
                f"expected {expected} at least {low}{below}, got {value!r}"
            )
        return number

    return parse


def text(value):
    """An argparse type: some text (not empty), all of it valid UTF-8 (a shell's
    $'\\xff' is not)."""
    try:
        value.encode()
    except UnicodeEncodeError:
        raise argparse.ArgumentTypeError(f"{value!r} is not UTF-8 text") from None
    if not value:
        raise argparse.ArgumentTypeError("expected some text, got none")
    return value


def parse_args():
    parser = argparse.ArgumentParser(
        description="Generate text with weights from convert.py or main.py."
    )
    parser.add_argument(
        "weights",
        help="the .npz or .safetensors file from convert.py (the tokenizer in "
        "NAME-tokenizer/ beside it), or main.py's checkpoint.safetensors",
    )
    parser.add_argument(
        "--prompt",
        type=text,
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
        help="sampling temperature (default: 0.8); 0 is greedy, which with models "
        "this small soon repeats itself",
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
    return parser.parse_args()


def main():
    args = parse_args()
    mx.random.seed(args.seed)
    model, chars = load_model(args.weights)
    tokenizer = load_tokenizer(args.weights, chars)
    if len(tokenizer) > model.config.vocab_size:
        raise WeightsError(
            f"the tokenizer has {len(tokenizer)} tokens but the model only "
            f"{model.config.vocab_size}"
        )
    prompt = tokenizer.encode(args.prompt)
    if not prompt or len(prompt) >= model.config.block_size:
        raise WeightsError(
            f"the prompt is {len(prompt)} tokens; give some text, shorter than the "
            f"model's context ({model.config.block_size})"
        )

    print(args.prompt, end="", flush=True)
    generated, printed = [], 0
    for token in model.generate(prompt, args.max_tokens, args.temp, args.top_k):
        generated.append(token)
        so_far = tokenizer.decode(generated)
        if not so_far.endswith("\ufffd"):  # wait for the rest of a split character
            print(so_far[printed:], end="", flush=True)
            printed = len(so_far)
    print(tokenizer.decode(generated)[printed:], flush=True)


if __name__ == "__main__":
    try:
        main()
    except WeightsError as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:  # Ctrl-C while loading or generating
        print("Interrupted", file=sys.stderr)
        sys.exit(130)
    except OSError as e:  # stdout closed (`| head -c1`) or full (`> /dev/full`)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # drop the rest
        if isinstance(e, BrokenPipeError):
            sys.exit(141)  # the reader has gone: quietly, as `yes | head` does
        sys.exit(f"error: cannot write the text: {e.strerror or e}")
