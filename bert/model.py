"""BERT in MLX: embeddings, a post-LayerNorm Transformer encoder, the pooler and the masked-LM head.

    python bert/model.py --bert-model bert-base-uncased --mlx-model weights/bert-base-uncased.npz

prints the MLX output for a sample batch; `python bert/hf_model.py --bert-model ...` prints the
`transformers` output for the same batch.

Parameter names follow Hugging Face's `BertModel` closely, so `convert.py`'s mapping is short:
`encoder.layer.{i}.attention.self.query` here is `encoder.layers.{i}.attention.query`.
"""

import argparse
import zipfile
from dataclasses import asdict, dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np


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

    def __post_init__(self):
        """Refuse a configuration that cannot build a BERT (a damaged config.json) as a whole, before anything
        is built from it: ValueError naming the field and the range it must be in."""
        for name, value in asdict(self).items():
            low, high = (
                (1e-30, 0.1)
                if name == "layer_norm_eps"
                else (1, 2**10 if "layers" in name else 2**20)
            )
            if (
                type(value) is not type(low) or not low <= value <= high
            ):  # NaN fails the comparison too
                raise ValueError(
                    f"{name} is {value!r}; it must be {'a whole number' if low == 1 else 'a number'} from {low:,} to {high:,}"
                )
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads {self.num_attention_heads}"
            )

    @classmethod
    def from_hf(cls, hf_config):
        """Take the fields above from a `transformers` BertConfig (or any object with them)."""
        if (act := getattr(hf_config, "hidden_act", "gelu")) != "gelu":
            raise ValueError(
                f"hidden_act {act!r} is not supported; this BERT uses the exact (erf) GELU, 'gelu'"
            )
        return cls(
            **{
                name: getattr(hf_config, name, None)
                for name in cls.__dataclass_fields__
            }
        )


class Embeddings(nn.Module):
    """word + position + token-type embeddings, then LayerNorm."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embeddings = nn.Embedding(
            config.max_position_embeddings, config.hidden_size
        )
        self.token_type_embeddings = nn.Embedding(
            config.type_vocab_size, config.hidden_size
        )
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def __call__(self, input_ids, token_type_ids):
        positions = mx.arange(input_ids.shape[1])  # (T,), broadcast over the batch
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions)
        return self.norm(x + self.token_type_embeddings(token_type_ids))  # (B, T, D)


class Attention(nn.Module):
    """Bidirectional multi-head self-attention."""

    def __init__(self, config: BertConfig):
        super().__init__()
        D, self.n_heads = config.hidden_size, config.num_attention_heads
        self.query, self.key, self.value, self.out_proj = (
            nn.Linear(D, D) for _ in range(4)
        )

    def __call__(self, x, mask):
        B, T, D = x.shape
        # (B, T, D) -> (B, n_heads, T, head_dim)
        q, k, v = (
            proj(x).reshape(B, T, self.n_heads, -1).transpose(0, 2, 1, 3)
            for proj in (self.query, self.key, self.value)
        )
        # mask: (B, 1, 1, T) additive, 0 for tokens and a large negative number for padding.
        out = mx.fast.scaled_dot_product_attention(
            q, k, v, scale=q.shape[-1] ** -0.5, mask=mask
        )
        return self.out_proj(out.transpose(0, 2, 1, 3).reshape(B, T, D))


class FeedForward(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.up = nn.Linear(config.hidden_size, config.intermediate_size)
        self.down = nn.Linear(config.intermediate_size, config.hidden_size)

    def __call__(self, x):
        return self.down(
            nn.gelu(self.up(x))
        )  # nn.gelu is the exact erf form, as BERT's "gelu"


class EncoderLayer(nn.Module):
    """Post-LayerNorm (the original Transformer's order): x = norm(x + sublayer(x))."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.attention = Attention(config)
        self.attention_norm = nn.LayerNorm(
            config.hidden_size, eps=config.layer_norm_eps
        )
        self.feed_forward = FeedForward(config)
        self.ffn_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def __call__(self, x, mask):
        x = self.attention_norm(x + self.attention(x, mask))
        return self.ffn_norm(x + self.feed_forward(x))


class Encoder(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.layers = [EncoderLayer(config) for _ in range(config.num_hidden_layers)]

    def __call__(self, x, mask):
        for layer in self.layers:
            x = layer(x, mask)
        return x


class MaskedLMHead(nn.Module):
    """dense + GELU + LayerNorm, then logits against the (tied) word embeddings plus a bias."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.bias = mx.zeros((config.vocab_size,))

    def __call__(self, x, word_embeddings):
        return (
            word_embeddings.as_linear(self.norm(nn.gelu(self.dense(x)))) + self.bias
        )  # (B, T, vocab)


class Bert(nn.Module):
    def __init__(
        self, config: BertConfig, with_pooler: bool = True, with_mlm_head: bool = False
    ):
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config)
        self.encoder = Encoder(config)
        if with_pooler:  # BertForMaskedLM checkpoints have none
            self.pooler = nn.Linear(config.hidden_size, config.hidden_size)
        if with_mlm_head:
            self.mlm = MaskedLMHead(config)

    def __call__(self, input_ids, token_type_ids=None, attention_mask=None):
        """input_ids (B, T) -> (hidden states (B, T, D), pooled (B, D), or None without a pooler)."""
        if input_ids.shape[1] > self.config.max_position_embeddings:
            raise ValueError(
                f"{input_ids.shape[1]} tokens are more than the model's {self.config.max_position_embeddings} positions"
            )
        x = self.embeddings(
            input_ids,
            mx.zeros_like(input_ids) if token_type_ids is None else token_type_ids,
        )
        # attention_mask (B, T) of 1 (token) / 0 (padding) -> additive (B, 1, 1, T) in the activations' dtype.
        # The finite minimum (not -inf) keeps a fully padded row from turning into NaNs.
        mask = (
            None
            if attention_mask is None
            else ((1 - attention_mask.astype(x.dtype)) * mx.finfo(x.dtype).min)[
                :, None, None, :
            ]
        )
        y = self.encoder(x, mask)
        pooled = (
            mx.tanh(self.pooler(y[:, 0])) if "pooler" in self else None
        )  # from the [CLS] token
        return y, pooled

    def mlm_logits(self, hidden_states):
        """Masked-LM logits (B, T, vocab) from the encoder's output; needs the MLM head (`"mlm" in model`)."""
        return self.mlm(hidden_states, self.embeddings.word_embeddings)


# ---------------------------------------------------------------- loading


class WeightsError(Exception):
    """Weights that are missing, corrupt or do not fit the model. The message names what is wrong."""


def read_weights(weights_path):
    """{name: array} from a .npz written by convert.py; floating-point arrays only. The `pooling` entry that
    convert.py adds for sentence-transformers models is not a weight: embed.py reads it.

    NumPy reads the file, not mx.load: MLX 0.32 reads .npz members through Python file objects on
    its own I/O threads, and one of those still waiting for the interpreter lock when a script ends
    aborts the process ("terminate called without an active exception").
    """
    if not zipfile.is_zipfile(weights_path):
        raise WeightsError(
            f"{weights_path} is missing or not a .npz (zip) archive; write it with convert.py"
        )
    try:
        with np.load(weights_path, allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files if name != "pooling"}
    except (OSError, RuntimeError, ValueError, zipfile.BadZipFile) as e:
        raise WeightsError(f"cannot read weights from {weights_path}: {e}") from None
    # NumPy has no bfloat16; MLX stores it as 2-byte void ("|V2"), viewed back as bfloat16 here.
    if bad := [
        f"{name} ({a.dtype})"
        for name, a in arrays.items()
        if a.dtype.kind != "f" and a.dtype != "V2"
    ]:
        raise WeightsError(
            f"{weights_path} has weights that are not floating point: {', '.join(bad[:3])}; convert again"
        )
    return {
        name: mx.array(a.view(np.uint16)).view(mx.bfloat16)
        if a.dtype == "V2"
        else mx.array(a)
        for name, a in arrays.items()
    }


def load_model(bert_model, weights_path, dtype=mx.float32):
    """(Bert, tokenizer) from a Hugging Face name or folder (config and tokenizer) and converted weights."""
    from transformers import AutoConfig, AutoTokenizer

    weights = read_weights(weights_path)
    try:
        config = BertConfig.from_hf(AutoConfig.from_pretrained(bert_model))
        tokenizer = AutoTokenizer.from_pretrained(bert_model)
    except Exception as e:  # not JSON, a field of the wrong type (transformers checks), out of range (BertConfig), ...
        raise WeightsError(
            f"the config.json or tokenizer of {bert_model} cannot be used: {e}"
        ) from None
    # The optional parts are built when the weights have them.
    model = Bert(
        config,
        with_pooler="pooler.weight" in weights,
        with_mlm_head=any(k.startswith("mlm.") for k in weights),
    )
    try:
        model.load_weights(
            list(weights.items())
        )  # strict: every parameter present, no extra, same shapes
    except ValueError as e:  # MLX names the keys or the shape that do not fit
        raise WeightsError(
            f"{weights_path} does not fit the model: {' '.join(str(e).split())}"
        ) from None
    model.set_dtype(
        dtype
    )  # no dropout in this model: nothing differs between training and eval mode
    if len(tokenizer) > config.vocab_size:
        raise WeightsError(
            f"the tokenizer of {bert_model} has {len(tokenizer)} tokens but the model only "
            f"{config.vocab_size}; use the tokenizer that belongs to these weights"
        )
    return model, tokenizer


SAMPLE_BATCH = [
    "This is an example of BERT working on MLX.",
    "A second string",
    "This is another string.",
]
DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


if __name__ == "__main__":
    from cli import (
        run,
        text,
    )  # the edges every script here shares: one-line errors, Ctrl-C, UTF-8 flags

    parser = argparse.ArgumentParser(
        description="Run the MLX BERT on a sample batch and print its output."
    )
    parser.add_argument(
        "--bert-model",
        required=True,
        help="Hugging Face name or local folder (config, tokenizer)",
    )
    parser.add_argument(
        "--mlx-model", required=True, help="the .npz written by convert.py"
    )
    parser.add_argument(
        "--text",
        type=text,
        nargs="+",
        default=SAMPLE_BATCH,
        help="sentences (default: a sample batch)",
    )
    parser.add_argument(
        "--dtype",
        choices=list(DTYPES),
        default="float32",
        help="inference dtype (default: float32)",
    )
    args = parser.parse_args()

    def main():
        model, tokenizer = load_model(
            args.bert_model, args.mlx_model, DTYPES[args.dtype]
        )
        tokens = tokenizer(args.text, return_tensors="np", padding=True)
        output, pooled = model(**{k: mx.array(v) for k, v in tokens.items()})
        print("MLX BERT:", output, sep="\n")
        if pooled is not None:
            print("\n pooled output:", pooled, sep="\n")

    run(main, WeightsError)
