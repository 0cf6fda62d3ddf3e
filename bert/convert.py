"""Convert a Hugging Face BERT checkpoint, or a sentence-transformers model built on
one, to one .npz of MLX weights.

    python bert/convert.py --bert-model bert-base-uncased --mlx-model weights/bert.npz
    python bert/convert.py --bert-model sentence-transformers/all-MiniLM-L6-v2 \\
        --mlx-model weights/minilm.npz
    python bert/convert.py --bert-model path/to/folder --mlx-model weights/mine.npz

`--bert-model` is a Hub name (downloaded once to the Hugging Face cache) or a local
folder with config.json and model.safetensors (or pytorch_model.bin). The masked-LM head
is kept when the checkpoint has one (BertForMaskedLM, BertForPreTraining); the
next-sentence head is dropped.

A sentence-transformers folder (modules.json: Transformer, Pooling, optionally
Normalize) also gets its pooling stored in the .npz, as the JSON bytes of {"mode":
"mean" | "cls" | "max", "normalize": bool, "max_seq_length": int or null,
"do_lower_case": bool} under the name `pooling`, which embed.py reads.
"""

import sys

try:  # Ctrl-C while the libraries load ends with one line too
    import argparse
    import json
    import os
    import re
    from pathlib import Path

    import numpy as np
    from embed import Pooling, pooling_array, write_atomically
except KeyboardInterrupt:
    print("interrupted", file=sys.stderr)
    sys.exit(130)

# Hugging Face name (after stripping a leading "bert.") -> MLX name, as (regex,
# replacement) pairs.
KEY_MAP = [
    (r"^embeddings\.LayerNorm\.", "embeddings.norm."),
    (
        r"^encoder\.layer\.(\d+)\.attention\.self\.(query|key|value)\.",
        r"encoder.layers.\1.attention.\2.",
    ),
    (
        r"^encoder\.layer\.(\d+)\.attention\.output\.dense\.",
        r"encoder.layers.\1.attention.out_proj.",
    ),
    (
        r"^encoder\.layer\.(\d+)\.attention\.output\.LayerNorm\.",
        r"encoder.layers.\1.attention_norm.",
    ),
    (
        r"^encoder\.layer\.(\d+)\.intermediate\.dense\.",
        r"encoder.layers.\1.feed_forward.up.",
    ),
    (
        r"^encoder\.layer\.(\d+)\.output\.dense\.",
        r"encoder.layers.\1.feed_forward.down.",
    ),
    (r"^encoder\.layer\.(\d+)\.output\.LayerNorm\.", r"encoder.layers.\1.ffn_norm."),
    (r"^pooler\.dense\.", "pooler."),
    (r"^cls\.predictions\.transform\.dense\.", "mlm.dense."),
    (r"^cls\.predictions\.transform\.LayerNorm\.", "mlm.norm."),
    (r"^cls\.predictions\.bias$", "mlm.bias"),
    (
        r"^embeddings\.(word|position|token_type)_embeddings\.weight$",
        r"embeddings.\1_embeddings.weight",
    ),
]
# Present in some checkpoints and not needed: the decoder is tied to the word
# embeddings, the NSP head is not part of this model, position_ids is a buffer.
DROPPED = [
    r"^cls\.predictions\.decoder\.",
    r"^cls\.seq_relationship\.",
    r"position_ids$",
]


class ConversionError(ValueError):
    """A checkpoint that cannot be converted; the message says what is wrong with it."""


def hf_to_mlx_name(name):
    """The MLX parameter name for a Hugging Face one, or None if it is dropped."""
    name = re.sub(r"^bert\.", "", name)
    # Old LayerNorm names.
    name = re.sub(r"\.gamma$", ".weight", re.sub(r"\.beta$", ".bias", name))
    if any(re.search(pattern, name) for pattern in DROPPED):
        return None
    for pattern, replacement in KEY_MAP:
        if re.search(pattern, name):
            return re.sub(pattern, replacement, name)
    raise ConversionError(
        f"unexpected weight {name!r} in the checkpoint; is it a BERT model?"
    )


def looks_like_a_path(name):
    """True unless `name` can only be a Hugging Face repository id ("name" or
    "org/name"): a path exists, starts with . / or ~, has more than one separator, or
    starts with a folder that exists here."""
    if (
        Path(name).exists()
        or re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name) is None
        or name.startswith(".")
    ):
        return True
    return "/" in name and Path(name).parent.is_dir()


def resolve(bert_model):
    """A local folder for `bert_model`: itself if it is a folder, else a Hub download
    (cached)."""
    if Path(bert_model).is_dir():
        return Path(bert_model)
    if looks_like_a_path(bert_model):
        raise ConversionError(
            f"{bert_model} is not a folder; --bert-model takes a folder with "
            "config.json and model.safetensors (or pytorch_model.bin), or a Hub name "
            "such as bert-base-uncased"
        )
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(
                bert_model,
                allow_patterns=[
                    "config.json",
                    "*.safetensors",
                    "model.safetensors.index.json",
                    "pytorch_model.bin",
                    "vocab.txt",
                    "tokenizer*.json",
                    "special_tokens_map.json",  # and sentence-transformers' files:
                    "modules.json",
                    "sentence_bert_config.json",
                    "config_sentence_transformers.json",
                    "*/config.json",
                ],
            )
        )
    except Exception as e:  # offline, unknown name, ...
        raise ConversionError(
            f"cannot get {bert_model!r} from the Hugging Face Hub ({type(e).__name__}: "
            f"{e}); pass a local folder instead"
        ) from None


def read_checkpoint(folder):
    """{Hugging Face name: numpy array} from model.safetensors (single or sharded) or
    pytorch_model.bin."""
    from safetensors.numpy import load_file

    try:
        if (folder / "model.safetensors").is_file():
            return load_file(folder / "model.safetensors")
        if (folder / "model.safetensors.index.json").is_file():
            index = json.loads((folder / "model.safetensors.index.json").read_text())
            weights = {}
            for shard in sorted(set(index["weight_map"].values())):
                weights.update(load_file(folder / shard))
            return weights
        if (folder / "pytorch_model.bin").is_file():
            import torch

            # weights_only=True: never unpickle arbitrary objects from a download.
            state_dict = torch.load(
                folder / "pytorch_model.bin", map_location="cpu", weights_only=True
            )
            return {
                k: v.float().numpy() if v.is_floating_point() else v.numpy()
                for k, v in state_dict.items()
            }
    except Exception as e:
        raise ConversionError(
            f"cannot read the weights in {folder}: {type(e).__name__}: {e}"
        ) from None
    raise ConversionError(f"no model.safetensors or pytorch_model.bin in {folder}")


def read_json(path, kind=dict):
    """The JSON value in `path`, which must be a `kind` (an object by default)."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # missing, not UTF-8, not JSON
        raise ConversionError(f"cannot read {path}: {e}") from None
    if not isinstance(value, kind):
        raise ConversionError(
            f"{path} holds a JSON {type(value).__name__}, not the {kind.__name__} "
            "expected; is it damaged?"
        )
    return value


# The older config.json of sentence-transformers' Pooling: one boolean per mode (mean
# when none is set).
LEGACY_POOLING_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}


def pooling_mode(folder, path):
    """The pooling mode of the Pooling module in folder/path (its config.json), checked
    against the model's size."""
    file = folder / path / "config.json"
    config = read_json(file)
    if "pooling_mode" in config:  # sentence-transformers 6: a mode, or a list of modes
        modes = config["pooling_mode"]
        if not isinstance(modes, list):
            modes = [modes]
    else:
        modes = [
            mode for key, mode in LEGACY_POOLING_KEYS.items() if config.get(key)
        ] or ["mean"]
    dim = config.get("embedding_dimension", config.get("word_embedding_dimension"))
    hidden = read_json(folder / "config.json").get("hidden_size")
    if dim != hidden:
        raise ConversionError(
            f"{file} pools vectors of {dim} dimensions, but the model's hidden_size is "
            f"{hidden}"
        )
    return " + ".join(map(str, modes))  # more than one is refused by Pooling


def read_pooling(folder):
    """The Pooling of a sentence-transformers folder (modules.json), None for a plain
    BERT folder. Pooling checks it as a whole."""
    if not (folder / "modules.json").is_file():
        return None
    modules = read_json(folder / "modules.json", list)
    if not all(isinstance(m, dict) for m in modules):
        raise ConversionError(f"{folder / 'modules.json'} is not a list of modules")
    kinds = [str(m.get("type")).rsplit(".", 1)[-1] for m in modules]
    if kinds not in (
        ["Transformer", "Pooling"],
        ["Transformer", "Pooling", "Normalize"],
    ) or modules[0].get("path"):
        raise ConversionError(
            f"{folder / 'modules.json'} has the modules {', '.join(kinds)} (the "
            f"first in {modules[0].get('path')!r}); embed.py implements Transformer "
            "(in the folder itself), Pooling, and optionally Normalize"
        )
    settings = (
        read_json(folder / "sentence_bert_config.json")
        if (folder / "sentence_bert_config.json").is_file()
        else {}
    )
    st_config = folder / "config_sentence_transformers.json"
    prompt = (
        read_json(st_config).get("default_prompt_name") if st_config.is_file() else None
    )
    if prompt is not None:
        raise ConversionError(
            f"the model prepends the prompt {prompt!r} by default, which embed.py does "
            "not do"
        )
    try:
        return Pooling(
            pooling_mode(folder, modules[1].get("path", "")),
            normalize=kinds[-1] == "Normalize",
            max_seq_length=settings.get("max_seq_length"),
            do_lower_case=settings.get("do_lower_case", False),
        )
    except ValueError as e:
        raise ConversionError(f"{folder}: {e}") from None


def convert(bert_model):
    """({MLX name: float32 numpy array} for the checkpoint `bert_model`, its pooling
    or None)."""
    folder = resolve(bert_model)
    # First: a sentence-transformers model that cannot be used stops here.
    pooling = read_pooling(folder)
    weights = {}
    for name, value in read_checkpoint(folder).items():
        mlx_name = hf_to_mlx_name(name)
        if mlx_name is not None:
            if value.dtype.kind != "f":
                raise ConversionError(
                    f"{name} in {folder} is {value.dtype}, not floating point; is it a "
                    "quantized model?"
                )
            weights[mlx_name] = value.astype(np.float32)
    return weights, pooling


def main():
    parser = argparse.ArgumentParser(
        description="Convert a Hugging Face BERT checkpoint, or a "
        "sentence-transformers model built on one, to MLX weights (.npz)."
    )
    parser.add_argument(
        "--bert-model",
        required=True,
        help="Hugging Face model name (e.g. bert-base-uncased, "
        "sentence-transformers/all-MiniLM-L6-v2) or local folder with config.json and "
        "model.safetensors or pytorch_model.bin",
    )
    parser.add_argument("--mlx-model", required=True, help="the .npz file to write")
    args = parser.parse_args()
    if not args.mlx_model.endswith(".npz"):
        parser.error(f"--mlx-model must end in .npz, got {args.mlx_model}")
    weights, pooling = convert(args.bert_model)
    if pooling is not None:
        weights["pooling"] = pooling_array(pooling)
    write_atomically(args.mlx_model, lambda f: np.savez(f, **weights))
    head = "with" if any(k.startswith("mlm.") for k in weights) else "without"
    kind = ""
    if pooling:
        normalized = " with normalization" if pooling.normalize else ""
        kind = f", and its {pooling.mode} pooling{normalized}"
    arrays = len(weights) - bool(pooling)
    print(
        f"Wrote {arrays} arrays ({head} the masked-LM head){kind} to {args.mlx_model}"
    )


if __name__ == "__main__":
    try:
        main()
        sys.stdout.flush()  # a closed or full stdout is found here, not at exit
    except KeyboardInterrupt:  # the output is written whole or not at all
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except (ValueError, OSError) as e:  # OSError: also stdout closed or full
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit("error: " + " ".join(str(e).split()))  # one line
