"""Train a character-level GPT on a text (default: Tiny Shakespeare); write generated text to OUT/completions.txt.

    python gpt2/main.py                                   # the walkthrough's defaults, ~1M characters
    python gpt2/main.py --data my.txt --max-steps 200     # any text file, a short run
    python gpt2/main.py --resume                          # continue from OUT/checkpoint.safetensors
    python gpt2/main.py --dtype float32                   # compute in float32 (default: bfloat16 on a GPU)
    mlx.launch -n 4 --python python3 gpt2/main.py --batch-size 256    # one model on 4 processes

The vocabulary is the set of characters in the text (65 for Tiny Shakespeare). The first 90% of the
text trains, the last 10% validates. Each epoch cuts the training text into windows of --ctx-len
characters (input) and the same windows shifted by one (labels), shuffles them into mini-batches,
and takes one AdamW step per batch. The model is model.py's GPT.

Features beside the main job, each read only when it is used: distributed.py (started by
mlx.launch, N processes train one model: --batch-size is the global batch, each process computes
the gradients of its 1/N of it, averaged over the processes in every step; process 0 alone prints
and writes), float16.py (--dtype float16's loss scaling), grad_accum.py (--grad-accum's
micro-batches), resume.py (--resume) and cuda_dropout.py (on an NVIDIA GPU, the dropouts as CUDA kernels).
"""

import argparse
import hashlib
import itertools
import math
import os
import signal
import sys
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten
from model import GPT, GPTConfig, bounded
from save import check_writable, json_array, save_arrays, signals_held, write_atomically

DTYPES = {"bfloat16": mx.bfloat16, "float16": mx.float16, "float32": mx.float32}


# ---- Data ---------------------------------------------------------------------------------------


def load_text(path):
    """The training text: `path`, or else Tiny Shakespeare (shakespeare.py: downloaded once)."""
    if path is None:
        import shakespeare

        path = shakespeare.cached()
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read {path} as UTF-8 text: {e}") from None
    if not text.strip("\0"):
        raise ValueError(
            f"{path} has no text: it is empty{' but for NUL bytes' if text else ''}; give a text file"
        )
    return text


class CharVocab:
    """Characters <-> integer ids, in sorted order of the characters seen in the text."""

    def __init__(self, chars):
        self.chars = sorted(set(chars))
        self.ids = {c: i for i, c in enumerate(self.chars)}

    def encode(self, text):
        if unknown := sorted(set(text) - self.ids.keys()):
            raise ValueError(
                f"characters not in the training vocabulary: {''.join(unknown)!r}"
            )
        return [self.ids[c] for c in text]

    def decode(self, ids):
        return "".join(self.chars[i] for i in ids)


def epoch_batches(data, ctx_len, batch_size, seed, epoch):
    """The window start positions of one epoch's batches, in order: (batches, batch_size).

    Windows do not overlap; the grid of windows starts at a random offset each epoch, so that over
    epochs the model sees every position at every place in the context. Partial batches are dropped.
    """
    rng = np.random.default_rng(
        [seed, epoch]
    )  # the same plan for the same (seed, epoch): --resume is exact
    starts = rng.permutation(
        np.arange(int(rng.integers(0, ctx_len)), len(data) - ctx_len - 1, ctx_len)
    )
    return starts[: len(starts) // batch_size * batch_size].reshape(-1, batch_size)


def windows(data, starts, ctx_len):
    """Inputs data[s : s + ctx_len] and labels data[s + 1 : s + ctx_len + 1] for each start s: (B, ctx_len) each."""
    index = starts[:, None] + np.arange(ctx_len)
    return mx.array(data[index]), mx.array(data[index + 1])


# ---- Training -----------------------------------------------------------------------------------


def loss_fn(model, x, y):
    logits = model(x).astype(
        mx.float32
    )  # (B, T, vocab): the loss in float32 whatever the compute dtype
    return nn.losses.cross_entropy(logits, y, reduction="mean")


def make_train_step(
    model,
    optimizer,
    dtype=mx.float32,
    grad_clip=0.0,
    loss_scale=None,
    group=None,
    grad_accum=1,
):
    """One compiled AdamW step on a batch: train_step(x, y) -> loss (lazy, float32), and its `state`.

    Mixed precision: the model keeps float32 master weights and AdamW float32 moments; each step
    computes with a `dtype` copy of the attention and MLP weights (embeddings and LayerNorms stay
    float32), whose gradients come back in float32 for the update. float16 also needs loss_scale
    (float16.py). mx.compile traces the step once and replays it; what every call reads and writes
    (weights, optimizer state, random state for dropout, loss scale) is its `state`.

    With a `group` of several processes, each passes its own rows of the batch, and the gradients
    and the loss are averaged over the processes inside the step, before clipping and the update.
    grad_accum K cuts the rows into K micro-batches (grad_accum.py), one forward and backward pass
    each, whose gradients are averaged before the one update: a batch K times larger in the same memory.
    """

    def scaled_loss(
        params, x, y
    ):  # computed with a low-precision copy of the attention and MLP weights
        model.update(
            tree_unflatten(
                [
                    (k, p.astype(dtype) if ".attn." in k or ".mlp." in k else p)
                    for k, p in tree_flatten(params)
                ]
            )
        )
        loss = (
            loss_fn(model, x, y) / grad_accum
        )  # a micro-batch's share of the batch's mean loss
        return (loss_scale.scale(loss) if loss_scale else loss), loss

    optimizer.init(
        model.trainable_parameters()
    )  # the moments exist before the first step (fp16 keeps a copy)
    state = [model.state, optimizer.state, mx.random.state] + (
        [loss_scale.state] if loss_scale else []
    )

    def gradients(x, y):
        """The loss of one (micro-)batch and its float32 gradients (still multiplied by the loss scale)."""
        master = model.trainable_parameters()
        (_, loss), grads = mx.value_and_grad(scaled_loss)(master, x, y)
        model.update(master)  # back to the float32 weights, which the optimizer updates
        return loss, grads

    def update(loss, grads):
        """Average over the processes, unscale, clip, update; the batch's mean loss."""
        if group is not None and group.size() > 1:
            import distributed  # data parallelism

            grads, loss = distributed.average(
                grads, loss, group
            )  # the same on every process from here on
        grads = loss_scale.unscale(grads) if loss_scale else grads
        if grad_clip > 0:
            grads, _ = optim.clip_grad_norm(grads, grad_clip)
        (loss_scale.update if loss_scale else optimizer.update)(
            model, grads
        )  # float16: unless it overflowed
        return loss

    if grad_accum == 1:
        return mx.compile(
            lambda x, y: update(*gradients(x, y)), inputs=state, outputs=state
        ), state
    from grad_accum import (
        accumulating_step,
    )  # --grad-accum: micro-batches, then one update

    return accumulating_step(gradients, update, state, grad_accum), state


def learning_rate(args, total_steps):
    """Constant --lr, or (with --min-lr) linear warm-up then cosine decay to --min-lr, as nanoGPT."""
    if args.min_lr is None:
        return args.lr
    decay = optim.cosine_decay(
        args.lr, max(total_steps - args.warmup, 1), end=args.min_lr
    )
    warmup = optim.linear_schedule(
        0.0, args.lr, max(args.warmup, 1)
    )  # never used with --warmup 0
    return optim.join_schedules([warmup, decay], [args.warmup])


def evaluate(model, data, ctx_len, batch_size, group):
    """Mean cross-entropy over every non-overlapping window of `data` (dropout off); with several
    processes, each takes its share of the windows and the sums are added up over the processes."""
    model.eval()
    starts = np.array_split(
        np.arange(0, len(data) - ctx_len - 1, ctx_len), group.size()
    )[group.rank()]
    total = mx.array([0.0, 0.0])  # (sum of the windows' losses, windows)
    for i in range(0, len(starts), batch_size):
        x, y = windows(data, starts[i : i + batch_size], ctx_len)
        total = total + mx.stack(
            [loss_fn(model, x, y) * len(x), mx.array(len(x), mx.float32)]
        )
        mx.eval(total)
    model.train()
    loss_sum, count = mx.distributed.all_sum(
        total, group=group
    ).tolist()  # one process: `total` itself
    return loss_sum / count


class Progress:
    """Prints `Step k/N | loss = L | T ms/step | H:MM:SS left` every --log-every steps, or (without it)
    after the first step, which compiles the step function, and then about every 10 seconds."""

    def __init__(self, first, total, every):
        self.first, self.total, self.every, self.start, self.printed = (
            first,
            total,
            every,
            time.perf_counter(),
            0,
        )

    def __call__(self, step, loss):
        now, line = time.perf_counter(), f"Step {step}/{self.total} | loss = {loss:.6f}"
        if (
            step == self.first + 1
        ):  # the first step ends: the steps after it give the pace
            self.start, line = (
                now,
                line + f" | the first step took {now - self.start:.1f} s (it compiles)",
            )
        elif (step % self.every) if self.every else (now - self.printed < 10):
            return
        else:
            per_step = (now - self.start) / (step - self.first - 1)
            left = int(per_step * (self.total - step))
            line += f" | {1e3 * per_step:.0f} ms/step | {left // 3600}:{left % 3600 // 60:02d}:{left % 60:02d} left"
        self.printed = now
        print(line, flush=True)


# ---- The run ------------------------------------------------------------------------------------


def new_model(config):
    """GPT(config); on an NVIDIA GPU with its dropouts swapped for cuda_dropout.py's CUDA kernels."""
    if mx.default_device() == mx.gpu and mx.cuda.is_available():
        from cuda_dropout import (
            use_dropout_kernels,
        )  # they pay there: 13% of the training step, measured

        return use_dropout_kernels(GPT(config))
    return GPT(config)


def prepare(args):
    """The vocabulary, the training and validation ids, and the run's settings (for --resume)."""
    text = load_text(args.data)
    vocab = CharVocab(text)
    vocab.encode(
        args.prompt
    )  # unknown characters in --prompt: fail now, not after training
    data = np.array(vocab.encode(text), dtype=np.int32)
    train_data, val_data = data[: int(0.9 * len(data))], data[int(0.9 * len(data)) :]
    if (
        len(val_data) < args.ctx_len + 2
        or len(train_data) < (args.ctx_len + 1) * args.batch_size + args.ctx_len
    ):
        raise ValueError(
            f"the text ({len(text)} characters) is too short for --ctx-len {args.ctx_len} "
            f"and --batch-size {args.batch_size}"
        )
    run = {
        **{k: v for k, v in vars(args).items() if not isinstance(v, Path)},
        "chars": "".join(vocab.chars),
        "characters": len(text),
        "text_sha256": hashlib.sha256(text.encode()).hexdigest(),
    }
    return vocab, train_data, val_data, run


def build(args, vocab, run, steps, group, say):
    """The model, AdamW (its schedule over `steps` steps) and float16's loss scale, new or as --resume's
    checkpoint left them; the step they are at; what to call after each step."""
    mx.random.seed(args.seed)
    model = new_model(
        GPTConfig(
            len(vocab.chars),
            args.ctx_len,
            args.n_layers,
            args.n_heads,
            args.n_emb,
            args.dropout,
        )
    )
    optimizer = optim.AdamW(
        learning_rate(args, steps),
        betas=[0.9, args.beta2],
        weight_decay=args.weight_decay,
    )
    loss_scale, step, on_step, agree = (
        None,
        0,
        lambda: None,
        bool,
    )  # one process: its own Ctrl-C decides
    if args.dtype == "float16":
        from float16 import LossScale

        loss_scale = LossScale(optimizer)
    if args.resume:
        from resume import resume

        step = resume(
            Path(args.out) / "checkpoint.safetensors",
            run,
            model,
            optimizer,
            loss_scale,
            say,
        )
    if group.size() > 1:
        import distributed  # data parallelism: the same weights everywhere, a watchdog, one stop for all

        on_step, agree = distributed.setup(model, args.timeout, group)
    return model, optimizer, loss_scale, step, on_step, agree


class Checkpoints:
    """OUT/checkpoint.safetensors, which resume.py reads: the float32 master weights, AdamW's state,
    float16's loss scale, the step and the run's settings. Written by process 0 only, and only while
    every weight is finite; whether it (and completions.txt) can be written is checked at once, not
    after training. Remembers the last good step for the message that stops a diverging run."""

    def __init__(self, out, model, optimizer, loss_scale, run, step, writes):
        self.path, self.saved, self.writes = (
            out / "checkpoint.safetensors",
            step or None,
            writes,
        )
        self.model, self.optimizer, self.loss_scale, self.run = (
            model,
            optimizer,
            loss_scale,
            run,
        )
        if writes:  # room for the weights and two AdamW moments, twice: the old file and the new one
            check_writable(
                self.path,
                2 * 3 * 4 * sum(p.size for _, p in tree_flatten(model.parameters())),
            )
            check_writable(out / "completions.txt")

    def stop_if(self, bad, what, step):
        if bad:
            kept = (
                f"the last good checkpoint, {self.path}, is kept (step {self.saved})"
                if self.saved
                else "no checkpoint was written"
            )
            raise ValueError(
                f"{what} became inf or nan at step {step}; stopped, and {kept}. "
                "Try a lower --lr, --grad-clip 1.0, or --dtype float32"
            )

    def save(self, step):
        weights = tree_flatten(self.model.parameters())
        self.stop_if(
            not mx.all(mx.stack([mx.isfinite(w).all() for _, w in weights])).item(),
            "a weight",
            step,
        )
        if self.writes:  # names such as model.h.0.attn.c_attn.weight, optimizer.step, loss_scale.scale
            state = {
                "model": self.model.parameters(),
                "optimizer": self.optimizer.state,
                "loss_scale": self.loss_scale.state if self.loss_scale else {},
            }
            save_arrays(
                self.path,
                {
                    **dict(tree_flatten(state)),
                    "meta": json_array({**self.run, "step": step}),
                },
            )
        self.saved = step


def train(args, group):
    """Every process reads the text and builds the same model; process 0 alone prints and writes."""
    size, rank, main_process = group.size(), group.rank(), group.rank() == 0
    say = print if main_process else (lambda *args, **kwargs: None)
    vocab, train_data, val_data, run = prepare(args)
    T, B, micro = (
        args.ctx_len,
        args.batch_size,
        args.batch_size // (size * args.grad_accum),
    )
    plans = [
        epoch_batches(train_data, T, B, args.seed, e) for e in range(args.epochs)
    ]  # each epoch's batches
    ends = list(
        itertools.accumulate(map(len, plans))
    )  # the step at which each epoch ends
    # The schedule spans all epochs; --max-steps only stops early, so a capped run and its --resume
    # follow the same learning rates as one uninterrupted run.
    model, optimizer, loss_scale, step, on_step, agree = build(
        args, vocab, run, ends[-1], group, say
    )
    say(
        f"{run['characters']:,} characters, vocabulary {len(vocab.chars)}; {sum(p.size for _, p in tree_flatten(model.parameters())) / 1e6:.2f}M "
        f"parameters; {ends[-1]} steps in {args.epochs} epochs of batch {B} x {T}; {args.dtype} on {mx.default_device()}"
        + (
            f"; {size} processes x {args.grad_accum} micro-batches of {micro}"
            if micro < B
            else ""
        ),
        flush=True,
    )
    checkpoints = Checkpoints(
        Path(args.out), model, optimizer, loss_scale, run, step, main_process
    )
    train_step, state = make_train_step(
        model,
        optimizer,
        DTYPES[args.dtype],
        args.grad_clip,
        loss_scale,
        group,
        args.grad_accum,
    )
    total, first, start = (
        min(ends[-1], args.max_steps or math.inf),
        step,
        time.perf_counter(),
    )
    progress = (
        Progress(first, total, args.log_every)
        if main_process
        else (lambda step, loss: None)
    )

    def finished(loss, step):
        """Step `step` (counted from 1) is done: check its loss, tell the watchdog, show progress."""
        checkpoints.stop_if(
            not math.isfinite(value := loss.item()), "the training loss", step
        )
        on_step()
        progress(step, value)

    losses, tic, stopped = [], time.perf_counter(), False
    with signals_held(
        signal.SIGINT
    ) as interrupted:  # Ctrl-C is only noted here: the loop stops for it
        for starts in itertools.islice(itertools.chain(*plans), step, total):
            if stopped := agree(
                bool(interrupted)
            ):  # Ctrl-C: every process stops here, at the same step
                break
            # Dropout masks depend on (seed, step, process) only: --resume on as many processes is exact.
            mx.random.seed((args.seed * 1_000_003 + step) * size + rank)
            loss = train_step(
                *windows(train_data, starts.reshape(size, -1)[rank], T)
            )  # this process's rows
            # Queue this step and return at once: Python prepares the next batch while the device
            # computes. The previous step's loss is ready by now; check it.
            mx.async_eval(state, loss)
            if losses:
                finished(losses[-1], step)
            losses.append(loss)
            step += 1
            if step in ends or step == total:  # the end of an epoch, or of the run
                finished(loss, step)
                tokens_per_s = len(losses) * B * T / (time.perf_counter() - tic)
                val = evaluate(model, val_data, T, micro, group)
                on_step()
                say(
                    f"Epoch {np.searchsorted(ends, step) + 1} | train = {mx.mean(mx.stack(losses)).item():.4f} | "
                    f"val = {val:.4f} | {tokens_per_s:,.0f} tokens/s | {time.perf_counter() - start:.1f} s",
                    flush=True,
                )
                checkpoints.save(step)
                losses, tic = [], time.perf_counter()
    if stopped:
        if losses:
            finished(losses[-1], step)
        checkpoints.save(step)
        say(
            f"Interrupted at step {step}; saved {checkpoints.path}; continue with --resume",
            file=sys.stderr,
            flush=True,
        )
        if size > 1:
            agree.barrier()  # the others end only once process 0 has written the checkpoint
        sys.exit(
            130 if main_process else 0
        )  # mlx.launch stops the others when one ends with an error
    say(
        f"Trained {step - first} steps in {time.perf_counter() - start:.1f} s; checkpoint {checkpoints.path}"
    )
    return model, vocab


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add, count, number = parser.add_argument, bounded(int, 1), bounded(float, 0)
    add(
        "--data",
        type=Path,
        help="a UTF-8 text file to train on (default: Tiny Shakespeare, downloaded once)",
    )
    add(
        "--out",
        default=".",
        help="folder for completions.txt and checkpoint.safetensors (default: .)",
    )
    add(
        "--ctx-len",
        type=count,
        default=128,
        help="context length in characters (default: 128)",
    )
    add("--n-emb", type=count, default=128, help="embedding width (default: 128)")
    add("--n-heads", type=count, default=4, help="attention heads (default: 4)")
    add("--n-layers", type=count, default=3, help="transformer blocks (default: 3)")
    add(
        "--dropout",
        type=bounded(float, 0, 1),
        default=0.1,
        help="dropout probability (default: 0.1)",
    )
    add(
        "--epochs",
        type=count,
        default=20,
        help="passes over the training text (default: 20)",
    )
    add(
        "--batch-size",
        type=count,
        default=64,
        help="windows per step, over all processes together (default: 64)",
    )
    add(
        "--grad-accum",
        type=count,
        default=1,
        help="micro-batches per process and step, to fit a batch in memory (default: 1)",
    )
    add("--lr", type=number, default=1e-3, help="AdamW learning rate (default: 1e-3)")
    add(
        "--min-lr",
        type=number,
        help="decay the learning rate to this with a cosine after --warmup (default: constant)",
    )
    add(
        "--warmup",
        type=bounded(int, 0),
        default=0,
        help="linear warm-up steps with --min-lr (default: 0)",
    )
    add(
        "--weight-decay",
        type=number,
        default=0.01,
        help="AdamW weight decay (default: 0.01)",
    )
    add(
        "--beta2",
        type=bounded(float, 0, 1),
        default=0.999,
        help="AdamW beta2 (default: 0.999)",
    )
    add(
        "--grad-clip",
        type=number,
        default=0.0,
        help="clip the gradient norm to this; 0 is off (default: 0)",
    )
    add(
        "--max-steps",
        type=count,
        help="stop after this many training steps in all (default: no cap)",
    )
    add(
        "--resume",
        action="store_true",
        help="continue the run in OUT/checkpoint.safetensors (on any number of processes)",
    )
    add(
        "--log-every",
        type=bounded(int, 0),
        default=0,
        help="print the step, loss, pace and time left every this many "
        "steps (default: 0, about every 10 s)",
    )
    add(
        "--timeout",
        type=number,
        default=600,
        help="with several processes: stop when none made progress for this "
        "many seconds, as when one hangs; 0 waits forever (default: 600)",
    )
    add(
        "--prompt",
        default="\n",
        help="text the generated characters continue (default: a newline)",
    )
    add(
        "--max-tokens",
        type=bounded(int, 0),
        default=1000,
        help="characters to generate (default: 1000)",
    )
    add(
        "--temp",
        type=number,
        default=1.0,
        help="sampling temperature; 0 is greedy (default: 1.0)",
    )
    add(
        "--dtype",
        choices=list(DTYPES),
        default="bfloat16" if mx.default_device() == mx.gpu else "float32",
        help="compute in this dtype; weights and AdamW stay float32 (default: bfloat16 on a GPU, else float32)",
    )
    add(
        "--seed",
        type=bounded(int, 0, 2**32),
        default=0,
        help="seed for initialisation, batches, dropout, sampling (default: 0)",
    )
    args = parser.parse_args()
    if args.n_emb % args.n_heads:
        parser.error(
            f"--n-emb {args.n_emb} must be a multiple of --n-heads {args.n_heads}"
        )
    return args


def main():
    args = parse_args()
    group = (
        mx.distributed.init()
    )  # a group of one process, unless a launcher started this one
    try:
        if {"MLX_RANK", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"} & os.environ.keys():
            import distributed  # data parallelism: the processes mlx.launch (or mpirun) started

            group = distributed.init()
        if args.batch_size % (group.size() * args.grad_accum):
            raise ValueError(
                f"--batch-size {args.batch_size} (the global batch) must be a multiple of the number of "
                f"processes ({group.size()}) times --grad-accum ({args.grad_accum})"
            )
        if group.rank() == 0 and mx.default_device() == mx.cpu:
            from blas import (
                warn_if_reference_blas,
            )  # on Linux, mlx[cpu]'s bundled BLAS is slow

            warn_if_reference_blas()
        try:
            mx.eval(
                mx.ones((2, 2), DTYPES[args.dtype])
                @ mx.ones((2, 2), DTYPES[args.dtype])
            )
        except Exception as e:
            raise ValueError(
                f"--dtype {args.dtype}: MLX on {mx.default_device()} cannot compute in {args.dtype} ({e}); "
                "use --dtype float32"
            ) from None
        model, vocab = train(args, group)
        if group.rank() != 0:
            return  # process 0 alone generates and writes
        model.eval()
        mx.random.seed(args.seed)
        completion = vocab.decode(
            model.generate(
                vocab.encode(args.prompt), args.max_tokens, temperature=args.temp
            )
        )
        out = Path(args.out) / "completions.txt"
        write_atomically(
            out,
            lambda tmp: Path(tmp).write_text(
                args.prompt + completion, encoding="utf-8"
            ),
        )
    except (
        KeyboardInterrupt
    ):  # before or after training: the training loop stops at a step boundary itself
        print("\nInterrupted", file=sys.stderr)
        sys.exit(130)
    except (
        ValueError,
        OSError,
        RuntimeError,
    ) as e:  # bad input, a full disk; a lost connection to another process
        lost = isinstance(e, RuntimeError) and group.size() > 1
        sys.exit(
            f"error: {e}"
            + (
                f" (process {group.rank()} of {group.size()}: another one probably stopped first; "
                "see its message)"
                if lost
                else ""
            )
            if group.rank() == 0 or lost
            else 1
        )
    print(f"Wrote {len(completion)} generated characters to {out}:\n{completion[:300]}")


if __name__ == "__main__":
    main()
