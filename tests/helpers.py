"""Shared test helpers: import an example's modules, run its scripts, make tiny data."""

import contextlib
import gzip
import importlib
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


_LOADED = {}  # folder -> {bare name: module}, the modules import_example loaded from it


@contextlib.contextmanager
def example_modules(folder):
    """Run a block as `python FOLDER/script.py` sees the world: FOLDER first on sys.path, and its
    modules importable by their bare names (`model`, `convert`). Afterwards neither is left behind,
    so no other test, and no library, finds one (transformers imports a package named `kernels`;
    every folder has its own `model.py`). Modules loaded here are kept per folder, so a later block
    sees the same `model` module, and its classes, as the one before."""
    path = ROOT / folder
    if str(path) in sys.path:  # inside another block for this folder: it cleans up
        yield
        return
    names = {p.stem for p in path.glob("*.py")}
    before = {name: sys.modules.pop(name) for name in names & set(sys.modules)}
    loaded = _LOADED.setdefault(folder, {})
    sys.modules.update(loaded)
    sys.path.insert(0, str(path))
    try:
        yield
    finally:
        sys.path.remove(str(path))
        for name in names & set(sys.modules):
            loaded[name] = sys.modules.pop(name)
        sys.modules.update(before)  # another folder's modules of the same names


def import_example(folder, module):
    """Import FOLDER/MODULE.py as `python FOLDER/script.py` would see it (see example_modules)."""
    with example_modules(folder):
        return importlib.import_module(module)


def drop_example_modules():
    """Remove from sys.modules every module that an example folder's file left under a bare name."""
    folders = {p.parent for p in ROOT.glob("*/*.py") if p.parent.name != "tests"}
    for name, module in list(sys.modules.items()):
        file = getattr(module, "__file__", None)
        if "." not in name and file and Path(file).parent in folders:
            del sys.modules[name]


def run_script(script, *args, cwd=None, timeout=600, env=None):
    """Run `python ROOT/script args...` offline; return the CompletedProcess (never raises on failure)."""
    full_env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        **(env or {}),
    }
    return subprocess.run(
        [sys.executable, str(ROOT / script), *map(str, args)],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_with_unread_stdin(script, *args, timeout=120):
    """Run `python ROOT/script args...` offline with a line waiting on a stdin that never ends (this process
    holds the pipe's write end), so a script that read stdin would wait or take the line. Returns
    (returncode, stdout, stderr, what is still unread on stdin)."""
    import tempfile

    read_end, write_end = os.pipe()
    os.write(write_end, b"a line on stdin\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        process = subprocess.Popen(
            [sys.executable, str(ROOT / script), *map(str, args)],
            stdin=read_end,
            stdout=out,
            stderr=err,
            env=env,
            text=True,
        )
        try:
            returncode = process.wait(timeout=timeout)
        finally:
            process.kill()
        os.set_blocking(read_end, False)
        unread = os.read(read_end, 1000).decode()
        os.close(read_end), os.close(write_end)
        out.seek(0), err.seek(0)
        return returncode, out.read(), err.read(), unread


def write_idx(path, array, gz=False):
    """Write a uint8 array as an IDX file: magic 2051 for (N, rows, cols) images, 2049 for (N,) labels."""
    array = np.asarray(array, dtype=np.uint8)
    magic = {3: 2051, 1: 2049}[array.ndim]
    data = struct.pack(f">{1 + array.ndim}I", magic, *array.shape) + array.tobytes()
    opener = gzip.open if gz else open
    with opener(path, "wb") as f:
        f.write(data)


def tiny_mnist(directory, n_train=300, n_test=100, gz=True, seed=0):
    """Write a learnable MNIST-shaped data set: class k is noise plus a bright 4x4 square at a
    position that depends on k. Returns the directory."""
    rng = np.random.default_rng(seed)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 10, n)
        images = rng.integers(0, 60, (n, 28, 28))
        for i, k in enumerate(labels):
            r, c = 2 + 6 * (k // 4), 2 + 6 * (k % 4)
            images[i, r : r + 4, c : c + 4] = 255
        suffix = ".gz" if gz else ""
        write_idx(directory / f"{split}-images-idx3-ubyte{suffix}", images, gz)
        write_idx(directory / f"{split}-labels-idx1-ubyte{suffix}", labels, gz)
    return directory


BERT_WORDS = (
    "the a is of and to in this that it was for on are as with be at by an example bert working mlx "
    "second string another capital france paris"
)
BERT_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted(
    set(BERT_WORDS.split()) | set("abcdefghijklmnopqrstuvwxyz.,")
)


def tiny_bert(folder, hf_class=None, seed=0):
    """A tiny random BERT (`hf_class`, default BertForPreTraining) with its tokenizer, saved like a Hub folder."""
    import torch
    from transformers import BertConfig, BertForPreTraining, BertTokenizer

    hf_class = hf_class or BertForPreTraining
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(BERT_VOCAB) + "\n")
    tokenizer = BertTokenizer(str(folder / "vocab.txt"))
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(BERT_VOCAB),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        max_position_embeddings=64,
        type_vocab_size=2,
        layer_norm_eps=1e-12,
    )
    hf_class(config).eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def tiny_sentence_transformer(folder, pooling_mode="mean", normalize=True, seed=0):
    """A tiny random BERT (BertModel) saved as a sentence-transformers folder: Transformer, Pooling, [Normalize]."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import (
        Normalize,
        Pooling,
        Transformer,
    )  # version 6
    from transformers import BertModel

    bert = tiny_bert(
        Path(folder).with_name(Path(folder).name + "-bert"), BertModel, seed=seed
    )
    transformer = Transformer(str(bert))
    modules = [
        transformer,
        Pooling(transformer.get_embedding_dimension(), pooling_mode=pooling_mode),
    ]
    SentenceTransformer(modules=modules + [Normalize()] * normalize).save(str(folder))
    return Path(folder)


LLAMA_TEXT = [
    "call me ishmael some years ago never mind how long precisely",
    "having little or no money in my purse and nothing particular to interest me on shore",
    "i thought i would sail about a little and see the watery part of the world",
    "the quick brown fox jumps over the lazy dog, café and naïve words too",
] * 20


def tiny_sentencepiece(path, vocab_size=320):
    """Train a small BPE SentencePiece model (bos 1, eos 2, byte fallback, as Llama's) and write it to `path`."""
    import io

    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(LLAMA_TEXT),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        minloglevel=2,
    )
    Path(path).write_bytes(model.getvalue())
    return Path(path)


LLAMA_CONFIG = dict(
    vocab_size=320,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=192,
    rope_theta=5000.0,
    rms_norm_eps=1e-5,
    max_position_embeddings=96,
    tie_word_embeddings=False,
)
# The same model in Meta's params.json terms: 2/3 * 4 * 64 = 170, rounded up to a multiple of 32 = 192.
LLAMA_PARAMS = dict(
    dim=64,
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    vocab_size=-1,
    multiple_of=32,
    norm_eps=1e-5,
    rope_theta=5000.0,
)


def tiny_llama(folder, seed=0, max_shard_size=None, **overrides):
    """A tiny random LlamaForCausalLM (GQA, rope_theta 5000) saved like a Hub folder, with tokenizer.model.
    `max_shard_size` (e.g. "40KB") splits the weights into several safetensors files, as large models are."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**{**LLAMA_CONFIG, **overrides})).eval()
    with torch.no_grad():  # the default init (std 0.02) makes near-uniform logits; widen it so tokens differ
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.3)
    model.save_pretrained(
        folder, **({"max_shard_size": max_shard_size} if max_shard_size else {})
    )
    tiny_sentencepiece(folder / "tokenizer.model", LLAMA_CONFIG["vocab_size"])
    return folder


def hf_to_meta_state_dict(state_dict, n_heads=4, n_kv_heads=2):
    """Undo Hugging Face's Llama conversion: Meta names, and wq/wk rows back in interleaved-RoPE order."""
    import torch

    def unpermute(w, heads):  # inverse of convert_llama_weights_to_hf.permute
        out_dim, in_dim = w.shape
        return (
            w.view(heads, 2, out_dim // heads // 2, in_dim)
            .transpose(1, 2)
            .reshape(out_dim, in_dim)
        )

    names = {
        "model.embed_tokens.weight": "tok_embeddings.weight",
        "model.norm.weight": "norm.weight",
        "lm_head.weight": "output.weight",
    }
    parts = {
        "self_attn.q_proj": "attention.wq",
        "self_attn.k_proj": "attention.wk",
        "self_attn.v_proj": "attention.wv",
        "self_attn.o_proj": "attention.wo",
        "mlp.gate_proj": "feed_forward.w1",
        "mlp.down_proj": "feed_forward.w2",
        "mlp.up_proj": "feed_forward.w3",
        "input_layernorm": "attention_norm",
        "post_attention_layernorm": "ffn_norm",
    }
    meta = {}
    for name, w in state_dict.items():
        if name in names:
            meta[names[name]] = w.clone()
            continue
        _, _, i, *rest = name.split(".")
        part = parts[".".join(rest[:-1])]
        if part == "attention.wq":
            w = unpermute(w, n_heads)
        elif part == "attention.wk":
            w = unpermute(w, n_kv_heads)
        meta[f"layers.{i}.{part}.weight"] = w.clone()
    meta["rope.freqs"] = torch.zeros(
        8
    )  # Llama 2 checkpoints carry this buffer; the converter drops it
    return meta


def split_meta_state_dict(meta, n_shards):
    """Llama 2's model-parallel split: column-parallel weights on dim 0, row-parallel (wo, w2) and the
    embedding on dim 1, norms repeated in every shard."""
    shards = [{} for _ in range(n_shards)]
    for name, w in meta.items():
        if w.ndim == 1:
            pieces = [w.clone()] * n_shards
        else:
            axis = (
                1
                if name.endswith(("wo.weight", "w2.weight"))
                or name.startswith("tok_embeddings")
                else 0
            )
            pieces = [p.clone() for p in w.chunk(n_shards, dim=axis)]
        for shard, piece in zip(shards, pieces):
            shard[name] = piece
    return shards


def tiny_gpt2(folder, seed=0, tie=True):
    """A tiny random GPT2LMHeadModel saved like a Hub folder, with a byte-level BPE tokenizer
    (the 256 byte symbols, a few merges, and <|endoftext|>)."""
    import json

    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2Tokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    # GPT-2's byte-to-symbol table: printable bytes stand for themselves, the rest map to chr(256 + n).
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    others = [b for b in range(256) if b not in printable]
    table = {
        **{b: chr(b) for b in printable},
        **{b: chr(256 + n) for n, b in enumerate(others)},
    }
    symbols = [table[b] for b in range(256)]
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("Ġ", "a"), ("i", "n")]
    vocab = {
        s: i
        for i, s in enumerate(
            symbols + ["".join(m) for m in merges] + ["<|endoftext|>"]
        )
    }
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)
    )
    GPT2Tokenizer(
        str(folder / "vocab.json"), str(folder / "merges.txt")
    ).save_pretrained(folder)
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=len(vocab),
        n_positions=64,
        n_embd=32,
        n_layer=2,
        n_head=4,
        tie_word_embeddings=tie,
        bos_token_id=len(vocab) - 1,
        eos_token_id=len(vocab) - 1,
    )
    model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # GPT-2's init (std 0.02) gives near-uniform logits; widen it, and make biases nonzero
        for name, p in model.named_parameters():
            p.normal_(0, 0.2 if p.ndim == 2 else 0.1).add_(
                1.0 if "ln_" in name and name.endswith("weight") else 0
            )
    model.save_pretrained(folder)
    return folder


def tiny_lora_data(folder, kind="text", n_train=16, n_valid=4, n_test=4):
    """train.jsonl, valid.jsonl and test.jsonl for llama/lora.py from LLAMA_TEXT's sentences, one line per
    example of `kind`: "text", "completion" (the first three words are the prompt) or "messages" (a user
    message and the assistant's reply, split the same way). Returns the folder."""
    import json

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sentences = list(dict.fromkeys(LLAMA_TEXT))

    def example(sentence):
        words = sentence.split()
        prompt, rest = " ".join(words[:3]), " ".join(words[3:])
        if kind == "text":
            return {"text": sentence}
        if kind == "completion":
            return {"prompt": prompt, "completion": " " + rest}
        return {
            "messages": [
                {"role": "user", "content": prompt},
                {"role": "assistant", "content": rest},
            ]
        }

    start = 0
    for split, n in (("train", n_train), ("valid", n_valid), ("test", n_test)):
        lines = [
            json.dumps(example(sentences[(start + i) % len(sentences)]))
            for i in range(n)
        ]
        (folder / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
        start += n
    return folder
