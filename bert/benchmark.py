"""Forward throughput (sequences/s) of the MLX BERT against transformers' BertModel (SDPA attention).

    python bert/benchmark.py                                   # bert-base shape, CPU, float32
    python bert/benchmark.py --device gpu --dtype float16 --shapes 32x128
    python bert/benchmark.py --tiny --repeats 1                # a tiny model, for a quick check

Random weights, no download. Each row: median seconds per forward pass of each framework, the
throughput, and the ratio (above 1: MLX is faster). On Linux CPU, preload OpenBLAS first (see the
README); PyTorch is then timed in a child process without LD_PRELOAD, since the preload would also
replace PyTorch's own MKL.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import torch

from model import DTYPES, Bert, BertConfig

BASE = dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
            intermediate_size=3072, max_position_embeddings=512)
TINY = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=37, max_position_embeddings=64)


def warn_if_reference_blas():
    """mlx[cpu] on Linux ships netlib's reference BLAS (~30x slower matmul) unless OpenBLAS is preloaded."""
    if not sys.platform.startswith("linux"):
        return
    with open("/proc/self/maps") as f:
        libs = {line.split()[-1] for line in f if "/" in line}
    reference = any("mlx_cpu.libs/libblas" in lib for lib in libs)
    openblas = any(lib.rsplit("/", 1)[-1].startswith("libopenblas") for lib in libs)
    if reference and not openblas:
        print("warning: MLX is using the reference BLAS bundled with mlx[cpu] (slow matmul); "
              "see README.md to preload OpenBLAS", file=sys.stderr)


def median_seconds(fn, repeats, warmup=2):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        tic = time.perf_counter()
        fn()
        times.append(time.perf_counter() - tic)
    return statistics.median(times)


def batch(vocab_size, B, T, seed=0):
    """Token ids and an attention mask with some padding in every row after the first."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab_size, (B, T)).astype(np.int32)
    lengths = np.maximum(1, T - rng.integers(0, T // 4 + 1, B))
    lengths[0] = T
    mask = (np.arange(T)[None, :] < lengths[:, None]).astype(np.int32)
    return ids, mask


def time_mlx(config, shapes, dtype, repeats, compiled):
    model = Bert(BertConfig(**config))
    model.set_dtype(DTYPES[dtype])
    model.eval()
    mx.eval(model.parameters())
    forward = mx.compile(model) if compiled else model
    result = {}
    for B, T in shapes:
        ids, mask = (mx.array(a) for a in batch(config["vocab_size"], B, T))
        result[f"{B}x{T}"] = median_seconds(lambda: mx.eval(forward(ids, attention_mask=mask)), repeats)
    return result


def time_torch(config, shapes, dtype, repeats, device):
    from transformers import BertConfig as HFConfig, BertModel

    hf_config = HFConfig(**config, attn_implementation="sdpa")
    model = BertModel(hf_config).to(device=device, dtype=getattr(torch, dtype)).eval()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    result = {}
    for B, T in shapes:
        ids, mask = (torch.from_numpy(a).long().to(device) for a in batch(config["vocab_size"], B, T))

        def forward():
            with torch.inference_mode():
                model(input_ids=ids, attention_mask=mask)
            sync()

        result[f"{B}x{T}"] = median_seconds(forward, repeats)
    return result


def profile_layer(config, B, T, dtype, repeats):
    """{piece: (MLX ms, PyTorch ms or None)} for one MLX encoder layer at (B, T): where does the time go?"""
    D, F, H = config["hidden_size"], config["intermediate_size"], config["num_attention_heads"]
    dt = DTYPES[dtype]
    x, h = mx.random.normal((B * T, D)).astype(dt), mx.random.normal((B * T, F)).astype(dt)
    w_d, w_up, w_down = (mx.random.normal(s).astype(dt) for s in [(D, D), (F, D), (D, F)])
    q = mx.random.normal((B, H, T, D // H)).astype(dt)
    norm = mx.fast.layer_norm
    mx.eval(x, h, w_d, w_up, w_down, q)
    pieces = {
        "4 attention projections (B*T, D) @ (D, D)": lambda: [x @ w_d.T for _ in range(4)],
        "feed-forward up + down matmuls": lambda: [x @ w_up.T, h @ w_down.T],
        "GELU (exact, erf) on (B*T, 4D)": lambda: nn.gelu(h),
        "scaled_dot_product_attention": lambda: mx.fast.scaled_dot_product_attention(q, q, q, scale=0.125),
        "2 LayerNorms on (B*T, D)": lambda: [norm(x, None, None, 1e-12) for _ in range(2)],
        "exp on (B*T, 4D), for scale": lambda: mx.exp(h),
        "multiply on (B*T, 4D), for scale": lambda: h * h,
    }
    # The element-wise pieces in PyTorch on the same device, for comparison (no BLAS involved).
    th = torch.randn(B * T, F, dtype=getattr(torch, dtype), device="cuda" if mx.default_device() == mx.gpu else "cpu")
    sync = torch.cuda.synchronize if th.is_cuda else (lambda: None)
    torch_pieces = {
        "GELU (exact, erf) on (B*T, 4D)": lambda: torch.nn.functional.gelu(th),
        "exp on (B*T, 4D), for scale": lambda: torch.exp(th),
        "multiply on (B*T, 4D), for scale": lambda: th * th,
    }
    result = {}
    for name, fn in pieces.items():
        ms_mlx = 1e3 * median_seconds(lambda: mx.eval(fn()), repeats)
        ms_torch = 1e3 * median_seconds(lambda: (torch_pieces[name](), sync()), repeats) if name in torch_pieces else None
        result[name] = (ms_mlx, ms_torch)
    return result


def torch_in_child(argv):
    """Rerun this script for PyTorch alone, without LD_PRELOAD; returns its {shape: seconds}."""
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    result = subprocess.run([sys.executable, __file__, *argv, "--only", "torch"],
                            env=env, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"error: the PyTorch child process failed: {result.stderr.strip().splitlines()[-1:]}")
    return json.loads(result.stdout.splitlines()[-1])


def parse_shape(text):
    try:
        B, T = (int(x) for x in text.lower().split("x"))
        assert B > 0 and T > 0
    except (ValueError, AssertionError):
        raise argparse.ArgumentTypeError(f"expected BATCHxTOKENS such as 8x128, got {text!r}") from None
    return B, T


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description="BERT forward throughput, MLX vs transformers (PyTorch).")
    parser.add_argument("--shapes", type=parse_shape, nargs="+", default=[(8, 128), (1, 16)],
                        help="batch shapes as BATCHxTOKENS (default: 8x128 1x16)")
    parser.add_argument("--device", choices=["cpu", "gpu"], default="cpu",
                        help="cpu, or gpu: MLX's GPU backend against PyTorch on CUDA (default: cpu)")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32", help="weights and activations (default: float32)")
    parser.add_argument("--repeats", type=int, default=10, help="timed forward passes; the median is used (default: 10)")
    parser.add_argument("--tiny", action="store_true", help="a tiny 2-layer model instead of bert-base (for tests)")
    parser.add_argument("--profile", action="store_true",
                        help="instead, time the pieces of one MLX encoder layer at the first shape")
    parser.add_argument("--only", choices=["torch"], help=argparse.SUPPRESS)  # used by torch_in_child
    args = parser.parse_args(argv)
    config = TINY if args.tiny else BASE
    if max(T for _, T in args.shapes) > config["max_position_embeddings"]:
        parser.error(f"sequences longer than {config['max_position_embeddings']} tokens do not fit the model")

    torch_device = "cuda" if args.device == "gpu" else "cpu"
    if args.only == "torch":
        print(json.dumps(time_torch(config, args.shapes, args.dtype, args.repeats, torch_device)))
        return
    if args.device == "gpu":
        if not mx.is_available(mx.gpu) or not torch.cuda.is_available():
            sys.exit("error: --device gpu needs MLX's GPU backend and PyTorch with CUDA; use --device cpu")
        mx.set_default_device(mx.gpu)
    else:
        mx.set_default_device(mx.cpu)
        warn_if_reference_blas()

    if args.profile:
        B, T = args.shapes[0]
        print(f"one {'tiny' if args.tiny else 'bert-base'} layer at {B}x{T}, {args.dtype}, "
              f"MLX {mx.__version__} on {mx.default_device()}, median ms of {args.repeats}; "
              f"the element-wise pieces also in PyTorch {torch.__version__}:")
        print(f"  {'MLX':>8}  {'PyTorch':>8}")
        for name, (ms, ms_torch) in profile_layer(config, B, T, args.dtype, args.repeats).items():
            print(f"  {ms:8.2f}  {ms_torch if ms_torch is not None else float('nan'):8.2f}  {name}")
        return

    separate = args.device == "cpu" and "LD_PRELOAD" in os.environ
    t_torch = torch_in_child(argv) if separate else time_torch(config, args.shapes, args.dtype, args.repeats, torch_device)
    t_mlx = time_mlx(config, args.shapes, args.dtype, args.repeats, compiled=False)
    t_mlx_compiled = time_mlx(config, args.shapes, args.dtype, args.repeats, compiled=True)

    gpu = f" ({torch.cuda.get_device_name()})" if args.device == "gpu" else ""
    print(f"{'bert-base' if not args.tiny else 'tiny'} shape, random weights, {args.dtype}, "
          f"median of {args.repeats}; MLX {mx.__version__} on {mx.default_device()}{gpu}; "
          f"PyTorch {torch.__version__} on {torch_device}"
          f"{' (in a child process without LD_PRELOAD)' if separate else ''}, transformers SDPA attention")
    print(f"{'shape':>7} {'MLX seq/s':>10} {'MLX compiled':>13} {'PyTorch seq/s':>14} {'MLX/PyTorch':>12}")
    for shape in t_mlx:
        B = int(shape.split("x")[0])
        best = min(t_mlx[shape], t_mlx_compiled[shape])
        print(f"{shape:>7} {B / t_mlx[shape]:>10.1f} {B / t_mlx_compiled[shape]:>13.1f} "
              f"{B / t_torch[shape]:>14.1f} {t_torch[shape] / best:>11.2f}x")


if __name__ == "__main__":
    main()
