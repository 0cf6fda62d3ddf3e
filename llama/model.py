"""Llama in MLX: RMSNorm, rotary embeddings, grouped-query attention with a key/value
cache, SwiGLU.

Parameter names are Meta's (`tok_embeddings`, `layers.{i}.attention.wq`,
`feed_forward.w1`, ...), so `convert.py` renames a Hugging Face checkpoint and keeps a
Meta one. The configuration travels inside the converted weights file, so
`load_model(path)` needs nothing else. Llama 3.1 and later differ only in configuration:
RoPE frequencies rescaled once (`rope_scaling`) and, for Llama 3.2 1B and 3B, an output
layer that is the embedding (`tie_word_embeddings`). A quantized file (convert.py
--quantize) says so in its configuration; only then is quantize.py read.

    from model import load_model
    model = load_model("weights.safetensors")
    for token in model.generate(mx.array([1, 450, 7483]), temp=0.0):  # one int a step
        ...
"""

import json
import math
import os
import sys
import zipfile
from dataclasses import dataclass, fields
from functools import partial
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

ROPE_SCALING_KEYS = (
    "factor",
    "low_freq_factor",
    "high_freq_factor",
    "original_max_position_embeddings",
)


@dataclass
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    # Fewer key/value heads than query heads: grouped-query attention.
    n_kv_heads: int | None = None
    vocab_size: int = 32000
    # The feed-forward width (Meta's params.json derives it: see convert.meta_args).
    hidden_dim: int = 11008
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # Meta's checkpoints rotate interleaved pairs (x0, x1), (x2, x3), ...: traditional.
    # Hugging Face's converter permuted the rows of wq and wk so that rotating the two
    # halves (x0, x_{d/2}), (x1, x_{d/2+1}), ... gives the same result.
    rope_traditional: bool = True
    # Llama 3.1's scaled RoPE: {"factor", "low_freq_factor", "high_freq_factor",
    # "original_max_position_embeddings"} (Hugging Face's names), or None.
    rope_scaling: dict | None = None
    # The context the model was trained with; longer prompts are refused.
    max_seq_len: int = 4096
    # The output layer reuses tok_embeddings (Llama 3.2 1B and 3B).
    tie_word_embeddings: bool = False
    # {"group_size": 64, "bits": 4} (mlx-lm's keys): the linear layers and the
    # embedding hold quantized weights (quantize.py); None: floating point.
    quantization: dict | None = None

    def __post_init__(self):
        """Check a configuration that may come from a damaged file: a ValueError names
        the first field that is wrong."""
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        for field in fields(self):
            value = getattr(self, field.name)
            if field.type is bool:
                ok, kind = type(value) is bool, "true or false"
            elif field.type is float:
                ok = type(value) in (int, float) and 0 < value < math.inf
                kind = "a positive number"
            elif field.type == dict | None:
                ok, kind = value is None or type(value) is dict, "an object or null"
            else:  # a width or a count: MLX's shapes are int32
                most = 1024 if field.name == "n_layers" else 2**31 - 1
                ok = type(value) is int and 0 < value <= most
                kind = f"a whole number from 1 to {most}"
            if not ok:
                raise ValueError(f"{field.name} must be {kind}, not {value!r}")
        # head_dim = dim / n_heads is a whole, even number (RoPE rotates pairs).
        if self.dim % (2 * self.n_heads) or self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"dim {self.dim}, n_heads {self.n_heads} and n_kv_heads "
                f"{self.n_kv_heads} do not divide into an even head_dim and whole "
                "groups of query heads"
            )
        scaling = self.rope_scaling
        if scaling is not None and not (
            set(scaling) == set(ROPE_SCALING_KEYS)
            and all(
                type(v) in (int, float) and 0 < v < math.inf for v in scaling.values()
            )
            and scaling["low_freq_factor"] < scaling["high_freq_factor"]
        ):
            raise ValueError(
                "rope_scaling must hold positive factor, low_freq_factor, "
                "high_freq_factor and original_max_position_embeddings, the low "
                f"factor below the high one, not {scaling!r}"
            )

    @property
    def head_dim(self):
        return self.dim // self.n_heads


class KVCache:
    """The keys and values of every position seen so far, for one layer.

    Storage is (B, n_kv_heads, capacity, head_dim), grown `step` positions at a time and
    written in place, so a decoding step does not copy the whole cache as
    `mx.concatenate` would.
    """

    step = 256

    def __init__(self):
        self.keys = self.values = None
        # Positions filled; lowering it forgets the positions from there on.
        self.offset = 0

    def update(self, keys, values):
        """Append (B, n_kv_heads, T, head_dim) keys and values; return all so far."""
        B, H, T, D = keys.shape
        if self.keys is None or self.offset + T > self.keys.shape[2]:
            capacity = self.step * math.ceil((self.offset + T) / self.step)
            new_keys = mx.zeros((B, H, capacity, D), keys.dtype)
            new_values = mx.zeros((B, H, capacity, D), keys.dtype)
            if self.keys is not None:
                new_keys[:, :, : self.offset] = self.keys[:, :, : self.offset]
                new_values[:, :, : self.offset] = self.values[:, :, : self.offset]
            self.keys, self.values = new_keys, new_values
        self.keys[:, :, self.offset : self.offset + T] = keys
        self.values[:, :, self.offset : self.offset + T] = values
        self.offset += T
        return self.keys[:, :, : self.offset], self.values[:, :, : self.offset]


def llama3_rope_freqs(
    head_dim,
    base,
    factor,
    low_freq_factor,
    high_freq_factor,
    original_max_position_embeddings,
):
    """Llama 3.1's RoPE frequencies, rescaled once for a longer context (Meta's
    `apply_scaling`).

    Plain RoPE rotates feature pair i at position p by p / base^(2i/head_dim). Llama 3.1
    keeps the fast rotations (wavelength below original_max_position_embeddings /
    high_freq_factor), slows the slow ones (wavelength above
    original_max_position_embeddings / low_freq_factor) by `factor`, and blends the two
    in between. Returns the rescaled periods, the `freqs` mx.fast.rope divides by.
    """
    inv_freq = 1.0 / base ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / inv_freq
    low_freq_wavelen = original_max_position_embeddings / low_freq_factor
    high_freq_wavelen = original_max_position_embeddings / high_freq_factor
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (original_max_position_embeddings / wavelen - low_freq_factor) / (
        high_freq_factor - low_freq_factor
    )
    medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    scaled = np.where(medium, (1 - smooth) * scaled / factor + smooth * scaled, scaled)
    return mx.array(1.0 / scaled, dtype=mx.float32)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.head_dim = args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)
        # Plain RoPE's periods come from the base; Llama 3.1's rescaled ones are given.
        base, freqs = args.rope_theta, None
        if args.rope_scaling is not None:
            base = None
            freqs = llama3_rope_freqs(
                args.head_dim, args.rope_theta, **args.rope_scaling
            )
        self.rope = partial(
            mx.fast.rope,
            dims=args.head_dim,
            traditional=args.rope_traditional,
            scale=1.0,
            base=base,
            freqs=freqs,
        )

    def __call__(self, x, cache: KVCache | None = None):
        B, T, _ = x.shape
        # q: (B, n_heads, T, head_dim); k and v: (B, n_kv_heads, T, head_dim)
        q, k, v = (
            w(x).reshape(B, T, -1, self.head_dim).transpose(0, 2, 1, 3)
            for w in (self.wq, self.wk, self.wv)
        )
        offset = 0 if cache is None else cache.offset  # the position of x's first token
        q, k = self.rope(q, offset=offset), self.rope(k, offset=offset)
        if cache is not None:
            k, v = cache.update(k, v)  # (B, n_kv_heads, offset + T, head_dim)
        # Query head i attends with key/value head i // (n_heads // n_kv_heads); the
        # fused kernel groups them itself. One new token sees everything: no mask.
        mask = "causal" if T > 1 else None
        out = mx.fast.scaled_dot_product_attention(
            q, k, v, scale=self.head_dim**-0.5, mask=mask
        )
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
    """Pre-norm residual block: h = x + attention(norm(x)), then h +
    feed_forward(norm(h))."""

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

    def __call__(self, tokens, cache: list | None = None, last_only=False):
        """tokens (B, T) int -> logits (B, T, vocab_size). With `cache` (a KVCache per
        layer), the tokens continue the sequence it holds, and it is extended by them.
        last_only: the logits of the last position only, (B, 1, vocab_size)."""
        h = self.tok_embeddings(tokens)  # (B, T, dim)
        for i, layer in enumerate(self.layers):
            h = layer(h, None if cache is None else cache[i])
        h = self.norm(h[:, -1:] if last_only else h)
        if self.args.tie_word_embeddings:
            return self.tok_embeddings.as_linear(h)  # h @ tok_embeddings.weight.T
        return self.output(h)

    def make_cache(self):
        return [KVCache() for _ in self.layers]

    def generate(self, prompt, temp=0.0, top_p=1.0, cache=None):
        """Yield the next token (an int) after `prompt` (T,), forever; the caller stops.

        temp 0 is greedy; otherwise sample from softmax(logits / temp), restricted to
        the smallest set of tokens whose probability adds up to top_p. With `cache`
        (from make_cache), the prompt continues the sequence it holds (a chat's earlier
        turns). When the caller stops after a token, the cache holds the prompt and
        every token yielded before it; from the second token on, that last one too (its
        step is already under way). `cache[0].offset` says which.
        """
        if cache is None:
            cache = self.make_cache()

        def step(token):  # (1,) token -> (1,) next token, lazily; one cache position
            return sample(self(token[:, None], cache)[:, -1], temp, top_p)

        # The prompt in one pass. Its token waits for that pass alone: launching the
        # next step first, as the loop does, would add milliseconds in front of it.
        token = sample(self(prompt[None], cache, last_only=True)[:, -1], temp, top_p)
        yield token.item()
        next_token = step(token)
        mx.async_eval(next_token)
        while True:
            # Start step n+1 before waiting for token n: the Python work of one step
            # overlaps the device's work of the previous one.
            token, next_token = next_token, step(next_token)
            mx.async_eval(next_token)
            yield token.item()  # waits for `token` only


def sample(logits, temp, top_p):
    """(B, vocab) logits -> (B,) tokens."""
    if temp == 0:
        return mx.argmax(logits, axis=-1)
    logits = logits.astype(mx.float32) / temp
    if top_p == 1.0:
        return mx.random.categorical(logits)
    probs = mx.softmax(logits, axis=-1)
    order = mx.argsort(-probs, axis=-1)  # most likely first
    sorted_probs = mx.take_along_axis(probs, order, axis=-1)
    # Keep a token if the ones more likely than it add up to less than top_p.
    keep = (mx.cumsum(sorted_probs, axis=-1) - sorted_probs) < top_p
    sorted_logits = mx.where(keep, mx.take_along_axis(logits, order, axis=-1), -mx.inf)
    chosen = mx.random.categorical(sorted_logits)[:, None]
    return mx.take_along_axis(order, chosen, axis=-1)[:, 0]


# ---- Loading -------------------------------------------------------------------------


class WeightsError(Exception):
    """A weights file that is missing, unreadable, or does not fit its model."""


def check_weights(model, weights):
    """Raise WeightsError if `weights` ({name: array}) do not fit `model`: the same
    names and shapes, packed uint32 for quantized weights and floats otherwise (a NumPy
    view from tp.py is checked for its shape only)."""
    expected = dict(nn.utils.tree_flatten(model.parameters()))

    def fits(have, want):
        kind = mx.uint32 if want.dtype == mx.uint32 else mx.floating
        if isinstance(have, mx.array) and not mx.issubdtype(have.dtype, kind):
            return False
        return tuple(have.shape) == tuple(want.shape)

    if weights.keys() != expected.keys() or not all(
        fits(weights[k], want) for k, want in expected.items()
    ):
        from weights_check import misfit  # the error path only: what does not fit

        raise WeightsError(misfit(model, weights, expected))


def check_finite(weights):
    """Raise WeightsError naming a float array that holds NaN, inf or a value beyond
    float16's range: no trained Llama has one, and it would make the logits NaN."""
    floats = {k: v for k, v in weights.items() if mx.issubdtype(v.dtype, mx.floating)}
    # One pass over the weights, one wait for all the maxima.
    largest = [mx.abs(v).max().astype(mx.float32) for v in floats.values()]
    for name, value in zip(floats, mx.stack(largest).tolist()):
        if not value <= 65504:
            raise WeightsError(f"{name} holds {value}: the weights are damaged")


def weights_file(path):
    """`path` as a Path if it can be a weights file written by convert.py; a
    WeightsError saying what it is if not."""
    path = Path(path)
    if path.suffix not in (".npz", ".safetensors") or not path.is_file():
        from weights_check import not_weights  # the error path only: what it is

        raise WeightsError(not_weights(path))
    return path


def read_arrays(path):
    """{name: array} from a .safetensors or .npz file.

    NumPy reads .npz, not mx.load: MLX 0.32 reads .npz members through Python file
    objects on its own threads, and one still waiting for the interpreter lock when a
    script ends aborts the process. NumPy has no bfloat16; MLX stores it as 2-byte void
    ("|V2"), viewed back as bfloat16 here.
    """
    if path.suffix != ".npz":
        # The CPU stream reads the arrays in parallel: with MLX's CUDA backend, several
        # times faster than the GPU stream. (On Apple silicon the memory is shared.)
        return mx.load(str(path), stream=mx.cpu)
    if not zipfile.is_zipfile(path):
        raise ValueError("it is not a .npz (zip) archive")
    arrays = {}
    with np.load(path, allow_pickle=False) as npz:
        for name in npz.files:
            a = npz[name]
            if a.dtype == "V2":
                arrays[name] = mx.array(a.view(np.uint16)).view(mx.bfloat16)
            else:
                arrays[name] = mx.array(a)
    return arrays


def stored_model(config, path):
    """The Llama, unevaluated, that convert.py described in `path` by `config` (JSON
    bytes in a uint8 array). Only a quantized file reads quantize.py."""
    if config is None:
        raise WeightsError(
            f"{path} has no model configuration; convert the checkpoint with convert.py"
        )
    try:
        stored = json.loads(bytes(memoryview(config)).decode())
        if not isinstance(stored, dict):
            raise ValueError("it is not a JSON object")
        names = {f.name for f in fields(ModelArgs)}
        args = ModelArgs(**{k: v for k, v in stored.items() if k in names})
        if args.quantization is None:
            return Llama(args)
        from quantize import check_quantization, quantize

        q = check_quantization(args.quantization, args.dim, args.hidden_dim)
        args.quantization = q
        return quantize(Llama(args), q["group_size"], q["bits"])
    except (ValueError, TypeError) as e:  # a damaged field, an unsupported quantization
        raise WeightsError(
            f"{path} holds a configuration this example cannot use: {e}"
        ) from None


def load_model(path):
    """The Llama stored in `path` (.npz or .safetensors from convert.py), evaluated."""
    path = weights_file(path)
    try:
        weights = read_arrays(path)
    except Exception as e:
        raise WeightsError(f"cannot read {path}: {e}") from None
    model = stored_model(weights.pop("config", None), path)
    check_weights(model, weights)
    check_finite(weights)
    model.load_weights(list(weights.items()))
    mx.eval(model.parameters())
    return model


def write_atomically(path, write):
    """write(temporary path) beside `path`, then a rename over it: `path` is the old
    file or the whole new one, never half of one, with the permissions the user's umask
    gives a new file. The temporary file is removed on an error or Ctrl-C. convert.py
    writes weights with it, lora.py its adapters."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.tmp{path.suffix}"  # MLX adds a missing suffix
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def warn_if_reference_blas():
    """On Linux, mlx[cpu] uses the reference BLAS it bundles (about 30x slower matrix
    products) unless OpenBLAS is preloaded: say so before long work on the CPU."""
    if mx.default_device() != mx.cpu or not sys.platform.startswith("linux"):
        return
    maps = Path("/proc/self/maps").read_text()
    if "mlx_cpu.libs/libblas" in maps and "/libopenblas" not in maps:
        print(
            "warning: MLX is using the reference BLAS bundled with mlx[cpu] (slow "
            "matrix products); the top-level README.md shows how to preload OpenBLAS",
            file=sys.stderr,
        )
