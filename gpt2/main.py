"""Train a character-level GPT on Tiny Shakespeare, then write 1000 generated characters to completions.txt.

    python gpt2/main.py                                   # the walkthrough's defaults, ~1M characters
    python gpt2/main.py --data my.txt --max-steps 200     # any text file, a short run
    python gpt2/main.py --resume                          # continue from OUT/checkpoint.safetensors
    mlx.launch -n 4 gpt2/main.py --batch-size 256         # one model on 4 processes (distributed.py)
    python gpt2/main.py --dtype float32                   # compute in float32 (default: bfloat16 on a GPU)

The vocabulary is the set of characters in the text (65 for Tiny Shakespeare). The first 90% of the
text trains, the last 10% validates. Each epoch cuts the training text into windows of ctx_len
characters (input) and the same windows shifted by one (labels), shuffles them into mini-batches,
and takes one AdamW step per batch. The model is gpt2/model.py's GPT.

Started by mlx.launch, N processes train one model: --batch-size is the global batch, each process
computes the gradients of its 1/N of it, and they are averaged over the processes in every step.
Process 0 alone prints and writes files.
"""

import argparse
import hashlib
import math
import os
import sys
import tempfile
import time
import urllib.request
from functools import partial
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_unflatten

import distributed
from model import GPT, GPTConfig, config_array, from_json_array, json_array, save_arrays

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"


class DataError(Exception):
    """The text could not be found, downloaded or read. The message says what to do."""


# ---- Data ---------------------------------------------------------------------------------------


def default_cache_path():
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "mlx-examples" / "tinyshakespeare" / "input.txt"


def write_atomically(path, data):
    """Write bytes to `path` through a temporary file in the same folder, renamed when complete."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def download_shakespeare(path, url=SHAKESPEARE_URL):
    """Download Tiny Shakespeare to `path`, checking its SHA-256, through a temporary file."""
    print(f"Downloading Tiny Shakespeare from {url} to {path}", file=sys.stderr)
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            data = response.read()
    except Exception as e:  # URLError, timeouts, HTTP errors
        raise DataError(f"cannot download Tiny Shakespeare from {url} ({e}); download input.txt by hand "
                        f"to {path}, or pass --data PATH to any text file") from None
    if hashlib.sha256(data).hexdigest() != SHAKESPEARE_SHA256:
        raise DataError(f"the file downloaded from {url} is not Tiny Shakespeare (SHA-256 mismatch); "
                        f"put the right input.txt in {path} by hand")
    write_atomically(path, data)


def load_text(data_path=None, url=SHAKESPEARE_URL):
    """The training text: `data_path` if given, else Tiny Shakespeare from the cache (downloaded once)."""
    if data_path is None:
        data_path = default_cache_path()
        if not data_path.is_file():
            download_shakespeare(data_path, url)
    try:
        text = Path(data_path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read {data_path} as UTF-8 text: {e}") from None
    return text


class CharVocab:
    """Characters <-> integer ids, in sorted order of the characters seen in the text."""

    def __init__(self, chars):
        self.chars = sorted(set(chars))
        self.ids = {c: i for i, c in enumerate(self.chars)}

    def encode(self, text):
        unknown = sorted(set(text) - set(self.ids))
        if unknown:
            raise ValueError(f"characters not in the training vocabulary: {''.join(unknown)!r}")
        return [self.ids[c] for c in text]

    def decode(self, ids):
        return "".join(self.chars[i] for i in ids)


def epoch_batches(data, ctx_len, batch_size, seed, epoch):
    """The (B, ctx_len) window start positions of one epoch's batches, in order.

    Windows do not overlap; the grid of windows starts at a random offset each epoch, so that over
    epochs the model sees every position at every place in the context. Partial batches are dropped.
    """
    rng = np.random.default_rng([seed, epoch])  # the same plan for the same (seed, epoch): --resume is exact
    offset = int(rng.integers(0, ctx_len))
    starts = np.arange(offset, len(data) - ctx_len - 1, ctx_len)
    starts = rng.permutation(starts)
    n_batches = len(starts) // batch_size
    return starts[: n_batches * batch_size].reshape(n_batches, batch_size)


def windows(data, starts, ctx_len):
    """Inputs data[s : s + ctx_len] and labels data[s + 1 : s + ctx_len + 1] for each start s: (B, ctx_len) each."""
    index = starts[:, None] + np.arange(ctx_len)
    return mx.array(data[index]), mx.array(data[index + 1])


# ---- Training -----------------------------------------------------------------------------------


DTYPES = {"bfloat16": mx.bfloat16, "float16": mx.float16, "float32": mx.float32}


def loss_fn(model, x, y):
    logits = model(x).astype(mx.float32)  # (B, T, vocab): the loss in float32 whatever the compute dtype
    return nn.losses.cross_entropy(logits, y, reduction="mean")


def new_loss_scale():
    """float16's dynamic loss scale: the factor, and the overflow-free steps since it last changed."""
    return {"scale": mx.array(2.0**15), "good_steps": mx.array(0)}


def make_train_step(model, optimizer, dtype=mx.float32, grad_clip=0.0, loss_scale=None, group=None, grad_accum=1):
    """One compiled AdamW step on a batch: train_step(x, y) -> loss (lazy, float32).

    Mixed precision: the model holds float32 master weights and AdamW float32 moments. Each step
    casts the weights to `dtype` for the forward and backward pass; the gradient of that cast
    returns the gradients in float32, and the update is made in float32 on the master weights.

    float16 (largest value 65504, smallest normal 6e-5) also needs loss scaling: the loss is
    multiplied by loss_scale["scale"] before the backward pass, so that small gradients do not
    flush to zero, and the gradients are divided by it after. A step whose gradients overflowed
    changes nothing but the scale, which it halves; 1000 overflow-free steps in a row double it.

    mx.compile traces the step once and replays it. The model's weights, the optimizer's state, the
    random state (for dropout) and the loss scale are read and written by every call, so they are
    the compiled function's implicit inputs and outputs: `state`, returned beside the step.

    Data parallelism (distributed.py): with a `group` of several processes, each calls train_step
    with its own rows of the batch, and the gradients and the loss are averaged over the processes
    inside the compiled step, before clipping and the update, so every process makes the same
    update. grad_accum K cuts the rows into K micro-batches, one forward and backward pass each,
    whose gradients are averaged before the one update (nanoGPT's gradient accumulation): a batch
    K times larger in the memory of one micro-batch.
    """
    scaling = dtype == mx.float16
    loss_scale = loss_scale or new_loss_scale()
    group = group or mx.distributed.init()

    def low_precision(name, p):  # the attention and MLP weights; embeddings and LayerNorms stay float32
        return p.astype(dtype) if ".attn." in name or ".mlp." in name else p

    def scaled_loss(params, x, y):
        # The low-precision copy of the weights that the forward and backward pass compute with.
        model.update(tree_unflatten([(k, low_precision(k, p)) for k, p in tree_flatten(params)]))
        loss = loss_fn(model, x, y)
        return (loss * loss_scale["scale"] if scaling else loss), loss

    loss_and_grad = mx.value_and_grad(scaled_loss)
    optimizer.init(model.trainable_parameters())  # the moments exist before the first step (fp16 keeps a copy)
    state = [model.state, optimizer.state, mx.random.state] + ([loss_scale] if scaling else [])

    def update_unless_overflowed(grads):
        """float16: the optimizer's update where every gradient is finite, else no change; then the scale."""
        finite = mx.all(mx.stack([mx.isfinite(g).all() for _, g in tree_flatten(grads)]))
        before = (model.trainable_parameters(), tree_map(lambda a: a, optimizer.state))
        optimizer.update(model, grads)
        keep_if_finite = partial(tree_map, lambda new, old: mx.where(finite, new, old))
        model.update(keep_if_finite(model.trainable_parameters(), before[0]))
        optimizer.state.update(keep_if_finite(optimizer.state, before[1]))  # in place: `state` holds this dict
        good_steps = mx.where(finite, loss_scale["good_steps"] + 1, 0)
        grow = good_steps >= 1000
        loss_scale["scale"] = mx.where(finite, mx.where(grow, 2.0, 1.0), 0.5) * loss_scale["scale"]
        loss_scale["good_steps"] = mx.where(grow, 0, good_steps)

    def gradients(x, y):
        """The loss of one (micro-)batch and its float32 gradients, still multiplied by the loss scale."""
        master = model.trainable_parameters()
        (_, loss), grads = loss_and_grad(master, x, y)  # grads: float32, like the master weights
        model.update(master)  # back to the float32 weights, which the optimizer updates
        return loss, grads

    def update(loss, grads):
        """Average over micro-batches and processes, unscale, clip, update; the batch's mean loss."""
        if grad_accum > 1:  # sums over the micro-batches -> means
            loss, grads = loss / grad_accum, tree_map(lambda g: g / grad_accum, grads)
        grads, loss = distributed.average(grads, loss, group)  # from here on the same on every process
        if scaling:
            grads = tree_map(lambda g: g / loss_scale["scale"], grads)
        if grad_clip > 0:
            grads, _ = optim.clip_grad_norm(grads, grad_clip)
        if scaling:
            update_unless_overflowed(grads)
        else:
            optimizer.update(model, grads)
        return loss

    if grad_accum == 1:
        @partial(mx.compile, inputs=state, outputs=state)
        def train_step(x, y):
            return update(*gradients(x, y))

        return train_step, state

    gradients = mx.compile(gradients, inputs=state, outputs=state)
    update = mx.compile(update, inputs=state, outputs=state)

    def train_step(x, y):
        loss, grads = 0.0, None
        for x_micro, y_micro in zip(mx.split(x, grad_accum), mx.split(y, grad_accum)):
            micro_loss, micro_grads = gradients(x_micro, y_micro)
            loss = loss + micro_loss
            grads = micro_grads if grads is None else tree_map(mx.add, grads, micro_grads)
            mx.eval(loss, grads)  # here, so that one micro-batch's activations are in memory at a time
        return update(loss, grads)

    return train_step, state


def check_dtype(name):
    """Raise DataError unless MLX's default device can multiply matrices in the dtype `name`."""
    try:
        a = mx.ones((2, 2), dtype=DTYPES[name])
        mx.eval(a @ a)
    except Exception as e:
        raise DataError(f"--dtype {name}: MLX on {mx.default_device()} cannot compute in {name} ({e}); "
                        "use --dtype float32") from None


def learning_rate(args, total_steps):
    """Constant args.lr, or (with --min-lr) linear warm-up then cosine decay to --min-lr, as nanoGPT."""
    if args.min_lr is None:
        return args.lr
    decay = optim.cosine_decay(args.lr, max(total_steps - args.warmup, 1), end=args.min_lr)
    if args.warmup == 0:
        return decay
    warmup = optim.linear_schedule(0.0, args.lr, args.warmup)
    return optim.join_schedules([warmup, decay], [args.warmup])


def evaluate(model, data, ctx_len, batch_size, group=None):
    """Mean cross-entropy over every non-overlapping window of `data` (dropout off).

    With several processes, each takes its share of the windows, and the sums are added up over
    the processes."""
    group = group or mx.distributed.init()
    model.eval()
    starts = np.arange(0, len(data) - ctx_len - 1, ctx_len)
    starts = np.array_split(starts, group.size())[group.rank()]
    total, count = 0.0, 0
    for i in range(0, len(starts), batch_size):
        x, y = windows(data, starts[i : i + batch_size], ctx_len)
        total += loss_fn(model, x, y).item() * x.shape[0]
        count += x.shape[0]
    model.train()
    if group.size() > 1:
        total, count = mx.distributed.all_sum(mx.array([total, count]), group=group).tolist()
    return total / count


def save_checkpoint(path, model, optimizer, loss_scale, step, meta):
    """Weights, optimizer state, loss scale, step and run description in one .safetensors file, written
    atomically. The weights are the float32 master weights, whatever --dtype the run computes in."""
    arrays = {f"model.{k}": v for k, v in tree_flatten(model.parameters())}
    arrays.update({f"optimizer.{k}": v for k, v in tree_flatten(optimizer.state)})
    arrays.update({f"loss_scale.{k}": v for k, v in loss_scale.items()})
    arrays["config"] = config_array(model.config)
    arrays["meta"] = json_array({**meta, "step": step})
    save_arrays(path, arrays)


def load_checkpoint(path):
    """(model weights, optimizer state, loss scale, meta) from save_checkpoint's file."""
    try:
        arrays = mx.load(str(path))
        arrays.pop("config")  # for load_model; the run's settings in `meta` say the same and more
        meta = from_json_array(arrays.pop("meta"))
    except Exception as e:
        raise DataError(f"cannot read the checkpoint {path}: {e}") from None
    weights = [(k[len("model."):], v) for k, v in arrays.items() if k.startswith("model.")]
    opt_state = tree_unflatten([(k[len("optimizer."):], v) for k, v in arrays.items() if k.startswith("optimizer.")])
    loss_scale = {k[len("loss_scale."):]: v for k, v in arrays.items() if k.startswith("loss_scale.")}
    return weights, opt_state, loss_scale, meta


class NonFiniteLoss(Exception):
    pass


def check_finite(loss, step, checkpoint):
    """Stop the run if the training loss of step `step` (counted from 1) is inf or nan. The checkpoint
    on disk, from the last epoch that ended well, is left as it is."""
    value = loss.item()
    if not math.isfinite(value):
        kept = (f"the last good checkpoint, {checkpoint}, is kept (step {load_checkpoint(checkpoint)[3]['step']})"
                if checkpoint.is_file() else "no checkpoint was written")
        raise NonFiniteLoss(f"the training loss became {value} at step {step}; stopped, and {kept}. "
                            "Try a lower --lr, --grad-clip 1.0, or --dtype float32")


def train(args, group):
    # Every process reads the text and builds the same model; process 0 alone prints and writes.
    main_process = group.rank() == 0
    text = load_text(args.data, args.data_url)
    vocab = CharVocab(text)
    vocab.encode(args.prompt)  # unknown characters in --prompt: fail now, not after training
    data = np.array(vocab.encode(text), dtype=np.int32)
    split = int(0.9 * len(data))
    train_data, val_data = data[:split], data[split:]
    if len(val_data) < args.ctx_len + 2 or len(train_data) < (args.ctx_len + 1) * args.batch_size + args.ctx_len:
        raise DataError(f"the text ({len(text)} characters) is too short for --ctx-len {args.ctx_len} "
                        f"and --batch-size {args.batch_size}")
    checkpoint = Path(args.out) / "checkpoint.safetensors"
    # What a --resume must share with the run it continues.
    run = dict(chars="".join(vocab.chars), ctx_len=args.ctx_len, n_emb=args.n_emb, n_heads=args.n_heads,
               n_layers=args.n_layers, dropout=args.dropout, seed=args.seed, batch_size=args.batch_size, lr=args.lr,
               min_lr=args.min_lr, warmup=args.warmup, weight_decay=args.weight_decay, grad_clip=args.grad_clip,
               epochs=args.epochs, text_sha256=hashlib.sha256(text.encode()).hexdigest())

    mx.random.seed(args.seed)
    config = GPTConfig(vocab_size=len(vocab.chars), block_size=args.ctx_len, n_layer=args.n_layers,
                       n_head=args.n_heads, n_embd=args.n_emb, dropout=args.dropout)
    steps_per_epoch = [len(epoch_batches(train_data, config.block_size, args.batch_size, args.seed, e))
                       for e in range(args.epochs)]
    total_steps = min(sum(steps_per_epoch), args.max_steps or math.inf)
    model = GPT(config)
    # The schedule spans all epochs; --max-steps only stops early, so a capped run and its --resume
    # follow the same learning rates as one uninterrupted run.
    optimizer = optim.AdamW(learning_rate(args, sum(steps_per_epoch)), betas=[0.9, args.beta2], weight_decay=args.weight_decay)
    step, loss_scale = 0, new_loss_scale()
    if args.resume:
        if not checkpoint.is_file():
            raise DataError(f"--resume: no checkpoint at {checkpoint}")
        weights, opt_state, saved_scale, meta = load_checkpoint(checkpoint)
        changed = [k for k in run if meta.get(k) != run[k]]
        if changed:
            raise DataError(f"--resume: the checkpoint was made with other settings or text ({', '.join(changed)}); "
                            "resume with the same flags and --data")
        model.load_weights(weights)
        optimizer.state = opt_state
        loss_scale.update(saved_scale)
        step = meta["step"]
        # The checkpoint holds float32 master weights and optimizer state, so any --dtype can continue it;
        # only the rounding of the steps after this one changes.
        saved_dtype = meta.get("dtype", "float32")
        note = f" (trained in {saved_dtype}, continuing in {args.dtype})" if saved_dtype != args.dtype else ""
        if main_process:
            print(f"Resumed from {checkpoint} at step {step}{note}")
    watchdog = distributed.Watchdog(args.timeout, group)  # with several processes: no waiting forever
    model.update(distributed.broadcast(model.parameters(), group))  # the same weights everywhere, for sure
    mx.eval(model.parameters(), optimizer.state)
    n_params = sum(p.size for _, p in tree_flatten(model.parameters()))
    size, rank, micro_batch = group.size(), group.rank(), args.batch_size // (group.size() * args.grad_accum)
    if main_process:
        print(f"{len(text):,} characters, vocabulary {len(vocab.chars)}; {n_params / 1e6:.2f}M parameters; "
              f"{sum(steps_per_epoch)} steps in {args.epochs} epochs of batch {args.batch_size} x {config.block_size}; "
              f"{args.dtype} on {mx.default_device()}"
              + (f"; {size} processes x {args.grad_accum} micro-batches of {micro_batch}"
                 if size * args.grad_accum > 1 else ""))

    train_step, state = make_train_step(model, optimizer, DTYPES[args.dtype], args.grad_clip, loss_scale,
                                        group, args.grad_accum)

    def finished(loss, step):
        """Step `step` (counted from 1) is done: check its loss, tell the watchdog, print with --log-every."""
        check_finite(loss, step, checkpoint)
        watchdog.progress()
        if args.log_every and step % args.log_every == 0 and main_process:
            print(f"Step {step} | loss = {loss.item():.6f}", flush=True)

    meta = {**run, "dtype": args.dtype}
    model.train()
    start, first_step = time.perf_counter(), step
    try:
        for epoch in range(args.epochs):
            if sum(steps_per_epoch[: epoch + 1]) <= step:
                continue  # finished before a --resume
            batches = epoch_batches(train_data, config.block_size, args.batch_size, args.seed, epoch)
            first = step - sum(steps_per_epoch[:epoch])  # > 0 only in the epoch a --resume lands in
            losses, tic = [], time.perf_counter()
            for starts in batches[first:]:
                if step >= total_steps:
                    break
                # Dropout masks depend on (seed, step, process) only: --resume on as many processes is exact.
                mx.random.seed((args.seed * 1_000_003 + step) * size + rank)
                x, y = windows(train_data, distributed.rank_rows(starts, group), config.block_size)
                loss = train_step(x, y)
                # Queue this step and return at once: Python prepares the next batch while the device
                # computes. The previous step's loss is ready by now; check it.
                mx.async_eval(state, loss)
                if losses:
                    finished(losses[-1], step)
                losses.append(loss)
                step += 1
            if losses:
                finished(losses[-1], step)
            seconds = time.perf_counter() - tic
            tokens_per_s = len(losses) * args.batch_size * config.block_size / seconds if losses else 0.0
            val = evaluate(model, val_data, config.block_size, micro_batch, group)
            train_loss = mx.mean(mx.stack(losses)).item() if losses else float("nan")
            watchdog.progress()
            if main_process:
                print(f"Epoch {epoch + 1} | train = {train_loss:.4f} | val = {val:.4f} | {tokens_per_s:,.0f} tokens/s | "
                      f"{time.perf_counter() - start:.1f} s", flush=True)
                with distributed.finish_writing_first():
                    save_checkpoint(checkpoint, model, optimizer, loss_scale, step, meta)
            if step >= total_steps:
                break
    except KeyboardInterrupt:
        if not main_process:
            sys.exit(1)
        save_checkpoint(checkpoint, model, optimizer, loss_scale, step, meta)
        sys.exit(f"\nInterrupted at step {step}; saved {checkpoint}; continue with --resume")
    if main_process:
        print(f"Trained {step - first_step} steps in {time.perf_counter() - start:.1f} s; checkpoint {checkpoint}")
    return model, vocab


def main():
    parser = argparse.ArgumentParser(description="Train a character-level GPT (default: Tiny Shakespeare) and write "
                                                 "generated text to OUT/completions.txt.")
    parser.add_argument("--data", type=Path, help="a UTF-8 text file to train on (default: Tiny Shakespeare, "
                                                  "downloaded once to ~/.cache/mlx-examples)")
    parser.add_argument("--data-url", default=SHAKESPEARE_URL,
                        help="where to download Tiny Shakespeare from when it is not cached (default: karpathy/char-rnn on GitHub)")
    parser.add_argument("--out", default=".", help="folder for completions.txt and checkpoint.safetensors (default: .)")
    parser.add_argument("--ctx-len", type=int, default=128, help="context length in characters (default: 128)")
    parser.add_argument("--n-emb", type=int, default=128, help="embedding width (default: 128)")
    parser.add_argument("--n-heads", type=int, default=4, help="attention heads (default: 4)")
    parser.add_argument("--n-layers", type=int, default=3, help="transformer blocks (default: 3)")
    parser.add_argument("--dropout", type=float, default=0.1, help="dropout probability (default: 0.1)")
    parser.add_argument("--epochs", type=int, default=20, help="passes over the training text (default: 20)")
    parser.add_argument("--batch-size", type=int, default=64,
                        help="windows per step, over all processes together (default: 64)")
    parser.add_argument("--grad-accum", type=int, default=1,
                        help="cut each process's share of a batch into this many micro-batches, one forward and "
                             "backward pass each, to fit a big batch in memory (default: 1)")
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (default: 1e-3)")
    parser.add_argument("--min-lr", type=float, help="decay the learning rate to this with a cosine after --warmup "
                                                     "steps (default: constant --lr)")
    parser.add_argument("--warmup", type=int, default=0, help="linear warm-up steps with --min-lr (default: 0)")
    parser.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay (default: 0.01)")
    parser.add_argument("--beta2", type=float, default=0.999, help="AdamW beta2 (default: 0.999)")
    parser.add_argument("--grad-clip", type=float, default=0.0, help="clip the gradient norm to this; 0 is off (default: 0)")
    parser.add_argument("--max-steps", type=int, help="stop after this many training steps in all (default: no cap)")
    parser.add_argument("--resume", action="store_true", help="continue the run saved in OUT/checkpoint.safetensors "
                                                              "(on any number of processes)")
    parser.add_argument("--log-every", type=int, default=0,
                        help="also print the loss every this many steps; 0 is only per epoch (default: 0)")
    parser.add_argument("--timeout", type=float, default=600,
                        help="with several processes: stop when they make no progress for this many seconds, as "
                             "when one of them hangs; 0 waits forever (default: 600)")
    parser.add_argument("--prompt", default="\n", help="text the generated characters continue (default: a newline)")
    parser.add_argument("--max-tokens", type=int, default=1000, help="characters to generate (default: 1000)")
    parser.add_argument("--temp", type=float, default=1.0, help="sampling temperature; 0 is greedy (default: 1.0)")
    parser.add_argument("--dtype", choices=list(DTYPES), help="compute in this dtype; weights and AdamW stay float32 "
                        "(default: bfloat16 on a GPU, float32 on the CPU, where MLX's bfloat16 is slower)")
    parser.add_argument("--seed", type=int, default=0, help="seed for initialisation, batches, dropout, sampling (default: 0)")
    args = parser.parse_args()
    if min(args.ctx_len, args.n_emb, args.n_heads, args.n_layers, args.epochs, args.batch_size, args.grad_accum) < 1:
        parser.error("--ctx-len, --n-emb, --n-heads, --n-layers, --epochs, --batch-size and --grad-accum must be at least 1")
    if args.n_emb % args.n_heads:
        parser.error(f"--n-emb {args.n_emb} must be a multiple of --n-heads {args.n_heads}")
    if not 0 <= args.dropout < 1 or args.temp < 0 or args.warmup < 0 or (args.max_steps is not None and args.max_steps < 1):
        parser.error("--dropout must be in [0, 1), --temp and --warmup at least 0, --max-steps at least 1")
    if args.log_every < 0 or args.timeout < 0:
        parser.error("--log-every and --timeout must be at least 0")

    if args.dtype is None:
        args.dtype = "bfloat16" if mx.default_device() == mx.gpu else "float32"
    try:
        group = distributed.init()
    except distributed.DistributedError as e:
        sys.exit(f"error: {e}")
    if args.batch_size % (group.size() * args.grad_accum):
        sys.exit(f"error: --batch-size {args.batch_size} (the global batch) must be a multiple of the number of "
                 f"processes ({group.size()}) times --grad-accum ({args.grad_accum})")
    try:
        check_dtype(args.dtype)
        model, vocab = train(args, group)
        prompt = vocab.encode(args.prompt)
    except (DataError, NonFiniteLoss, ValueError) as e:
        sys.exit(f"error: {e}")
    except RuntimeError as e:  # a collective operation failed: usually because another process ended first
        if group.size() == 1:
            raise
        sys.exit(f"error: process {group.rank()} of {group.size()} lost contact with the others ({e}); "
                 "one of them probably stopped first: see its message")
    if group.rank() != 0:
        return  # process 0 alone generates and writes
    model.eval()
    mx.random.seed(args.seed)
    completion = vocab.decode(model.generate(prompt, args.max_tokens, temperature=args.temp))
    out = Path(args.out) / "completions.txt"
    write_atomically(out, (args.prompt + completion).encode("utf-8"))
    print(f"Wrote {len(completion)} generated characters to {out}:\n{completion[:300]}")


if __name__ == "__main__":
    main()
