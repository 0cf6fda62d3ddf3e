"""LoRA adapters beside an unchanged Llama: the layer, its files, and fusing it into the
model.

LoRA (Hu et al., 2021) keeps a linear layer's weight W frozen and learns a low-rank
change: y = W x + scale * B (A x), with A (rank, in), B (out, rank) and scale = alpha /
rank (PEFT's lora_alpha / r). A starts Kaiming-uniform (as PEFT's lora_A), B at zero, so
untrained adapters change nothing. The adapters are float32 whatever the base is
(float16, bfloat16, 4- or 8-bit), as PEFT keeps them; their output is cast to the
base's.

An adapter folder holds adapters.safetensors ("layers.31.attention.wq.lora_a" (rank, in)
and ".lora_b" (out, rank), PEFT's layout; "training.*" the optimizer's state, the
metadata the step and the training settings) and adapter_config.json (rank, alpha,
dropout, layers, keys, the base model).

    from lora_adapters import load_adapters
    load_adapters(model, "adapters")  # model from model.load_model, adapted in place
"""

import json
import math
from dataclasses import asdict, replace
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten
from model import WeightsError, write_atomically

# The linear layers of a block, by the name of the module that holds them.
LINEAR_KEYS = {
    "wq": "attention",
    "wk": "attention",
    "wv": "attention",
    "wo": "attention",
    "w1": "feed_forward",
    "w2": "feed_forward",
    "w3": "feed_forward",
}
ADAPTERS, CONFIG = "adapters.safetensors", "adapter_config.json"
# What a base model must share with the one the adapters were trained on.
BASE_FIELDS = ("dim", "n_layers", "n_heads", "n_kv_heads", "hidden_dim", "vocab_size")


class AdapterError(WeightsError):
    """Adapters that are missing, unreadable, or made for another model."""


class LoRALinear(nn.Module):
    """`linear` (nn.Linear or nn.QuantizedLinear, frozen) plus a trainable low-rank
    change: y = linear(x) + scale * (dropout(x) @ A.T) @ B.T."""

    def __init__(self, linear, rank, alpha, dropout=0.0):
        super().__init__()
        out_dims, in_dims = linear.weight.shape
        if isinstance(linear, nn.QuantizedLinear):
            # each uint32 of the packed weight holds 32 / bits weights
            in_dims = in_dims * 32 // linear.bits
        self.linear = linear
        self.dropout = nn.Dropout(dropout)
        self.scale = alpha / rank
        bound = 1 / math.sqrt(in_dims)  # kaiming_uniform_(a=sqrt(5)), as PEFT's lora_A
        self.lora_a = mx.random.uniform(-bound, bound, (rank, in_dims))  # float32
        self.lora_b = mx.zeros((out_dims, rank))

    def __call__(self, x):
        y = self.linear(x)
        # float32: x is promoted to the adapters' dtype
        z = (self.dropout(x) @ self.lora_a.T) @ self.lora_b.T
        return y + (self.scale * z).astype(y.dtype)

    def fused(self):
        """An nn.Linear holding W + scale * B @ A in W's float dtype (a quantized W
        dequantized first)."""
        weight = dequantized(self.linear)
        merged = weight.astype(mx.float32) + self.scale * (self.lora_b @ self.lora_a)
        return plain_linear(merged.astype(weight.dtype), self.linear.get("bias"))


def dequantized(layer):
    """The float weight of an nn.Linear, nn.Embedding or their quantized versions."""
    if not isinstance(layer, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
        return layer.weight
    return mx.dequantize(
        layer.weight, layer.scales, layer.biases, layer.group_size, layer.bits
    )


def plain_linear(weight, bias=None):
    """An nn.Linear with this (out, in) weight and bias."""
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    linear.weight = weight
    if bias is not None:
        linear.bias = bias
    return linear


def linear_to_lora_layers(model, layers, keys, rank, alpha, dropout=0.0):
    """Freeze `model`, then wrap the linear layers `keys` ("wq", "wv", ...) of the
    blocks `layers` (indices) in LoRALinear, in place: the adapters are all that trains.
    """
    model.freeze()
    for i in layers:
        for key in keys:
            parent = getattr(model.layers[i], LINEAR_KEYS[key])
            setattr(parent, key, LoRALinear(getattr(parent, key), rank, alpha, dropout))
    return model


def fuse(model):
    """`model` with each LoRALinear replaced by its fused nn.Linear and every other
    quantized layer dequantized: a float model, in place."""
    swaps = []
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            swaps.append((name, module.fused()))
        elif isinstance(module, nn.QuantizedLinear) and not name.endswith(".linear"):
            # (not the one inside a LoRALinear)
            swaps.append((name, plain_linear(dequantized(module), module.get("bias"))))
        elif isinstance(module, nn.QuantizedEmbedding):
            embedding = nn.Embedding(module.num_embeddings, module.dims)
            embedding.weight = dequantized(module)
            swaps.append((name, embedding))
    model.update_modules(tree_unflatten(swaps))
    model.args = replace(model.args, quantization=None)
    weights = dict(tree_flatten(model.parameters()))
    if not all(mx.all(mx.isfinite(v)).item() for v in weights.values()):
        dtype = str(model.norm.weight.dtype).removeprefix("mlx.core.")
        raise AdapterError(
            f"the fused weights overflow {dtype} (an alpha or adapters far too "
            "large?); nothing written"
        )
    return weights


# ---- Adapter files ------------------------------------------------------------------


def save_atomically(path, write):
    """model.write_atomically; a failed write (MLX raises RuntimeError for a full disk)
    is an OSError naming `path`, so the script says which file it could not write."""
    try:
        write_atomically(path, write)
    except RuntimeError as e:
        raise OSError(None, str(e), str(path)) from None


def save_adapters(folder, adapters, optimizer_state, step, settings):
    """adapters.safetensors: the adapters, the optimizer's state as training.*, the step
    and the training settings (to check a resumed run against) in the metadata."""
    arrays = dict(tree_flatten(adapters))
    for k, v in tree_flatten(optimizer_state):
        if k != "learning_rate":
            arrays[f"training.{k}"] = v
    metadata = {"step": str(step), "settings": json.dumps(settings)}
    save_atomically(
        folder / ADAPTERS,
        lambda tmp: mx.save_safetensors(str(tmp), arrays, metadata=metadata),
    )


def save_config(folder, config):
    text = json.dumps(config, indent=2) + "\n"
    save_atomically(folder / CONFIG, lambda tmp: tmp.write_text(text))


def config_problem(config):
    """What is wrong with a loaded adapter_config.json, or None."""
    if not isinstance(config, dict):
        return "it is not a JSON object"
    rank, alpha = config.get("rank"), config.get("alpha")
    dropout, layers, keys = (
        config.get("dropout", 0),
        config.get("layers"),
        config.get("keys"),
    )
    if not (isinstance(rank, int) and rank >= 1):
        return f"rank {rank!r} is not a positive integer"
    # alpha / rank scales the adapters: a huge one would overflow the fused weights
    if not (isinstance(alpha, (int, float)) and 0 < alpha <= 1e6):
        return f"alpha {alpha!r} is not a number in (0, 1e6]"
    if not (isinstance(dropout, (int, float)) and 0 <= dropout < 1):
        return f"dropout {dropout!r} is not in [0, 1)"
    if not (
        isinstance(layers, list) and all(isinstance(i, int) and i >= 0 for i in layers)
    ):
        return f"layers {layers!r} is not a list of block indices"
    if not (isinstance(keys, list) and keys and set(keys) <= set(LINEAR_KEYS)):
        return f"keys {keys!r} is not a list of {', '.join(LINEAR_KEYS)}"
    if not isinstance(config.get("base_model", {}), dict):
        return "base_model is not a JSON object"
    return None


def adapter_file(path):
    """adapters.safetensors of an adapter folder, or `path` itself if it names that
    file."""
    path = Path(path)
    file = path if path.suffix == ".safetensors" else path / ADAPTERS
    for needed in (file, file.parent / CONFIG):
        if not needed.is_file():
            raise AdapterError(
                f"{needed} does not exist; train adapters with lora.py --train "
                f"--adapter-path {file.parent} first"
            )
    return file


def read_adapters(path):
    """(configuration, {adapter name: array}, {optimizer state name: array}, metadata)
    from an adapter folder or its adapters.safetensors (with adapter_config.json beside
    it).
    """
    file = adapter_file(path)
    try:
        arrays, metadata = mx.load(str(file), return_metadata=True)
        config = json.loads((file.parent / CONFIG).read_text())
    except (OSError, ValueError, RuntimeError) as e:
        raise AdapterError(f"cannot read the adapters in {file.parent}: {e}") from None
    problem = config_problem(config)
    if problem:
        raise AdapterError(
            f"{file.parent / CONFIG}: {problem}; it should be the {CONFIG} that "
            "lora.py --train wrote"
        )
    training, adapters = {}, {}
    for k, v in arrays.items():
        if k.startswith("training."):
            training[k.removeprefix("training.")] = v
        else:
            adapters[k] = v
    return config, adapters, training, metadata


def check_base(model, config, where):
    """AdapterError if the adapters were trained on a model of another shape or
    vocabulary."""
    base, args = config.get("base_model", {}), asdict(model.args)
    differ = [
        f"{k} {base[k]} (this model: {args[k]})"
        for k in BASE_FIELDS
        if k in base and base[k] != args[k]
    ]
    if differ:
        raise AdapterError(
            f"{where}: the adapters were trained on a model with {', '.join(differ)}; "
            "use them with that model"
        )


def apply_adapters(model, config, adapters, where):
    """Wrap `model`'s layers as `config` says and load `adapters` into them;
    AdapterError naming what does not fit."""
    check_base(model, config, where)
    n = model.args.n_layers
    if max(config["layers"], default=-1) >= n:
        raise AdapterError(
            f"{where}: the adapters are for block {max(config['layers'])}, this model "
            f"has {n} blocks; they were made for another model"
        )
    rank, alpha, dropout = config["rank"], config["alpha"], config.get("dropout", 0)
    linear_to_lora_layers(model, config["layers"], config["keys"], rank, alpha, dropout)
    expected = dict(tree_flatten(model.trainable_parameters()))
    problems = [f"missing {k}" for k in sorted(set(expected) - set(adapters))]
    problems += [f"unexpected {k}" for k in sorted(set(adapters) - set(expected))]
    for k, v in adapters.items():
        if k in expected and v.shape != expected[k].shape:
            problems.append(f"{k} is {v.shape}, this model needs {expected[k].shape}")
        if not mx.issubdtype(v.dtype, mx.floating):
            problems.append(f"{k} is {v.dtype}, not floating point")
    if problems:
        more = f" and {len(problems) - 4} more" if len(problems) > 4 else ""
        raise AdapterError(
            f"{where}: the adapters do not fit this model, made for another one? "
            f"{', '.join(problems[:4])}{more}"
        )
    if not all(mx.all(mx.isfinite(v)).item() for v in adapters.values()):
        raise AdapterError(f"{where}: the adapters hold non-finite values")
    model.update(tree_unflatten(list(adapters.items())))
    return model


def load_adapters(model, path):
    """Apply the adapters in `path` (a folder that lora.py --train wrote, or its
    adapters.safetensors) to `model`, in place, for generation; returns what llama.py's
    load line adds."""
    config, adapters, _, _ = read_adapters(path)
    apply_adapters(model, config, adapters, path)
    model.eval()  # no dropout
    mx.eval(model.parameters())
    keys, blocks = "/".join(config["keys"]), len(config["layers"])
    return f", LoRA adapters of rank {config['rank']} on {keys} of {blocks} blocks"


def save_fused(model, adapter_path, save_path, tokenizer=None):
    """--fuse: write `model` with the adapters of `adapter_path` merged, as convert.py
    writes a model (its configuration inside as `config`, JSON bytes), so llama.py runs
    it as it is; or, to a .gguf, for llama.cpp (float16, `tokenizer` inside)."""
    load_adapters(model, adapter_path)
    weights = fuse(model)
    if save_path.suffix == ".gguf":
        from gguf_export import write_gguf

        save_path.parent.mkdir(parents=True, exist_ok=True)
        return write_gguf(save_path, model, tokenizer, "F16")
    config = json.dumps(asdict(model.args)).encode()
    weights["config"] = mx.array(list(config), mx.uint8)
    save_path.parent.mkdir(parents=True, exist_ok=True)
    # The one place the fused model is written: a branch per format, by the suffix
    if save_path.suffix == ".npz":
        save_atomically(save_path, lambda tmp: mx.savez(str(tmp), **weights))
    else:
        save_atomically(save_path, lambda tmp: mx.save_safetensors(str(tmp), weights))
