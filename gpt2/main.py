"""Train a character-level GPT on a text (default: Tiny Shakespeare); write generated
text to OUT/completions.txt and the model to OUT/checkpoint.safetensors.

    python gpt2/main.py --n-layers 2 --n-emb 64 --ctx-len 64 --batch-size 32 \\
        --dropout 0 --lr 3e-3 --max-steps 2000 --max-tokens 300  # minutes on a CPU
    python gpt2/main.py                             # the walkthrough's run
    python gpt2/main.py --resume                    # continue from the checkpoint
    python gpt2/generate.py checkpoint.safetensors  # sample the trained model again
    mlx.launch -n 4 --python python3 gpt2/main.py --batch-size 256  # 4 processes

The vocabulary is the set of characters in the text (65 for Tiny Shakespeare). The first
90% of the text trains, the last 10% validates. Each epoch cuts the training text into
windows of --ctx-len characters (inputs) and the same windows shifted by one (labels),
shuffles them into batches and takes one AdamW step per batch. The model is model.py's
GPT.

Read only when used: distributed.py (under mlx.launch, N processes train one model),
resume.py (--resume) and attention_dropout.py (the dropouts as CUDA kernels).
"""

import signal

try:  # Ctrl-C while Python and MLX load: the default action, a quiet exit
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    import argparse
    import hashlib
    import itertools
    import math
    import os
    import sys
    import time
    from dataclasses import asdict
    from datetime import timedelta
    from pathlib import Path

    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim
    import numpy as np
    from mlx.utils import tree_flatten, tree_map, tree_unflatten
    from model import GPT, GPTConfig
    from save import json_array, save_arrays, write_atomically
finally:  # from here on Ctrl-C raises KeyboardInterrupt: one line
    signal.signal(signal.SIGINT, signal.default_int_handler)

DTYPES = {"bfloat16": mx.bfloat16, "float32": mx.float32}
CHAR_RNN = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data"
SHAKESPEARE = f"{CHAR_RNN}/tinyshakespeare/input.txt"


# ---- Data ---------------------------------------------------------------------------


def download_shakespeare():
    """Tiny Shakespeare (Karpathy's char-rnn data), downloaded once to ~/.cache."""
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    path = Path(cache) / "mlx-examples" / "tinyshakespeare" / "input.txt"
    if not path.is_file():
        print(f"Downloading Tiny Shakespeare to {path}", file=sys.stderr)
        path.parent.mkdir(parents=True, exist_ok=True)
        from urllib.request import urlretrieve

        try:
            write_atomically(path, lambda tmp: urlretrieve(SHAKESPEARE, tmp))
        except OSError as e:  # no network, a timeout, an HTTP error
            raise ValueError(
                f"cannot download Tiny Shakespeare from {SHAKESPEARE} ({e}); put "
                f"input.txt at {path} by hand, or pass --data PATH to any text file"
            ) from None
    return path


def load_text(path):
    path = path or download_shakespeare()
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read {path} as UTF-8 text: {e}") from None
    if not text.strip("\0"):
        raise ValueError(f"{path} has no text (it is empty or all NUL bytes)")
    return text


class CharVocab:
    """Characters <-> integer ids, in sorted order of the characters of the text."""

    def __init__(self, chars):
        self.chars = sorted(set(chars))
        self.ids = {c: i for i, c in enumerate(self.chars)}

    def encode(self, text):
        unknown = sorted(set(text) - self.ids.keys())
        if unknown:
            raise ValueError(
                f"characters not in the training text: {''.join(unknown)!r}"
            )
        return [self.ids[c] for c in text]

    def decode(self, ids):
        return "".join(self.chars[i] for i in ids)


def epoch_batches(data, ctx_len, batch_size, seed, epoch):
    """The window starts of one epoch's batches, in order: (batches, batch_size).

    Windows do not overlap; their grid starts at a random offset each epoch, so that
    over epochs every position is seen at every place in the context. Partial batches
    are dropped. The same (seed, epoch) gives the same plan: --resume is exact.
    """
    rng = np.random.default_rng([seed, epoch])
    offset = int(rng.integers(0, ctx_len))
    starts = rng.permutation(np.arange(offset, len(data) - ctx_len - 1, ctx_len))
    return starts[: len(starts) // batch_size * batch_size].reshape(-1, batch_size)


def windows(data, starts, ctx_len):
    """Inputs data[s : s + ctx_len] and labels one further, for each start s."""
    index = starts[:, None] + np.arange(ctx_len)  # (B, ctx_len)
    return mx.array(data[index]), mx.array(data[index + 1])


# ---- Training -----------------------------------------------------------------------


def loss_fn(model, x, y):
    logits = model(x).astype(mx.float32)  # the loss in float32 whatever the dtype
    return nn.losses.cross_entropy(logits, y, reduction="mean")


def make_train_step(
    model, optimizer, dtype=mx.float32, grad_clip=0.0, group=None, grad_accum=1
):
    """One compiled AdamW step: train_step(x, y) -> loss (lazy), and the step's `state`.

    Mixed precision: the model keeps float32 weights and AdamW float32 moments; the step
    computes with a `dtype` copy of the attention and MLP weights (embeddings and
    LayerNorms stay float32), whose gradients come back in float32 for the update.
    mx.compile traces the step once and replays it; what it reads and writes (weights,
    AdamW's state, the random state for dropout) is its `state`.

    With a `group` of processes, each passes its rows of the batch and the gradients are
    averaged over the processes before clipping and the update. grad_accum K cuts the
    rows into K micro-batches, one forward and backward pass each, summed before the one
    update: a batch K times larger in the same memory.
    """

    def low_precision_loss(params, x, y):
        cast = [
            (k, p.astype(dtype) if ".attn." in k or ".mlp." in k else p)
            for k, p in tree_flatten(params)
        ]
        model.update(tree_unflatten(cast))
        return loss_fn(model, x, y) / grad_accum  # a micro-batch's share of the mean

    def gradients(x, y):
        master = model.trainable_parameters()
        loss, grads = mx.value_and_grad(low_precision_loss)(master, x, y)
        model.update(master)  # the float32 weights again, which AdamW updates
        return loss, grads

    def update(loss, grads):
        if group is not None and group.size() > 1:
            import distributed

            grads, loss = distributed.average(grads, loss, group)
        if grad_clip > 0:
            grads, _ = optim.clip_grad_norm(grads, grad_clip)
        optimizer.update(model, grads)
        return loss

    optimizer.init(model.trainable_parameters())  # the moments exist before step 1
    state = [model.state, optimizer.state, mx.random.state]
    if grad_accum == 1:
        step = mx.compile(lambda x, y: update(*gradients(x, y)), state, state)
        return step, state
    gradients = mx.compile(gradients, inputs=state, outputs=state)
    update = mx.compile(update, inputs=state, outputs=state)

    def accumulating_step(x, y):
        total = gradients(x[: len(x) // grad_accum], y[: len(y) // grad_accum])
        for x_k, y_k in zip(mx.split(x, grad_accum)[1:], mx.split(y, grad_accum)[1:]):
            mx.eval(total)  # one micro-batch's activations in memory at a time
            total = tree_map(mx.add, total, gradients(x_k, y_k))
        return update(*total)

    return accumulating_step, state


def learning_rate(args, total_steps):
    """Constant --lr, or with --min-lr a linear warm-up, then cosine decay (nanoGPT)."""
    if args.min_lr is None:
        return args.lr
    decay_steps = max(total_steps - args.warmup, 1)
    decay = optim.cosine_decay(args.lr, decay_steps, end=args.min_lr)
    warmup = optim.linear_schedule(0.0, args.lr, max(args.warmup, 1))
    return optim.join_schedules([warmup, decay], [args.warmup])


def evaluate(model, data, ctx_len, batch_size, group):
    """Mean loss over every non-overlapping window of `data`, dropout off; with several
    processes, each takes its share of the windows and the sums are added up."""
    model.eval()
    all_starts = np.arange(0, len(data) - ctx_len - 1, ctx_len)
    starts = np.array_split(all_starts, group.size())[group.rank()]
    total = mx.array([0.0, 0.0])  # (sum of the windows' losses, windows)
    for i in range(0, len(starts), batch_size):
        x, y = windows(data, starts[i : i + batch_size], ctx_len)
        count = mx.array(len(x), mx.float32)
        total = total + mx.stack([loss_fn(model, x, y) * count, count])
        mx.eval(total)
    model.train()
    loss_sum, count = mx.distributed.all_sum(total, group=group).tolist()
    return loss_sum / count


class Progress:
    """Prints `Step k/N | loss = L | T ms/step | H:MM:SS left` after the first step
    (which compiles), then every `every` steps, or without it about every 10 seconds."""

    def __init__(self, first, total, every):
        self.first, self.total, self.every = first, total, every
        self.start = self.printed = time.perf_counter()

    def __call__(self, step, loss):
        now = time.perf_counter()
        line = f"Step {step}/{self.total} | loss = {loss:.6f}"
        if step == self.first + 1:
            line += f" | the first step took {now - self.start:.1f} s (it compiles)"
            self.start = now  # the pace is measured after it
        elif self.every and step % self.every:
            return
        elif not self.every and now - self.printed < 10:
            return
        else:
            per_step = (now - self.start) / (step - self.first - 1)
            left = timedelta(seconds=int(per_step * (self.total - step)))  # H:MM:SS
            line += f" | {1e3 * per_step:.0f} ms/step | {left} left"
        self.printed = now
        print(line, flush=True)


class Checkpoint:
    """OUT/checkpoint.safetensors: the float32 weights under model., AdamW's state under
    optimizer., the GPTConfig (for generate.py), and the step and the run's settings
    (for resume.py). Written by process 0 only, and only while every weight is finite.
    """

    def __init__(self, path, model, optimizer, run, step, writes):
        self.path, self.model, self.optimizer = path, model, optimizer
        self.run, self.saved, self.writes = run, step or None, writes

    def kept(self):
        if self.saved is None:
            return "no checkpoint was written"
        return f"the last good checkpoint, {self.path} (step {self.saved}), is whole"

    def stop(self, what, step):
        raise ValueError(
            f"{what} at step {step}: stopped, and {self.kept()}. "
            "Try a lower --lr, or --grad-clip 1.0"
        )

    def save(self, step):
        state = {"model": self.model.parameters(), "optimizer": self.optimizer.state}
        weights = [w for _, w in tree_flatten(state["model"])]
        if not mx.all(mx.stack([mx.isfinite(w).all() for w in weights])).item():
            self.stop("a weight became inf or nan", step)
        if self.writes:
            arrays = dict(tree_flatten(state))
            arrays["config"] = json_array(asdict(self.model.config))
            arrays["meta"] = json_array({**self.run, "step": step})
            try:
                save_arrays(self.path, arrays)
            except (OSError, RuntimeError) as e:  # a full disk
                raise ValueError(
                    f"cannot write the checkpoint of step {step} ({e}); "
                    f"{self.kept()}: free some space, then continue with --resume"
                ) from None
        self.saved = step


# ---- The run ------------------------------------------------------------------------


def prepare(args):
    """The vocabulary, the training and validation ids, the run's settings, and the
    window starts of each epoch's batches."""
    text = load_text(args.data)
    vocab = CharVocab(text)
    vocab.encode(args.prompt)  # unknown characters in --prompt: refused now
    data = np.array(vocab.encode(text), dtype=np.int32)
    split = int(0.9 * len(data))
    train_data, val_data = data[:split], data[split:]
    one_batch = (args.ctx_len + 1) * args.batch_size + args.ctx_len
    if len(val_data) < args.ctx_len + 2 or len(train_data) < one_batch:
        raise ValueError(
            f"the text ({len(text)} characters) is too short for --ctx-len "
            f"{args.ctx_len} and --batch-size {args.batch_size}"
        )
    run = {k: v for k, v in vars(args).items() if not isinstance(v, Path)}
    run["chars"] = "".join(vocab.chars)
    args.characters = len(text)
    run["text_sha256"] = hashlib.sha256(text.encode()).hexdigest()
    # Each epoch's batches. The learning-rate schedule spans all epochs; --max-steps
    # only stops early, so a capped run and its --resume follow one run's rates.
    plans = [
        epoch_batches(train_data, args.ctx_len, args.batch_size, args.seed, epoch)
        for epoch in range(args.epochs)
    ]
    return vocab, train_data, val_data, run, plans


def new_model(config):
    """GPT(config); on an NVIDIA GPU with its dropouts swapped for CUDA kernels, which
    save 13% of the training step there (README.md)."""
    if mx.default_device() == mx.gpu and mx.cuda.is_available():
        from attention_dropout import use_dropout_kernels

        return use_dropout_kernels(GPT(config))
    return GPT(config)


def build(args, vocab, run, steps, group, say):
    """The model, its Checkpoint (with AdamW, its schedule over `steps` steps) and the
    compiled step, new or as --resume's checkpoint left them; the step they are at;
    what to call after each step (the watchdog), and how the processes agree to stop."""
    mx.random.seed(args.seed)
    config = GPTConfig(
        vocab_size=len(vocab.chars),
        block_size=args.ctx_len,
        n_layer=args.n_layers,
        n_head=args.n_heads,
        n_embd=args.n_emb,
        dropout=args.dropout,
    )
    model = new_model(config)
    lr = learning_rate(args, steps)
    optimizer = optim.AdamW(lr, [0.9, args.beta2], weight_decay=args.weight_decay)
    train_step, state = make_train_step(
        model, optimizer, DTYPES[args.dtype], args.grad_clip, group, args.grad_accum
    )
    path = args.out / "checkpoint.safetensors"
    step, on_step, agree = 0, lambda: None, bool  # one process: its own Ctrl-C
    if args.resume:
        from resume import resume

        step = resume(path, run, model, optimizer, say)
    if group.size() > 1:  # the same weights everywhere, a watchdog, one stop for all
        import distributed

        on_step, agree = distributed.setup(model, args.timeout, group)
    checkpoint = Checkpoint(path, model, optimizer, run, step, group.rank() == 0)
    return model, checkpoint, train_step, state, step, on_step, agree


def describe(args, vocabulary, model, steps, size, micro):
    """The line that says what the run does, before it starts."""
    n_params = sum(p.size for _, p in tree_flatten(model.parameters()))
    line = (
        f"{args.characters:,} characters, vocabulary {vocabulary}; "
        f"{n_params / 1e6:.2f}M parameters; {steps} steps in {args.epochs} epochs of "
        f"batch {args.batch_size} x {args.ctx_len}; {args.dtype} on "
        f"{mx.default_device()}"
    )
    if micro < args.batch_size:
        line += f"; {size} processes x {args.grad_accum} micro-batches of {micro}"
    return line


def epoch_summary(args, model, val_data, group, micro, losses, seconds):
    """Evaluate; `train = L | val = L | N tokens/s` of the epoch's steps."""
    val = evaluate(model, val_data, args.ctx_len, micro, group)
    train_loss = mx.mean(mx.stack(losses)).item()
    tokens_per_s = len(losses) * args.batch_size * args.ctx_len / seconds
    return f"train = {train_loss:.4f} | val = {val:.4f} | {tokens_per_s:,.0f} tokens/s"


def save_and_exit(checkpoint, step, agree, group):
    """After Ctrl-C: process 0 writes this step's checkpoint and says so; exit 130."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    checkpoint.save(step)
    if group.rank() == 0:
        saved = f"saved {checkpoint.path}; continue with --resume"
        print(f"Interrupted at step {step}; {saved}", file=sys.stderr)
    if group.size() > 1:
        agree.barrier()  # the others end once process 0 has written
    sys.exit(130 if group.rank() == 0 else 0)  # mlx.launch stops the others


def train(args, group):
    """Every process reads the text and builds the same model; process 0 alone prints
    and writes. Returns the trained model and the vocabulary."""
    size, rank, main_process = group.size(), group.rank(), group.rank() == 0
    say = print if main_process else (lambda *args, **kwargs: None)
    vocab, train_data, val_data, run, plans = prepare(args)
    if main_process:  # an --out that cannot be made: refused now, not after training
        args.out.mkdir(parents=True, exist_ok=True)
    ends = list(itertools.accumulate(map(len, plans)))  # the step ending each epoch
    total = min(ends[-1], args.max_steps or math.inf)  # the schedule spans all epochs
    built = build(args, vocab, run, ends[-1], group, say)
    model, checkpoint, train_step, state, step, on_step, agree = built
    micro = args.batch_size // (size * args.grad_accum)  # rows per forward, backward
    say(describe(args, len(vocab.chars), model, ends[-1], size, micro), flush=True)
    progress = Progress(step, total, args.log_every)
    diverged = 3 * math.log(len(vocab.chars)) + 1  # a uniform guess: log(vocabulary)

    def finished(loss, step):
        """Step `step` is done: check its loss, tell the watchdog, show progress."""
        value = loss.item()
        if not value < diverged:  # also NaN
            checkpoint.stop(f"the training loss diverged ({value:.4g})", step)
        on_step()
        if main_process:
            progress(step, value)

    first, start, losses, tic = step, time.perf_counter(), [], time.perf_counter()
    interrupted = []  # Ctrl-C only notes itself: the loop stops at a step boundary
    signal.signal(signal.SIGINT, lambda *_: interrupted.append(True))
    for starts in itertools.islice(itertools.chain(*plans), step, total):
        if agree(bool(interrupted)):  # every process stops at the same step
            if losses:
                finished(losses[-1], step)
            save_and_exit(checkpoint, step, agree, group)
        # Dropout masks depend on (seed, step, process) only: --resume is exact.
        mx.random.seed((args.seed * 1_000_003 + step) * size + rank)
        x, y = windows(train_data, starts.reshape(size, -1)[rank], args.ctx_len)
        loss = train_step(x, y)
        # Queue this step and return at once: Python prepares the next batch while the
        # device computes. The previous step's loss is ready by now; check it.
        mx.async_eval(state, loss)
        if losses:
            finished(losses[-1], step)
        losses.append(loss)
        step += 1
        if step in ends or step == total:  # the end of an epoch, or of the run
            finished(loss, step)
            seconds = time.perf_counter() - tic
            line = epoch_summary(args, model, val_data, group, micro, losses, seconds)
            on_step()  # the evaluation was progress too
            elapsed = time.perf_counter() - start
            epoch = np.searchsorted(ends, step) + 1
            say(f"Epoch {epoch} | {line} | {elapsed:.1f} s", flush=True)
            checkpoint.save(step)
            losses, tic = [], time.perf_counter()
    signal.signal(signal.SIGINT, signal.default_int_handler)
    say(f"Trained {step - first} steps in {time.perf_counter() - start:.1f} s")
    return model, vocab


def warn_if_reference_blas(maps=Path("/proc/self/maps")):
    """mlx[cpu] on Linux bundles netlib's reference BLAS: matrix products ~30x slower
    than OpenBLAS's, training here about 6x. Preloading OpenBLAS fixes it (README.md).
    `maps` lists the shared libraries this process has loaded (on Linux).
    """
    libraries = maps.read_text() if maps.exists() else ""
    if "mlx_cpu.libs/libblas" in libraries and "libopenblas" not in libraries:
        print(
            "warning: MLX uses the slow reference BLAS of mlx[cpu] (training takes "
            "about 6x longer); gpt2/README.md says how to preload OpenBLAS",
            file=sys.stderr,
        )


def bounded(kind, low, high=math.inf):
    """An argparse type: a `kind` (int or float) from `low` to below `high`: never
    NaN or infinite."""

    def parse(value):
        try:
            number = kind(value)
        except ValueError:
            number = math.nan  # refused below: NaN is in no range
        if not low <= number < high:
            expected = "an integer" if kind is int else "a finite number"
            below = f" and below {high}" if high < math.inf else ""
            raise argparse.ArgumentTypeError(
                f"expected {expected} at least {low}{below}, got {value!r}"
            )
        return number

    return parse


def parse_args():
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add, count, number = parser.add_argument, bounded(int, 1), bounded(float, 0)
    natural, fraction = bounded(int, 0), bounded(float, 0, 1)
    add("--data", type=Path, help="a UTF-8 text file; None: Tiny Shakespeare")
    add("--out", type=Path, default=".", help="folder for the files written")
    add("--ctx-len", type=count, default=128, help="context length in characters")
    add("--n-emb", type=count, default=128, help="embedding width")
    add("--n-heads", type=count, default=4, help="attention heads")
    add("--n-layers", type=count, default=3, help="transformer blocks")
    add("--dropout", type=fraction, default=0.1, help="dropout probability")
    add("--epochs", type=count, default=20, help="passes over the training text")
    add("--batch-size", type=count, default=64, help="windows per step, all processes")
    add("--grad-accum", type=count, default=1, help="micro-batches per process, step")
    add("--lr", type=number, default=1e-3, help="AdamW learning rate")
    add("--min-lr", type=number, help="cosine decay to this; None: constant --lr")
    add("--warmup", type=natural, default=0, help="warm-up steps (--min-lr)")
    add("--weight-decay", type=number, default=0.01, help="AdamW weight decay")
    add("--beta2", type=fraction, default=0.999, help="AdamW beta2")
    add("--grad-clip", type=number, default=0.0, help="clip the gradient norm; 0: off")
    add("--max-steps", type=count, help="stop after this many steps; None: no cap")
    add("--resume", action="store_true", help="continue OUT/checkpoint.safetensors")
    add("--log-every", type=natural, default=0, help="progress every N steps; 0: ~10 s")
    add("--timeout", type=number, default=600, help="seconds a hung process may take")
    add("--prompt", default="\n", help="text to continue (default: %(default)r)")
    add("--max-tokens", type=natural, default=1000, help="characters to write")
    add("--temp", type=number, default=0.8, help="sampling temperature; 0: greedy")
    dtype = "bfloat16" if mx.default_device() == mx.gpu else "float32"
    add("--dtype", choices=DTYPES, default=dtype, help="compute dtype; weights float32")
    add("--seed", type=bounded(int, 0, 2**32), default=0, help="for everything random")
    args = parser.parse_args()
    if not args.prompt:
        parser.error("--prompt is empty: give the text to continue")
    if args.n_emb % args.n_heads:
        parser.error(f"--n-emb {args.n_emb} must be a multiple of --n-heads")
    return args


def main():
    args = parse_args()
    group = mx.distributed.init()  # one process, unless a launcher started this one
    try:
        if {"MLX_RANK", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"} & os.environ.keys():
            import distributed  # the processes mlx.launch (or mpirun) started

            group = distributed.init()
        if args.batch_size % (group.size() * args.grad_accum):
            raise ValueError(
                f"--batch-size {args.batch_size} must be a multiple of the processes "
                f"({group.size()}) times --grad-accum ({args.grad_accum})"
            )
        if group.rank() == 0 and mx.default_device() == mx.cpu:
            warn_if_reference_blas()
        model, vocab = train(args, group)
        if group.rank() != 0:
            return  # process 0 alone generates and writes
        model.eval()
        mx.random.seed(args.seed)
        prompt = vocab.encode(args.prompt)
        tokens = model.generate(prompt, args.max_tokens, temperature=args.temp)
        completion = vocab.decode(tokens)
        out = args.out / "completions.txt"
        write_atomically(
            out, lambda tmp: Path(tmp).write_text(args.prompt + completion)
        )
    except (ValueError, OSError, RuntimeError) as e:  # bad input, a full disk
        if group.size() > 1 and isinstance(e, RuntimeError):  # a lost connection
            sys.exit(
                f"error: {e} (process {group.rank()} of {group.size()}: another one "
                "probably stopped first; see its message)"
            )
        sys.exit(f"error: {e}" if group.rank() == 0 else 1)
    print(f"Wrote {out}:\n{completion[:300]}")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        print("Interrupted", file=sys.stderr)
        sys.exit(130)
