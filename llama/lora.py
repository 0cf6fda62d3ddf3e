"""Fine-tune a converted Llama with LoRA (QLoRA on a 4- or 8-bit one), generate with the adapters, fuse them.

    python llama/lora.py --model weights.safetensors --tokenizer tokenizer.model --data data/ --train --iters 600
    python llama/lora.py --model weights.safetensors --tokenizer tokenizer.model --data data/ --test
    python llama/llama.py weights.safetensors tokenizer.model --adapter-path adapters/ "prompt"
    python llama/lora.py --model weights.safetensors --adapter-path adapters/ --fuse --save-path fused.safetensors

LoRA (Hu et al., 2021) keeps a linear layer's weight W frozen and learns a low-rank change to it:
y = W x + scale * B (A x), with A (rank, in), B (out, rank) and scale = alpha / rank (PEFT's
lora_alpha / r; mlx-lm asks for the scale itself). A starts Kaiming-uniform (as PEFT's lora_A), B at
zero, so untrained adapters change nothing. model.py does not know about LoRA: `linear_to_lora_layers`
freezes the model and replaces its chosen nn.Linear modules, or the nn.QuantizedLinear ones of a model
from `convert.py --quantize` (QLoRA: the base stays quantized), by LoRALinear modules that wrap them.
By default the adapters sit on the attention's wq and wv of the last --num-layers blocks; --keys
chooses other layers (`--keys all`: every linear layer of a block). The adapters are float32 whatever
the base is (float16, bfloat16, 4- or 8-bit), as PEFT keeps them; their output is cast to the base's.
Training and --test multiply by a quantized layer through its dequantized weight, made for the product
and again for the backward pass (DequantizingLinear): for the thousands of rows of a batch a dense
product is the fast one, and the float weights of the model never exist all at once.

--data DIR holds train.jsonl, valid.jsonl and, for --test, test.jsonl: one JSON object per line, one of
    {"text": "The quick brown fox."}                       BOS, the text, EOS
    {"prompt": "Q: 2 + 2?\\nA:", "completion": " 4"}          BOS, the prompt, then the completion and EOS
    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}
The messages are put in the model's chat format (chat.py, as llama.py --chat does); the roles go
(system,) user, assistant, user, assistant, ... The loss is the cross-entropy per token, averaged over
the counted tokens of a batch: all but padding, or with --mask-prompt only the completions and the
assistant's replies (each with its end-of-turn token). Texts longer than --max-seq-length tokens are cut
there (their number is reported). A batch is --batch-size examples of similar length (the examples
sorted by length, cut into batches, the batches shuffled every epoch by --seed), padded to a multiple of
32 tokens: few shapes, so the compiled step is rarely recompiled.

--adapter-path gets adapters.safetensors and adapter_config.json (rank, alpha, scale, dropout, layers,
keys, the base model's configuration), written atomically every --save-every steps and at the end. The
adapters are stored as "layers.31.attention.wq.lora_a" (rank, in) and ".lora_b" (out, rank), PEFT's
layout; beside them, "training.*" holds AdamW's state and the file's metadata the step, so that
--resume-adapter-file continues exactly as the uninterrupted run would have (same --data, --seed,
--batch-size and --iters; the data order and dropout depend only on the seed and the step). Ctrl-C or
SIGTERM stops after the step under way and saves it (press again to stop at once, saving nothing). A
non-finite loss or gradient stops before its update counts: the adapters of the last good step are
saved, the run exits with status 1.

--fuse writes W + scale * B @ A into every adapted layer, in the format convert.py writes, so llama.py
runs the result with no flag. A quantized base is dequantized first and the fused model is written in
its float dtype: that is exactly the model the adapters were trained against. Quantizing it again would
round W + scale * B @ A to the same grid, whose steps are larger than most of the adapters' change, so it
would undo much of the training; for a small file keep the quantized base and pass --adapter-path.
"""

import argparse
import json
import math
import os
import signal
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

# Before MLX starts: its CUDA backend sends work to the GPU in CUDA graphs of up to 1,000 MB of inputs (on an
# H100 or H200) and keeps those inputs until their graph has run, up to 10 graphs ahead: at a 7B step's peak,
# about 8 GB more than the step needs. Graphs of 100 MB keep about 1 GB, at about the same speed (on an H200).
if sys.platform != "darwin":
    os.environ.setdefault("MLX_MAX_MB_PER_BUFFER", "100")

import mlx.core as mx  # noqa: E402 (after the setting above)
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from chat import chat_tokens
from mlx.utils import tree_flatten, tree_map, tree_map_with_path, tree_unflatten
from model import (
    TransformerBlock,
    WeightsError,
    load_model,
    warn_if_reference_blas,
    write_atomically,
)
from tokenizer import TokenizerError, load_tokenizer

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
PAD_MULTIPLE = 32


class AdapterError(WeightsError):
    """Adapters that are missing, unreadable, or made for another model."""


class DataError(Exception):
    """A data file that is missing, empty, or has a line this script cannot train on."""


# ---- The LoRA layer ----------------------------------------------------------------------------


class LoRALinear(nn.Module):
    """`linear` (nn.Linear or nn.QuantizedLinear, frozen) plus a trainable low-rank change:
    y = linear(x) + scale * (dropout(x) @ A.T) @ B.T."""

    def __init__(self, linear, rank, alpha, dropout=0.0):
        super().__init__()
        out_dims, in_dims = linear.weight.shape
        if isinstance(linear, nn.QuantizedLinear):
            in_dims = (
                in_dims * 32 // linear.bits
            )  # each uint32 of the packed weight holds 32 / bits weights
        self.linear = linear
        self.dropout = nn.Dropout(dropout)
        self.scale = alpha / rank
        bound = 1 / math.sqrt(
            in_dims
        )  # kaiming_uniform_(a=sqrt(5)), as PEFT initialises lora_A
        self.lora_a = mx.random.uniform(
            -bound, bound, (rank, in_dims)
        )  # float32, (rank, in) as PEFT
        self.lora_b = mx.zeros((out_dims, rank))

    def __call__(self, x):
        y = self.linear(x)
        z = (
            self.dropout(x) @ self.lora_a.T
        ) @ self.lora_b.T  # float32: x is promoted to the adapters' dtype
        return y + (self.scale * z).astype(y.dtype)

    def fused(self):
        """An nn.Linear holding W + scale * B @ A, in W's float dtype (a quantized W dequantized first)."""
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
    """Freeze `model`, then wrap the linear layers `keys` ("wq", "wv", ...) of the blocks `layers` (indices)
    in LoRALinear, in place: the adapters are the only trainable parameters."""
    model.freeze()
    for i in layers:
        for key in keys:
            parent = getattr(model.layers[i], LINEAR_KEYS[key])
            setattr(parent, key, LoRALinear(getattr(parent, key), rank, alpha, dropout))
    return model


class CheckpointedBlock(TransformerBlock):
    """A TransformerBlock whose inner activations are recomputed in the backward pass instead of kept
    (mx.checkpoint): --grad-checkpoint trades about a third more compute for much less memory."""

    def __call__(self, x, cache=None):
        def block(
            params, x
        ):  # the adapters are inputs, so that their gradients pass the checkpoint
            self.update(params)
            return TransformerBlock.__call__(self, x, cache)

        return mx.checkpoint(block)(self.trainable_parameters(), x)


def checkpoint_blocks(model):
    for block in model.layers:
        block.__class__ = CheckpointedBlock  # a class swap: model.py stays as it is
        for module in block.modules():
            module.recomputed = True  # read by dequantized_product
    return model


def dequantized_product(layer, x):
    """x @ W.T for the quantized `layer` (W (out, in)) as a dense product with its dequantized W, a transient float
    weight. The backward pass dequantizes W again (mx.custom_function) rather than keeping it, so without
    --grad-checkpoint too the float weights never exist all at once."""

    # Each W is made from inputs that wait for the product's own input: else mx.compile would find the same
    # dequantize in the forward pass, in --grad-checkpoint's recomputation and in the backward pass, merge them,
    # and keep every layer's float W from the forward pass to the backward one.
    def weight_after(a):
        return mx.dequantize(
            *mx.depends([layer.weight, layer.scales, layer.biases], [a]),
            layer.group_size,
            layer.bits,
        )

    @mx.custom_function
    def product(x):
        return x @ weight_after(x).T

    @product.vjp
    def product_vjp(x, cotangent, output):  # the base is frozen: a gradient for x only
        # Under --grad-checkpoint, x is the block's recomputed input, and the W made after it is the one the
        # recomputation made just before: one dequantize less, and it is freed with the block's backward pass.
        return cotangent @ weight_after(
            x if getattr(layer, "recomputed", False) else cotangent
        )

    return product(x)


class DequantizingLinear(nn.QuantizedLinear):
    """nn.QuantizedLinear for batches of many rows (training, --test): a dense product with the dequantized weight,
    cuBLAS's GEMM on a GPU, where mx.quantized_matmul's backward product has only a naive kernel on CUDA and a
    CPU computes float16 quantized products element by element. Generation keeps mx.quantized_matmul."""

    def __call__(self, x):
        y = dequantized_product(self, x)
        return y + self["bias"] if "bias" in self else y


class DequantizingEmbedding(nn.QuantizedEmbedding):
    """nn.QuantizedEmbedding whose use as the output layer (tied embeddings) is DequantizingLinear's product."""

    def as_linear(self, x):
        return dequantized_product(self, x)


def dequantizing_layers(model):
    """Swap the quantized layers of `model` (those inside a LoRALinear too) for the dequantizing ones, in place:
    a class swap, the same parameters, so adapters and files are unchanged."""
    swaps = {
        nn.QuantizedLinear: DequantizingLinear,
        nn.QuantizedEmbedding: DequantizingEmbedding,
    }
    for _, module in model.named_modules():
        module.__class__ = swaps.get(type(module), type(module))
    return model


def fuse(model):
    """`model` with each LoRALinear replaced by its fused nn.Linear and every other quantized layer
    dequantized: a float model, in place."""
    swaps = []
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            swaps.append((name, module.fused()))
        elif isinstance(module, nn.QuantizedLinear) and not name.endswith(
            ".linear"
        ):  # not one inside a LoRALinear
            swaps.append((name, plain_linear(dequantized(module), module.get("bias"))))
        elif isinstance(module, nn.QuantizedEmbedding):
            embedding = nn.Embedding(module.num_embeddings, module.dims)
            embedding.weight = dequantized(module)
            swaps.append((name, embedding))
    model.update_modules(tree_unflatten(swaps))
    model.args = replace(model.args, quantization=None)
    return model


# ---- Adapter files -----------------------------------------------------------------------------


def save_adapters(folder, adapters, optimizer_state, step):
    """adapters.safetensors: the adapter arrays, the optimizer's state as training.*, the step in the metadata."""
    arrays = dict(tree_flatten(adapters))
    arrays.update(
        (f"training.{k}", v)
        for k, v in tree_flatten(optimizer_state)
        if k != "learning_rate"
    )
    write_atomically(
        folder / ADAPTERS,
        lambda tmp: mx.save_safetensors(str(tmp), arrays, metadata={"step": str(step)}),
    )


def save_config(folder, config):
    write_atomically(
        folder / CONFIG, lambda tmp: tmp.write_text(json.dumps(config, indent=2) + "\n")
    )


def check_config(config, path):
    """The adapter configuration checked as a whole; AdapterError saying what is wrong."""
    problem = None
    if not isinstance(config, dict):
        problem = "it is not a JSON object"
    elif not (isinstance(config.get("rank"), int) and config["rank"] >= 1):
        problem = f"rank {config.get('rank')!r} is not a positive integer"
    elif not (
        isinstance(config.get("alpha"), (int, float)) and math.isfinite(config["alpha"])
    ):
        problem = f"alpha {config.get('alpha')!r} is not a finite number"
    elif not (
        isinstance(config.get("dropout", 0), (int, float))
        and 0 <= config.get("dropout", 0) < 1
    ):
        problem = f"dropout {config.get('dropout')!r} is not in [0, 1)"
    elif not (
        isinstance(config.get("layers"), list)
        and all(isinstance(i, int) and i >= 0 for i in config["layers"])
    ):
        problem = f"layers {config.get('layers')!r} is not a list of block indices"
    elif not (
        isinstance(config.get("keys"), list)
        and config["keys"]
        and set(config["keys"]) <= set(LINEAR_KEYS)
    ):
        problem = (
            f"keys {config.get('keys')!r} is not a list of {', '.join(LINEAR_KEYS)}"
        )
    if problem:
        raise AdapterError(
            f"{path}: {problem}; it should be the {CONFIG} that lora.py --train wrote"
        )
    return config


def read_adapters(path):
    """(configuration, {adapter name: array}, {optimizer state name: array}, step) from an adapter folder or
    its adapters.safetensors (with adapter_config.json beside it)."""
    path = Path(path)
    file = path / ADAPTERS if path.is_dir() else path
    if not file.is_file() or not (file.parent / CONFIG).is_file():
        raise AdapterError(
            f"{file if not file.is_file() else file.parent / CONFIG} does not exist; train adapters "
            f"with lora.py --train --adapter-path {file.parent} first"
        )
    try:
        arrays, metadata = mx.load(str(file), return_metadata=True)
        config = json.loads((file.parent / CONFIG).read_text())
        step = int(metadata.get("step", "0"))
    except Exception as e:
        raise AdapterError(f"cannot read the adapters in {file.parent}: {e}") from None
    training = {
        k.removeprefix("training."): v
        for k, v in arrays.items()
        if k.startswith("training.")
    }
    adapters = {k: v for k, v in arrays.items() if not k.startswith("training.")}
    return check_config(config, file.parent / CONFIG), adapters, training, step


def apply_adapters(model, config, adapters, where):
    """Wrap `model`'s layers as `config` says and load `adapters` into them; AdapterError naming what does not fit."""
    n = model.args.n_layers
    if max(config["layers"], default=-1) >= n:
        raise AdapterError(
            f"{where}: the adapters are for block {max(config['layers'])}, this model has {n} blocks; "
            "they were made for another model"
        )
    linear_to_lora_layers(
        model,
        config["layers"],
        config["keys"],
        config["rank"],
        config["alpha"],
        config.get("dropout", 0),
    )
    expected = dict(tree_flatten(model.trainable_parameters()))
    problems = [f"missing {k}" for k in sorted(set(expected) - set(adapters))]
    problems += [f"unexpected {k}" for k in sorted(set(adapters) - set(expected))]
    problems += [
        f"{k} is {tuple(v.shape)}, this model needs {tuple(expected[k].shape)}"
        for k, v in adapters.items()
        if k in expected and v.shape != expected[k].shape
    ]
    problems += [
        f"{k} is {v.dtype}, not floating point"
        for k, v in adapters.items()
        if not mx.issubdtype(v.dtype, mx.floating)
    ]
    if problems:
        raise AdapterError(
            f"{where}: the adapters do not fit this model, made for another one? "
            f"{', '.join(problems[:4])}"
            + (f" and {len(problems) - 4} more" if len(problems) > 4 else "")
        )
    if not all(mx.all(mx.isfinite(v)).item() for v in adapters.values()):
        raise AdapterError(f"{where}: the adapters hold non-finite values")
    model.update(tree_unflatten(list(adapters.items())))
    return model


def load_adapters(model, path):
    """Apply the adapters in `path` (a folder that lora.py --train wrote, or its adapters.safetensors) to
    `model`, in place, for generation; returns what llama.py's load line adds."""
    config, adapters, _, _ = read_adapters(path)
    apply_adapters(model, config, adapters, path)
    model.eval()  # no dropout
    mx.eval(model.parameters())
    return f", LoRA adapters of rank {config['rank']} on {'/'.join(config['keys'])} of {len(config['layers'])} blocks"


def load_with_adapters(weights, adapter_path, tokenizer_for):
    """llama.py --adapter-path: (model, tokenizer, what the load line adds) for the model in `weights` with the
    adapters of `adapter_path`; one error line and exit status 1 for anything that does not fit."""
    if (
        "MLX_RANK" in os.environ
    ):  # started by mlx.launch: every rank exits, rank 0 says why
        sys.exit(
            "error: --adapter-path runs on one process; fuse the adapters into the model first (lora.py --fuse)"
            if os.environ["MLX_RANK"] == "0"
            else 1
        )
    try:
        model = load_model(weights)
        return model, tokenizer_for(model), load_adapters(model, adapter_path)
    except (WeightsError, TokenizerError) as e:
        sys.exit(f"error: {e}")


# ---- Data --------------------------------------------------------------------------------------


def check_example(example):
    """What is wrong with one line's object, or None."""
    if not isinstance(example, dict) or not (
        {"text"} <= example.keys()
        or {"prompt", "completion"} <= example.keys()
        or {"messages"} <= example.keys()
    ):
        return 'expected an object with "text", with "prompt" and "completion", or with "messages"'
    if "text" in example:
        return (
            None
            if isinstance(example["text"], str) and example["text"]
            else '"text" is not a non-empty string'
        )
    if "prompt" in example:
        ok = (
            all(isinstance(example[k], str) for k in ("prompt", "completion"))
            and example["completion"]
        )
        return (
            None
            if ok
            else '"prompt" and "completion" are not strings, the completion non-empty'
        )
    messages = example["messages"]
    if not (
        isinstance(messages, list)
        and messages
        and all(
            isinstance(m, dict)
            and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str)
            for m in messages
        )
    ):
        return '"messages" is not a non-empty list of {"role": ..., "content": ...} objects with string values'
    roles = (
        [m["role"] for m in messages[1:]]
        if messages[0]["role"] == "system"
        else [m["role"] for m in messages]
    )
    if roles[:2] != ["user", "assistant"] or roles != [
        ("user", "assistant")[i % 2] for i in range(len(roles))
    ]:
        return "the roles must go (system,) user, assistant, user, assistant, ... with at least one assistant reply"
    return None


def read_jsonl(path):
    """[(line number, object)] of a .jsonl file (blank lines skipped); DataError naming the first bad line."""
    if not path.is_file():
        raise DataError(
            f"{path} does not exist; --data must be a folder with train.jsonl and valid.jsonl "
            "(and test.jsonl for --test)"
        )
    examples = []
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                example = json.loads(line.decode("utf-8"))
            except UnicodeDecodeError:
                raise DataError(f"{path} line {number} is not UTF-8 text") from None
            except ValueError as e:
                raise DataError(f"{path} line {number} is not JSON: {e}") from None
            problem = check_example(example)
            if problem:
                raise DataError(f"{path} line {number}: {problem}")
            examples.append((number, example))
    if not examples:
        raise DataError(
            f"{path} is empty; write one JSON object per line (see lora.py --help)"
        )
    return examples


def eos_id(tokenizer):
    """The id that ends a text: SentencePiece's EOS, Llama 3's <|end_of_text|>, a tokenizer.json's eos_token."""
    if tokenizer.kind == "SentencePiece":
        return tokenizer.eos_id
    name = (
        "<|end_of_text|>"
        if tokenizer.kind == "Llama 3"
        else tokenizer.special_tokens_map.get("eos_token")
    )
    return tokenizer.token_id(name)


def conversation(tokenizer, messages):
    """(tokens, [is an assistant's token]) of a whole conversation in the tokenizer's chat format. chat.py's
    chat_tokens gives the tokens up to where a reply begins; the conversation with one more user message
    gives them all, and each reply runs from its beginning to its first stop token, inclusive."""
    messages = messages[
        : max(i for i, m in enumerate(messages) if m["role"] == "assistant") + 1
    ]
    tokens = chat_tokens(tokenizer, messages + [{"role": "user", "content": "."}])
    assistant, end = [False] * len(tokens), 0
    for i in (i for i, m in enumerate(messages) if m["role"] == "assistant"):
        start = len(prefix := chat_tokens(tokenizer, messages[:i]))
        end = next(
            (
                j + 1
                for j in range(start, len(tokens))
                if tokens[j] in tokenizer.stop_ids
            ),
            None,
        )
        if tokens[:start] != prefix or end is None:
            raise TokenizerError(
                "this chat format does not give each reply as the continuation of the "
                "conversation before it, ended by a stop token; train on prompt/completion lines"
            )
        assistant[start:end] = [True] * (end - start)
    return tokens[:end], assistant[:end]


def encode(example, tokenizer, mask_prompt):
    """(token ids, [does the token count in the loss]) of one example."""
    eos = [e] if (e := eos_id(tokenizer)) is not None else []
    if "text" in example:
        tokens = tokenizer.prompt(example["text"]) + eos
        return tokens, [True] * len(tokens)
    if "prompt" in example:
        prompt, completion = (
            tokenizer.prompt(example["prompt"]),
            tokenizer.encode(example["completion"]) + eos,
        )
        return prompt + completion, [not mask_prompt] * len(prompt) + [True] * len(
            completion
        )
    tokens, assistant = conversation(tokenizer, example["messages"])
    return tokens, [a or not mask_prompt for a in assistant]


def load_data(path, tokenizer, args):
    """[(tokens, counted)] of a .jsonl file, each cut to --max-seq-length tokens; says what it holds."""
    examples, truncated = [], 0
    for number, example in read_jsonl(path):
        if args.mask_prompt and "text" in example:
            raise DataError(
                f'{path} line {number}: --mask-prompt needs "prompt"/"completion" or "messages" lines, '
                'not "text" (every token of a text counts)'
            )
        try:
            tokens, counted = encode(example, tokenizer, args.mask_prompt)
        except (
            TokenizerError,
            UnicodeError,
        ) as e:  # a template's refusal; a lone surrogate ("\\ud800")
            raise DataError(f"{path} line {number}: {e}") from None
        truncated += len(tokens) > args.max_seq_length
        examples.append((tokens[: args.max_seq_length], counted[: args.max_seq_length]))
    n_counted = sum(
        sum(c[1:]) for _, c in examples
    )  # the first token is never predicted
    if n_counted == 0:
        raise DataError(
            f"{path}: no token counts in the loss (each completion cut off by --max-seq-length?)"
        )
    cut = (
        f"; {truncated} longer than --max-seq-length {args.max_seq_length} tokens, cut there"
        if truncated
        else ""
    )
    print(
        f"{path}: {len(examples)} examples, {sum(len(t) for t, _ in examples)} tokens, {n_counted} of them "
        f"counted in the loss{cut}",
        flush=True,
    )
    return examples


def batch_indices(examples, batch_size, drop_last):
    """Lists of `batch_size` indices of examples of similar length (sorted by length, cut in order)."""
    order = np.argsort([len(t) for t, _ in examples], kind="stable")
    end = len(order) - batch_size + 1 if drop_last else len(order)
    return [order[i : i + batch_size] for i in range(0, max(end, 0), batch_size)]


def pad(batch):
    """(inputs, targets, mask), each (B, T), for [(tokens, counted)]: T is the longest example's length - 1,
    rounded up to a multiple of PAD_MULTIPLE; padded positions have mask 0."""
    T = PAD_MULTIPLE * math.ceil(
        max(max(len(t) for t, _ in batch) - 1, 1) / PAD_MULTIPLE
    )
    tokens, mask = (
        np.zeros((len(batch), T + 1), np.int32),
        np.zeros((len(batch), T), np.float32),
    )
    for row, (t, counted) in enumerate(batch):
        tokens[row, : len(t)] = t
        mask[row, : len(t) - 1] = counted[1:]  # target j is token j + 1
    return mx.array(tokens[:, :-1]), mx.array(tokens[:, 1:]), mx.array(mask)


# ---- Training ----------------------------------------------------------------------------------


def loss_fn(model, inputs, targets, mask):
    """(mean cross-entropy per counted token, number of counted tokens); the logits in float32."""
    logits = model(inputs).astype(mx.float32)
    n = mask.sum()
    return (nn.losses.cross_entropy(logits, targets) * mask).sum() / mx.maximum(n, 1), n


def make_step(model, optimizer, compile=None):
    """One training step on a batch: (loss, counted tokens, whether the loss and every gradient are finite).
    Compiled (the model, optimizer and random state its inputs and outputs) by default on a GPU only: on a
    CPU, MLX compiles by generating C++, which takes tens of seconds for each new kind of step and made the
    tiny test model's steps about 10% faster."""
    loss_and_grad = nn.value_and_grad(model, loss_fn)
    state = [model.state, optimizer.state, mx.random.state]
    compile = mx.default_device() == mx.gpu if compile is None else compile

    def step(inputs, targets, mask):
        (loss, n), grads = loss_and_grad(model, inputs, targets, mask)
        finite = mx.isfinite(loss)
        for _, g in tree_flatten(grads):
            finite = finite & mx.all(mx.isfinite(g))
        optimizer.update(model, grads)
        return loss, n, finite

    return mx.compile(step, inputs=state, outputs=state) if compile else step


def evaluate(model, examples, batch_size, max_batches=-1, seed=0):
    """(mean cross-entropy per counted token, counted tokens) over `max_batches` batches (-1: all) of
    `examples`, the same ones each time."""
    batches = batch_indices(examples, batch_size, drop_last=False)
    order = np.random.default_rng(seed).permutation(len(batches))
    total, count = 0.0, 0
    model.eval()
    for i in order[: max_batches if max_batches > 0 else None]:
        loss, n = loss_fn(model, *pad([examples[j] for j in batches[i]]))
        mx.eval(loss, n)
        total, count = total + loss.item() * n.item(), count + int(n.item())
    model.train()
    return total / count, count


class Stop:
    """Ctrl-C and SIGTERM: during training, a request to stop after the step under way (a second one
    stops at once); otherwise KeyboardInterrupt, which removes temporary files on its way out."""

    def __init__(self):
        self.training, self.requested = False, None
        signal.signal(signal.SIGINT, self)
        signal.signal(signal.SIGTERM, self)

    def __call__(self, signum, frame):
        if not self.training or self.requested:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name


def train(model, optimizer, train_set, valid_set, args, start_step, stop):
    """Train from start_step to args.iters, reporting, evaluating and saving as the flags say. Returns the
    exit status: 0 done, 130 stopped by a signal, 1 stopped by a non-finite loss."""
    step_fn, folder = make_step(model, optimizer), Path(args.adapter_path)
    batches = batch_indices(train_set, args.batch_size, drop_last=True)
    losses, tokens, tic = [], 0, time.perf_counter()
    report_validation(model, valid_set, args, start_step)
    stop.training = True
    for step in range(start_step + 1, args.iters + 1):
        epoch, k = divmod(
            step - 1, len(batches)
        )  # the data order depends only on the seed and the step
        batch = [
            train_set[j]
            for j in batches[
                np.random.default_rng([args.seed, epoch]).permutation(len(batches))[k]
            ]
        ]
        mx.random.seed(
            int(np.random.SeedSequence([args.seed, step]).generate_state(1)[0])
        )  # dropout's
        previous = (
            model.trainable_parameters(),
            tree_map(lambda x: x, optimizer.state),
        )  # the arrays, not copies
        loss, n, finite = step_fn(*pad(batch))
        mx.eval(loss, n, finite, model.trainable_parameters(), optimizer.state)
        if not finite.item():
            save_adapters(folder, *previous, step - 1)
            print(
                f"error: the loss or a gradient of step {step} is not finite (loss {loss.item()}); stopped before "
                f"its update, saved the adapters of step {step - 1} to {folder / ADAPTERS}; try a lower "
                "--learning-rate",
                file=sys.stderr,
            )
            return 1
        losses.append((loss.item(), int(n.item())))
        tokens += sum(len(t) - 1 for t, _ in batch)
        if (
            step % args.steps_per_report == 0
            or step == start_step + 1
            or step == args.iters
        ):
            report_training(
                step,
                args.iters,
                losses,
                tokens,
                time.perf_counter() - tic,
                step - start_step,
            )
            losses, tokens, tic = [], 0, time.perf_counter()
        if step == args.iters or (
            args.steps_per_eval and step % args.steps_per_eval == 0
        ):
            report_validation(model, valid_set, args, step)
        if step == args.iters or step % args.save_every == 0 or stop.requested:
            save_adapters(folder, model.trainable_parameters(), optimizer.state, step)
            print(f"step {step}: saved {folder / ADAPTERS}", flush=True)
        if stop.requested:
            print(
                f"{stop.requested}: stopped after step {step}; continue with --resume-adapter-file "
                f"{folder / ADAPTERS}",
                file=sys.stderr,
            )
            return 130
    stop.training = False
    return 0


def report_training(step, iters, losses, tokens, seconds, steps_done):
    loss = sum(l * n for l, n in losses) / max(sum(n for _, n in losses), 1)
    left = (iters - step) * seconds / len(losses)
    eta = f", about {left / 60:.1f} min left" if step < iters else ""
    eta = (
        " (the first step compiles on a GPU)"
        if steps_done == 1 and mx.default_device() == mx.gpu
        else eta
    )
    print(
        f"step {step}/{iters}: train loss {loss:.3f}, {len(losses) / seconds:.2f} steps/s, {tokens / seconds:,.0f} "
        f"tokens/s, peak memory {mx.get_peak_memory() / 1e9:.2f} GB{eta}",
        flush=True,
    )


def report_validation(model, valid_set, args, step):
    tic = time.perf_counter()
    loss, n = evaluate(model, valid_set, args.batch_size, args.val_batches, args.seed)
    print(
        f"step {step}/{args.iters}: valid loss {loss:.3f} ({n} tokens, {time.perf_counter() - tic:.1f} s)",
        flush=True,
    )


# ---- Command line ------------------------------------------------------------------------------


def lora_config(model, args):
    """The adapter configuration for a new training run, from the flags."""
    n = model.args.n_layers
    num_layers = (
        n
        if args.num_layers == -1
        else min(16, n)
        if args.num_layers is None
        else args.num_layers
    )
    if num_layers > n:
        raise AdapterError(
            f"--num-layers {num_layers}, but the model has {n} blocks; use -1 for all of them"
        )
    keys = list(LINEAR_KEYS) if "all" in args.keys else list(dict.fromkeys(args.keys))
    return {
        "rank": args.rank,
        "alpha": args.alpha,
        "scale": args.alpha / args.rank,
        "dropout": args.dropout,
        "layers": list(range(n - num_layers, n)),
        "keys": keys,
        "base_model": asdict(model.args),
    }


def prepare_training(model, args):
    """(optimizer, first step - 1): new adapters as the flags say, or those of --resume-adapter-file with the
    optimizer state and step saved beside them."""
    optimizer = optim.AdamW(
        learning_rate=args.learning_rate, bias_correction=True
    )  # PyTorch's AdamW
    if args.resume_adapter_file:
        config, adapters, training, step = read_adapters(args.resume_adapter_file)
        apply_adapters(model, config, adapters, args.resume_adapter_file)
    else:
        config, step = lora_config(model, args), 0
        linear_to_lora_layers(
            model, config["layers"], config["keys"], args.rank, args.alpha, args.dropout
        )
    optimizer.init(model.trainable_parameters())
    if args.resume_adapter_file:
        names = {k for k, _ in tree_flatten(optimizer.state)} - {"learning_rate"}
        if set(training) != names:
            raise AdapterError(
                f"{args.resume_adapter_file} has no optimizer state for these adapters; it was not "
                "written by lora.py --train"
            )
        optimizer.state = tree_map_with_path(
            lambda name, x: training.get(name, x), optimizer.state
        )
        print(
            f"resuming after step {step} with the adapters' own settings: rank {config['rank']}, alpha "
            f"{config['alpha']}, {'/'.join(config['keys'])} of blocks {config['layers'][0]}-{config['layers'][-1]}"
        )
    Path(args.adapter_path).mkdir(parents=True, exist_ok=True)
    save_config(Path(args.adapter_path), {**config, "base_model": asdict(model.args)})
    if args.grad_checkpoint:
        checkpoint_blocks(model)
    model.train()
    return optimizer, step


def run(args, stop):
    """Everything after the flags: returns the exit status."""
    tic = time.perf_counter()
    model = load_model(args.model)
    if args.fuse:
        return fuse_to_file(model, args)
    dequantizing_layers(model)  # a quantized model's products for training and --test
    tokenizer = load_tokenizer(args.tokenizer, model.args.vocab_size)
    print(
        f"loaded {args.model} in {time.perf_counter() - tic:.1f} s, {tokenizer.kind} tokenizer",
        flush=True,
    )
    data, status = Path(args.data), 0
    splits = ["train", "valid"] * args.train + [
        "test"
    ] * args.test  # all read and checked before any training
    sets = {name: load_data(data / f"{name}.jsonl", tokenizer, args) for name in splits}
    if args.train:
        if len(sets["train"]) < args.batch_size:
            raise DataError(
                f"{data / 'train.jsonl'} has {len(sets['train'])} examples, fewer than --batch-size "
                f"{args.batch_size}; lower --batch-size"
            )
        optimizer, start = prepare_training(model, args)
        if start >= args.iters:
            raise AdapterError(
                f"{args.resume_adapter_file} is already trained for {start} steps; give --iters "
                "above that"
            )
        q = model.args.quantization  # a packed uint32 holds 32 / bits weights
        total = sum(
            v.size * (32 // q["bits"] if q and v.dtype == mx.uint32 else 1)
            for _, v in tree_flatten(model.parameters())
        )
        trainable = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
        print(
            f"training steps {start + 1}-{args.iters}, {args.batch_size} examples a step, {trainable:,} trainable "
            f"parameters ({100 * trainable / total:.3f}% of the model)",
            flush=True,
        )
        warn_if_reference_blas()
        status = train(
            model, optimizer, sets["train"], sets["valid"], args, start, stop
        )
    elif (Path(args.adapter_path) / ADAPTERS).is_file():
        print(
            f"testing with the adapters of {args.adapter_path}{load_adapters(model, args.adapter_path)}"
        )
    else:
        print(f"no adapters in {args.adapter_path}: testing the model as it is")
    if args.test and status == 0:
        loss, n = evaluate(model, sets["test"], args.batch_size)
        print(
            f"test loss {loss:.3f}, perplexity {math.exp(min(loss, 700)):.3f} ({n} tokens)"
        )
    return status


def fuse_to_file(model, args):
    """--fuse: the model with the adapters of --adapter-path merged, written as convert.py writes a model."""
    from convert import save  # the format convert.py writes, configuration inside

    load_adapters(model, args.adapter_path)
    fuse(model)
    save(model.args, dict(tree_flatten(model.parameters())), args.save_path)
    dtype = str(model.norm.weight.dtype).removeprefix("mlx.core.")
    print(
        f"wrote {args.save_path}: the model with the adapters of {args.adapter_path} merged, {dtype}; run it "
        f'with llama.py {args.save_path} TOKENIZER "prompt"'
    )
    return 0


def number(kind, low=None, high=None, low_open=False):
    """An argparse type: `kind` in [low, high] (or (low, high] with low_open), finite."""

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not a{'n integer' if kind is int else ' number'}"
            ) from None
        if (
            not math.isfinite(value)
            or (low is not None and (value <= low if low_open else value < low))
            or (high is not None and value > high)
        ):
            bounds = f"{'(' if low_open else '['}{low}, {high if high is not None else 'inf'}]"
            raise argparse.ArgumentTypeError(f"{text} is not in {bounds}")
        return value

    return parse


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--model",
        required=True,
        help="the .safetensors or .npz file written by convert.py (4- or 8-bit "
        "from convert.py --quantize: QLoRA)",
    )
    p.add_argument(
        "--tokenizer",
        help="the model's tokenizer, as for llama.py (needed by --train and --test)",
    )
    p.add_argument(
        "--data",
        default="data",
        help="folder with train.jsonl, valid.jsonl, test.jsonl (default: data)",
    )
    p.add_argument("--train", action="store_true", help="train adapters")
    p.add_argument(
        "--test",
        action="store_true",
        help="report the loss and perplexity on test.jsonl (with the "
        "adapters of --adapter-path, if it holds any)",
    )
    p.add_argument(
        "--fuse",
        action="store_true",
        help="merge the adapters of --adapter-path into the model, write it "
        "to --save-path",
    )
    p.add_argument(
        "--save-path", help="the fused model to write with --fuse: .safetensors or .npz"
    )
    p.add_argument(
        "--adapter-path",
        default="adapters",
        help="folder for adapters.safetensors and adapter_config.json "
        "(default: adapters)",
    )
    p.add_argument(
        "--resume-adapter-file",
        help="continue training from this adapters.safetensors (its settings, "
        "optimizer state and step), up to --iters",
    )
    p.add_argument(
        "--num-layers",
        type=number(int, -1),
        help="adapt the last this many blocks; -1 for all (default: "
        "16, or all of a smaller model)",
    )
    p.add_argument(
        "--keys",
        nargs="+",
        choices=[*LINEAR_KEYS, "all"],
        default=["wq", "wv"],
        help="the linear layers of a block to adapt; all: wq wk wv wo w1 w2 w3 (default: wq wv)",
    )
    p.add_argument(
        "--rank",
        type=number(int, 1),
        default=8,
        help="rank of the adapters (default: 8)",
    )
    p.add_argument(
        "--alpha",
        type=number(float, 0, low_open=True),
        default=16.0,
        help="LoRA alpha; the adapters' output is scaled by alpha / rank (default: 16)",
    )
    p.add_argument(
        "--dropout",
        type=number(float, 0, 0.999),
        default=0.0,
        help="dropout on the adapters' input (default: 0)",
    )
    p.add_argument(
        "--batch-size",
        type=number(int, 1),
        default=4,
        help="examples per step (default: 4)",
    )
    p.add_argument(
        "--iters",
        type=number(int, 1),
        default=1000,
        help="training steps in all (default: 1000)",
    )
    p.add_argument(
        "--learning-rate",
        type=number(float, 0, low_open=True),
        default=1e-4,
        help="AdamW's learning rate (default: 1e-4)",
    )
    p.add_argument(
        "--steps-per-report",
        type=number(int, 1),
        default=10,
        help="steps between loss reports (default: 10)",
    )
    p.add_argument(
        "--steps-per-eval",
        type=number(int, 0),
        default=200,
        help="steps between validations; 0: only "
        "before and after training (default: 200)",
    )
    p.add_argument(
        "--val-batches",
        type=number(int, -1),
        default=25,
        help="validation batches; -1 for all (default: 25)",
    )
    p.add_argument(
        "--save-every",
        type=number(int, 1),
        default=100,
        help="steps between saves (default: 100)",
    )
    p.add_argument(
        "--max-seq-length",
        type=number(int, 2),
        default=2048,
        help="longest example in tokens; longer ones are cut (default: 2048)",
    )
    p.add_argument(
        "--mask-prompt",
        action="store_true",
        help="count only the completions and the assistant's replies in the loss",
    )
    p.add_argument(
        "--grad-checkpoint",
        action="store_true",
        help="recompute each block's activations in the backward "
        "pass: less memory, more time",
    )
    p.add_argument(
        "--seed",
        type=number(int, 0, 2**32 - 1),
        default=0,
        help="seed for the adapters' initialisation, "
        "the data order and dropout (default: 0)",
    )
    args = p.parse_args(argv)
    if not (args.train or args.test or args.fuse):
        p.error("say what to do: --train, --test or --fuse")
    if args.fuse and (args.train or args.test):
        p.error("--fuse is a step of its own; run it after --train")
    if args.fuse and (
        not args.save_path
        or Path(args.save_path).suffix not in (".safetensors", ".npz")
    ):
        p.error("--fuse needs --save-path ending in .safetensors or .npz")
    if not args.fuse and not args.tokenizer:
        p.error("--train and --test need --tokenizer")
    if args.num_layers == 0 or args.val_batches == 0:
        p.error("--num-layers and --val-batches must be -1 (all) or at least 1")
    if args.resume_adapter_file and not args.train:
        p.error("--resume-adapter-file needs --train")
    return args


def main():
    args = parse_args()
    mx.random.seed(args.seed)
    stop = Stop()
    try:
        sys.exit(run(args, stop))
    except (
        WeightsError,
        TokenizerError,
        DataError,
    ) as e:  # AdapterError is a WeightsError
        sys.exit(f"error: {e}")
    except OSError as e:  # an output that cannot be written
        sys.exit(
            f"error: cannot write {e.filename or args.adapter_path}: {e.strerror or e}"
        )
    except KeyboardInterrupt:
        print("interrupted; nothing saved since the last save", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
