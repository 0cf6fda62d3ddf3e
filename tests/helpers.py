"""Shared test helpers: import an example's modules, run its scripts, make tiny data."""

import gzip
import importlib
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def import_example(folder, module):
    """Import FOLDER/MODULE.py as `python FOLDER/script.py` would see it (its folder first on sys.path).

    Every example has its own `model.py`, so a module cached from another folder is dropped first.
    """
    path = ROOT / folder
    for name in [p.stem for p in path.glob("*.py")]:
        cached = sys.modules.get(name)
        if cached is not None and Path(getattr(cached, "__file__", "") or "").parent != path:
            del sys.modules[name]
    sys.path.insert(0, str(path))
    try:
        return importlib.import_module(module)
    finally:
        sys.path.remove(str(path))


def run_script(script, *args, cwd=None, timeout=600, env=None):
    """Run `python ROOT/script args...` offline; return the CompletedProcess (never raises on failure)."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, str(ROOT / script), *map(str, args)],
        cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout,
    )


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


BERT_WORDS = ("the a is of and to in this that it was for on are as with be at by an example bert working mlx "
              "second string another capital france paris")
BERT_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted(set(BERT_WORDS.split()) | set("abcdefghijklmnopqrstuvwxyz.,"))


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
    config = BertConfig(vocab_size=len(BERT_VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=37, max_position_embeddings=64, type_vocab_size=2, layer_norm_eps=1e-12)
    hf_class(config).eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
