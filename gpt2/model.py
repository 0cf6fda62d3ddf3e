"""GPT-2 in MLX: token and position embeddings, pre-LayerNorm blocks of causal
self-attention and a GELU MLP, a final LayerNorm and the language-model head.

main.py trains this model from scratch on characters; generate.py loads OpenAI's GPT-2
weights (written by convert.py) into it and generates. Its dropout is mlx.nn's, which
attention_dropout.py swaps for CUDA kernels from outside the model when main.py trains
on an NVIDIA GPU.

Parameter names follow nanoGPT and Hugging Face's GPT2Model (`wte`, `h.{i}.attn.c_attn`,
`ln_f`), so converting is a rename plus a transpose.
"""

import math
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten


@dataclass
class GPTConfig:
    vocab_size: int = 50257
    block_size: int = 1024  # the longest sequence the position embedding covers
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # biases in the Linear layers and LayerNorms, as GPT-2
    tie_head: bool = True  # the LM head reuses the token embedding (wte), as GPT-2
    layer_norm_eps: float = 1e-5


def causal_softmax(scores):
    """softmax(scores + causal mask) over the last axis of (..., T, T) scores, summed in
    float32."""
    T = scores.shape[-1]
    # -inf above the diagonal: position t sees the positions up to t
    causal = mx.triu(mx.full((T, T), -mx.inf, dtype=scores.dtype), k=1)
    return mx.softmax(scores + causal, axis=-1, precise=True)


def layer_norm(config):
    """GPT-2's LayerNorm: a learned scale, and a learned shift with config.bias."""
    return nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)


class AttentionDropout(nn.Dropout):
    """Dropout of the attention probabilities: takes the scores, gives
    dropout(causal_softmax(scores))."""

    def __call__(self, scores):
        return super().__call__(causal_softmax(scores))


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        # q, k and v in one matmul
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.attn_dropout = AttentionDropout(config.dropout)  # scores -> probabilities
        self.resid_dropout = nn.Dropout(config.dropout)
        self.dropout = config.dropout

    def __call__(self, x):
        B, T, C = x.shape
        x = x.astype(self.c_attn.weight.dtype)  # the weights' dtype (see GPT.__call__)
        q, k, v = mx.split(self.c_attn(x), 3, axis=-1)
        # (B, T, C) -> (B, n_head, T, head_dim)
        q, k, v = (
            t.reshape(B, T, self.n_head, C // self.n_head).transpose(0, 2, 1, 3)
            for t in (q, k, v)
        )
        scale = 1.0 / math.sqrt(C // self.n_head)
        if self.training and self.dropout > 0:
            # Dropout on the attention probabilities needs them spelled out: MLX's fused
            # attention has none.
            scores = (q * scale) @ k.transpose(0, 1, 3, 2)  # (B, n_head, T, T)
            y = self.attn_dropout(scores) @ v
        else:
            y = mx.fast.scaled_dot_product_attention(
                q, k, v, scale=scale, mask="causal"
            )
        y = y.transpose(0, 2, 1, 3).reshape(B, T, C)  # heads side by side again
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def __call__(self, x):
        # GPT-2's GELU is the tanh approximation ("gelu_new" in transformers).
        x = x.astype(self.c_fc.weight.dtype)  # the weights' dtype (see GPT.__call__)
        return self.dropout(self.c_proj(nn.gelu_approx(self.c_fc(x))))


class Block(nn.Module):
    """x + attn(ln_1(x)), then x + mlp(ln_2(x)): LayerNorm before each sublayer (GPT-2),
    not after (BERT)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = layer_norm(config)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = layer_norm(config)
        self.mlp = MLP(config)

    def __call__(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)  # token embedding
        self.wpe = nn.Embedding(config.block_size, config.n_embd)  # position embedding
        self.drop = nn.Dropout(config.dropout)
        self.h = [Block(config) for _ in range(config.n_layer)]
        self.ln_f = layer_norm(config)
        if not config.tie_head:
            self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.init_weights()

    def init_weights(self):
        """GPT-2's initialisation: normal(0, 0.02) for Linear and Embedding weights,
        normal(0, 0.02 / sqrt(2 * n_layer)) for the projections that write into the
        residual stream (each block adds two), zero biases, LayerNorm weight 1."""
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layer)

        def init(name, p):
            if name.endswith("c_proj.weight"):  # into the residual stream
                return residual_std * mx.random.normal(p.shape)
            if name.endswith("bias"):
                return mx.zeros(p.shape)
            if name.startswith("ln_") or ".ln_" in name:
                return mx.ones(p.shape)
            return 0.02 * mx.random.normal(p.shape)

        parameters = tree_flatten(self.parameters())
        self.update(tree_unflatten([(name, init(name, p)) for name, p in parameters]))

    def __call__(self, idx):
        """idx (B, T) int tokens -> logits (B, T, vocab_size).

        Mixed precision (main.py --dtype) gives the attention and MLP weights a
        low-precision dtype and keeps the embeddings and LayerNorms in float32: the
        sublayers cast their input to their weights' dtype, and their outputs join a
        float32 residual stream, as PyTorch's autocast does.
        """
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(
                f"a sequence of {T} tokens is longer than the context "
                f"({self.config.block_size})"
            )
        x = self.drop(self.wte(idx) + self.wpe(mx.arange(T)))  # (B, T, n_embd)
        for block in self.h:
            x = block(x)
        x = self.ln_f(x)
        return self.wte.as_linear(x) if self.config.tie_head else self.lm_head(x)

    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None):
        """Yield max_new_tokens tokens (ints) continuing idx (T,), one at a time.

        The last block_size tokens are the context: every step recomputes them (no
        cache; the models here are small). temperature 0 is greedy; top_k keeps only the
        k most likely tokens.
        """
        idx = list(idx)
        for _ in range(max_new_tokens):
            context = mx.array(idx[-self.config.block_size :])
            logits = self(context[None])[0, -1].astype(mx.float32)  # (vocab_size,)
            if temperature == 0:
                token = int(mx.argmax(logits).item())
            else:
                logits = logits / temperature
                if top_k is not None and top_k < logits.shape[0]:
                    kth = mx.sort(logits)[-top_k]  # the k-th largest logit
                    logits = mx.where(logits < kth, -mx.inf, logits)
                token = int(mx.random.categorical(logits).item())
            idx.append(token)
            yield token
