"""Convert a Meta or Hugging Face Llama checkpoint to one MLX weights file that carries
its configuration.

    # Meta: a folder of params.json and consolidated.*.pth, or one .pth beside it
    python llama/convert.py path/to/llama-2-7b weights.npz
    python llama/convert.py path/to/consolidated.00.pth weights.npz
    # Hugging Face: a Hub name or folder
    python llama/convert.py meta-llama/Llama-2-7b-hf weights.safetensors
    # Meta Llama 3.x: scaled RoPE
    python llama/convert.py path/to/Llama3.1-8B-Instruct weights.safetensors
    # 4-bit, groups of 64; a model mlx-lm already quantized
    python llama/convert.py meta-llama/Llama-2-7b-hf llama-2-7b-4bit.safetensors \
        --quantize
    python llama/convert.py mlx-community/Llama-3.2-1B-Instruct-4bit out.safetensors

The output is .npz or .safetensors (chosen by its extension) and is written atomically.
Weights keep their checkpoint dtype unless --dtype says otherwise.

Meta's checkpoints already use this model's names; several shards (model parallel, e.g.
13B has two) are concatenated along the axis each weight was split on. Hugging Face's
names are mapped below, and their RoPE layout (rotate halves) is recorded in the
configuration, not undone in the weights. Llama 3.1's scaled RoPE (`use_scaled_rope`, or
`rope_scaling` of type `llama3`) and tied embeddings are recorded there too. Hugging
Face Mistral models without a sliding window are Llamas with another config.

--quantize stores the linear layers and the embedding as MLX affine-quantized weights
(quantize.py; --q-bits 4 or 8, --q-group-size 32, 64 or 128) and records {"group_size",
"bits"} in the configuration as "quantization", so llama.py needs no flag. --dtype then
sets the dtype of the scales, biases and norms. Models that mlx-lm quantized
(config.json with "quantization", `.scales`/`.biases` beside each packed `.weight`, as
MLX models on the Hugging Face Hub are) keep their quantized arrays as they are.
"""

import os
import signal


def stop_at_once(signum, frame):
    os.write(2, b"\ninterrupted\n")
    os._exit(130)


if __name__ == "__main__":
    # Ctrl-C while the imports below run ends the process with one line (as llama.py);
    # main() then restores Python's KeyboardInterrupt.
    signal.signal(signal.SIGINT, stop_at_once)

# ruff: noqa: E402 (the imports below come after that guard)
import argparse
import json
import math
import re
import shutil
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from hub import TOKENIZER_FILES, download, is_hub_name
from model import (
    ROPE_SCALING_KEYS,
    Llama,
    ModelArgs,
    WeightsError,
    check_weights,
    write_atomically,
)
from quantize import BITS, GROUP_SIZES, check_quantization, quantize, quantize_weights

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
DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}
QUANTIZATION_KEYS = (
    "group_size",
    "bits",
    "mode",
)  # the rest of mlx-lm's "quantization" is per layer


PROGRESS_BYTES = (
    2**30
)  # conversions of more than this say how far they are while they work


class ConversionError(Exception):
    pass


class Progress:
    """For work on `total` bytes of weights: at the start a line saying what it is, then
    one every few seconds with how far it is and about how long the rest will take (on
    stderr; nothing for small work)."""

    def __init__(self, what, total):
        self.total, self.done, self.tic, self.shown = (
            total,
            0,
            time.perf_counter(),
            time.perf_counter(),
        )
        self.on = total >= PROGRESS_BYTES
        if self.on:
            print(f"{what}: {file_size(total)}", file=sys.stderr, flush=True)

    def add(self, nbytes):
        self.done += nbytes
        now = time.perf_counter()
        if self.on and (now - self.shown >= 5 or self.done >= self.total):
            left = (now - self.tic) * (self.total - self.done) / max(self.done, 1)
            print(
                f"  {100 * self.done / self.total:.0f}% in {now - self.tic:.0f} s, "
                f"about {left:.0f} s left",
                file=sys.stderr,
                flush=True,
            )
            self.shown = now


def torch_to_mx(tensor):
    """A torch tensor as an mx.array of the same dtype (numpy has no bfloat16, so go
    through its bits)."""
    import torch

    if tensor.dtype == torch.bfloat16:
        return mx.array(tensor.view(torch.uint16).numpy()).view(mx.bfloat16)
    return mx.array(tensor.numpy())


def load_pth(path):
    import torch

    try:
        # weights_only=True: never unpickle arbitrary objects; mmap: do not read a 13 GB
        # file twice.
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise ConversionError(
            f"cannot read {path}: {type(e).__name__}: {str(e).splitlines()[0]}"
        ) from None


# ---- Meta checkpoints ----------------------------------------------------------------


# Llama 3.1's scaled RoPE as Meta's reference code hardcodes it (`apply_scaling`):
# params.json only says use_scaled_rope. Llama 3.2 1B and 3B were published on Hugging
# Face with factor 32 instead of 8.
META_ROPE_SCALING = dict(
    factor=8.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    original_max_position_embeddings=8192,
)
LLAMA_3_2_SMALL_DIMS = (2048, 3072)  # Llama 3.2 1B and 3B


def meta_args(
    params, vocab_size, max_seq_len=None, rope_scaling_factor=None, tied=False
):
    """ModelArgs from Meta's params.json. Llama 2 writes vocab_size -1: it comes from
    the embedding.

    params.json has no context length; by default it is the family's: 4096 for Llama 1
    and 2, 8192 for Llama 3, 131072 with scaled RoPE (Llama 3.1 and later)."""
    rope_scaling = None
    if params.get("use_scaled_rope"):
        if rope_scaling_factor is None:
            rope_scaling_factor = params.get("rope_scaling_factor") or (
                32.0
                if params["dim"] in LLAMA_3_2_SMALL_DIMS
                else META_ROPE_SCALING["factor"]
            )
        rope_scaling = {**META_ROPE_SCALING, "factor": float(rope_scaling_factor)}
    if max_seq_len is None:
        max_seq_len = 131072 if rope_scaling else 8192 if vocab_size >= 128000 else 4096
    # Meta's feed-forward width: 2/3 of 4 * dim, times ffn_dim_multiplier, rounded up to
    # a multiple_of.
    hidden_dim = int(2 * (4 * params["dim"]) / 3)
    if params.get("ffn_dim_multiplier") is not None:
        hidden_dim = int(params["ffn_dim_multiplier"] * hidden_dim)
    multiple_of = params.get("multiple_of", 256)
    if type(multiple_of) is not int or multiple_of < 1:
        raise ValueError(
            f"multiple_of must be a whole number from 1, not {multiple_of!r}"
        )
    known = ("dim", "n_layers", "n_heads", "n_kv_heads", "norm_eps", "rope_theta")
    return ModelArgs(
        **{k: params[k] for k in known if params.get(k) is not None},
        hidden_dim=multiple_of * math.ceil(hidden_dim / multiple_of),
        vocab_size=vocab_size,
        rope_traditional=True,
        rope_scaling=rope_scaling,
        max_seq_len=params.get("max_seq_len", max_seq_len),
        tie_word_embeddings=tied,
    )


def merge_shards(shards, expected):
    """One weight from its model-parallel pieces: concatenated on the axis where the
    pieces are smaller than the whole (dim 0 for wq/wk/wv/w1/w3/output, dim 1 for wo/w2
    and Llama 2's tok_embeddings), or, for the norms that every shard repeats, the first
    copy."""
    if len(shards) == 1 or shards[0].shape == expected:
        return shards[0]
    for axis in range(len(expected)):
        if shards[0].shape[axis] * len(shards) == expected[axis]:
            return mx.concatenate(shards, axis=axis)
    raise ConversionError(
        f"cannot merge shards of shape {tuple(shards[0].shape)} into {tuple(expected)}"
    )


def read_meta(path, max_seq_len=None, rope_scaling_factor=None):
    folder = path if path.is_dir() else path.parent
    files = sorted(folder.glob("consolidated.*.pth")) if path.is_dir() else [path]
    if not files:
        raise ConversionError(f"no consolidated.*.pth in {folder}")
    try:
        params = json.loads((folder / "params.json").read_text())
    except (OSError, ValueError) as e:
        raise ConversionError(
            f"cannot read params.json beside the checkpoint: {e}"
        ) from None
    if not isinstance(params, dict):
        params = {}
    missing = [k for k in ("dim", "n_layers", "n_heads") if k not in params]
    if missing:
        raise ConversionError(
            f"{folder / 'params.json'} lacks {', '.join(missing)}; is it a Meta "
            "Llama's params.json?"
        )
    state_dicts = [load_pth(f) for f in files]
    embedding = state_dicts[0]["tok_embeddings.weight"]
    # The vocabulary is the embedding's full first dimension (Llama 2 splits the
    # embedding on dim 1).
    split_on_vocab = embedding.shape[1] == params["dim"]
    vocab_size = embedding.shape[0] * (len(files) if split_on_vocab else 1)
    # No output.weight, or one equal to the embedding: store the matrix once (tied
    # embeddings).
    output = state_dicts[0].get("output.weight")
    tied = output is None or (
        len(files) == 1
        and output.shape == embedding.shape
        and bool((output == embedding).all())
    )
    try:
        args = meta_args(params, vocab_size, max_seq_len, rope_scaling_factor, tied)
    except (TypeError, ValueError) as e:  # a string where a number belongs, say
        raise ConversionError(f"{folder / 'params.json'}: {e}") from None
    parameters = nn.utils.tree_flatten(Llama(args).parameters())  # lazy: no memory
    expected = {k: v.shape for k, v in parameters}
    progress = Progress(
        f"reading {len(files)} file{'s' * (len(files) > 1)} of {folder}",
        sum(t.nbytes for sd in state_dicts for t in sd.values()),
    )
    weights = {}
    for name in state_dicts[0]:
        if any(re.search(p, name) for p in DROPPED) or (
            tied and name == "output.weight"
        ):
            continue
        if name not in expected:
            raise ConversionError(
                f"unexpected weight {name!r} in {files[0].name}; is it a Llama "
                "checkpoint?"
            )
        weights[name] = merge_shards(
            [torch_to_mx(sd[name]) for sd in state_dicts], expected[name]
        )
        # torch_to_mx has copied them out of the files
        progress.add(sum(sd[name].nbytes for sd in state_dicts))
    return args, weights


# ---- Hugging Face checkpoints --------------------------------------------------------


def mlx_lm_quantization(config):
    """{"group_size", "bits"} of a model that mlx-lm quantized (config.json's
    "quantization"), or None.

    Per-layer entries are allowed when they repeat the global setting or are false (a
    layer mlx-lm left in floating point; convert quantizes it). Other formats (GPTQ,
    AWQ, bitsandbytes, ...: a "quantization_config" with a "quant_method") store weights
    differently and are refused."""
    q = config.get("quantization")
    if q is None:
        method = (config.get("quantization_config") or {}).get("quant_method")
        if method is not None:
            raise ConversionError(
                f"{method!r}-quantized checkpoints are not supported; convert the "
                "unquantized model with --quantize, or an MLX (mlx-lm) quantized one"
            )
        return None
    if q.get("mode", "affine") != "affine":
        raise ConversionError(
            f"quantization mode {q['mode']!r} is not supported; only MLX's 'affine' "
            "mode is"
        )
    group_size, bits = q.get("group_size"), q.get("bits")
    for layer, setting in q.items():
        if layer in QUANTIZATION_KEYS or setting is False:
            continue
        if not (
            isinstance(setting, dict)
            and setting.get("bits", bits) == bits
            and setting.get("group_size", group_size) == group_size
        ):
            raise ConversionError(
                f"per-layer quantization ({layer}: {setting}) is not supported; every "
                f"layer must use the model's {bits} bits and group size {group_size}"
            )
    return {"group_size": group_size, "bits": bits}


def hf_rope_scaling(rope):
    """ModelArgs.rope_scaling from a config.json's RoPE settings: None, or Llama 3.1's
    four numbers; other kinds are refused."""
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "default":
        return None
    if rope_type != "llama3":
        raise ConversionError(
            f"RoPE scaling {rope_type!r} is not supported by this example "
            "(supported: none, and 'llama3' as in Llama 3.1)"
        )
    missing = [k for k in ROPE_SCALING_KEYS if k not in rope]
    if missing:
        raise ConversionError(
            f"llama3 RoPE scaling without {', '.join(missing)} in config.json"
        )
    return {k: rope[k] for k in ROPE_SCALING_KEYS}


def hf_args(config):
    """ModelArgs from a Hugging Face config.json: Llama (1, 2, 3.x, TinyLlama, ...) or
    Mistral without a sliding window, possibly quantized by mlx-lm. Anything else is
    refused with the reason."""
    model_type = config.get("model_type", "llama")
    if model_type not in ("llama", "mistral"):
        raise ConversionError(
            f"model_type {model_type!r} is not supported: this example runs "
            "LlamaForCausalLM and MistralForCausalLM checkpoints"
        )
    if model_type == "mistral" and config.get("sliding_window") is not None:
        raise ConversionError(
            f"sliding_window {config['sliding_window']} (Mistral 7B v0.1) is not "
            "supported; Mistral 7B v0.2 and v0.3 have none"
        )
    # transformers 5: rope_parameters (with rope_theta); before: rope_scaling.
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_scaling = hf_rope_scaling(rope)
    if config.get("attention_bias") or config.get("mlp_bias"):
        raise ConversionError(
            "Llama variants with attention or MLP biases are not supported"
        )
    if config.get("hidden_act", "silu") != "silu":
        raise ConversionError(
            f"hidden_act {config['hidden_act']!r} is not supported (Llama uses silu)"
        )
    try:
        dim, n_heads = config["hidden_size"], config["num_attention_heads"]
        args = ModelArgs(
            dim=dim,
            n_layers=config["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=config.get("num_key_value_heads") or n_heads,
            vocab_size=config["vocab_size"],
            hidden_dim=config["intermediate_size"],
            norm_eps=config.get("rms_norm_eps", 1e-6),
            rope_theta=config.get("rope_theta", rope.get("rope_theta", 10000.0)),
            rope_traditional=False,  # HF permuted wq/wk for rotate-halves RoPE
            rope_scaling=rope_scaling,
            max_seq_len=config.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            quantization=mlx_lm_quantization(config),
        )
        if args.quantization is not None:
            args.quantization = check_quantization(
                args.quantization, args.dim, args.hidden_dim
            )
    except KeyError as e:
        raise ConversionError(
            f"config.json has no {e.args[0]!r}; is it a Llama's?"
        ) from None
    # A damaged field, shapes that do not divide, an unsupported quantization:
    except (TypeError, ValueError) as e:
        raise ConversionError(f"config.json: {e}") from None
    if config.get("head_dim") not in (None, args.head_dim):
        raise ConversionError(
            f"head_dim {config['head_dim']} differs from hidden_size / "
            "num_attention_heads"
        )
    return args


def hf_to_mlx_name(name):
    if any(re.search(p, name) for p in DROPPED):
        return None
    for pattern, replacement in HF_KEY_MAP:
        if re.search(pattern, name):
            return re.sub(pattern, replacement, name)
    raise ConversionError(
        f"unexpected weight {name!r} in the checkpoint; is it a Llama model?"
    )


def resolve_hf(source):
    if Path(source).is_dir():
        return Path(source)
    path = Path(source)
    if path.is_file() and path.suffix == ".safetensors":
        raise ConversionError(
            f"{source} is one weights file; give the Hugging Face folder that holds it "
            "with its config.json (or, if convert.py wrote it, use it with llama.py)"
        )
    if path.is_file() and path.suffix == ".gguf":
        raise ConversionError(
            f"{source} is a GGUF file, which convert.py does not read; give the "
            "Hugging Face folder or Meta checkpoint it was made from"
        )
    if path.is_file() and path.name == "params.json":
        raise ConversionError(
            f"{source} is Meta's configuration; give the folder that holds it with "
            f"the consolidated.*.pth files: python llama/convert.py {path.parent} ..."
        )
    if path.is_file():
        raise ConversionError(
            f"{source} is not a checkpoint convert.py reads; give a Hugging Face "
            "folder or Hub name, a Meta folder, or a Meta .pth file"
        )
    if not is_hub_name(source) or source.endswith((".pth", ".json")):
        raise ConversionError(f"{source} does not exist")
    # The weights, and the tokenizer files llama.py reads from the same Hub name.
    # Mistral's repositories also hold the weights in Mistral's own format
    # (consolidated.safetensors).
    return download(
        source,
        [
            "config.json",
            "*.safetensors",
            "model.safetensors.index.json",
            *TOKENIZER_FILES,
        ],
        ConversionError,
        ignore=["consolidated*"],
    )


def read_hf(folder):
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise ConversionError(f"cannot read config.json in {folder}: {e}") from None
    if not isinstance(config, dict):
        raise ConversionError(
            f"{folder / 'config.json'} is not a JSON object; is it a Hugging Face "
            "model's?"
        )
    try:
        args = hf_args(config)
    except (
        AttributeError,
        TypeError,
        ValueError,
    ) as e:  # a field of the wrong kind that hf_args did not expect
        raise ConversionError(
            f"{folder / 'config.json'} is damaged ({type(e).__name__}: {e})"
        ) from None
    # The files the index names, or every .safetensors but Mistral's own
    # consolidated.safetensors.
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            files = [
                folder / name
                for name in sorted(
                    set(json.loads(index.read_text())["weight_map"].values())
                )
            ]
        except (OSError, ValueError, KeyError) as e:
            raise ConversionError(f"cannot read {index}: {e}") from None
    else:
        files = [
            f
            for f in sorted(folder.glob("*.safetensors"))
            if not f.name.startswith("consolidated")
        ]
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
    if (
        args.tie_word_embeddings
    ):  # Llama 3.2 1B/3B: the output layer is the embedding; some files repeat it
        for name in ("output.weight", "output.scales", "output.biases"):
            weights.pop(name, None)
    return args, weights


# ---- Both ----------------------------------------------------------------------------


def convert(
    source, dtype=None, max_seq_len=None, rope_scaling_factor=None, quantization=None
):
    """(ModelArgs, {name: mx.array}) for a Meta or Hugging Face checkpoint, checked
    against the model.

    quantization: {"group_size", "bits"} to quantize the linear layers and the
    embedding (quantize.py), or None to keep the checkpoint's weights, quantized
    (mlx-lm) or not. dtype: of every floating-point array."""
    path = Path(source)
    if path.suffix == ".pth" and not path.is_file():
        raise ConversionError(f"{source} does not exist")
    if path.suffix == ".gguf":  # llama.cpp's file, its kept blocks still quantized
        from gguf_file import read_gguf_checkpoint

        dequantize = dtype is not None or quantization is not None
        args, weights = read_gguf_checkpoint(path, dequantize)
    elif path.suffix == ".pth" or (path.is_dir() and (path / "params.json").is_file()):
        args, weights = read_meta(path, max_seq_len, rope_scaling_factor)
    else:
        args, weights = read_hf(resolve_hf(source))
    if quantization is not None:
        if args.quantization is not None and args.quantization != quantization:
            raise ConversionError(
                f"the checkpoint is already quantized ({args.quantization['bits']} "
                "bits, groups of "
                f"{args.quantization['group_size']}); convert it without --quantize"
            )
        try:
            args = replace(
                args,
                quantization=check_quantization(
                    quantization, args.dim, args.hidden_dim
                ),
            )
        except ValueError as e:
            raise ConversionError(str(e)) from None
    if (
        dtype is not None
    ):  # before quantizing, so that scales and biases get this dtype too
        weights = {
            k: v.astype(DTYPES[dtype]) if mx.issubdtype(v.dtype, mx.floating) else v
            for k, v in weights.items()
        }
    try:
        if args.quantization is not None:
            weights = quantize_weights(model_for(args), weights)
        check_weights(model_for(args), weights)
    except (ValueError, WeightsError) as e:
        raise ConversionError(str(e)) from None
    return args, weights


def model_for(args):
    """The Llama `args` describes, unevaluated (shapes only), its layers quantized if
    args says so."""
    return (
        Llama(args)
        if args.quantization is None
        else quantize(Llama(args), **args.quantization)
    )


def config_array(args: ModelArgs):
    """ModelArgs as a uint8 array of JSON bytes, stored with the weights (`config`)."""
    return mx.array(list(json.dumps(asdict(args)).encode()), dtype=mx.uint8)


def evaluate(weights):
    """Compute the arrays one at a time (read from the checkpoint, cast, quantized),
    saying how far it is."""
    progress = Progress(
        f"converting {len(weights)} arrays", sum(v.nbytes for v in weights.values())
    )
    for value in weights.values():
        mx.eval(value)
        progress.add(value.nbytes)


def save(args, weights, path):
    """Write weights plus the configuration to `path` atomically (.npz or .safetensors
    by its suffix)."""
    arrays = {**weights, "config": config_array(args)}

    def write(tmp):
        if tmp.suffix == ".npz":
            mx.savez(str(tmp), **arrays)
        else:
            mx.save_safetensors(str(tmp), arrays)

    try:
        write_atomically(path, write)
    except (
        OSError,
        RuntimeError,
        ValueError,
    ) as e:  # a full disk, say (MLX raises RuntimeError)
        raise ConversionError(f"cannot write {path}: {e}") from None


def check_output(path, nbytes=0):
    """One line (ConversionError) for an output that cannot be written, before the
    work: a folder, a parent that is a file or cannot be made, no right to write there,
    or (with nbytes) too little free space."""
    path = Path(path)
    if path.is_dir():
        raise ConversionError(
            f"{path} is a folder; give the file to write, e.g. "
            f"{path / 'weights.safetensors'}"
        )
    if path.suffix not in (".npz", ".safetensors"):
        raise ConversionError(
            f"the output must end in .npz or .safetensors, got {path}"
        )
    file = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
    if file is not None:
        raise ConversionError(f"cannot write {path}: {file} is a file, not a folder")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConversionError(
            f"cannot make the folder {path.parent} for {path}: {e.strerror}"
        ) from None
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise ConversionError(f"cannot write into {path.parent}: permission denied")
    free = shutil.disk_usage(path.parent).free
    if nbytes > free:
        raise ConversionError(
            f"{path} needs about {file_size(nbytes)}; {path.parent} has "
            f"{file_size(free)} free"
        )


def file_size(nbytes):
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e8 else f"{nbytes / 1e6:.2f} MB"


def positive(kind):
    """An argparse type: a finite `kind` (int or float) above 0, an int below 2**31."""

    def parse(text):
        value = kind(text)
        if kind is int and not 0 < value < 2**31:
            raise argparse.ArgumentTypeError(f"must be from 1 to 2**31 - 1, not {text}")
        if not 0 < value < math.inf:  # NaN fails too
            raise argparse.ArgumentTypeError(f"must be a positive number, not {text}")
        return value

    parse.__name__ = kind.__name__  # argparse's "invalid int value: 'x'"
    return parse


def parse_args():
    parser = argparse.ArgumentParser(
        description="Convert a Meta, Hugging Face or GGUF Llama checkpoint to MLX "
        "weights, or MLX weights to GGUF."
    )
    parser.add_argument(
        "checkpoint",
        help="a Meta folder (params.json + consolidated.*.pth), one Meta .pth with "
        "params.json beside it, a Hugging Face Llama folder or Hub name, or a .gguf",
    )
    parser.add_argument(
        "output", help="the file to write: .npz, .safetensors or .gguf (gguf_export.py)"
    )
    parser.add_argument(
        "--gguf-type",
        choices=("F16", "Q8_0", "Q4_0"),
        default="F16",
        help="the tensor type of a .gguf output (default: F16)",
    )
    parser.add_argument(
        "--tokenizer",
        help="for a .gguf output: the .gguf or Hugging Face folder with the tokenizer",
    )
    parser.add_argument(
        "--dtype",
        choices=list(DTYPES),
        help="store floating-point weights in this dtype; with --quantize, the scales, "
        "biases and norms (default: as in the checkpoint)",
    )
    parser.add_argument(
        "--quantize",
        action="store_true",
        help="quantize the linear layers and the embedding (MLX affine quantization)",
    )
    quantize = "with --quantize: bits per weight (default: 4)"
    parser.add_argument("--q-bits", type=int, choices=BITS, help=quantize)
    group = "with --quantize: weights per scale and bias (default: 64)"
    parser.add_argument("--q-group-size", type=int, choices=GROUP_SIZES, help=group)
    parser.add_argument(
        "--max-seq-len",
        type=positive(int),
        help="context length of a Meta checkpoint, which params.json omits (default: "
        "4096 for Llama 1 and 2, 8192 for Llama 3, 131072 with scaled RoPE)",
    )
    parser.add_argument(
        "--rope-scaling-factor",
        type=positive(float),
        help="RoPE scaling factor of a Meta checkpoint with use_scaled_rope (default: "
        "32 for Llama 3.2 1B and 3B, 8 otherwise, as Meta's Hugging Face configs)",
    )
    args = parser.parse_args()
    if not args.quantize and (args.q_bits is not None or args.q_group_size is not None):
        parser.error("--q-bits and --q-group-size need --quantize")
    return args


def main():
    signal.signal(signal.SIGINT, signal.default_int_handler)
    args = parse_args()
    quantization = None
    # With --quantize, convert() checks the model's widths against the group size.
    if args.quantize:
        quantization = {
            "group_size": 64 if args.q_group_size is None else args.q_group_size,
            "bits": 4 if args.q_bits is None else args.q_bits,
        }
    signal.signal(
        signal.SIGTERM, stopped
    )  # an exception, so that save removes its temporary file
    try:
        if args.output.endswith(".gguf"):  # a converted model, written for llama.cpp
            from gguf_export import convert_to_gguf

            return print(convert_to_gguf(args))
        check_output(args.output)  # before anything is read or downloaded
        model_args, weights = convert(
            args.checkpoint,
            args.dtype,
            args.max_seq_len,
            args.rope_scaling_factor,
            quantization,
        )
        check_output(args.output, sum(v.nbytes for v in weights.values()))
        evaluate(weights)
        if sum(v.nbytes for v in weights.values()) >= PROGRESS_BYTES:
            print(f"writing {args.output}", file=sys.stderr, flush=True)
        save(model_args, weights, args.output)
    except (ConversionError, WeightsError) as e:  # WeightsError: from gguf_file.py
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    try:
        print(summary(model_args, weights, args.output), flush=True)
    except OSError as e:  # stdout closed (`| head -c1`) or full: the file is written
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        if not isinstance(e, BrokenPipeError):
            sys.exit(f"error: wrote {args.output}, but cannot print: {e.strerror}")


def stopped(number, frame):
    print("stopped by SIGTERM", file=sys.stderr)
    sys.exit(128 + number)


def summary(model_args, weights, output):
    """What was written, for the last line."""
    q = model_args.quantization
    # A packed uint32 word holds 32 / bits weights; scales and biases are not
    # counted as parameters.
    n_params = sum(
        math.prod(v.shape) * (32 // q["bits"] if v.dtype == mx.uint32 else 1)
        for k, v in weights.items()
        if not (q and k.endswith((".scales", ".biases")))
    )
    layout = (
        "interleaved (Meta)" if model_args.rope_traditional else "halves (Hugging Face)"
    )
    size = f"{n_params / 1e9:.2f}B" if n_params >= 1e9 else f"{n_params / 1e6:.2f}M"
    scaling = (
        f", scaled x{model_args.rope_scaling['factor']:g}"
        if model_args.rope_scaling
        else ""
    )
    tied = ", tied embeddings" if model_args.tie_word_embeddings else ""
    quantized = f", {q['bits']}-bit in groups of {q['group_size']}" if q else ""
    return (
        f"Wrote {size} parameters ({len(weights)} arrays, "
        f"{weights['norm.weight'].dtype}{quantized}), "
        f"{model_args.n_layers} layers, RoPE {layout}{scaling}{tied}, context "
        f"{model_args.max_seq_len}, to {output} ({file_size(os.path.getsize(output))})"
    )


if __name__ == "__main__":
    main()
