"""Convert OpenAI's GPT-2 from Hugging Face to one MLX weights file, with its tokenizer
beside it.

    python gpt2/convert.py gpt2 weights/gpt2.npz         # or gpt2-medium, ..., gpt2-xl
    python gpt2/convert.py path/to/gpt2 weights/gpt2.npz  # a folder with config.json

Writes weights/gpt2.npz (weights and config, atomically) and weights/gpt2-tokenizer/
(the BPE tokenizer files) for `python gpt2/generate.py weights/gpt2.npz`.
"""

import signal

try:  # Ctrl-C while Python and MLX load: the default action, a quiet exit
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    import argparse
    import json
    import re
    import sys
    import tempfile
    from dataclasses import asdict
    from pathlib import Path

    import mlx.core as mx
    from generate import WeightsError, check_weights, read_config, tokenizer_dir
    from model import GPT, GPTConfig
    from save import json_array, save_arrays
finally:  # from here on Ctrl-C raises KeyboardInterrupt: one line
    signal.signal(signal.SIGINT, signal.default_int_handler)

# Hugging Face's GPT-2 uses Conv1D modules whose weight is stored (in, out), the
# transpose of a Linear layer's (out, in). These are they.
CONV1D = re.compile(r"\.(c_attn|c_proj|c_fc)\.weight$")
# Buffers of older checkpoints (the causal mask), not weights.
DROPPED = re.compile(r"\.attn\.(bias|masked_bias)$")
DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}


class ConversionError(Exception):
    pass


def gpt_config(hf):
    """GPTConfig from a Hugging Face GPT-2 config.json (as a dict)."""
    if hf.get("model_type", "gpt2") != "gpt2":
        raise ConversionError(f"model_type {hf['model_type']!r} is not GPT-2")
    if hf.get("activation_function", "gelu_new") != "gelu_new":
        raise ConversionError(
            f"activation_function {hf['activation_function']!r}: this model uses "
            "GPT-2's gelu_new"
        )
    if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("reorder_and_upcast_attn"):
        raise ConversionError(
            "scale_attn_by_inverse_layer_idx / reorder_and_upcast_attn are not "
            "supported"
        )
    return GPTConfig(
        vocab_size=hf["vocab_size"],
        block_size=hf["n_positions"],
        n_layer=hf["n_layer"],
        n_head=hf["n_head"],
        n_embd=hf["n_embd"],
        dropout=0.0,
        bias=True,
        tie_head=hf.get("tie_word_embeddings", True),
        layer_norm_eps=hf.get("layer_norm_epsilon", 1e-5),
    )


def mlx_name(name):
    """MLX name for a Hugging Face one, or None for a buffer.
    "transformer.h.0.attn.c_attn.weight" -> "h.0.attn.c_attn.weight"."""
    if DROPPED.search(name):
        return None
    return re.sub(r"^transformer\.", "", name)


def is_hub_name(name):
    """A Hugging Face repository id: "name" or "org/name", not a path such as ./x, /x,
    ~/x or a/b/c."""
    return re.fullmatch(
        r"[\w.-]+(/[\w.-]+)?", name
    ) is not None and not name.startswith(".")


def resolve(source):
    """The folder holding the checkpoint: `source` itself if it is a folder with a
    config.json, else the Hub's copy of the repository `source` (offline: the Hugging
    Face cache). A folder without a config.json is not a checkpoint: `gpt2` run from the
    repository root names the Hub's GPT-2, not this example's folder."""
    if (Path(source) / "config.json").is_file():
        return Path(source)
    if not is_hub_name(source):
        kind = (
            "a folder without config.json" if Path(source).is_dir() else "not a folder"
        )
        raise ConversionError(
            f"{source} is {kind}; give a Hugging Face GPT-2 folder or a Hub name "
            "such as gpt2"
        )
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(
                source,
                allow_patterns=[
                    "config.json",
                    "model.safetensors",
                    "vocab.json",
                    "merges.txt",
                    "tokenizer.json",
                    "tokenizer_config.json",
                ],
            )
        )
    except Exception as e:  # offline, unknown name, ...
        first = str(e).splitlines()[0] if str(e) else ""
        raise ConversionError(
            f"cannot get {source!r} from the Hugging Face Hub "
            f"({type(e).__name__}: {first}); "
            "pass a local folder instead"
        ) from None


def convert(source, dtype=None):
    """(GPTConfig, {MLX name: mx.array}, folder) for a Hugging Face GPT-2 name or
    folder."""
    folder = resolve(source)
    try:
        config = gpt_config(json.loads((folder / "config.json").read_text()))
        hf_weights = mx.load(str(folder / "model.safetensors"))
    except (
        OSError,
        ValueError,
        RuntimeError,
        KeyError,
        TypeError,
    ) as e:  # KeyError: a field missing
        raise ConversionError(
            f"cannot read the GPT-2 checkpoint in {folder}: {type(e).__name__}: {e}"
        ) from None
    weights = {}
    for name, value in hf_weights.items():
        new = mlx_name(name)
        if new is None or (
            new == "lm_head.weight" and config.tie_head
        ):  # tied: the same array as wte
            continue
        weights[new] = (
            value.T if CONV1D.search(name) else value
        )  # Conv1D (in, out) -> Linear (out, in)
    try:
        read_config(
            json_array(asdict(config)), weights, fix=f"fix {folder / 'config.json'}"
        )  # as generate.py will read it
        check_weights(GPT(config), weights)
    except WeightsError as e:
        raise ConversionError(str(e)) from None
    if dtype is not None:
        weights = {k: v.astype(DTYPES[dtype]) for k, v in weights.items()}
    return config, weights, folder


def save(config, weights, path):
    """Write the weights and config to `path` (.npz or .safetensors) atomically."""
    save_arrays(path, {**weights, "config": json_array(asdict(config))})


def save_tokenizer(folder, weights_path):
    if not any((folder / name).is_file() for name in ("tokenizer.json", "vocab.json")):
        raise ConversionError(  # transformers would load an empty tokenizer
            f"{folder} has no tokenizer files (tokenizer.json, or vocab.json and "
            "merges.txt); copy them from the Hub's gpt2 into it"
        )
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except Exception as e:
        raise ConversionError(
            f"cannot load the tokenizer in {folder}: {type(e).__name__}: {e}"
        ) from None
    tokenizer.save_pretrained(tokenizer_dir(weights_path))


def check_writable(path):
    """Refuse an output that cannot be written before converting."""
    if path.is_dir():
        raise ConversionError(f"cannot write {path}: it is a folder")
    file = next((p for p in path.parents if p.is_file()), None)
    if file:
        raise ConversionError(f"cannot write {path}: {file} is a file, not a folder")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=path.parent).close()
    except OSError as e:
        raise ConversionError(f"cannot write {path}: {e.strerror or e}") from None


def main():
    parser = argparse.ArgumentParser(
        description="Convert Hugging Face GPT-2 weights to MLX."
    )
    parser.add_argument(
        "source",
        help="Hugging Face name (gpt2, gpt2-medium, ...) or local folder with "
        "config.json, model.safetensors and the tokenizer files",
    )
    parser.add_argument("output", help="the file to write: .npz or .safetensors")
    parser.add_argument(
        "--dtype",
        choices=list(DTYPES),
        help="store weights in this dtype (default: as in the checkpoint)",
    )
    args = parser.parse_args()
    if Path(args.output).suffix not in (".npz", ".safetensors"):
        sys.exit(
            f"error: the output must end in .npz or .safetensors, got {args.output}"
        )
    try:
        check_writable(Path(args.output))  # now, not after the conversion
        config, weights, folder = convert(args.source, args.dtype)
        save_tokenizer(folder, args.output)
        n_params = sum(v.size for v in weights.values())
        print(
            f"Writing {n_params / 1e6:.1f}M parameters from {folder} to {args.output}",
            file=sys.stderr,
            flush=True,
        )
        save(config, weights, args.output)
    except (
        ConversionError,
        ValueError,
        OSError,
        RuntimeError,
    ) as e:  # RuntimeError: MLX could not write the file
        sys.exit(f"error: {e}")
    print(
        f"Wrote {n_params / 1e6:.1f}M parameters ({config.n_layer} layers, n_embd "
        f"{config.n_embd}) to {args.output}, and the tokenizer to "
        f"{tokenizer_dir(args.output)}/",
        file=sys.stderr,
    )


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        print("Interrupted", file=sys.stderr)
        sys.exit(130)
