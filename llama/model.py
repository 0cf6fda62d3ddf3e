"""Llama in MLX: RMSNorm, rotary embeddings, grouped-query attention with a key/value cache, SwiGLU.

Parameter names are Meta's (`tok_embeddings`, `layers.{i}.attention.wq`, `feed_forward.w1`, ...), so a
Meta checkpoint loads as it is and `convert.py` renames a Hugging Face one. The model configuration
travels inside the converted weights file, so `load_model(path)` needs nothing else. Llama 3.1 and later
differ only in configuration: RoPE frequencies rescaled once (`rope_scaling`) and, for Llama 3.2 1B and
3B, an output layer that is the embedding (`tie_word_embeddings`). A quantized model (convert.py
--quantize) is configured by `quantization`: its linear layers and embedding hold 4- or 8-bit weights.

    from model import load_model
    model = load_model("weights.npz")
    for token in model.generate(mx.array([1, 450, 7483]), temp=0.0):   # a generator, one int per step
        ...
"""

import json
import math
import zipfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from quantized_matvec import quantized_matmul, use_kernel


@dataclass
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: Optional[int] = None  # fewer key/value heads than query heads: grouped-query attention
    vocab_size: int = 32000
    hidden_dim: Optional[int] = None  # feed-forward width; None: derived from multiple_of as Meta does
    multiple_of: int = 256
    ffn_dim_multiplier: Optional[float] = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # Meta's checkpoints rotate interleaved pairs (x0, x1), (x2, x3), ...: traditional=True.
    # Hugging Face's converter permuted the rows of wq and wk so that rotating the two halves
    # (x0, x_{d/2}), (x1, x_{d/2+1}), ... gives the same result: traditional=False for HF weights.
    rope_traditional: bool = True
    # Llama 3.1's scaled RoPE: {"factor", "low_freq_factor", "high_freq_factor",
    # "original_max_position_embeddings"} (Hugging Face's names), or None for plain RoPE.
    rope_scaling: Optional[dict] = None
    max_seq_len: int = 4096  # the context the model was trained with; longer prompts are refused
    tie_word_embeddings: bool = False  # the output layer reuses tok_embeddings (Llama 3.2 1B and 3B)
    # {"group_size": 64, "bits": 4} (mlx-lm's name and keys): every linear layer and the embedding hold
    # affine-quantized weights (see quantize below); None: all weights are floating point.
    quantization: Optional[dict] = None

    def __post_init__(self):
        self.n_kv_heads = self.n_kv_heads or self.n_heads
        if self.hidden_dim is None:  # Meta's rule: 2/3 of 4*dim, scaled, rounded up to multiple_of
            hidden_dim = int(2 * (4 * self.dim) / 3)
            if self.ffn_dim_multiplier is not None:
                hidden_dim = int(self.ffn_dim_multiplier * hidden_dim)
            self.hidden_dim = self.multiple_of * math.ceil(hidden_dim / self.multiple_of)
        if self.dim % self.n_heads or self.n_heads % self.n_kv_heads:
            raise ValueError(f"dim {self.dim}, n_heads {self.n_heads} and n_kv_heads {self.n_kv_heads} do not divide")
        if self.quantization is not None:
            self.quantization = check_quantization(self.quantization, self.dim, self.hidden_dim)

    @property
    def head_dim(self):
        return self.dim // self.n_heads


class KVCache:
    """The keys and values of every position seen so far, for one layer.

    Storage is (B, n_kv_heads, capacity, head_dim), grown `step` positions at a time and written in
    place, so a decoding step does not copy the whole cache as `mx.concatenate` would.
    """

    step = 256

    def __init__(self):
        self.keys = self.values = None
        self.offset = 0  # number of positions filled

    def update(self, keys, values):
        """Append (B, n_kv_heads, T, head_dim) keys and values; return all of them so far."""
        B, H, T, D = keys.shape
        if self.keys is None or self.offset + T > self.keys.shape[2]:
            capacity = self.step * math.ceil((self.offset + T) / self.step)
            new_keys, new_values = (mx.zeros((B, H, capacity, D), keys.dtype) for _ in range(2))
            if self.keys is not None:
                new_keys[:, :, : self.offset] = self.keys[:, :, : self.offset]
                new_values[:, :, : self.offset] = self.values[:, :, : self.offset]
            self.keys, self.values = new_keys, new_values
        self.keys[:, :, self.offset : self.offset + T] = keys
        self.values[:, :, self.offset : self.offset + T] = values
        self.offset += T
        return self.keys[:, :, : self.offset], self.values[:, :, : self.offset]

    def trim(self, n):
        """Forget all but the first n positions (a chat whose new prompt differs from there on)."""
        self.offset = min(self.offset, n)


def llama3_rope_freqs(head_dim, base, factor, low_freq_factor, high_freq_factor, original_max_position_embeddings):
    """Llama 3.1's RoPE frequencies, rescaled once for a longer context (Meta's `apply_scaling`).

    Plain RoPE rotates feature pair i at position p by the angle p / base^(2i/head_dim). Llama 3.1 keeps
    the fast rotations (wavelength shorter than original_max_position_embeddings / high_freq_factor),
    slows the slow ones (wavelength longer than original_max_position_embeddings / low_freq_factor) by
    `factor`, and blends the two in between. Returns the per-pair periods base^(2i/head_dim), rescaled:
    the `freqs` that mx.fast.rope divides the position by.
    """
    inv_freq = 1.0 / base ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / inv_freq
    low_freq_wavelen = original_max_position_embeddings / low_freq_factor
    high_freq_wavelen = original_max_position_embeddings / high_freq_factor
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (original_max_position_embeddings / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    scaled = np.where(medium, (1 - smooth) * scaled / factor + smooth * scaled, scaled)
    return mx.array(1.0 / scaled, dtype=mx.float32)


class RoPE(nn.Module):
    """nn.RoPE, with the frequencies given (Llama 3.1) instead of computed from the base."""

    def __init__(self, dims, traditional, freqs):
        super().__init__()
        self.dims, self.traditional = dims, traditional
        self._freqs = freqs  # a leading underscore keeps it out of the parameters

    def __call__(self, x, offset=0):
        return mx.fast.rope(x, self.dims, traditional=self.traditional, base=None, scale=1.0, offset=offset,
                            freqs=self._freqs)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)
        if args.rope_scaling is None:
            self.rope = nn.RoPE(args.head_dim, traditional=args.rope_traditional, base=args.rope_theta)
        else:
            freqs = llama3_rope_freqs(args.head_dim, args.rope_theta, **args.rope_scaling)
            self.rope = RoPE(args.head_dim, args.rope_traditional, freqs)

    def __call__(self, x, cache: Optional[KVCache] = None):
        B, T, _ = x.shape
        q, k, v = self.wq(x), self.wk(x), self.wv(x)
        q = q.reshape(B, T, self.n_heads, self.head_dim).transpose(0, 2, 1, 3)  # (B, n_heads, T, head_dim)
        k = k.reshape(B, T, self.n_kv_heads, self.head_dim).transpose(0, 2, 1, 3)  # (B, n_kv_heads, T, head_dim)
        v = v.reshape(B, T, self.n_kv_heads, self.head_dim).transpose(0, 2, 1, 3)
        offset = cache.offset if cache is not None else 0  # position of the first of these T tokens
        q, k = self.rope(q, offset=offset), self.rope(k, offset=offset)
        if cache is not None:
            k, v = cache.update(k, v)  # (B, n_kv_heads, offset + T, head_dim)
        # Each query head i attends with key/value head i // (n_heads // n_kv_heads); the fused kernel
        # does that grouping itself. One new token sees everything before it: no mask is needed.
        mask = "causal" if T > 1 else None
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.head_dim**-0.5, mask=mask)
        return self.wo(out.transpose(0, 2, 1, 3).reshape(B, T, -1))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.w1 = nn.Linear(args.dim, args.hidden_dim, bias=False)  # gate
        self.w2 = nn.Linear(args.hidden_dim, args.dim, bias=False)  # down
        self.w3 = nn.Linear(args.dim, args.hidden_dim, bias=False)  # up

    def __call__(self, x):
        return self.w2(nn.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    """Pre-norm residual block: x + attention(norm(x)), then h + feed_forward(norm(h))."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args)
        self.attention_norm = nn.RMSNorm(args.dim, eps=args.norm_eps)
        self.ffn_norm = nn.RMSNorm(args.dim, eps=args.norm_eps)

    def __call__(self, x, cache=None):
        h = x + self.attention(self.attention_norm(x), cache)
        return h + self.feed_forward(self.ffn_norm(h))


class Llama(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = [TransformerBlock(args) for _ in range(args.n_layers)]
        self.norm = nn.RMSNorm(args.dim, eps=args.norm_eps)
        if not args.tie_word_embeddings:
            self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.quantization is not None:  # the layers above, quantized (weights come from a file)
            quantize(self, **args.quantization)

    def __call__(self, tokens, cache: Optional[list] = None, last_only=False):
        """tokens (B, T) int -> logits (B, T, vocab_size). With `cache` (one KVCache per layer), the
        tokens continue the sequence the cache holds, and the cache is extended with them.
        last_only: the logits of the last position only, (B, 1, vocab_size), as generation needs."""
        h = self.tok_embeddings(tokens)  # (B, T, dim)
        for i, layer in enumerate(self.layers):
            h = layer(h, cache[i] if cache is not None else None)
        h = self.norm(h[:, -1:] if last_only else h)
        # Tied embeddings: logits are h @ tok_embeddings.weight.T.
        return self.tok_embeddings.as_linear(h) if self.args.tie_word_embeddings else self.output(h)

    def make_cache(self):
        return [KVCache() for _ in self.layers]

    def generate(self, prompt, temp=0.0, top_p=1.0, cache=None):
        """Yield the next token (an int) after `prompt` (T,), forever; the caller decides when to stop.

        temp 0 is greedy decoding; otherwise sample from softmax(logits / temp), restricted to the
        smallest set of tokens whose probability adds up to top_p. With `cache` (from make_cache), the
        prompt continues the sequence the cache holds (a chat's earlier turns). When the caller stops
        after a token, the cache holds the prompt and every token yielded before it; from the second
        token on, that last one too (its step is already under way). `cache[0].offset` says which.
        """
        cache = self.make_cache() if cache is None else cache

        def step(token):  # (1,) token -> (1,) next token, lazily; extends the cache by one position
            return sample(self(token[:, None], cache)[:, -1], temp, top_p)

        token = sample(self(prompt[None], cache, last_only=True)[:, -1], temp, top_p)  # the prompt in one pass
        # The first token waits for the prompt pass alone: building and launching the next step first, as
        # the loop below does, would add several milliseconds of Python and kernel launches in front of it.
        yield token.item()
        next_token = step(token)
        mx.async_eval(next_token)
        while True:
            # Build and start step n+1 before waiting for token n: the Python work of one step overlaps
            # the device's work of the previous one. `next_token` is still lazy here.
            token, next_token = next_token, step(next_token)
            mx.async_eval(next_token)
            yield token.item()  # waits for `token` only


def sample(logits, temp, top_p):
    """(B, vocab) logits -> (B,) tokens."""
    if temp == 0:
        return mx.argmax(logits, axis=-1)
    logits = logits.astype(mx.float32) / temp
    if top_p < 1.0:
        probs = mx.softmax(logits, axis=-1)
        order = mx.argsort(-probs, axis=-1)  # most likely first
        sorted_probs = mx.take_along_axis(probs, order, axis=-1)
        # Keep a token if the tokens more likely than it add up to less than top_p (the first always stays).
        keep = (mx.cumsum(sorted_probs, axis=-1) - sorted_probs) < top_p
        sorted_logits = mx.where(keep, mx.take_along_axis(logits, order, axis=-1), -mx.inf)
        return mx.take_along_axis(order, mx.random.categorical(sorted_logits)[:, None], axis=-1)[:, 0]
    return mx.random.categorical(logits)


# ---- Quantization -------------------------------------------------------------------------------

# MLX's affine quantization (mx.quantize): each row of a weight is cut into groups of `group_size`
# consecutive inputs, and within a group w ~ scale * q + bias with q an unsigned `bits`-bit integer.
# A quantized layer stores `weight` (out, in * bits / 32) uint32 (the q packed 32 / bits to a word),
# `scales` and `biases` (out, in / group_size) in the float dtype; mlx-lm's files use the same names.
QUANTIZATION_BITS = (4, 8)
QUANTIZATION_GROUP_SIZES = (32, 64, 128)


def check_quantization_settings(quantization):
    """{"group_size", "bits"} checked against what this example supports; raises ValueError with the fix."""
    group_size, bits = quantization.get("group_size"), quantization.get("bits")
    if bits not in QUANTIZATION_BITS:
        raise ValueError(f"{bits}-bit quantization is not supported; use 4 or 8 bits")
    if group_size not in QUANTIZATION_GROUP_SIZES:
        raise ValueError(f"quantization group size {group_size} is not supported; use 32, 64 or 128")
    return group_size, bits


def check_quantization(quantization, dim, hidden_dim):
    """{"group_size", "bits"} checked as above and against the model's widths (every quantized layer's
    input width must be a whole number of groups); raises ValueError with the fix."""
    group_size, bits = check_quantization_settings(quantization)
    for name, width in (("dim", dim), ("hidden_dim", hidden_dim)):
        if width % group_size:
            fits = [g for g in QUANTIZATION_GROUP_SIZES if dim % g == 0 and hidden_dim % g == 0]
            raise ValueError(f"the model's {name} {width} is not a multiple of the quantization group size "
                             f"{group_size}; use a group size of {' or '.join(map(str, fits)) or 'none of 32, 64, 128'}")
    return {"group_size": group_size, "bits": bits}


class QuantizedEmbedding(nn.QuantizedEmbedding):
    """nn.QuantizedEmbedding whose use as the (tied) output layer goes through quantized_matvec, as the
    other quantized layers do: the CUDA decode kernel on one token, mx.quantized_matmul otherwise."""

    def as_linear(self, x):
        return quantized_matmul(x, self["weight"], self["scales"], self["biases"], self.group_size, self.bits)


def quantize(model, group_size, bits):
    """Quantize every linear layer (attention, feed-forward, output) and the embedding of `model` in place.

    The output layer is read whole for every generated token, so quantizing it speeds decoding like any
    other layer. The embedding is only looked up (one row per token), so quantizing it saves memory and
    file size, not time: 0.19 GB of a 7B model at 4 bits. The norms stay in floating point (tiny).
    Every product is MLX's own mx.quantized_matmul; use_decode_kernel(model) switches decoding on a CUDA
    GPU to quantized_matvec.py's kernel instead (measured slower end to end so far: see README)."""
    nn.quantize(model, group_size, bits)  # every module with to_quantized: nn.Linear and nn.Embedding
    return model


def use_decode_kernel(model):
    """Decode through quantized_matvec.py's CUDA kernel: MLX's quantized classes -> quantized_matvec's
    QuantizedLinear and the QuantizedEmbedding above, parameters untouched. Off CUDA nothing changes."""
    use_kernel(model)  # the linear layers
    for _, module in model.named_modules():
        if type(module) is nn.QuantizedEmbedding:  # the (tied) output layer's product
            module.__class__ = QuantizedEmbedding
    return model


# ---- Loading ------------------------------------------------------------------------------------


class WeightsError(Exception):
    """A weights file that is missing, unreadable, or does not fit the model it describes."""


def check_weights(model, weights):
    """Raise WeightsError naming every missing or unexpected key and every shape that does not fit."""
    expected = dict(nn.utils.tree_flatten(model.parameters()))
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    wrong = [f"{k} {tuple(weights[k].shape)} (expected {tuple(expected[k].shape)})"
             for k in sorted(set(expected) & set(weights)) if weights[k].shape != expected[k].shape]
    problems = [f"{label}: {', '.join(items[:6])}{' ...' if len(items) > 6 else ''}"
                for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
                if items]
    if problems:
        quantization = getattr(getattr(model, "args", None), "quantization", None)
        hint = (f" (the configuration says {quantization['bits']}-bit weights in groups of {quantization['group_size']})"
                if quantization and (wrong or missing) else "")
        raise WeightsError("the weights do not fit the model: " + "; ".join(problems) + hint)


def read_arrays(path):
    """{name: array} from a .safetensors or .npz file.

    NumPy reads .npz, not mx.load: MLX 0.32 reads .npz members through Python file objects on its
    own I/O threads, and one of those still waiting for the interpreter lock when a script ends
    aborts the process ("terminate called without an active exception"). NumPy has no bfloat16;
    MLX stores it as 2-byte void ("|V2"), which is viewed back as bfloat16 here.
    """
    if path.suffix != ".npz":
        # Read on the CPU stream: MLX reads the arrays there in parallel, which with MLX's CUDA
        # backend is several times faster than through the GPU stream. (The GPU then fetches the
        # weights on first use; on Apple silicon CPU and GPU share the memory.)
        return mx.load(str(path), stream=mx.cpu)
    if not zipfile.is_zipfile(path):
        raise ValueError("it is not a .npz (zip) archive")
    weights = {}
    with np.load(path, allow_pickle=False) as npz:
        for name in npz.files:
            a = npz[name]
            weights[name] = mx.array(a.view(np.uint16)).view(mx.bfloat16) if a.dtype == "V2" else mx.array(a)
    return weights


def load_model(path):
    """The Llama stored in `path` (.npz or .safetensors from convert.py), weights evaluated."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path} does not exist; write it with convert.py first")
    try:
        weights = read_arrays(path)
    except Exception as e:
        raise WeightsError(f"cannot read {path}: {e}") from None
    # convert.py stores the configuration as JSON bytes in an extra uint8 array.
    if "config" not in weights:
        raise WeightsError(f"{path} has no model configuration; convert the checkpoint with convert.py")
    config = json.loads(bytes(memoryview(weights.pop("config"))).decode())
    known = {f.name for f in fields(ModelArgs)}
    try:
        args = ModelArgs(**{k: v for k, v in config.items() if k in known})
    except ValueError as e:  # e.g. a quantization this example does not support
        raise WeightsError(f"{path}: {e}") from None
    model = Llama(args)
    check_weights(model, weights)
    model.load_weights(list(weights.items()))
    mx.eval(model.parameters())
    return model


def config_array(args: ModelArgs):
    """ModelArgs as a uint8 array of JSON bytes, stored beside the weights as `config`."""
    return mx.array(list(json.dumps(asdict(args)).encode()), dtype=mx.uint8)
