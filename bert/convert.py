"""Convert a Hugging Face BERT checkpoint to one .npz of MLX weights.

    python bert/convert.py --bert-model bert-base-uncased --mlx-model weights/bert-base-uncased.npz
    python bert/convert.py --bert-model path/to/local/folder --mlx-model weights/mine.npz

`--bert-model` is a Hub name (downloaded once to the Hugging Face cache) or a local folder with
config.json and model.safetensors (or pytorch_model.bin). The masked-LM head is kept when the
checkpoint has one (BertForMaskedLM, BertForPreTraining); the next-sentence head is dropped.
"""

import argparse
import json
import os
import re
import sys
import tempfile
from pathlib import Path

import numpy as np

# Hugging Face name (after stripping a leading "bert.") -> MLX name, as (regex, replacement) pairs.
KEY_MAP = [
    (r"^embeddings\.LayerNorm\.", "embeddings.norm."),
    (r"^encoder\.layer\.(\d+)\.attention\.self\.(query|key|value)\.", r"encoder.layers.\1.attention.\2."),
    (r"^encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"encoder.layers.\1.attention.out_proj."),
    (r"^encoder\.layer\.(\d+)\.attention\.output\.LayerNorm\.", r"encoder.layers.\1.attention_norm."),
    (r"^encoder\.layer\.(\d+)\.intermediate\.dense\.", r"encoder.layers.\1.feed_forward.up."),
    (r"^encoder\.layer\.(\d+)\.output\.dense\.", r"encoder.layers.\1.feed_forward.down."),
    (r"^encoder\.layer\.(\d+)\.output\.LayerNorm\.", r"encoder.layers.\1.ffn_norm."),
    (r"^pooler\.dense\.", "pooler."),
    (r"^cls\.predictions\.transform\.dense\.", "mlm.dense."),
    (r"^cls\.predictions\.transform\.LayerNorm\.", "mlm.norm."),
    (r"^cls\.predictions\.bias$", "mlm.bias"),
    (r"^embeddings\.(word|position|token_type)_embeddings\.weight$", r"embeddings.\1_embeddings.weight"),
]
# Present in some checkpoints and not needed: the decoder is tied to the word embeddings, the NSP
# head is not part of this model, position_ids is a buffer.
DROPPED = [r"^cls\.predictions\.decoder\.", r"^cls\.seq_relationship\.", r"position_ids$"]


class ConversionError(Exception):
    pass


def hf_to_mlx_name(name):
    """The MLX parameter name for a Hugging Face one, or None if it is dropped."""
    name = re.sub(r"^bert\.", "", name)
    name = re.sub(r"\.gamma$", ".weight", re.sub(r"\.beta$", ".bias", name))  # old LayerNorm names
    if any(re.search(pattern, name) for pattern in DROPPED):
        return None
    for pattern, replacement in KEY_MAP:
        if re.search(pattern, name):
            return re.sub(pattern, replacement, name)
    raise ConversionError(f"unexpected weight {name!r} in the checkpoint; is it a BERT model?")


def looks_like_a_path(name):
    """True unless `name` can only be a Hugging Face repository id ("name" or "org/name"): a path
    exists, starts with . / or ~, has more than one separator, or starts with a folder that exists here."""
    if Path(name).exists() or re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name) is None or name.startswith("."):
        return True
    return "/" in name and Path(name).parent.is_dir()


def resolve(bert_model):
    """A local folder for `bert_model`: itself if it is a folder, else a Hub download (cached)."""
    if Path(bert_model).is_dir():
        return Path(bert_model)
    if looks_like_a_path(bert_model):
        raise ConversionError(f"{bert_model} is not a folder; --bert-model takes a folder with config.json and "
                              "model.safetensors (or pytorch_model.bin), or a Hub name such as bert-base-uncased")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(bert_model, allow_patterns=[
            "config.json", "*.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
            "vocab.txt", "tokenizer*.json", "special_tokens_map.json"]))
    except Exception as e:  # offline, unknown name, ...
        raise ConversionError(f"cannot get {bert_model!r} from the Hugging Face Hub ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}); pass a local folder instead") from None


def read_checkpoint(folder):
    """{Hugging Face name: numpy array} from model.safetensors (single or sharded) or pytorch_model.bin."""
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

            # weights_only=True: never unpickle arbitrary objects from a downloaded file.
            state_dict = torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
            return {k: v.float().numpy() if v.is_floating_point() else v.numpy() for k, v in state_dict.items()}
    except Exception as e:
        raise ConversionError(f"cannot read the weights in {folder}: {type(e).__name__}: {e}") from None
    raise ConversionError(f"no model.safetensors or pytorch_model.bin in {folder}")


def convert(bert_model):
    """{MLX name: float32 numpy array} for the checkpoint `bert_model`."""
    folder = resolve(bert_model)
    weights = {}
    for name, value in read_checkpoint(folder).items():
        mlx_name = hf_to_mlx_name(name)
        if mlx_name is not None:
            weights[mlx_name] = value.astype(np.float32)
    return weights


def save_npz(weights, path):
    """Write `weights` to `path` atomically: a temporary file in the same folder, renamed when complete."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npz")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **weights)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def main():
    parser = argparse.ArgumentParser(description="Convert a Hugging Face BERT checkpoint to MLX weights (.npz).")
    parser.add_argument("--bert-model", required=True,
                        help="Hugging Face model name (e.g. bert-base-uncased) or local folder with config.json "
                             "and model.safetensors or pytorch_model.bin")
    parser.add_argument("--mlx-model", required=True, help="the .npz file to write")
    args = parser.parse_args()
    if not args.mlx_model.endswith(".npz"):
        sys.exit(f"error: --mlx-model must end in .npz, got {args.mlx_model}")
    try:
        weights = convert(args.bert_model)
        save_npz(weights, args.mlx_model)
    except ConversionError as e:
        sys.exit(f"error: {e}")
    head = "with" if any(k.startswith("mlm.") for k in weights) else "without"
    print(f"Wrote {len(weights)} arrays ({head} the masked-LM head) to {args.mlx_model}")


if __name__ == "__main__":
    main()
