"""Batched generation speed: batch.py (MLX) against transformers' batched generate(), on
random weights.

    # Batch 1, 4, 16 on a GPU; seconds on a CPU:
    python llama/benchmark_batch.py --device gpu --preset 7b --dtype float16 \
        --quantize 4
    python llama/benchmark_batch.py --preset tiny --max-tokens 8 --repeats 1

Both frameworks run the same random weights (made by PyTorch with --seed, converted as
convert.py does). Each batch of B prompts generates --max-tokens new tokens per prompt,
greedy, with no stop token; total tokens/s is B x --max-tokens over the wall time of the
whole call, prompt pass included, median of --repeats runs after a warm-up run. Two
kinds of batches:

- equal: every prompt --prompt-tokens long (no padding, no attention mask);
- mixed: lengths spread evenly from --min-prompt-tokens to --prompt-tokens (left-padded,
  with a mask).

MLX runs batch.generate_batch for the --dtype model and, with --quantize, for the same
model quantized as convert.py --quantize does it (groups of 64). transformers runs
LlamaForCausalLM.generate on the --dtype model with sdpa attention, prompts left-padded
with an attention mask, as its documentation does batches. Progress goes to stderr, the
table to stdout.
"""

import argparse
import statistics
import time
from dataclasses import replace

import mlx.core as mx
import numpy as np
import torch
from batch import batched, generate_batch, left_padded
from convert import hf_args, hf_to_mlx_name, torch_to_mx
from model import Llama, warn_if_reference_blas
from quantize import quantize
from timing import say

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


def batch_prompts(vocab_size, B, longest, shortest, mixed, seed):
    """B random prompts: all `longest` tokens long, or (mixed) lengths spread from
    `shortest` to `longest`."""
    lengths = (
        np.linspace(shortest, longest, B).round().astype(int)
        if mixed and B > 1
        else [longest] * B
    )
    rng = np.random.default_rng(seed)
    return [rng.integers(3, vocab_size, n).tolist() for n in lengths]


def median_seconds(run, repeats, label):
    """Median wall seconds of run() over `repeats` calls after a warm-up call; run()
    waits for its work."""
    times = []
    for i in range(repeats + 1):
        tic = time.perf_counter()
        run()
        times.append(time.perf_counter() - tic)
        if i == 0:
            say(
                f"{label}: warm-up {times[0]:.1f} s; {repeats} timed "
                f"run{'s' * (repeats > 1)}"
            )
    return statistics.median(times[1:]), min(times[1:]), max(times[1:])


def time_mlx(model, prompts, max_tokens, repeats, label):
    def run():
        replies = generate_batch(model, prompts, max_tokens)
        assert all(len(r) == max_tokens for r in replies)

    return median_seconds(run, repeats, label)


def time_torch(hf_model, prompts, max_tokens, repeats, label, device):
    """transformers' generate() on the batch, left-padded with pad id 0 and an attention
    mask."""
    longest = max(map(len, prompts))
    ids = torch.tensor([[0] * (longest - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor(
        [[0] * (longest - len(p)) + [1] * len(p) for p in prompts], device=device
    )
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def run():
        with torch.inference_mode():
            out = hf_model.generate(
                ids,
                attention_mask=mask,
                max_new_tokens=max_tokens,
                min_new_tokens=max_tokens,
                do_sample=False,
                pad_token_id=0,
            )
        sync()
        assert out.shape[1] == longest + max_tokens

    return median_seconds(run, repeats, label)


def host_step(model, prompts, repeats=20):
    """(build, launch): median seconds the host spends on one batched decoding step, as
    timing.host_seconds measures one sequence's: Python making the graph, then
    mx.async_eval handing its kernels to the device."""
    tokens, _, cache = left_padded(model, prompts)
    builds, launches = [], []
    with batched(model):
        token = mx.argmax(model(tokens, cache, last_only=True)[:, -1], -1)
        mx.eval(token)
        for _ in range(repeats):
            tic = time.perf_counter()
            token = mx.argmax(model(token[:, None], cache)[:, -1], axis=-1)
            built = time.perf_counter()
            mx.async_eval(token)
            launched = time.perf_counter()
            mx.eval(token)
            builds.append(built - tic)
            launches.append(launched - built)
    return statistics.median(builds), statistics.median(launches)


def parse_args():
    parser = argparse.ArgumentParser(
        description="Batched generation tokens/s, MLX (batch.py) vs transformers.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add = parser.add_argument
    add(
        "--preset",
        choices=list(PRESETS),
        default="small",
        help="tiny (tests), small (~125M), 7b (Llama 2 7B), 8b (Llama 3.1 8B)",
    )
    add("--device", choices=["cpu", "gpu"], default="cpu", help="gpu: against CUDA")
    add("--dtype", choices=DTYPES, default="float32", help="weights and activations")
    add(
        "--quantize",
        type=int,
        choices=[4, 8],
        help="also time MLX with the model quantized to this many bits",
    )
    batch = in_range(int, 1, 256)
    add("--batch-sizes", type=batch, nargs="+", default=[1, 4, 16], help="prompts")
    length = in_range(int, 1, 2048)
    add("--prompt-tokens", type=length, default=128, help="the longest prompt")
    add("--min-prompt-tokens", type=length, default=16, help="the shortest, if mixed")
    add("--max-tokens", type=length, default=128, help="new tokens per prompt")
    add("--repeats", type=in_range(int, 1, 100), default=3, help="after a warm-up")
    add("--seed", type=in_range(int, 0, 2**63 - 1), default=0, help="weights, prompts")
    frameworks = ["mlx", "torch"]
    add("--frameworks", nargs="+", choices=frameworks, default=frameworks)
    args = parser.parse_args()
    if args.min_prompt_tokens > args.prompt_tokens:
        parser.error("--min-prompt-tokens must not be above --prompt-tokens")
    if args.device == "gpu" and not (
        mx.is_available(mx.gpu) and torch.cuda.is_available()
    ):
        parser.error(
            "--device gpu needs MLX's GPU backend and PyTorch with CUDA; use --device "
            "cpu"
        )
    return args


def main():
    args = parse_args()
    device = "cuda" if args.device == "gpu" else "cpu"
    mx.set_default_device(mx.gpu if args.device == "gpu" else mx.cpu)
    if args.device == "cpu":
        warn_if_reference_blas()
    say(
        f"building a random {args.preset}-preset {args.dtype} Llama (PyTorch, then "
        "MLX); then, for batches of "
        f"{' '.join(map(str, args.batch_sizes))} prompts, equal and mixed lengths, "
        f"{args.max_tokens} new tokens each"
    )
    hf = torch_model(args.preset, args.dtype, device, args.seed)
    models = {args.dtype: mlx_model(hf)}
    if args.quantize:
        models[f"{args.quantize}-bit"] = quantized_copy(
            models[args.dtype], 64, args.quantize
        )
    rows, hosts = time_batches(args, hf, models, device)
    report(rows, hosts, args)


def time_batches(args, hf, models, device):
    """Rows (framework, weights, prompt lengths, batch, (median, min, max) seconds) for
    every batch size, prompts of equal then mixed lengths; and MLX's host time per
    step at the largest batch."""
    rows = []
    hosts = []
    for mixed in (False, True):
        lengths = (
            f"{args.min_prompt_tokens}-{args.prompt_tokens}"
            if mixed
            else f"{args.prompt_tokens}"
        )
        for B in args.batch_sizes:
            prompts = batch_prompts(
                hf.config.vocab_size,
                B,
                args.prompt_tokens,
                args.min_prompt_tokens,
                mixed,
                args.seed + B,
            )
            if "mlx" in args.frameworks:
                for name, model in models.items():
                    label = f"MLX {name}, batch {B}, prompts of {lengths} tokens"
                    rows.append(
                        (
                            "MLX",
                            name,
                            lengths,
                            B,
                            time_mlx(
                                model, prompts, args.max_tokens, args.repeats, label
                            ),
                        )
                    )
                    if B == max(args.batch_sizes):
                        hosts.append((name, lengths, B, host_step(model, prompts)))
            if "torch" in args.frameworks:
                label = (
                    f"transformers {args.dtype}, batch {B}, prompts of {lengths} tokens"
                )
                seconds = time_torch(
                    hf, prompts, args.max_tokens, args.repeats, label, device
                )
                rows.append(("transformers", args.dtype, lengths, B, seconds))
    return rows, hosts


def report(rows, hosts, args):
    gpu = f" ({torch.cuda.get_device_name()})" if args.device == "gpu" else ""
    print(
        f"{args.preset} preset, random weights, {args.max_tokens} new tokens per "
        "prompt, greedy, total tokens/s "
        f"(prompt pass included), median [min-max] of {args.repeats}; MLX "
        f"{mx.__version__} on "
        f"{mx.default_device()}{gpu}; PyTorch {torch.__version__} on "
        f"{'cuda' if args.device == 'gpu' else 'cpu'}"
    )
    torch_speed = {
        (r[2], r[3]): r[3] * args.max_tokens / r[4][0]
        for r in rows
        if r[0] == "transformers"
    }
    print(
        f"{'framework':>12} {'weights':>9} {'prompts':>8} {'batch':>5} {'tokens/s':>9} "
        f"{'range':>17} {'vs transformers':>16}"
    )
    for framework, name, lengths, B, (median, low, high) in rows:
        speed = B * args.max_tokens / median
        versus = (
            f"{speed / torch_speed[lengths, B]:.2f}x"
            if framework == "MLX" and (lengths, B) in torch_speed
            else ""
        )
        span = f"{B * args.max_tokens / high:.0f}-{B * args.max_tokens / low:.0f}"
        print(
            f"{framework:>12} {name:>9} {lengths:>8} {B:>5} {speed:>9.1f} {span:>17} "
            f"{versus:>16}"
        )
    for name, lengths, B, (build, launch) in hosts:
        print(
            f"MLX {name}, batch {B}, prompts of {lengths} tokens: host time per "
            f"decoding step {build * 1e3:.2f} ms "
            f"building the graph + {launch * 1e3:.2f} ms launching it (on a CPU, "
            "launching includes the computing)"
        )
    say("done")


if __name__ == "__main__":
    main()
