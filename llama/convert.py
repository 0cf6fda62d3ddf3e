"""Convert a Meta or Hugging Face Llama checkpoint to one MLX weights file that carries its configuration.

    python llama/convert.py path/to/llama-2-7b weights.npz                 # Meta: params.json + consolidated.*.pth
    python llama/convert.py path/to/consolidated.00.pth weights.npz        # one Meta .pth, params.json beside it
    python llama/convert.py meta-llama/Llama-2-7b-hf weights.safetensors   # Hugging Face: a Hub name or folder
    python llama/convert.py path/to/Llama3.1-8B-Instruct weights.safetensors   # Meta Llama 3.x: scaled RoPE

The output is .npz or .safetensors (chosen by its extension) and is written atomically. Weights keep
their checkpoint dtype unless --dtype says otherwise.

Meta's checkpoints already use this model's names; several shards (model parallel, e.g. 13B has two)
are concatenated along the axis each weight was split on. Hugging Face's names are mapped below, and
their RoPE layout (rotate halves) is recorded in the configuration, not undone in the weights.
Llama 3.1's scaled RoPE (`use_scaled_rope`, or `rope_scaling` of type `llama3`) and tied embeddings are
recorded there too. Hugging Face Mistral models without a sliding window are Llamas with another config.
"""

import argparse
import json
import math
import os
import re
import sys
import tempfile
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from model import Llama, ModelArgs, WeightsError, check_weights, config_array

# Hugging Face name -> Meta / MLX name.
HF_KEY_MAP = [
    (r"^model\.embed_tokens\.", "tok_embeddings."),
    (r"^model\.norm\.", "norm."),
    (r"^lm_head\.", "output."),
    (r"^model\.layers\.(\d+)\.self_attn\.q_proj\.", r"layers.\1.attention.wq."),
    (r"^model\.layers\.(\d+)\.self_attn\.k_proj\.", r"layers.\1.attention.wk."),
    (r"^model\.layers\.(\d+)\.self_attn\.v_proj\.", r"layers.\1.attention.wv."),
    (r"^model\.layers\.(\d+)\.self_attn\.o_proj\.", r"layers.\1.attention.wo."),
    (r"^model\.layers\.(\d+)\.mlp\.gate_proj\.", r"layers.\1.feed_forward.w1."),
    (r"^model\.layers\.(\d+)\.mlp\.down_proj\.", r"layers.\1.feed_forward.w2."),
    (r"^model\.layers\.(\d+)\.mlp\.up_proj\.", r"layers.\1.feed_forward.w3."),
    (r"^model\.layers\.(\d+)\.input_layernorm\.", r"layers.\1.attention_norm."),
    (r"^model\.layers\.(\d+)\.post_attention_layernorm\.", r"layers.\1.ffn_norm."),
]
# Buffers some checkpoints carry that the model recomputes.
DROPPED = [r"rotary_emb\.inv_freq$", r"^rope\.freqs$"]
TOKENIZER_FILES = ["tokenizer.model", "tokenizer.json", "tokenizer_config.json", "generation_config.json",
                   "chat_template.jinja", "special_tokens_map.json"]
DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}


class ConversionError(Exception):
    pass


def torch_to_mx(tensor):
    """A torch tensor as an mx.array of the same dtype (numpy has no bfloat16, so go through its bits)."""
    import torch

    if tensor.dtype == torch.bfloat16:
        return mx.array(tensor.view(torch.uint16).numpy()).view(mx.bfloat16)
    return mx.array(tensor.numpy())


def load_pth(path):
    import torch

    try:
        # weights_only=True: never unpickle arbitrary objects; mmap: do not read a 13 GB file twice.
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise ConversionError(f"cannot read {path}: {type(e).__name__}: {str(e).splitlines()[0]}") from None


# ---- Meta checkpoints ---------------------------------------------------------------------------


# Llama 3.1's scaled RoPE as Meta's reference code hardcodes it (`apply_scaling`): params.json only says
# use_scaled_rope. Llama 3.2 1B and 3B were published on Hugging Face with factor 32 instead of 8.
META_ROPE_SCALING = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)
LLAMA_3_2_SMALL_DIMS = (2048, 3072)  # Llama 3.2 1B and 3B


def meta_args(params, vocab_size, max_seq_len=None, rope_scaling_factor=None, tied=False):
    """ModelArgs from Meta's params.json. Llama 2 writes vocab_size -1: it comes from the embedding.

    params.json has no context length; by default it is the family's: 4096 for Llama 1 and 2, 8192 for
    Llama 3, 131072 with scaled RoPE (Llama 3.1 and later)."""
    rope_scaling = None
    if params.get("use_scaled_rope"):
        if rope_scaling_factor is None:
            rope_scaling_factor = params.get("rope_scaling_factor") or (
                32.0 if params["dim"] in LLAMA_3_2_SMALL_DIMS else META_ROPE_SCALING["factor"])
        rope_scaling = {**META_ROPE_SCALING, "factor": float(rope_scaling_factor)}
    if max_seq_len is None:
        max_seq_len = 131072 if rope_scaling else 8192 if vocab_size >= 128000 else 4096
    known = ("dim", "n_layers", "n_heads", "n_kv_heads", "multiple_of", "ffn_dim_multiplier", "norm_eps", "rope_theta")
    return ModelArgs(**{k: params[k] for k in known if params.get(k) is not None},
                     vocab_size=vocab_size, rope_traditional=True, rope_scaling=rope_scaling,
                     max_seq_len=params.get("max_seq_len", max_seq_len), tie_word_embeddings=tied)


def merge_shards(shards, expected):
    """One weight from its model-parallel pieces: concatenated on the axis where the pieces are smaller
    than the whole (dim 0 for wq/wk/wv/w1/w3/output, dim 1 for wo/w2 and Llama 2's tok_embeddings),
    or, for the norms that every shard repeats, the first copy."""
    if len(shards) == 1 or shards[0].shape == expected:
        return shards[0]
    for axis in range(len(expected)):
        if shards[0].shape[axis] * len(shards) == expected[axis]:
            return mx.concatenate(shards, axis=axis)
    raise ConversionError(f"cannot merge shards of shape {tuple(shards[0].shape)} into {tuple(expected)}")


def read_meta(path, max_seq_len=None, rope_scaling_factor=None):
    folder = path if path.is_dir() else path.parent
    files = sorted(folder.glob("consolidated.*.pth")) if path.is_dir() else [path]
    if not files:
        raise ConversionError(f"no consolidated.*.pth in {folder}")
    try:
        params = json.loads((folder / "params.json").read_text())
    except (OSError, ValueError) as e:
        raise ConversionError(f"cannot read params.json beside the checkpoint: {e}") from None
    state_dicts = [load_pth(f) for f in files]
    embedding = state_dicts[0]["tok_embeddings.weight"]
    # The vocabulary is the embedding's full first dimension (Llama 2 splits the embedding on dim 1).
    split_on_vocab = embedding.shape[1] == params["dim"]
    vocab_size = embedding.shape[0] * (len(files) if split_on_vocab else 1)
    # No output.weight, or one equal to the embedding: store the matrix once (tied embeddings).
    output = state_dicts[0].get("output.weight")
    tied = output is None or (len(files) == 1 and output.shape == embedding.shape and bool((output == embedding).all()))
    args = meta_args(params, vocab_size, max_seq_len, rope_scaling_factor, tied)
    expected = {k: v.shape for k, v in nn.utils.tree_flatten(Llama(args).parameters())}  # lazy: no memory
    weights = {}
    for name in state_dicts[0]:
        if any(re.search(p, name) for p in DROPPED) or (tied and name == "output.weight"):
            continue
        if name not in expected:
            raise ConversionError(f"unexpected weight {name!r} in {files[0].name}; is it a Llama checkpoint?")
        weights[name] = merge_shards([torch_to_mx(sd[name]) for sd in state_dicts], expected[name])
    return args, weights


# ---- Hugging Face checkpoints -------------------------------------------------------------------


def hf_args(config):
    """ModelArgs from a Hugging Face config.json: Llama (1, 2, 3.x, TinyLlama, ...) or Mistral without a
    sliding window. Anything else is refused with the reason."""
    model_type = config.get("model_type", "llama")
    if model_type not in ("llama", "mistral"):
        raise ConversionError(f"model_type {model_type!r} is not supported: this example runs LlamaForCausalLM "
                              "and MistralForCausalLM checkpoints")
    if model_type == "mistral" and config.get("sliding_window") is not None:
        raise ConversionError(f"sliding_window {config['sliding_window']} (Mistral 7B v0.1) is not supported; "
                              "Mistral 7B v0.2 and v0.3 have none")
    # transformers 5 writes rope_parameters (with rope_theta inside); older configs rope_scaling.
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "llama3":
        names = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        missing = [k for k in names if k not in rope]
        if missing:
            raise ConversionError(f"llama3 RoPE scaling without {', '.join(missing)} in config.json")
        rope_scaling = {k: rope[k] for k in names}
    elif rope_type == "default":
        rope_scaling = None
    else:
        raise ConversionError(f"RoPE scaling {rope_type!r} is not supported by this example "
                              "(supported: none, and 'llama3' as in Llama 3.1)")
    if config.get("attention_bias") or config.get("mlp_bias"):
        raise ConversionError("Llama variants with attention or MLP biases are not supported")
    if config.get("hidden_act", "silu") != "silu":
        raise ConversionError(f"hidden_act {config['hidden_act']!r} is not supported (Llama uses silu)")
    dim, n_heads = config["hidden_size"], config["num_attention_heads"]
    if (config.get("head_dim") or dim // n_heads) != dim // n_heads:
        raise ConversionError(f"head_dim {config['head_dim']} differs from hidden_size / num_attention_heads")
    return ModelArgs(
        dim=dim, n_layers=config["num_hidden_layers"], n_heads=n_heads,
        n_kv_heads=config.get("num_key_value_heads") or n_heads, vocab_size=config["vocab_size"],
        hidden_dim=config["intermediate_size"], norm_eps=config.get("rms_norm_eps", 1e-6),
        rope_theta=config.get("rope_theta", rope.get("rope_theta", 10000.0)),
        rope_traditional=False,  # HF permuted wq/wk for rotate-halves RoPE
        rope_scaling=rope_scaling,
        max_seq_len=config.get("max_position_embeddings", 4096),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
    )


def hf_to_mlx_name(name):
    if any(re.search(p, name) for p in DROPPED):
        return None
    for pattern, replacement in HF_KEY_MAP:
        if re.search(pattern, name):
            return re.sub(pattern, replacement, name)
    raise ConversionError(f"unexpected weight {name!r} in the checkpoint; is it a Llama model?")


def is_hub_name(name):
    """A Hugging Face repository id: "name" or "org/name", not a path such as ./x, /x, ~/x or a/b/c."""
    return re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name) is not None and not name.startswith(".")


def resolve_hf(source):
    if Path(source).is_dir():
        return Path(source)
    if not is_hub_name(source) or source.endswith((".pth", ".json")):
        raise ConversionError(f"{source} does not exist")
    from huggingface_hub import snapshot_download

    try:
        # The weights, and the tokenizer files llama.py reads from the same Hub name.
        # Mistral's repositories also hold the weights in Mistral's own format (consolidated.safetensors).
        return Path(snapshot_download(source, allow_patterns=["config.json", "*.safetensors", "model.safetensors.index.json",
                                                              *TOKENIZER_FILES], ignore_patterns=["consolidated*"]))
    except Exception as e:  # offline, gated, unknown name, ...
        first = str(e).splitlines()[0] if str(e) else ""
        raise ConversionError(f"cannot get {source!r} from the Hugging Face Hub ({type(e).__name__}: {first}); "
                              "pass a local folder instead") from None


def read_hf(folder):
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise ConversionError(f"cannot read config.json in {folder}: {e}") from None
    args = hf_args(config)
    # The files the index names, or every .safetensors but Mistral's own consolidated.safetensors.
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            files = [folder / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
        except (OSError, ValueError, KeyError) as e:
            raise ConversionError(f"cannot read {index}: {e}") from None
    else:
        files = [f for f in sorted(folder.glob("*.safetensors")) if not f.name.startswith("consolidated")]
    if not files:
        raise ConversionError(f"no .safetensors weights in {folder}")
    weights = {}
    for f in files:
        try:
            shard = mx.load(str(f))
        except Exception as e:
            raise ConversionError(f"cannot read {f}: {e}") from None
        for name, value in shard.items():
            mlx_name = hf_to_mlx_name(name)
            if mlx_name is not None:
                weights[mlx_name] = value
    if args.tie_word_embeddings:  # Llama 3.2 1B/3B: the output layer is the embedding; some files repeat it
        weights.pop("output.weight", None)
    return args, weights


# ---- Both ---------------------------------------------------------------------------------------


def convert(source, dtype=None, max_seq_len=None, rope_scaling_factor=None):
    """(ModelArgs, {name: mx.array}) for a Meta or Hugging Face checkpoint, checked against the model."""
    path = Path(source)
    if path.suffix == ".pth" and not path.is_file():
        raise ConversionError(f"{source} does not exist")
    if path.suffix == ".pth" or (path.is_dir() and (path / "params.json").is_file()):
        args, weights = read_meta(path, max_seq_len, rope_scaling_factor)
    else:
        args, weights = read_hf(resolve_hf(source))
    try:
        check_weights(Llama(args), weights)
    except WeightsError as e:
        raise ConversionError(str(e)) from None
    if dtype is not None:
        weights = {k: v.astype(DTYPES[dtype]) for k, v in weights.items()}
    return args, weights


def save(args, weights, path):
    """Write weights plus the configuration to `path` atomically (a temporary file, then a rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=path.suffix)
    os.close(fd)
    try:
        arrays = {**weights, "config": config_array(args)}
        if path.suffix == ".npz":
            mx.savez(tmp, **arrays)
        else:
            mx.save_safetensors(tmp, arrays)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def main():
    parser = argparse.ArgumentParser(description="Convert a Meta or Hugging Face Llama checkpoint to MLX weights.")
    parser.add_argument("checkpoint", help="a Meta folder (params.json + consolidated.*.pth), one Meta .pth with "
                                           "params.json beside it, or a Hugging Face Llama folder or Hub name")
    parser.add_argument("output", help="the file to write: .npz or .safetensors")
    parser.add_argument("--dtype", choices=list(DTYPES), help="store weights in this dtype (default: as in the checkpoint)")
    parser.add_argument("--max-seq-len", type=int,
                        help="context length for Meta checkpoints, whose params.json omits it (default: the family's: "
                             "4096 for Llama 1 and 2, 8192 for Llama 3, 131072 with scaled RoPE; Hugging Face configs "
                             "carry their own)")
    parser.add_argument("--rope-scaling-factor", type=float,
                        help="RoPE scaling factor for Meta checkpoints with use_scaled_rope (default: 32 for Llama 3.2 "
                             "1B and 3B, 8 otherwise, as in the Hugging Face configs Meta published)")
    args = parser.parse_args()
    if Path(args.output).suffix not in (".npz", ".safetensors"):
        sys.exit(f"error: the output must end in .npz or .safetensors, got {args.output}")
    try:
        model_args, weights = convert(args.checkpoint, args.dtype, args.max_seq_len, args.rope_scaling_factor)
        save(model_args, weights, args.output)
    except ConversionError as e:
        sys.exit(f"error: {e}")
    n_params = sum(math.prod(v.shape) for v in weights.values())
    layout = "interleaved (Meta)" if model_args.rope_traditional else "halves (Hugging Face)"
    size = f"{n_params / 1e9:.2f}B" if n_params >= 1e9 else f"{n_params / 1e6:.2f}M"
    scaling = f", scaled x{model_args.rope_scaling['factor']:g}" if model_args.rope_scaling else ""
    tied = ", tied embeddings" if model_args.tie_word_embeddings else ""
    print(f"Wrote {size} parameters ({len(weights)} arrays, {next(iter(weights.values())).dtype}), "
          f"{model_args.n_layers} layers, RoPE {layout}{scaling}{tied}, context {model_args.max_seq_len}, "
          f"to {args.output}")


if __name__ == "__main__":
    main()
