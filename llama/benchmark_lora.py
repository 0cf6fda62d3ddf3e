"""Fine-tuning speed and memory of lora.py (MLX) against PyTorch + PEFT, on random
weights (nothing downloaded).

    python llama/benchmark_lora.py                        # 7B shape on a GPU, all six
    python llama/benchmark_lora.py --preset tiny --steps 2  # seconds, on a CPU too
    python llama/benchmark_lora.py --frameworks mlx --quantize 4  # MLX 4-bit QLoRA only

Every configuration trains LoRA adapters of rank --rank (alpha 2 x rank) on the
attention's query and value layers (MLX wq and wv, PyTorch q_proj and v_proj) of the
last --num-layers blocks with AdamW, on batches of --batch-size x --seq-len random
tokens, all of them counted in the loss:

- MLX: this example's Llama in --dtype (float16), and 4-bit QLoRA (the same model
  quantized in groups of 64, as convert.py --quantize does it), each without and with
  --grad-checkpoint. The step is lora.py's own (make_step: compiled on a GPU, adapters
  in float32, a quantized layer's product through its dequantized weight), evaluated
  every step as lora.py's loop does.
- PyTorch + PEFT: transformers' LlamaForCausalLM built on the GPU in bfloat16 with sdpa
  attention, PEFT's LoraConfig on the same layers (PEFT keeps the adapters in float32),
  torch.optim.AdamW, without and with gradient checkpointing (use_reentrant=False).

Tokens/s is batch x seq-len over the median time of --steps timed steps, after --warmup
steps that are not timed (MLX compiles the step in its first). Start GB is the memory in
use before the first step (the weights, adapters and optimizer state, once the work
queued while making them has finished: the float weights a quantized model was made from
are gone), peak GB mx.get_peak_memory() and torch.cuda.max_memory_allocated() over the
configuration's steps, counted from there, its weights included: one model is in memory
at a time, its random weights made on the device. A configuration that fails (out of
memory, say) prints one line and the others still run. Progress goes to stderr, the
table to stdout.
"""

import argparse
import gc
import os
import statistics
import sys
import time
import warnings
from dataclasses import replace

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import torch
from lora_adapters import linear_to_lora_layers
from lora_training import checkpoint_blocks, dequantizing_layers, make_step
from model import Llama, ModelArgs, warn_if_reference_blas
from timing import say

# The shapes of transformers' LlamaConfig: a tiny one for the CPU, Llama 2 7B's.
PRESETS = {
    "tiny": dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=192,
        vocab_size=320,
    ),
    "7b": dict(
        hidden_size=4096,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        intermediate_size=11008,
        vocab_size=32000,
    ),
}
# lora.py's size of MLX's CUDA graphs (read when MLX first runs), unless the user's
BUFFER = "MLX_MAX_MB_PER_BUFFER"
if sys.platform != "darwin":
    os.environ.setdefault(BUFFER, "100")


def mlx_model(preset, dtype, bits=None):
    """The random-weight Llama of `preset` in `dtype`, quantized to `bits` if given,
    made block by block on the default device (lazily built, so no float32 copy of the
    whole model ever exists)."""
    c = PRESETS[
        preset
    ]  # transformers' LlamaConfig defaults for the rest, as torch_model
    args = ModelArgs(
        dim=c["hidden_size"],
        n_layers=c["num_hidden_layers"],
        n_heads=c["num_attention_heads"],
        n_kv_heads=c["num_key_value_heads"],
        hidden_dim=c["intermediate_size"],
        vocab_size=c["vocab_size"],
        norm_eps=1e-6,
        rope_traditional=False,  # HF's layout
        max_seq_len=4096,
    )
    model = Llama(args)
    model.set_dtype(dtype)
    if bits:
        nn.quantize(model, 64, bits)
        model.args = replace(args, quantization={"group_size": 64, "bits": bits})
    for block in model.layers:
        mx.eval(block.parameters())
    mx.eval(model.parameters())
    return model


def torch_model(preset, device, layers, rank):
    """transformers' Llama of `preset` in bfloat16 on `device`, sdpa attention, with
    PEFT LoRA adapters."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        **{"max_position_embeddings": 4096, **PRESETS[preset]},
        attn_implementation="sdpa",
    )
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # a 7B model never exists in float32
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    lora = LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        lora_dropout=0.0,
        target_modules=["q_proj", "v_proj"],
        layers_to_transform=list(layers),
    )
    return get_peft_model(model, lora).train()


def enable_checkpointing(hf_model):
    """Gradient checkpointing of every decoder layer, non-reentrant (transformers 5.2x
    renamed the method)."""
    if hasattr(hf_model, "activation_checkpointing_enable"):
        hf_model.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": False}
        )
    else:
        hf_model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False}
        )


def time_steps(step, args, label):
    """Seconds of each of args.steps calls of step() (which waits for its work), after
    args.warmup calls, and the last loss."""
    warmup, compiles = (
        [],
        " (the first compiles)"
        if label.startswith("MLX") and mx.default_device() == mx.gpu
        else "",
    )
    for _ in range(args.warmup):
        tic = time.perf_counter()
        step()
        warmup.append(time.perf_counter() - tic)
    if warmup:
        say(
            f"{label}: {len(warmup)} warm-up step{'s' * (len(warmup) > 1)} "
            f"{sum(warmup):.1f} s{compiles}; "
            f"{args.steps} timed steps, about {args.steps * warmup[-1]:.0f} s"
        )
    times = []
    for _ in range(args.steps):
        tic = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - tic)
    return times, loss


def settled_mlx_memory():
    """MLX's active bytes once all queued work has finished and its buffers are freed (a
    GPU runs behind the Python thread, holding the buffers of the work queued for it);
    the peak counts from here."""
    gc.collect()
    mx.synchronize()
    mx.clear_cache()
    mx.reset_peak_memory()
    return mx.get_active_memory()


def mlx_configs(args, layers):
    """[(label, step times or an error, (bytes before the first step, peak bytes) or
    None, last loss)] for MLX --dtype LoRA and each --quantize QLoRA, without and with
    gradient checkpointing."""
    rows, vocab = [], PRESETS[args.preset]["vocab_size"]
    tokens = mx.random.randint(0, vocab, (args.batch_size, args.seq_len + 1))
    batch = (tokens[:, :-1], tokens[:, 1:], mx.ones((args.batch_size, args.seq_len)))
    for bits in [None, *args.quantize]:
        name = f"MLX {bits}-bit QLoRA" if bits else f"MLX {args.dtype} LoRA"
        say(
            f"{name}: making the random {args.preset}-shaped model on "
            f"{mx.default_device()}"
        )
        try:
            model = linear_to_lora_layers(
                mlx_model(args.preset, getattr(mx, args.dtype), bits),
                layers,
                ["wq", "wv"],
                args.rank,
                2 * args.rank,
            )
            dequantizing_layers(model)  # QLoRA's products, as lora.py trains
        except Exception as e:
            rows += [
                (name + suffix, e, None, None) for suffix in ("", ", grad checkpoint")
            ]
            continue
        for checkpoint in (False, True):
            label = name + (", grad checkpoint" if checkpoint else "")
            try:
                if checkpoint:
                    checkpoint_blocks(model)
                optimizer = optim.AdamW(learning_rate=1e-4, bias_correction=True)
                optimizer.init(model.trainable_parameters())
                mx.eval(optimizer.state)
                train_step, resident = make_step(model, optimizer), settled_mlx_memory()
                say(
                    f"{label}: {resident / 1e9:.2f} GB in memory before the first step "
                    "(weights, adapters, AdamW)"
                )

                def step():
                    loss, n, finite = train_step(*batch)
                    mx.eval(
                        loss, n, finite, model.trainable_parameters(), optimizer.state
                    )
                    return loss.item()

                times, loss = time_steps(step, args, label)
                rows.append((label, times, (resident, mx.get_peak_memory()), loss))
            except Exception as e:
                rows.append((label, e, None, None))
            optimizer = train_step = step = None
        model = None
        gc.collect()
        mx.clear_cache()
    return rows


def torch_configs(args, layers, device):
    """[(label, step times or an error, (bytes before the first step, peak bytes) or
    None, last loss)] for PyTorch + PEFT bfloat16, without and with gradient
    checkpointing."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    say(
        f"PyTorch + PEFT: making the random {args.preset}-shaped bfloat16 model on "
        f"{device}"
    )
    rows, name = [], "PyTorch + PEFT bfloat16"
    try:
        model = torch_model(args.preset, device, layers, args.rank)
    except Exception as e:
        return [(name + suffix, e, None, None) for suffix in ("", ", grad checkpoint")]
    ids = torch.randint(
        0,
        PRESETS[args.preset]["vocab_size"],
        (args.batch_size, args.seq_len),
        device=device,
    )
    for checkpoint in (False, True):
        label = name + (", grad checkpoint" if checkpoint else "")
        try:
            if checkpoint:
                enable_checkpointing(model.get_base_model())
            optimizer = torch.optim.AdamW(
                [p for p in model.parameters() if p.requires_grad], lr=1e-4
            )
            if device == "cuda":
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
                resident = torch.cuda.memory_allocated()

            def step():
                # transformers shifts the labels itself
                loss = model(input_ids=ids, labels=ids, use_cache=False).loss
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                sync()
                return loss.item()

            times, loss = time_steps(step, args, label)
            memory = (
                (resident, torch.cuda.max_memory_allocated())
                if device == "cuda"
                else None
            )
            rows.append((label, times, memory, loss))
        except Exception as e:
            rows.append((label, e, None, None))
        optimizer = step = None
    model = None
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return rows


def print_table(rows, args, tokens):
    """One line per configuration: tokens/s (range), memory before the first step and at
    the peak of the steps, and MLX's speed over PyTorch's for the same gradient
    checkpointing."""
    torch_rate = {
        label.endswith("checkpoint"): tokens / statistics.median(times)
        for label, times, _, _ in rows
        if label.startswith("PyTorch") and isinstance(times, list)
    }
    gpu = (
        f" ({torch.cuda.get_device_name()})"
        if args.device == "gpu" and torch.cuda.is_available()
        else ""
    )
    limit = f" (memory limit {args.memory_limit:g} GB)" if args.memory_limit else ""
    buffer = f", {BUFFER}={os.environ[BUFFER]}" if BUFFER in os.environ else ""
    print(
        f"LoRA fine-tuning, {args.preset} shape, random weights, rank {args.rank} on "
        f"wq/wv (q_proj/v_proj) of the last {args.num_layers} blocks, AdamW, batch "
        f"{args.batch_size} x {args.seq_len} tokens, median of {args.steps} steps "
        f"after {args.warmup}; MLX {mx.__version__} on {mx.default_device()}{gpu}"
        f"{limit}"
        f"{buffer}, PyTorch {torch.__version__}"
    )
    print(
        f"{'configuration':<42} {'tokens/s':>10} {'(range)':>19} {'start GB':>8} "
        f"{'peak GB':>8} {'vs PyTorch':>10} {'loss':>7}"
    )
    for label, times, memory, loss in rows:
        if not isinstance(times, list):
            first_line = str(times).splitlines()[0] if str(times) else ""
            print(f"{label:<42} failed: {type(times).__name__}: {first_line}")
            continue
        rate = tokens / statistics.median(times)
        span = f"({tokens / max(times):,.0f}-{tokens / min(times):,.0f})"
        reference = torch_rate.get(label.endswith("checkpoint"))
        ratio = (
            f"{rate / reference:.2f}x" if reference and label.startswith("MLX") else ""
        )
        start, peak = (f"{m / 1e9:.2f}" for m in memory) if memory else ("n/a", "n/a")
        print(
            f"{label:<42} {rate:>10,.1f} {span:>19} {start:>8} {peak:>8} {ratio:>10} "
            f"{loss:>7.3f}"
        )


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="LoRA / QLoRA training tokens/s and peak memory, MLX (lora.py) vs "
        "PyTorch + PEFT, random weights"
    )
    add = parser.add_argument
    add("--preset", choices=["7b", "tiny"], default="7b", help="Llama 2 7B's or tiny")
    add("--device", choices=["gpu", "cpu"], help="default: gpu where MLX has one")
    add("--frameworks", nargs="+", choices=["mlx", "torch"], default=["mlx", "torch"])
    add(
        "--dtype",
        choices=["float16", "bfloat16"],
        default="float16",
        help="MLX's weights and activations, and QLoRA's scales (default: float16)",
    )
    add(
        "--quantize",
        type=int,
        nargs="*",
        choices=[4, 8],
        default=[4],
        help="QLoRA bit widths to time as well; none for no QLoRA (default: 4)",
    )
    add("--batch-size", type=int, help="sequences per step (default: 4; tiny: 2)")
    add("--seq-len", type=int, help="tokens per sequence (default: 512; tiny: 32)")
    add("--rank", type=int, default=8, help="LoRA rank (default: 8)")
    add("--num-layers", type=int, help="the last blocks adapted (default: as lora.py)")
    add("--warmup", type=int, default=2, help="untimed steps first (default: 2)")
    add("--steps", type=int, default=5, help="timed steps (default: 5)")
    add("--seed", type=int, default=0, help="of the weights and tokens (default: 0)")
    add(
        "--memory-limit",
        type=float,
        metavar="GB",
        help="MLX's memory limit in GB (mx.set_memory_limit): above it, evaluation "
        "waits for the work queued ahead on the device to finish and free its buffers "
        "(default: MLX's, 95%% of a GPU's memory)",
    )
    return check_args(parser, parser.parse_args(argv))


def check_args(parser, args):
    """Defaults that depend on the preset, and the checks of the flags together."""
    args.device = args.device or ("gpu" if mx.is_available(mx.gpu) else "cpu")
    n_layers = PRESETS[args.preset]["num_hidden_layers"]
    tiny = args.preset == "tiny"
    args.batch_size = args.batch_size or (2 if tiny else 4)
    args.seq_len = args.seq_len or (32 if tiny else 512)
    args.num_layers = args.num_layers or min(16, n_layers)
    if args.memory_limit is not None and not 0 < args.memory_limit < float("inf"):
        parser.error("--memory-limit must be a positive number of GB")
    if min(args.batch_size, args.seq_len, args.rank, args.steps) < 1 or args.warmup < 0:
        parser.error(
            "--batch-size, --seq-len, --rank and --steps must be at least 1, --warmup "
            "at least 0"
        )
    if not 1 <= args.num_layers <= n_layers:
        parser.error(
            f"--num-layers must be 1 to {n_layers} for the {args.preset} preset"
        )
    if args.device == "cpu" and args.preset == "7b":
        parser.error("the 7b preset takes hours on a CPU; use --preset tiny there")
    no_cuda = not torch.cuda.is_available()
    if args.device == "gpu" and "torch" in args.frameworks and no_cuda:
        parser.error(
            "PyTorch has no CUDA GPU here; add --frameworks mlx, or use --device cpu"
        )
    return args


def main():
    args = parse_args()
    # renamed methods PEFT calls
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    mx.set_default_device(mx.gpu if args.device == "gpu" else mx.cpu)
    if args.memory_limit:
        mx.set_memory_limit(int(args.memory_limit * 1e9))
    if args.device == "cpu":
        warn_if_reference_blas()
    mx.random.seed(args.seed)
    torch.manual_seed(args.seed)
    n_layers = PRESETS[args.preset]["num_hidden_layers"]
    layers = range(n_layers - args.num_layers, n_layers)
    configs = 2 * (
        (1 + len(args.quantize)) * ("mlx" in args.frameworks)
        + ("torch" in args.frameworks)
    )
    say(
        f"timing {configs} LoRA training configurations of the {args.preset} shape, "
        f"{args.warmup} warm-up and {args.steps} timed steps each, batch "
        f"{args.batch_size} x {args.seq_len} tokens"
    )
    rows = []
    if "mlx" in args.frameworks:
        rows += mlx_configs(args, layers)
    if "torch" in args.frameworks:
        rows += torch_configs(args, layers, "cuda" if args.device == "gpu" else "cpu")
    for label, error, _, _ in rows:
        if not isinstance(error, list):
            first_line = str(error).splitlines()[0] if str(error) else ""
            print(
                f"{label} failed: {type(error).__name__}: {first_line}", file=sys.stderr
            )
    print_table(rows, args, args.batch_size * args.seq_len)
    say("done")


if __name__ == "__main__":
    main()
