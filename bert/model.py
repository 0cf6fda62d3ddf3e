"""BERT in MLX: embeddings, a post-LayerNorm Transformer encoder, the pooler and the
masked-LM head.

    python bert/model.py --bert-model bert-base-uncased --mlx-model weights/bert.npz

prints the MLX output for a sample batch; `python bert/hf_model.py --bert-model ...`
prints the `transformers` output for the same batch.

Parameter names follow Hugging Face's `BertModel` closely, so `convert.py`'s mapping is
short: `encoder.layer.{i}.attention.self.query` is `encoder.layers.{i}.attention.query`.
"""

import sys

try:  # Ctrl-C while the libraries load ends with one line too
    import argparse
    import os
    from dataclasses import dataclass
    from pathlib import Path

    import mlx.core as mx
    import mlx.nn as nn
    import numpy as np
except KeyboardInterrupt:
    print("interrupted", file=sys.stderr)
    sys.exit(130)


@dataclass
class BertConfig:
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12

    @classmethod
    def from_dict(cls, config):
        """The fields above from config.json's dictionary, checked as a whole."""
        fields = {name: config.get(name) for name in cls.__dataclass_fields__}
        *sizes, eps = fields.values()
        if not (
            all(type(v) is int and 1 <= v <= 2**20 for v in sizes)
            and fields["num_hidden_layers"] <= 2**10
            and 0 < eps < 0.1  # NaN or a string fails too
            and fields["hidden_size"] % fields["num_attention_heads"] == 0
            and config.get("hidden_act", "gelu") == "gelu"  # the exact (erf) GELU
        ):
            raise ValueError(f"config.json does not describe a BERT: {config}")
        return cls(**fields)


class Embeddings(nn.Module):
    """word + position + token-type embeddings, then LayerNorm."""

    def __init__(self, config: BertConfig):
        super().__init__()
        D = config.hidden_size
        self.word_embeddings = nn.Embedding(config.vocab_size, D)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, D)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, D)
        self.norm = nn.LayerNorm(D, eps=config.layer_norm_eps)

    def __call__(self, input_ids, token_type_ids):
        positions = mx.arange(input_ids.shape[1])  # (T,), broadcast over the batch
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions)
        return self.norm(x + self.token_type_embeddings(token_type_ids))  # (B, T, D)


class Attention(nn.Module):
    """Bidirectional multi-head self-attention."""

    def __init__(self, config: BertConfig):
        super().__init__()
        D, self.n_heads = config.hidden_size, config.num_attention_heads
        self.scale = (D // self.n_heads) ** -0.5
        self.query, self.key, self.value = (nn.Linear(D, D) for _ in range(3))
        self.out_proj = nn.Linear(D, D)

    def __call__(self, x, mask):
        B, T, D = x.shape
        # (B, T, D) -> (B, n_heads, T, head_dim)
        q, k, v = (
            proj(x).reshape(B, T, self.n_heads, -1).transpose(0, 2, 1, 3)
            for proj in (self.query, self.key, self.value)
        )
        # mask: (B, 1, 1, T) additive: 0 for tokens, a large negative one for padding.
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask)
        return self.out_proj(out.transpose(0, 2, 1, 3).reshape(B, T, D))


class FeedForward(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.up = nn.Linear(config.hidden_size, config.intermediate_size)
        self.down = nn.Linear(config.intermediate_size, config.hidden_size)

    def __call__(self, x):
        return self.down(nn.gelu(self.up(x)))  # the exact erf form, BERT's "gelu"


class EncoderLayer(nn.Module):
    """Post-LayerNorm (the original Transformer's order): x = norm(x + sublayer(x))."""

    def __init__(self, config: BertConfig):
        super().__init__()
        D, eps = config.hidden_size, config.layer_norm_eps
        self.attention = Attention(config)
        self.attention_norm = nn.LayerNorm(D, eps=eps)
        self.feed_forward = FeedForward(config)
        self.ffn_norm = nn.LayerNorm(D, eps=eps)

    def __call__(self, x, mask):
        x = self.attention_norm(x + self.attention(x, mask))
        return self.ffn_norm(x + self.feed_forward(x))


class MaskedLMHead(nn.Module):
    """dense + GELU + LayerNorm, then logits against the (tied) word embeddings."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.bias = mx.zeros((config.vocab_size,))

    def __call__(self, x, word_embeddings):
        # (B, T, vocab)
        return word_embeddings.as_linear(self.norm(nn.gelu(self.dense(x)))) + self.bias


class Bert(nn.Module):
    def __init__(self, config: BertConfig, with_pooler=True, with_mlm_head=False):
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config)
        # A dict for the checkpoint's names, encoder.layers.{i}.
        layers = [EncoderLayer(config) for _ in range(config.num_hidden_layers)]
        self.encoder = {"layers": layers}
        if with_pooler:  # BertForMaskedLM checkpoints have none
            self.pooler = nn.Linear(config.hidden_size, config.hidden_size)
        if with_mlm_head:
            self.mlm = MaskedLMHead(config)

    def __call__(self, input_ids, token_type_ids=None, attention_mask=None):
        """input_ids (B, T) -> (hidden states (B, T, D), pooled (B, D) or None)."""
        if token_type_ids is None:
            token_type_ids = mx.zeros_like(input_ids)
        x = self.embeddings(input_ids, token_type_ids)
        mask = None
        if attention_mask is not None:
            # (B, T) of 1 (token) / 0 (padding) -> additive (B, 1, 1, T). The finite
            # minimum (not -inf) keeps a fully padded row from turning into NaNs.
            padding = 1 - attention_mask[:, None, None].astype(x.dtype)  # (B, 1, 1, T)
            mask = padding * mx.finfo(x.dtype).min
        for layer in self.encoder["layers"]:
            x = layer(x, mask)
        pooled = None
        if "pooler" in self:
            pooled = mx.tanh(self.pooler(x[:, 0]))  # from the [CLS] token
        return x, pooled


# ---------------------------------------------------------------- loading


def load_model(bert_model, weights_path, dtype=mx.float32):
    """(Bert, tokenizer) from a Hugging Face name or folder (config and tokenizer) and
    the .npz that convert.py wrote. Loading is strict: every weight present, no extra,
    each of its shape, all finite; ValueError in one line if not."""
    from transformers import AutoConfig, AutoTokenizer

    config = None
    try:
        config = BertConfig.from_dict(AutoConfig.from_pretrained(bert_model).to_dict())
        tokenizer = AutoTokenizer.from_pretrained(bert_model)
        # NumPy reads the .npz (never unpickling), not mx.load, which aborts the
        # process when an I/O thread outlives the script (MLX 0.32). `pooling` is
        # embed.py's.
        weights = {k: a for k, a in np.load(weights_path).items() if k != "pooling"}
        sound = [a.dtype.kind == "f" and np.isfinite(a).all() for a in weights.values()]
        if not all(sound):
            raise ValueError("it holds weights that are not finite floats")
        model = Bert(config, "pooler.weight" in weights, "mlm.bias" in weights)
        # Strict: MLX names a weight that is missing, extra or of another shape.
        model.load_weights([(k, mx.array(a)) for k, a in weights.items()])
    except Exception as e:  # missing, damaged, offline, ...: transformers raises many
        if config is None and not Path(bert_model).exists():  # nor a Hub name
            e = f"there is no folder {bert_model}, nor a Hub model ({e})"
        raise ValueError(f"cannot load {bert_model}, {weights_path}: {e}") from None
    model.set_dtype(dtype)  # no dropout here: training and eval modes are the same
    if len(tokenizer) > config.vocab_size:  # token ids beyond the embeddings
        raise ValueError(f"the tokenizer of {bert_model} is larger than its model")
    return model, tokenizer


def utf8(text):
    """An argparse type: command-line bytes that are not UTF-8 fail here, one line."""
    text.encode()
    return text


SAMPLE_BATCH = ["This is an example of BERT working on MLX.", "A second string."]
DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="The MLX BERT on a sample batch.")
    parser.add_argument("--bert-model", required=True, help="Hub name or folder")
    parser.add_argument("--mlx-model", required=True, help="convert.py's .npz")
    parser.add_argument("--text", nargs="+", type=utf8, default=SAMPLE_BATCH)
    parser.add_argument("--dtype", choices=DTYPES, default="float32")
    args = parser.parse_args()
    try:
        dtype = DTYPES[args.dtype]
        model, tokenizer = load_model(args.bert_model, args.mlx_model, dtype)
        tokens = tokenizer(
            args.text, return_tensors="np", padding=True, truncation=True
        )
        output, pooled = model(**{k: mx.array(v) for k, v in tokens.items()})
        print("MLX BERT:", output, "\n pooled output:", pooled, sep="\n")
        sys.stdout.flush()  # a closed or full stdout is found here, not at exit
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except (ValueError, OSError) as e:  # OSError: stdout closed or full
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit("error: " + " ".join(str(e).split()))  # one line
