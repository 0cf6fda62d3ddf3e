"""Quantized Llama weights: what convert.py --quantize writes and llama.py loads, with
no flag.

MLX's affine quantization (mx.quantize): each row of a weight is cut into groups of
`group_size` consecutive inputs, and within a group w ~ scale * q + bias with q an
unsigned `bits`-bit integer. A quantized layer stores `weight` (out, in * bits / 32)
uint32 (the q packed 32 / bits to a word), `scales` and `biases` (out, in / group_size)
in the float dtype; mlx-lm's files use the same names.

The model in model.py is unchanged: a file's configuration says {"group_size", "bits"}
under "quantization", and loading swaps the model's nn.Linear and nn.Embedding layers
for MLX's quantized ones (`quantize`) before reading the packed arrays into them. Every
product is MLX's own mx.quantized_matmul. (A CUDA decode kernel of our own was measured
slower end to end: see README.md.)

    from quantize import quantize, quantize_weights
    model = quantize(Llama(args), group_size=64, bits=4)  # shapes only, no memory yet
    weights = quantize_weights(model, weights)  # float weights -> packed ones
"""

import mlx.core as mx
import mlx.nn as nn

BITS = (4, 8)
GROUP_SIZES = (32, 64, 128)


def check_quantization(quantization, dim, hidden_dim):
    """{"group_size", "bits"} checked against what this example supports and the model's
    widths (every quantized layer's input width must be a whole number of groups);
    raises ValueError with the fix."""
    group_size, bits = quantization.get("group_size"), quantization.get("bits")
    if bits not in BITS or type(bits) is not int:
        raise ValueError(f"{bits!r}-bit quantization is not supported; use 4 or 8 bits")
    if group_size not in GROUP_SIZES or type(group_size) is not int:
        raise ValueError(
            f"quantization group size {group_size!r} is not supported; use 32, 64 or "
            "128"
        )
    for name, width in (("dim", dim), ("hidden_dim", hidden_dim)):
        if width % group_size:
            fits = [g for g in GROUP_SIZES if dim % g == 0 and hidden_dim % g == 0]
            raise ValueError(
                f"the model's {name} {width} is not a multiple of the quantization "
                f"group size {group_size}; use a group size of "
                f"{' or '.join(map(str, fits)) or 'none of 32, 64, 128'}"
            )
    return {"group_size": group_size, "bits": bits}


def quantize(model, group_size, bits):
    """Quantize every linear layer (attention, feed-forward, output) and the embedding
    of `model` in place.

    The output layer is read whole for every generated token, so quantizing it speeds
    decoding like any other layer. The embedding is only looked up (one row per token),
    so quantizing it saves memory and file size, not time: 0.19 GB of a 7B model at 4
    bits. The norms stay in floating point (tiny)."""
    nn.quantize(
        model, group_size, bits
    )  # every module with to_quantized: nn.Linear and nn.Embedding
    return route_around_cpu_quantized_matmul(model)


def quantize_weights(model, weights):
    """`weights` with each floating-point weight of a layer that args.quantization
    quantizes replaced by mx.quantize's packed weight, scales and biases. Layers already
    quantized (mlx-lm) are kept as they are. Raises ValueError for a weight whose shape
    does not fit."""
    group_size = model.args.quantization["group_size"]
    bits = model.args.quantization["bits"]
    expected = dict(nn.utils.tree_flatten(model.parameters()))  # lazy: shapes only
    weights = dict(weights)
    for name in expected:
        if not name.endswith(".scales"):
            continue
        layer = name.removesuffix("scales")
        w = weights.get(layer + "weight")
        if (
            w is None
            or layer + "scales" in weights
            or not mx.issubdtype(w.dtype, mx.floating)
        ):
            continue  # missing (check_weights names it) or already quantized
        out_features, in_features = (
            expected[layer + "weight"].shape[0],
            expected[name].shape[1] * group_size,
        )
        if w.shape != (out_features, in_features):
            raise ValueError(
                f"{layer}weight has shape {tuple(w.shape)}, expected "
                f"{(out_features, in_features)}"
            )
        (
            weights[layer + "weight"],
            weights[layer + "scales"],
            weights[layer + "biases"],
        ) = mx.quantize(w, group_size, bits)
    return weights


# ---- The CPU ------------------------------------------------------------
# MLX 0.32's CPU quantized product is a plain loop: one row (a decoding step) beats the
# float product, but a prompt's many rows run ~50x slower than float32 through BLAS
# (576 x 1536 weight, 512 rows, 2-core x86, OpenBLAS: 1,004 ms quantized, 21 ms float,
# 36 ms dequantized then multiplied). On the CPU, products of DEQUANTIZE_ROWS rows or
# more dequantize the weight first.
DEQUANTIZE_ROWS = 8


def dequantized_product(layer, x):
    """x @ W.T with W the layer's dequantized weight: the quantized product's values."""
    w = mx.dequantize(
        layer["weight"],
        layer["scales"],
        layer.get("biases"),
        layer.group_size,
        layer.bits,
    )
    return x @ w.T


class CPUQuantizedLinear(nn.QuantizedLinear):
    def __call__(self, x):
        if x.size < DEQUANTIZE_ROWS * x.shape[-1]:
            return super().__call__(x)
        y = dequantized_product(self, x)
        return y + self["bias"] if "bias" in self else y


class CPUQuantizedEmbedding(nn.QuantizedEmbedding):
    def as_linear(self, x):  # tied embeddings' output layer
        if x.size < DEQUANTIZE_ROWS * x.shape[-1]:
            return super().as_linear(x)
        return dequantized_product(self, x)


def route_around_cpu_quantized_matmul(model):
    """On the CPU, swap the quantized layers for the ones above (same weights)."""
    if mx.default_device() != mx.cpu:
        return model
    for module in model.modules():
        if type(module) is nn.QuantizedLinear:
            module.__class__ = CPUQuantizedLinear
        elif type(module) is nn.QuantizedEmbedding:
            module.__class__ = CPUQuantizedEmbedding
    return model
