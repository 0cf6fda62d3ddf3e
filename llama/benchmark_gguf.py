"""Load and decode a Q4_0 GGUF against the same model converted to .safetensors.

    python llama/benchmark_gguf.py --preset tiny      # seconds, on the CPU
    python llama/benchmark_gguf.py --preset 7b        # a Llama 2 7B shape, on a GPU

Writes a GGUF of random Q4_0 blocks (every matrix, the embedding and output included, as
`llama-quantize --pure` does), converts it with convert.py (4-bit in groups of 32, the
same values: what convert.py --quantize --q-group-size 32 writes), then, in fresh
processes so that each load is a cold start of Python with the files in the page cache,
times loading each (weights evaluated) and decoding --max-tokens tokens after a short
prompt."""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from llama import in_range

HERE = Path(__file__).resolve().parent
PRESETS = {
    "tiny": dict(
        dim=256, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=512, vocab=1024
    ),
    "1b": dict(
        dim=2048, n_layers=16, n_heads=16, n_kv_heads=16, hidden_dim=5632, vocab=32000
    ),
    "7b": dict(
        dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, hidden_dim=11008, vocab=32000
    ),
}


def random_q4_0(rows, columns, rng):
    """(rows, columns / 32 * 18) uint8 Q4_0 blocks: float16 scales of 0.01, random q."""
    blocks = rng.integers(0, 256, (rows, columns // 32, 18), dtype=np.uint8)
    blocks[..., :2] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
    return blocks.reshape(rows, -1)


def write_random_gguf(path, shape):
    import gguf
    from gguf import GGMLQuantizationType as T

    rng = np.random.default_rng(0)
    dim, hidden = shape["dim"], shape["hidden_dim"]
    kv = dim // shape["n_heads"] * shape["n_kv_heads"]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(shape["n_layers"])
    writer.add_context_length(4096)
    writer.add_embedding_length(dim)
    writer.add_feed_forward_length(hidden)
    writer.add_head_count(shape["n_heads"])
    writer.add_head_count_kv(shape["n_kv_heads"])
    writer.add_layer_norm_rms_eps(1e-5)
    matrices = {"token_embd": (shape["vocab"], dim), "output": (shape["vocab"], dim)}
    for i in range(shape["n_layers"]):
        matrices |= {
            f"blk.{i}.attn_q": (dim, dim),
            f"blk.{i}.attn_k": (kv, dim),
            f"blk.{i}.attn_v": (kv, dim),
            f"blk.{i}.attn_output": (dim, dim),
            f"blk.{i}.ffn_gate": (hidden, dim),
            f"blk.{i}.ffn_up": (hidden, dim),
            f"blk.{i}.ffn_down": (dim, hidden),
        }
        for norm in ("attn_norm", "ffn_norm"):
            writer.add_tensor(f"blk.{i}.{norm}.weight", np.ones(dim, np.float32))
    writer.add_tensor("output_norm.weight", np.ones(dim, np.float32))
    for name, (rows, columns) in matrices.items():
        blocks = random_q4_0(rows, columns, rng)
        writer.add_tensor(f"{name}.weight", blocks, raw_dtype=T.Q4_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


# Run in a fresh process: load one file, then decode; print {"load": s, "decode":
# tokens/s}.
CHILD = """
import json, sys, time
sys.path.insert(0, sys.argv[1])
import mlx.core as mx
path, max_tokens = sys.argv[2], int(sys.argv[3])
tic = time.perf_counter()
if path.endswith(".gguf"):
    from gguf_file import load_gguf
    model, _ = load_gguf(path, dtype=mx.float16)
else:
    from model import load_model
    model = load_model(path)
load = time.perf_counter() - tic
tokens = model.generate(mx.array([1, 2, 3, 4, 5]))
next(tokens)
tic = time.perf_counter()
for _ in range(max_tokens):
    next(tokens)
print(json.dumps({"load": load, "decode": max_tokens / (time.perf_counter() - tic)}))
"""


def measure(path, max_tokens):
    result = subprocess.run(
        [sys.executable, "-c", CHILD, str(HERE), str(path), str(max_tokens)],
        capture_output=True,
        text=True,
    )
    if result.returncode:
        sys.exit(f"error: measuring {path} failed:\n{result.stderr}")
    return json.loads(result.stdout.splitlines()[-1])


def summary(values):
    return f"{np.median(values):.3f} ({min(values):.3f}-{max(values):.3f})"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=PRESETS, default="tiny")
    runs, tokens = in_range(int, 1, 100), in_range(int, 1, 4096)
    parser.add_argument("--runs", type=runs, default=5, help="fresh processes per file")
    parser.add_argument("--max-tokens", type=tokens, default=128)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=".") as folder:
        gguf_path = Path(folder) / "random.Q4_0.gguf"
        safetensors = Path(folder) / "random.safetensors"
        write_random_gguf(gguf_path, PRESETS[args.preset])
        convert = [sys.executable, str(HERE / "convert.py"), gguf_path, safetensors]
        subprocess.run(convert, check=True, stdout=subprocess.DEVNULL)
        runs = {gguf_path: [], safetensors: []}
        for path in runs:  # once each, unmeasured: the files into the page cache
            measure(path, 4)
        for _ in range(args.runs):  # alternating, so that drift hits both
            for path, results in runs.items():
                results.append(measure(path, args.max_tokens))
        print(f"preset {args.preset}, {args.runs} runs, median (range)")
        for path, results in runs.items():
            load = summary([r["load"] for r in results])
            decode = summary([r["decode"] for r in results])
            print(f"{path.name:22} load {load} s, decode {decode} tokens/s")
        gguf_runs, st_runs = runs.values()
        load_ratio = np.median([r["load"] for r in gguf_runs]) / np.median(
            [r["load"] for r in st_runs]
        )
        decode_ratio = np.median([r["decode"] for r in gguf_runs]) / np.median(
            [r["decode"] for r in st_runs]
        )
        print(
            f"GGUF / safetensors: load time {load_ratio:.2f}x, "
            f"decode speed {decode_ratio:.2f}x"
        )


if __name__ == "__main__":
    main()
