"""Prompt and decoding speed of this MLX Llama against transformers'
LlamaForCausalLM.generate.

    python llama/benchmark.py  # --preset small, CPU, float32
    # A 7B-shaped model on a GPU; Llama 3.1 8B's shape:
    python llama/benchmark.py --device gpu --preset 7b --dtype float16
    python llama/benchmark.py --device gpu --preset 8b --dtype float16
    python llama/benchmark.py --preset tiny --max-tokens 8 --repeats 1  # a quick check
    # Matrix-vector GB/s; 4-bit against float16:
    python llama/benchmark.py --profile --device gpu --preset 7b --dtype float16
    python llama/benchmark.py --device gpu --preset 7b --dtype float16 --quantize 4 \
        --time-load

Both frameworks run the same random weights (made by PyTorch with --seed, then
converted; nothing is downloaded). For each: prompt tokens/s (one pass over a
--prompt-tokens prompt, computing the last position's logits only, as generation does)
and decoding tokens/s (one sequence, greedy, --max-tokens new tokens, after the first),
medians of --repeats.

Decoding one sequence reads every weight once per token, so decode tokens/s x weight
bytes is the memory bandwidth achieved. The script measures the device's copy bandwidth
(PyTorch) and reports the fraction of that ceiling (copy bandwidth / weight bytes
tokens/s) that decoding reaches.

With --quantize 4 or 8 the comparison is MLX against MLX instead (PyTorch only makes the
weights and measures the copy bandwidth): the --dtype model, then the same model
quantized as convert.py --quantize does it (--q-group-size), each timed as above, with
the bytes of the quantized weights for the bandwidth, the peak memory while generating
(mx.get_peak_memory), and how far the quantized model's logits over the prompt are from
the --dtype model's: mean KL divergence and how often the most likely token is the same.
"""

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import torch
from convert import hf_args, hf_to_mlx_name, save, torch_to_mx
from model import Llama, load_model, warn_if_reference_blas
from quantize import quantize
from timing import generate_runs, host_seconds, say

from llama import in_range

# Hugging Face LlamaConfig fields. "7b" is Llama 2 7B's shape; "8b" Llama 3.1 8B's: GQA
# with 8 key/value heads, a 128,256-token vocabulary, and scaled RoPE.
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
PRESETS = {
    "tiny": dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=192,
        vocab_size=320,
    ),
    "small": dict(
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_key_value_heads=4,
        intermediate_size=2048,
        vocab_size=32000,
    ),
    "7b": dict(
        hidden_size=4096,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        intermediate_size=11008,
        vocab_size=32000,
    ),
    "8b": dict(
        hidden_size=4096,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        intermediate_size=14336,
        vocab_size=128256,
        rope_parameters=LLAMA3_ROPE,
        max_position_embeddings=131072,
    ),
}
DTYPES = ["float32", "float16", "bfloat16"]
DTYPES_MX = {name: getattr(mx, name) for name in DTYPES}


def torch_model(preset, dtype, device, seed):
    """The random-weight transformers Llama for `preset`, built directly in `dtype` on
    `device`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        **{"max_position_embeddings": 4096, **PRESETS[preset]},
        attn_implementation="sdpa",
    )
    default = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, dtype))  # a 7B model never exists in float32
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(default)
    return model


def mlx_model(hf_model):
    """The same weights in this example's Llama, configured and named as convert.py does
    it."""
    model = Llama(hf_args(hf_model.config.to_dict()))
    weights = []
    for name, tensor in hf_model.state_dict().items():
        array = torch_to_mx(tensor.detach().cpu())
        weights.append((hf_to_mlx_name(name), array))
        mx.eval(
            array
        )  # one tensor at a time, so that peak host memory stays near one copy
    model.load_weights(weights)
    mx.eval(model.parameters())
    return model


def prompt_ids(vocab_size, n, seed):
    return torch.randint(
        3, vocab_size, (n,), generator=torch.Generator().manual_seed(seed)
    ).tolist()


def time_mlx(model, prompt, max_tokens, repeats, label="MLX"):
    """Median (prompt seconds, seconds per decoded token) of model.generate, as llama.py
    runs it."""
    runs = generate_runs(model, prompt, max_tokens, repeats, label=label)
    return [statistics.median(r[i] for r in runs) for i in (0, 1)]


def time_torch(hf_model, prompt, max_tokens, repeats, device):
    """Median (prompt seconds, seconds per decoded token) of transformers: a forward
    pass over the prompt, and generate() for max_tokens greedy tokens, minus that prompt
    pass."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    ids = torch.tensor([prompt], device=device)
    prefill, decode = [], []
    for i in range(repeats + 1):
        start = time.perf_counter()
        with torch.inference_mode():
            sync()
            tic = time.perf_counter()
            hf_model(
                ids, use_cache=True, logits_to_keep=1
            )  # the last position's logits, as generate() and MLX
            sync()
            prefill.append(time.perf_counter() - tic)
            tic = time.perf_counter()
            hf_model.generate(
                ids,
                max_new_tokens=max_tokens,
                min_new_tokens=max_tokens,
                do_sample=False,
                pad_token_id=0,
            )
            sync()
            decode.append((time.perf_counter() - tic - prefill[-1]) / (max_tokens - 1))
        if i == 0:
            seconds = time.perf_counter() - start
            say(
                f"PyTorch: warm-up run {seconds:.1f} s; {repeats} timed "
                f"run{'s' * (repeats > 1)}, about {repeats * seconds:.0f} s"
            )
    return statistics.median(prefill[1:]), statistics.median(decode[1:])


def median_seconds(fn, repeats):
    """Median seconds of fn() over `repeats` calls, after one warm-up call. fn must wait
    for its work."""
    fn()
    times = []
    for _ in range(repeats):
        tic = time.perf_counter()
        fn()
        times.append(time.perf_counter() - tic)
    return statistics.median(times)


def copy_bandwidth(device, repeats=5):
    """Bytes per second read plus written by a 1 GiB copy (PyTorch's copy_,
    multithreaded on a CPU)."""
    x = torch.ones(2**28, device=device)
    y = torch.empty_like(x)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    return 2 * x.nbytes / median_seconds(lambda: (y.copy_(x), sync()), repeats)


def profile_matvec(preset, dtype, device, repeats):
    """[(what, MLX GB/s, PyTorch GB/s)] for each weight shape of the preset: one token
    through many different matrices of that shape (more than a GPU's cache holds), and a
    plain read (a sum, 1 GiB on a GPU) for the bandwidth the memory gives each
    framework."""
    c = PRESETS[preset]
    D, F, V = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    KV = D // c["num_attention_heads"] * c["num_key_value_heads"]
    shapes = {
        "wq, wo": (D, D),
        "wk, wv": (KV, D),
        "w1, w3": (F, D),
        "w2": (D, F),
        "output": (V, D),
    }
    tdevice = "cuda" if device == "gpu" else "cpu"
    sync = torch.cuda.synchronize if device == "gpu" else (lambda: None)
    total = 2**30 if device == "gpu" else 2**28  # bytes of weights per shape

    def gbps(nbytes, fn):
        return nbytes / median_seconds(fn, repeats) / 1e9

    rows = []
    for name, (N, K) in shapes.items():
        count = min(64, max(2, total // (N * K * DTYPES_MX[dtype].size)))
        ws = [mx.random.normal((N, K)).astype(DTYPES_MX[dtype]) for _ in range(count)]
        x = mx.random.normal((K,)).astype(DTYPES_MX[dtype])
        mx.eval(ws, x)
        nbytes = sum(w.nbytes for w in ws)
        plain = gbps(nbytes, lambda: mx.eval([x @ w.T for w in ws]))
        tws = [
            torch.randn(N, K, dtype=getattr(torch, dtype), device=tdevice)
            for _ in range(count)
        ]
        tx = torch.randn(K, dtype=getattr(torch, dtype), device=tdevice)
        ref = gbps(
            nbytes, lambda: ([torch.nn.functional.linear(tx, w) for w in tws], sync())
        )
        rows.append((f"{name} ({N}x{K}) x{count}", plain, ref))
    big = mx.ones((total // DTYPES_MX[dtype].size,), DTYPES_MX[dtype])
    tbig = torch.ones(
        total // DTYPES_MX[dtype].size, dtype=getattr(torch, dtype), device=tdevice
    )
    rows.append(
        (
            f"read {total >> 20} MiB (a sum)",
            gbps(big.nbytes, lambda: mx.eval(big.sum())),
            gbps(big.nbytes, lambda: (tbig.sum(), sync())),
        )
    )
    return rows


def time_load(model, repeats=3, suffixes=(".npz", ".safetensors")):
    """{suffix: (median seconds of load_model, median seconds of load_model plus one
    token, file bytes, peak memory of load_model plus one token beyond what was in use
    before)} for the model saved in each format, read from the page cache. The token
    counts because a GPU may only fetch the weights when it first uses them (MLX's CUDA
    backend keeps arrays in managed memory)."""
    weights = dict(nn.utils.tree_flatten(model.parameters()))
    result = {}
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as folder:
        for suffix in suffixes:
            path = Path(folder) / f"weights{suffix}"
            save(model.args, weights, path)
            times = []
            for _ in range(
                repeats + 1
            ):  # the first read brings the file into the page cache
                mx.clear_cache()
                in_use = mx.get_active_memory()
                mx.reset_peak_memory()
                tic = time.perf_counter()
                loaded = load_model(path)
                loaded_at = time.perf_counter()
                mx.eval(loaded(mx.array([[1]])))
                times.append(
                    (
                        loaded_at - tic,
                        time.perf_counter() - tic,
                        mx.get_peak_memory() - in_use,
                    )
                )
                del loaded
            load, first, peak = (
                statistics.median(t[i] for t in times[1:]) for i in (0, 1, 2)
            )
            result[suffix] = (load, first, path.stat().st_size, peak)
            path.unlink()
    return result


def logit_distance(reference, logits):
    """(mean KL(p_reference || p), fraction of positions whose most likely token is the
    same) for (..., vocab) logits, computed in float32: how far a quantized model's
    predictions are from the original's."""
    reference, logits = reference.astype(mx.float32), logits.astype(mx.float32)
    log_p = reference - mx.logsumexp(reference, axis=-1, keepdims=True)
    log_q = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    kl = mx.sum(mx.exp(log_p) * (log_p - log_q), axis=-1)
    same = mx.argmax(reference, axis=-1) == mx.argmax(logits, axis=-1)
    return mx.mean(kl).item(), mx.mean(same).item()


def parameter_bytes(model):
    return sum(p.nbytes for _, p in nn.utils.tree_flatten(model.parameters()))


def quantized_copy(model, group_size, bits):
    """A copy of `model` quantized as convert.py --quantize does it, evaluated; `model`
    is unchanged."""
    copy = Llama(replace(model.args, quantization=None))
    copy.update(model.parameters())  # the same arrays, not copies
    quantize(copy, group_size, bits)
    copy.args = replace(
        copy.args, quantization={"group_size": group_size, "bits": bits}
    )
    mx.eval(copy.parameters())
    return copy


def compare_quantized(model, prompt, args, torch_device):
    """Time `model` (args.dtype), then copies quantized to each of args.quantize bits
    (groups of args.q_group_size), as this example runs them. Prints speed, bandwidth,
    peak memory while generating and the logit distance from `model` over the prompt."""
    group_size = args.q_group_size
    reference = model(
        mx.array([prompt])
    )  # (1, T, vocab): every prompt position's logits
    mx.eval(reference)
    # (name, prompt seconds, seconds per token, weight bytes, peak bytes, (build,
    # launch) seconds, quality)
    rows = []

    def measure(name, model, in_use=0, quality=None):
        mx.clear_cache()
        mx.reset_peak_memory()
        prompt_seconds, token_seconds = time_mlx(
            model, prompt, args.max_tokens, args.repeats, f"MLX {name}"
        )
        # The quantized models' peak is counted beyond what was in use before they were
        # made (the float model kept for comparison): their weights, KV cache and
        # activations.
        rows.append(
            (
                name,
                prompt_seconds,
                token_seconds,
                parameter_bytes(model),
                mx.get_peak_memory() - in_use,
                host_seconds(model, prompt),
                quality,
            )
        )

    measure(args.dtype, model)
    for bits in args.quantize:
        mx.clear_cache()
        in_use = mx.get_active_memory()
        quantized = quantized_copy(model, group_size, bits)
        quality = logit_distance(reference, quantized(mx.array([prompt])))
        measure(f"{bits}-bit", quantized, in_use, quality)
        # the file convert.py --quantize would write, in the format this README
        # recommends
        if args.time_load:
            report_load(
                quantized, 1, suffixes=(".safetensors",), label=f"{bits}-bit: "
            )  # one timed load
        del quantized
    print_quantized(rows, args, copy_bandwidth(torch_device))


def print_quantized(rows, args, bandwidth):
    """compare_quantized's table: one row per model, the first (args.dtype) the
    reference of the ratios."""
    gpu = f" ({torch.cuda.get_device_name()})" if args.device == "gpu" else ""
    print(
        f"{args.preset} preset, random weights, {args.dtype} and quantized (MLX "
        f"affine, groups of {args.q_group_size}), "
        f"prompt {args.prompt_tokens} tokens, {args.max_tokens} new tokens, greedy, "
        f"median of {args.repeats}; MLX {mx.__version__} on {mx.default_device()}{gpu}"
    )
    print(
        f"copy bandwidth (PyTorch copy_, read + write): {bandwidth / 1e9:.1f} GB/s. "
        "Peak memory: "
        f"mx.get_peak_memory while generating (quantized: beyond the {args.dtype} "
        "model kept for comparison). "
        f"Quality: the logits over the prompt against {args.dtype}'s. Build, launch: "
        "the host's time per decoding "
        "step to make its graph (Python) and to turn it into kernels for the device "
        "(mx.async_eval), overlapped "
        "with the device's previous step; when their sum exceeds the step time, the "
        "host sets the pace."
    )
    print(
        f"{'':>18} {'weights':>8} {'prompt':>9} {'':>6} {'decoding':>9} {'':>6} "
        f"{'':>7} {'ceiling':>8} {'':>5} "
        f"{'peak':>6} {'build':>6} {'launch':>6} {'mean KL':>8} {'same':>6}"
    )
    print(
        f"{'':>18} {'GB':>8} {'tokens/s':>9} {'':>6} {'tokens/s':>9} {'':>6} "
        f"{'GB/s':>7} {'tokens/s':>8} {'':>5} "
        f"{'GB':>6} {'ms':>6} {'ms':>6} {'nats':>8} {'top-1':>6}"
    )
    first_prompt, first_token = rows[0][1], rows[0][2]
    for name, prompt_seconds, token_seconds, nbytes, peak, (
        build,
        launch,
    ), quality in rows:
        kl, same = (
            (f"{quality[0]:.4f}", f"{100 * quality[1]:.1f}%") if quality else ("", "")
        )
        print(
            f"{name:>18} {nbytes / 1e9:>8.2f} "
            f"{args.prompt_tokens / prompt_seconds:>9.1f} "
            f"{first_prompt / prompt_seconds:>5.2f}x {1 / token_seconds:>9.1f} "
            f"{first_token / token_seconds:>5.2f}x "
            f"{nbytes / token_seconds / 1e9:>7.1f} {bandwidth / nbytes:>8.0f} "
            f"{100 * nbytes / token_seconds / bandwidth:>4.0f}% {peak / 1e9:>6.2f} "
            f"{build * 1e3:>6.2f} {launch * 1e3:>6.2f} {kl:>8} {same:>6}"
        )


def report_load(model, repeats, suffixes=(".npz", ".safetensors"), label=""):
    for suffix, (load, first, nbytes, peak) in time_load(
        model, repeats, suffixes
    ).items():
        print(
            f"{label}load_model from {suffix} in the page cache: {load:.2f} s; with "
            f"the first token: {first:.2f} s; "
            f"file {nbytes / 1e9:.2f} GB; peak memory of loading and the first token "
            f"{peak / 1e9:.2f} GB"
        )


def torch_in_child(argv):
    """Rerun this script for PyTorch alone, without LD_PRELOAD; returns its timings. Its
    progress lines and errors go to this process's stderr."""
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    result = subprocess.run(
        [sys.executable, __file__, *argv, "--only", "torch"],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    if result.returncode != 0:
        sys.exit("error: the PyTorch child process failed (its error is above)")
    return json.loads(result.stdout.splitlines()[-1])


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description="Llama prompt and decoding tokens/s, MLX vs transformers.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add = parser.add_argument
    add(
        "--preset",
        choices=list(PRESETS),
        default="small",
        help="tiny (tests), small (~125M, a CPU), 7b (Llama 2 7B), 8b (Llama 3.1 8B)",
    )
    add("--device", choices=["cpu", "gpu"], default="cpu", help="gpu: against CUDA")
    add("--dtype", choices=DTYPES, default="float32", help="weights and activations")
    add("--prompt-tokens", type=in_range(int, 1, 4094), default=128, help="length")
    add("--max-tokens", type=in_range(int, 2, 4095), default=64, help="per run")
    add("--repeats", type=in_range(int, 1, 1000), default=3, help="after a warm-up")
    add("--seed", type=in_range(int, 0, 2**63 - 1), default=0, help="weights, prompt")
    add(
        "--time-load",
        action="store_true",
        help="also time load_model of the weights saved to a temporary file (page "
        "cache), alone and with the first token",
    )
    add(
        "--profile",
        action="store_true",
        help="instead: GB/s of one-token matrix-vector products per weight shape",
    )
    add(
        "--quantize",
        type=int,
        nargs="+",
        choices=[4, 8],
        help="instead of PyTorch, compare with the model quantized to these bits (as "
        "convert.py --quantize does): speed, peak memory, KL divergence of the logits",
    )
    add("--q-group-size", type=int, choices=[32, 64, 128], default=64)
    add("--only", choices=["torch"], help=argparse.SUPPRESS)  # for torch_in_child
    args = parser.parse_args(argv)
    if args.quantize and args.profile:
        parser.error("--profile and --quantize are separate measurements; give one")
    if args.prompt_tokens + args.max_tokens > 4096:
        parser.error(
            "--prompt-tokens plus --max-tokens must fit the 4096-token context"
        )
    return args


def select_device(args):
    if args.device == "gpu":
        if not mx.is_available(mx.gpu) or not torch.cuda.is_available():
            sys.exit(
                "error: --device gpu needs MLX's GPU backend and PyTorch with CUDA; "
                "use --device cpu"
            )
        mx.set_default_device(mx.gpu)
    else:
        mx.set_default_device(mx.cpu)
        warn_if_reference_blas()


def print_profile(args, torch_device):
    say(
        f"timing one-token products with each {args.preset}-preset weight shape, "
        "MLX then PyTorch"
    )
    print(
        f"one token through {args.preset}-preset {args.dtype} weight shapes, GB/s "
        "of weights read, median of "
        f"{args.repeats}; MLX {mx.__version__} on {mx.default_device()}; PyTorch "
        f"{torch.__version__} on {torch_device}"
    )
    print(f"{'shape':>32} {'MLX x @ W.T':>12} {'PyTorch':>9}")
    for name, plain, ref in profile_matvec(
        args.preset, args.dtype, args.device, args.repeats
    ):
        print(f"{name:>32} {plain:>12.0f} {ref:>9.0f}")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    torch_device = "cuda" if args.device == "gpu" else "cpu"
    prompt = prompt_ids(
        PRESETS[args.preset]["vocab_size"], args.prompt_tokens, args.seed
    )
    if args.only == "torch":
        hf = torch_model(args.preset, args.dtype, torch_device, args.seed)
        print(
            json.dumps(
                time_torch(hf, prompt, args.max_tokens, args.repeats, torch_device)
            )
        )
        return
    select_device(args)
    if args.profile:
        return print_profile(args, torch_device)
    versus = (
        f"{' and '.join(f'{b}-bit' for b in args.quantize)} copies"
        if args.quantize
        else "transformers"
    )
    say(
        f"building a random {args.preset}-preset {args.dtype} Llama (PyTorch, then "
        f"MLX), then timing MLX and {versus}: "
        f"{args.repeats} timed run{'s' * (args.repeats > 1)} each after a warm-up run, "
        f"{args.prompt_tokens} prompt tokens and {args.max_tokens} new ones"
    )
    hf = torch_model(args.preset, args.dtype, torch_device, args.seed)
    model = mlx_model(hf)
    n_parameters = sum(p.size for _, p in nn.utils.tree_flatten(model.parameters()))
    say(f"built the model, {n_parameters / 1e6:.2f}M parameters")
    if args.quantize:
        del hf
        if torch_device == "cuda":
            torch.cuda.empty_cache()
        compare_quantized(model, prompt, args, torch_device)
    else:
        compare_frameworks(model, hf, prompt, args, argv, torch_device)


def compare_frameworks(model, hf, prompt, args, argv, torch_device):
    """Time PyTorch (here, or in a child process without LD_PRELOAD), then MLX, and
    print the comparison."""
    separate = args.device == "cpu" and "LD_PRELOAD" in os.environ
    if (
        separate
    ):  # PyTorch is timed in a child that builds the same weights from the same seed
        del hf
        say("timing PyTorch in a child process without LD_PRELOAD")
        t_torch = torch_in_child(argv)
    else:
        t_torch = time_torch(hf, prompt, args.max_tokens, args.repeats, torch_device)
        del hf
        if torch_device == "cuda":
            torch.cuda.empty_cache()
    t_mlx = time_mlx(model, prompt, args.max_tokens, args.repeats)
    print_comparison(model, args, t_mlx, t_torch, torch_device, separate)
    print_host_time(model, prompt, args, t_mlx)
    if args.time_load:
        say("timing load_model from .npz and .safetensors files")
        report_load(model, args.repeats)


def print_comparison(model, args, t_mlx, t_torch, torch_device, separate):
    """The table of prompt and decoding tokens/s, with the copy bandwidth (measured
    here) as the decoding ceiling."""
    weight_bytes = sum(p.nbytes for _, p in nn.utils.tree_flatten(model.parameters()))
    bandwidth = copy_bandwidth(torch_device)
    ceiling = bandwidth / weight_bytes
    gpu = f" ({torch.cuda.get_device_name()})" if args.device == "gpu" else ""
    print(
        f"{args.preset} preset ({weight_bytes / 1e9:.2f} GB of {args.dtype} weights), "
        "random weights, prompt "
        f"{args.prompt_tokens} tokens, {args.max_tokens} new tokens, greedy, median of "
        f"{args.repeats}; MLX {mx.__version__} on {mx.default_device()}{gpu}; PyTorch "
        f"{torch.__version__} on {torch_device}"
        f"{' (in a child process without LD_PRELOAD)' if separate else ''}, "
        "transformers generate()"
    )
    print(
        f"copy bandwidth (PyTorch copy_, read + write): {bandwidth / 1e9:.1f} GB/s -> "
        f"decoding ceiling {ceiling:.1f} tokens/s"
    )
    print(f"{'':>10} {'MLX':>10} {'PyTorch':>10} {'MLX/PyTorch':>12}")
    print(
        f"{'prompt':>10} {args.prompt_tokens / t_mlx[0]:>10.1f} "
        f"{args.prompt_tokens / t_torch[0]:>10.1f} "
        f"{t_torch[0] / t_mlx[0]:>11.2f}x   tokens/s"
    )
    print(
        f"{'decoding':>10} {1 / t_mlx[1]:>10.1f} {1 / t_torch[1]:>10.1f} "
        f"{t_torch[1] / t_mlx[1]:>11.2f}x   tokens/s"
    )
    for name, seconds in (("MLX", t_mlx[1]), ("PyTorch", t_torch[1])):
        print(
            f"{name} decoding reads {weight_bytes / seconds / 1e9:.1f} GB/s of "
            f"weights, {100 / seconds / ceiling:.0f}% of the ceiling"
        )


def print_host_time(model, prompt, args, t_mlx):
    """MLX's host time per decoding step (measured here) against the time per token."""
    build, launch = host_seconds(model, prompt)
    on_cpu = (
        " (on a CPU, launching includes the computing)" if args.device == "cpu" else ""
    )
    print(
        f"MLX host time per decoding step: {build * 1e3:.2f} ms building the graph "
        f"(Python) + {launch * 1e3:.2f} "
        f"ms launching it (mx.async_eval), against {t_mlx[1] * 1e3:.2f} ms per token: "
        f"the host sets the pace when the sum comes near the time per token{on_cpu}"
    )


if __name__ == "__main__":
    # SIGTERM as an exception too, so that --time-load's temporary folder is removed
    signal.signal(signal.SIGTERM, lambda number, frame: sys.exit("stopped by SIGTERM"))
    try:
        main()
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
