"""GGUF files (llama.cpp, Ollama, LM Studio), run as they are (gguf_export.py writes).

    python llama/llama.py SmolLM2-135M-Instruct.Q4_1.gguf "The capital of France is"
    python llama/convert.py SmolLM2-135M-Instruct.Q4_1.gguf smol.safetensors

Reading. A GGUF file holds the hyperparameters (`llama.*`), the tokenizer and chat
template (`tokenizer.*`) and the tensors. Q4_0, Q4_1 and Q8_0 blocks are 32 weights and
one float16 scale d (Q4_1 also a minimum m): w = d * (q - 8), d * q + m and d * q. Each
is MLX's affine quantization in groups of 32, w = scale * q + bias, with the same q and
scale = d, bias = -8d, m or -128d (q + 128 for Q8_0's signed q), so these layers stay
quantized with their exact values; mx.load does that repacking. Tensors of other types
(K-quants, Q5_0, ...) are dequantized by llama.cpp's own `gguf` package and kept as
float layers.

llama.cpp stores wq and wk with Meta's row order (its converter permutes Hugging Face's
rows back), for RoPE on interleaved pairs: the model runs it with rope_traditional=True,
as llama.cpp does, and no row is moved. The tokenizer is the one transformers builds
from the same metadata."""

import re
from collections import Counter
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from hf_tokenizer import HFTokenizer
from model import Llama, ModelArgs, WeightsError, check_weights
from quantize import route_around_cpu_quantized_matmul
from tokenizer import TokenizerError

# GGUF's names -> Meta's (model.py): "blk.3.attn_q.weight" ->
# "layers.3.attention.wq.weight".
NAMES = {
    "token_embd": "tok_embeddings",
    "output_norm": "norm",
    "output": "output",
    "attn_norm": "attention_norm",
    "attn_q": "attention.wq",
    "attn_k": "attention.wk",
    "attn_v": "attention.wv",
    "attn_output": "attention.wo",
    "ffn_norm": "ffn_norm",
    "ffn_gate": "feed_forward.w1",
    "ffn_down": "feed_forward.w2",
    "ffn_up": "feed_forward.w3",
}
KEPT = {"Q4_0": 4, "Q4_1": 4, "Q8_0": 8}  # block types that are MLX affine groups of 32
GROUP_SIZE = 32


def mlx_name(name):
    """A GGUF tensor name as model.py's parameter name; None for one it has not."""
    match = re.fullmatch(r"(?:blk\.(\d+)\.)?(\w+)\.(weight|scales|biases)", name)
    if not match or match[2] not in NAMES:
        return None
    layer, module, kind = match.groups()
    prefix = f"layers.{layer}." if layer is not None else ""
    return f"{prefix}{NAMES[module]}.{kind}"


# ---- Tensors ------------------------------------------------------------


def read_tensors(path):
    """({GGUF name: array}, metadata, what was done) from `path`. mx.load reads F32, F16
    and the three kept block types; a file with any other type is read with llama.cpp's
    gguf package."""
    try:
        tensors, metadata = mx.load(str(path), return_metadata=True, stream=mx.cpu)
    except RuntimeError as e:
        if "gguf_tensor_to" not in str(e):  # truncated, not a GGUF, ...: mx.load says
            raise WeightsError(f"cannot read {path}: {e}") from None
        return read_with_gguf_package(path)
    # mx.load leaves out a tensor of a type id it does not know: count them.
    with open(path, "rb") as f:
        count = int.from_bytes(f.read(16)[8:], "little")  # after "GGUF" and the version
    names = {name.rsplit(".", 1)[0] for name in tensors}
    if len(names) != count:
        return read_with_gguf_package(path)
    return tensors, metadata, kept_note(tensors)


def kept_note(tensors):
    """'211 tensors kept quantized (4-bit and 8-bit, groups of 32)'."""
    bits = Counter(
        bits_of(tensors, name.removesuffix(".scales"))
        for name in tensors
        if name.endswith(".scales")
    )
    widths = " and ".join(f"{b}-bit" for b in sorted(bits)) or "none"
    return f"{bits.total()} tensors kept quantized ({widths}, groups of {GROUP_SIZE})"


def bits_of(arrays, layer):
    """4 or 8: a group of 32 weights packs into bits 32-bit words, beside one scale."""
    return arrays[f"{layer}.weight"].shape[-1] // arrays[f"{layer}.scales"].shape[-1]


def read_with_gguf_package(path):
    """read_tensors for a file that mx.load cannot read whole: every tensor through
    GGUFReader."""
    import gguf

    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # numpy's or struct's own message on a damaged file
        raise WeightsError(f"cannot read {path}: {e}") from None
    tensors, dequantized = {}, Counter()
    for tensor in reader.tensors:
        kind = tensor.tensor_type.name
        name = tensor.name.removesuffix(".weight")
        if kind in KEPT:
            blocks = np.asarray(tensor.data)  # (rows, bytes per row) uint8
            tensors.update(
                zip(
                    (f"{name}.weight", f"{name}.scales", f"{name}.biases"),
                    affine_from_blocks(blocks, kind),
                )
            )
            continue
        try:
            array = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        except NotImplementedError:
            raise WeightsError(
                f"{path}: tensor {tensor.name} is {kind}, which the gguf package "
                "cannot read; convert the model again with llama.cpp to Q8_0 or Q4_0"
            ) from None
        tensors[tensor.name] = mx.array(array.astype(np.float32))
        if kind not in ("F32", "F16"):
            dequantized[kind] += 1
    metadata = {
        field.name: field.contents()
        for field in reader.fields.values()
        if not field.name.startswith("tokenizer.")
    }
    done = ", ".join(f"{n} {kind} dequantized" for kind, n in dequantized.items())
    return tensors, metadata, f"{kept_note(tensors)}, {done}"


def affine_from_blocks(blocks, kind):
    """(packed uint32 weight, scales, biases) as mx.quantize makes them, from (rows, n *
    block bytes) GGUF blocks of `kind`: the same q, scale d, bias -8d, m or -128d (see
    the top)."""
    rows = blocks.shape[0]
    header = 4 if kind == "Q4_1" else 2
    blocks = blocks.reshape(rows, -1, header + (32 if kind == "Q8_0" else 16))
    d = blocks[..., :2].copy().view(np.float16)[..., 0].astype(np.float32)
    qs = blocks[..., header:]
    if kind == "Q8_0":
        q = qs ^ 0x80  # int8 q as uint8 q + 128
        bias = -128 * d
    else:
        # A block's byte j holds weight j (low 4 bits) and weight j + 16 (high 4 bits);
        # MLX packs weights 2i and 2i + 1 into byte i.
        q = np.concatenate([qs & 15, qs >> 4], axis=-1)
        q = q[..., 0::2] | (q[..., 1::2] << 4)
        bias = -8 * d
        if kind == "Q4_1":
            bias = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
    packed = np.ascontiguousarray(q).reshape(rows, -1).view(np.uint32)
    return mx.array(packed), mx.array(d), mx.array(bias)


# ---- The model ----------------------------------------------------------


def model_args(metadata, names, path):
    """ModelArgs from a GGUF file's `llama.*` metadata; WeightsError for another
    architecture."""
    architecture = str(metadata.get("general.architecture"))
    if architecture != "llama":
        raise WeightsError(
            f"{path} is a GGUF of a {architecture!r} model; this example runs "
            "the Llama family only (general.architecture 'llama')"
        )

    def value(key, default=None):
        found = metadata.get(f"llama.{key}", default)
        if found is None:
            raise WeightsError(f"{path} has no llama.{key} in its metadata")
        return found.item() if isinstance(found, mx.array) else found

    if "rope_freqs.weight" in names:
        raise WeightsError(
            f"{path} rescales RoPE (Llama 3.1's rope_freqs), which this loader "
            "does not read; convert the Hugging Face checkpoint with convert.py instead"
        )
    try:
        return ModelArgs(
            dim=value("embedding_length"),
            n_layers=value("block_count"),
            n_heads=value("attention.head_count"),
            n_kv_heads=value("attention.head_count_kv", value("attention.head_count")),
            vocab_size=value("vocab_size", 0) or None,
            hidden_dim=value("feed_forward_length"),
            norm_eps=value("attention.layer_norm_rms_epsilon"),
            rope_theta=value("rope.freq_base", 10000.0),
            rope_traditional=True,  # llama.cpp's row order: Meta's interleaved pairs
            max_seq_len=value("context_length"),
            tie_word_embeddings="output.weight" not in names,
        )
    except (ValueError, TypeError) as e:
        raise WeightsError(f"{path} holds hyperparameters this example cannot use: {e}")


def load_gguf(path, dtype=None):
    """(model, what the load line says) for the Llama in the GGUF file `path`.
    Float weights, scales and biases are `dtype`: by default float16 on a GPU and
    float32 on the CPU (MLX's CPU products are fastest in float32); both hold the
    blocks' values exactly."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path} does not exist")
    if dtype is None:
        dtype = mx.float32 if mx.default_device() == mx.cpu else mx.float16
    tensors, metadata, note = read_tensors(path)
    weights = {mlx_name(name): array for name, array in tensors.items()}
    unknown = [name for name in tensors if mlx_name(name) is None]
    if unknown:
        raise WeightsError(
            f"{path} holds tensors a Llama has not: {', '.join(unknown)}"
        )
    if "token_embd.weight" in tensors:  # the vocabulary is the embedding's rows
        metadata["llama.vocab_size"] = tensors["token_embd.weight"].shape[0]
    args = model_args(metadata, tensors.keys(), path)
    model = Llama(args)
    # Quantize exactly the layers whose blocks were kept, each with its own width (a
    # file often keeps its embedding in Q8_0 and the rest in Q4_1).
    nn.quantize(
        model, class_predicate=lambda name, _: quantization_of(name, weights) or False
    )
    route_around_cpu_quantized_matmul(model)
    weights = {
        k: v if v.dtype == mx.uint32 else v.astype(dtype) for k, v in weights.items()
    }
    check_weights(model, weights)
    model.load_weights(list(weights.items()))
    mx.eval(model.parameters())
    return model, f", GGUF: {note}"


def quantization_of(layer, weights):
    """{"group_size", "bits"} of a layer whose GGUF blocks were kept, else None."""
    if f"{layer}.scales" not in weights:
        return None
    return {"group_size": GROUP_SIZE, "bits": bits_of(weights, layer)}


# ---- The tokenizer ------------------------------------------------------


class GGUFTokenizer(HFTokenizer):
    """The tokenizer and chat template in a GGUF file's metadata, built by transformers'
    GGUF converter into a `tokenizers` Tokenizer, used as hf_tokenizer.py uses a
    tokenizer.json."""

    def __init__(self, path):
        from transformers.integrations.gguf import (
            convert_gguf_tokenizer,
            get_gguf_tokenizer,
        )

        try:
            architecture, vocabulary, config = get_gguf_tokenizer(str(path))
            self.tokenizer, _ = convert_gguf_tokenizer(architecture, vocabulary)
        except Exception as e:  # a KeyError names the missing field
            raise TokenizerError(
                f"{path} has no tokenizer in its metadata that transformers can build "
                f"({type(e).__name__}: {e}); give the model's tokenizer after the "
                "weights"
            ) from None
        # chat.py looks for a chat_template.jinja in `folder` before the config's
        # template: the file itself is no folder, so the template in the metadata is the
        # one used.
        self.folder, self.config = Path(path), config
        self.special_tokens_map = {
            k: v
            for k, v in config.items()
            if k.endswith("_token") and isinstance(v, str)
        }
        self.stop_ids = {self.token_id(config.get("eos_token"))} - {None}
        self.vocab_size = self.tokenizer.get_vocab_size(with_added_tokens=True)
        self.add_bos = str(config.get("add_bos_token")) == "True"

    def prompt(self, text):
        """BOS (if the file says add_bos_token) and the text, as transformers has it."""
        bos = [self.token_id(self.config.get("bos_token"))] if self.add_bos else []
        return bos + self.encode(text)


# ---- convert.py: a GGUF in, a GGUF out ----------------------------------


def read_gguf_checkpoint(path, dequantize=False):
    """(ModelArgs, {name: array}) for convert.py. dequantize: float32 weights (the
    blocks' values), for --dtype or --quantize. Otherwise a file whose layers all kept
    blocks of one width becomes a quantized .safetensors (group size 32), exact."""
    model, _ = load_gguf(path, dtype=mx.float32 if dequantize else mx.float16)
    if dequantize:
        return model.args, dict(nn.utils.tree_flatten(dequantized(model).parameters()))
    weights = dict(nn.utils.tree_flatten(model.parameters()))
    floats = any(hasattr(m, "to_quantized") for _, m in model.named_modules())
    bits = {m.bits for _, m in model.named_modules() if hasattr(m, "bits")}
    if len(bits) > 1 or (bits and floats):
        widths = " and ".join(map(str, sorted(bits))) + "-bit" + " and float" * floats
        raise WeightsError(
            f"{path} mixes {widths} layers, which a converted file cannot "
            "describe (one width for all); run the .gguf itself with llama.py"
        )
    if bits:
        model.args.quantization = {"group_size": GROUP_SIZE, "bits": bits.pop()}
    return model.args, weights


def dequantized(model):
    """`model` with each quantized layer replaced by a float one of the same values."""
    layers = []
    for name, module in model.named_modules():
        if "scales" not in module:
            continue
        w = mx.dequantize(
            module.weight, module.scales, module.biases, module.group_size, module.bits
        )
        float_layer = nn.Linear(w.shape[1], w.shape[0], bias=False)
        if isinstance(module, nn.QuantizedEmbedding):
            float_layer = nn.Embedding(*w.shape)
        float_layer.weight = w
        layers.append((name, float_layer))
    model.update_modules(nn.utils.tree_unflatten(layers))
    return model
