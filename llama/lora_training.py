"""LoRA's training: the step (through dequantized weights for a quantized base, with
--grad-checkpoint's recomputation), the loop with its reports, saves and exact resume,
and evaluation.

Resume is exact: the data order and dropout depend only on --seed and the step, and
adapters.safetensors holds AdamW's state, the step and the settings that shape the run
(--seed, --batch-size, --learning-rate, --data, --mask-prompt, --max-seq-length), which
a resumed run must repeat. Ctrl-C or SIGTERM stops after the step under way and saves it
(press again to stop at once). A diverging step (a loss or gradient that is not finite,
or a loss above twice that of guessing uniformly over the vocabulary) stops before its
update counts: the adapters of the last step whose loss was sound are saved, the run
exits with status 1.
"""

import hashlib
import json
import math
import sys
import time
from dataclasses import asdict
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from lora_adapters import (
    ADAPTERS,
    LINEAR_KEYS,
    AdapterError,
    adapter_file,
    apply_adapters,
    linear_to_lora_layers,
    read_adapters,
    save_adapters,
    save_config,
)
from lora_data import batch_indices, pad
from mlx.utils import tree_flatten, tree_map, tree_map_with_path
from model import TransformerBlock, warn_if_reference_blas

# ---- The products of a training step -------------------------------------------------


class CheckpointedBlock(TransformerBlock):
    """A TransformerBlock whose inner activations are recomputed in the backward pass
    instead of kept (mx.checkpoint): --grad-checkpoint trades about a third more compute
    for much less memory."""

    def __call__(self, x, cache=None):
        # the adapters are inputs, so that their gradients pass the checkpoint
        def block(params, x):
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
    """x @ W.T for the quantized `layer` (W (out, in)) as a dense product with its
    dequantized W, a transient float weight. The backward pass dequantizes W again
    (mx.custom_function) rather than keeping it, so the float weights never exist all at
    once."""

    # Each W is made from inputs that wait for the product's own input: else mx.compile
    # would find the same dequantize in the forward pass, in --grad-checkpoint's
    # recomputation and in the backward pass, merge them, and keep every layer's float W
    # until the backward pass.
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
        # Under --grad-checkpoint, x is the block's recomputed input, and the W made
        # after it is the one the recomputation made just before: one dequantize less,
        # freed with the block's backward pass.
        if getattr(layer, "recomputed", False):
            return cotangent @ weight_after(x)
        return cotangent @ weight_after(cotangent)

    return product(x)


class DequantizingLinear(nn.QuantizedLinear):
    """nn.QuantizedLinear for batches of many rows (training, --test): a dense product
    with the dequantized weight, cuBLAS's GEMM on a GPU, where mx.quantized_matmul's
    backward product has only a naive kernel on CUDA and a CPU computes float16
    quantized products element by element. Generation keeps mx.quantized_matmul."""

    def __call__(self, x):
        y = dequantized_product(self, x)
        return y + self["bias"] if "bias" in self else y


class DequantizingEmbedding(nn.QuantizedEmbedding):
    """nn.QuantizedEmbedding whose use as the output layer (tied embeddings) is
    DequantizingLinear's product."""

    def as_linear(self, x):
        return dequantized_product(self, x)


def dequantizing_layers(model):
    """Swap the quantized layers of `model` (those inside a LoRALinear too) for the
    dequantizing ones, in place: a class swap, the same parameters, so adapters and
    files are unchanged."""
    swaps = {
        nn.QuantizedLinear: DequantizingLinear,
        nn.QuantizedEmbedding: DequantizingEmbedding,
    }
    for _, module in model.named_modules():
        module.__class__ = swaps.get(type(module), type(module))
    return model


# ---- Loss, step, evaluation ----------------------------------------------------------


def loss_fn(model, inputs, targets, mask):
    """(mean cross-entropy per counted token, number of counted tokens); logits in
    float32."""
    logits = model(inputs).astype(mx.float32)
    n = mask.sum()
    return (nn.losses.cross_entropy(logits, targets) * mask).sum() / mx.maximum(n, 1), n


def make_step(model, optimizer, compile=None):
    """One training step on a batch: (loss, counted tokens, whether the loss and every
    gradient are finite). Compiled (the model, optimizer and random state its inputs and
    outputs) by default on a GPU only: on a CPU, MLX compiles by generating C++, which
    takes tens of seconds for each new kind of step and made the tiny test model's steps
    about 10% faster."""
    loss_and_grad = nn.value_and_grad(model, loss_fn)
    state = [model.state, optimizer.state, mx.random.state]
    if compile is None:
        compile = mx.default_device() == mx.gpu

    def step(inputs, targets, mask):
        (loss, n), grads = loss_and_grad(model, inputs, targets, mask)
        finite = mx.isfinite(loss)
        for _, g in tree_flatten(grads):
            finite = finite & mx.all(mx.isfinite(g))
        optimizer.update(model, grads)
        return loss, n, finite

    return mx.compile(step, inputs=state, outputs=state) if compile else step


def evaluate(model, examples, batch_size, max_batches=-1, seed=0):
    """(mean cross-entropy per counted token, counted tokens) over `max_batches` batches
    (-1: all) of `examples`, the same ones each time (every example has a counted
    token)."""
    batches = batch_indices(examples, batch_size, drop_last=False)
    order = np.random.default_rng(seed).permutation(len(batches))
    if max_batches > 0:
        order = order[:max_batches]
    total, count = 0.0, 0
    model.eval()
    for i in order:
        loss, n = loss_fn(model, *pad([examples[j] for j in batches[i]]))
        mx.eval(loss, n)
        total, count = total + loss.item() * n.item(), count + int(n.item())
    model.train()
    return total / count, count


# ---- Starting or resuming ------------------------------------------------------------


def lora_config(model, args):
    """The adapter configuration for a new training run, from the flags."""
    n = model.args.n_layers
    num_layers = args.num_layers
    if num_layers is None:
        num_layers = min(16, n)
    elif num_layers == -1:
        num_layers = n
    if num_layers > n:
        raise AdapterError(
            f"--num-layers {num_layers}, but the model has {n} blocks; use -1 for all "
            "of them"
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


def run_settings(args):
    """The flags that shape a run's steps, as a resumed run must repeat them (--data by
    the hash of its train.jsonl)."""
    train = (Path(args.data) / "train.jsonl").read_bytes()
    return {
        "--seed": args.seed,
        "--batch-size": args.batch_size,
        "--learning-rate": args.learning_rate,
        "--data": hashlib.sha256(train).hexdigest()[:16],
        "--mask-prompt": args.mask_prompt,
        "--max-seq-length": args.max_seq_length,
    }


def check_resume(file, metadata, settings):
    """The step to resume after; AdapterError if the file's step is damaged or it was
    trained with other settings."""
    step = metadata.get("step", "0")
    try:
        recorded = json.loads(metadata.get("settings", "{}"))
    except ValueError:
        recorded = None
    if not step.isdigit() or not isinstance(recorded, dict):
        raise AdapterError(
            f"{file}: its metadata (step {step!r}) is damaged; it was not written by "
            "lora.py --train"
        )
    for flag, value in settings.items():
        if flag in recorded and recorded[flag] != value:
            was, now = recorded[flag], value
            if flag == "--data":
                was, now = "another train.jsonl", "this one"
            raise AdapterError(
                f"{file} was trained with {flag} {was}, not {now}; resume "
                "with the same --seed, --batch-size, --learning-rate, --data, "
                "--mask-prompt and --max-seq-length, or train anew"
            )
    return int(step)


def prepare_training(model, args, settings):
    """(optimizer, first step - 1): new adapters as the flags say, or those of
    --resume-adapter-file with the optimizer state and step saved beside them."""
    optimizer = optim.AdamW(learning_rate=args.learning_rate, bias_correction=True)
    if args.resume_adapter_file:
        file = adapter_file(args.resume_adapter_file)
        config, adapters, training, metadata = read_adapters(file)
        step = check_resume(file, metadata, settings)
        apply_adapters(model, config, adapters, file)
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
                f"{file} has no optimizer state for these adapters; it was not written "
                "by lora.py --train"
            )
        optimizer.state = tree_map_with_path(
            lambda name, x: training.get(name, x), optimizer.state
        )
        blocks = f"{config['layers'][0]}-{config['layers'][-1]}"
        print(
            f"resuming after step {step} with the adapters' own settings: rank "
            f"{config['rank']}, alpha {config['alpha']}, {'/'.join(config['keys'])} of "
            f"blocks {blocks}"
        )
    Path(args.adapter_path).mkdir(parents=True, exist_ok=True)
    save_config(Path(args.adapter_path), {**config, "base_model": asdict(model.args)})
    if args.grad_checkpoint:
        checkpoint_blocks(model)
    model.train()
    return optimizer, step


# ---- The loop ------------------------------------------------------------------------


def batch_at(train_set, batches, seed, step):
    """The examples of `step`: the data order, and dropout's seed, depend only on --seed
    and the step, so a resumed run takes the same batches."""
    epoch, k = divmod(step - 1, len(batches))
    order = np.random.default_rng([seed, epoch]).permutation(len(batches))
    mx.random.seed(int(np.random.SeedSequence([seed, step]).generate_state(1)[0]))
    return [train_set[j] for j in batches[order[k]]]


def train(model, optimizer, data, args, start_step, stop, settings):
    """Train from start_step to args.iters on data["train"], reporting, validating on
    data["valid"] and saving as the flags say. Returns the exit status: 0 done, 130
    stopped by a signal, 1 stopped by a diverging step."""
    step_fn, folder = make_step(model, optimizer), Path(args.adapter_path)
    batches = batch_indices(data["train"], args.batch_size, drop_last=True)
    worst = 2 * math.log(model.args.vocab_size)  # twice the loss of a uniform guess
    report = Report(args.iters, start_step, args.steps_per_report)
    report_validation(model, data["valid"], args, start_step)
    # The arrays of the last adapters whose loss was sound (not copies: MLX arrays are
    # immutable, an update makes new ones)
    good = (
        model.trainable_parameters(),
        tree_map(lambda x: x, optimizer.state),
        start_step,
    )
    stop.training = True
    for step in range(start_step + 1, args.iters + 1):
        batch = batch_at(data["train"], batches, args.seed, step)
        before = (model.trainable_parameters(), tree_map(lambda x: x, optimizer.state))
        loss, n, finite = step_fn(*pad(batch))
        mx.eval(loss, n, finite, model.trainable_parameters(), optimizer.state)
        sound = math.isfinite(loss.item()) and loss.item() <= worst
        if sound:  # the adapters before this step's update give a sound loss
            good = (*before, step - 1)
        if not (sound and finite.item()):
            save_adapters(folder, *good, settings)
            print(
                f"error: step {step} diverged (loss {loss.item():.4g}); stopped before "
                f"its update and saved the adapters of step {good[2]} to "
                f"{folder / ADAPTERS}; train anew with a lower --learning-rate",
                file=sys.stderr,
            )
            return 1
        report.step(step, loss.item(), int(n.item()), sum(len(t) - 1 for t, _ in batch))
        if step == args.iters or (
            args.steps_per_eval and step % args.steps_per_eval == 0
        ):
            report_validation(model, data["valid"], args, step)
        if step == args.iters or step % args.save_every == 0 or stop.requested:
            state = (model.trainable_parameters(), optimizer.state, step, settings)
            save_adapters(folder, *state)
            print(f"step {step}: saved {folder / ADAPTERS}", flush=True)
        if stop.requested:
            print(
                f"{stop.requested}: stopped after step {step}; continue with "
                f"--resume-adapter-file {folder / ADAPTERS}",
                file=sys.stderr,
            )
            return 130
    stop.training = False
    return 0


class Report:
    """The training loss, speed and memory every --steps-per-report steps (and after the
    first and the last step)."""

    def __init__(self, iters, start_step, every):
        self.iters, self.start_step, self.every = iters, start_step, every
        self.losses, self.tokens, self.tic = [], 0, time.perf_counter()

    def step(self, step, loss, n, tokens):
        self.losses.append((loss, n))
        self.tokens += tokens
        first, last = step == self.start_step + 1, step == self.iters
        if not (step % self.every == 0 or first or last):
            return
        seconds = time.perf_counter() - self.tic
        mean = sum(x * n for x, n in self.losses) / max(
            sum(n for _, n in self.losses), 1
        )
        eta = ""
        if first and mx.default_device() == mx.gpu:
            eta = " (the first step compiles on a GPU)"
        elif not last:
            minutes = (self.iters - step) * seconds / len(self.losses) / 60
            eta = f", about {minutes:.1f} min left"
        print(
            f"step {step}/{self.iters}: train loss {mean:.3f}, "
            f"{len(self.losses) / seconds:.2f} steps/s, {self.tokens / seconds:,.0f} "
            f"tokens/s, peak memory {mx.get_peak_memory() / 1e9:.2f} GB{eta}",
            flush=True,
        )
        self.losses, self.tokens, self.tic = [], 0, time.perf_counter()


def report_validation(model, valid_set, args, step):
    tic = time.perf_counter()
    loss, n = evaluate(model, valid_set, args.batch_size, args.val_batches, args.seed)
    print(
        f"step {step}/{args.iters}: valid loss {loss:.3f} ({n} tokens, "
        f"{time.perf_counter() - tic:.1f} s)",
        flush=True,
    )


def run_training(model, data, args, stop):
    """--train: prepare (or resume), say what will train, train; the exit status."""
    settings = run_settings(args)
    optimizer, start = prepare_training(model, args, settings)
    if start >= args.iters:
        raise AdapterError(
            f"{args.resume_adapter_file} is already trained for {start} steps; give "
            "--iters above that"
        )
    bits = (model.args.quantization or {}).get("bits")
    total = 0
    for _, v in tree_flatten(model.parameters()):
        packed = bits and v.dtype == mx.uint32  # a uint32 holds 32 / bits weights
        total += v.size * (32 // bits if packed else 1)
    trainable = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    share = f"{100 * trainable / total:.3f}% of the model"
    print(
        f"training steps {start + 1}-{args.iters}, {args.batch_size} examples a step, "
        f"{trainable:,} trainable parameters ({share})",
        flush=True,
    )
    warn_if_reference_blas()
    return train(model, optimizer, data, args, start, stop, settings)
