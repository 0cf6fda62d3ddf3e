"""Tensor parallelism: one Llama split over N processes (the GPUs of one machine, or
several Macs).

    mlx.launch -n 4 --backend nccl --python python3 llama/llama.py \
        weights.safetensors tokenizer.model "Hello"
    mlx.launch --hostfile hosts.json --backend ring llama/llama.py \
        weights.safetensors tokenizer.model "Hello"

Every process ("rank") runs the same script. llama.py imports this file only when
mlx.launch started it (mlx.launch sets MLX_RANK in each process) and loads through
`load_split`: `mx.distributed.init()` connects the ranks (mlx.launch tells each its rank
and where the others are), `load_sharded` reads this rank's part of the weights, and a
failure on any rank stops them all with one line from rank 0. The model in model.py is
unchanged: `shard` slices the weights of each block's seven linear layers (which keep
their class and names) and makes its attention and feed-forward add up their outputs
over the ranks, as gpt-fast's tp.py does for PyTorch with forward hooks.

The split is Megatron-LM's (Shoeybi et al., 2019). With N ranks, rank r holds

    attention     wq, wk, wv: rows for query heads r*H/N ... (r+1)*H/N - 1 and for
                  their key/value heads (query head i uses key/value head
                  i // (H / H_kv), so contiguous blocks of both line up). The rank
                  computes attention for those heads only, and its KV cache holds only
                  them: (B, H_kv / N, T, head_dim) per layer.
                  wo: the matching input columns. Its product with the rank's heads is
                  a partial sum of the full product; one all-reduce
                  (mx.distributed.all_sum) adds the N of them.
    feed-forward  w1, w3: rows for hidden units r*F/N ... (r+1)*F/N - 1;
                  silu(w1 x) * w3 x needs no other rank's units. w2: the matching
                  input columns, then one all-reduce.

So per layer and token each rank sends and receives two vectors of `dim` numbers, and
every rank ends each block with the same full (B, T, dim) activations.

Embedding and output layer: every rank holds both whole (replicated). The embedding is a
lookup that reads B*T rows per step, so splitting it would save memory only (0.52 GB of
a 70B model's 138 GB). The output layer is read whole for every token: split by
vocabulary rows, each rank would read (N-1)/N * vocab * dim * 2 bytes less per token,
0.39 GB for 70B on 4 GPUs (about 0.17 ms at 2.3 TB/s, 1% of a token's 34.5 GB per rank),
at the cost of a third collective per token, an all_gather of the logits (tens of
microseconds over NVLink, more over Ethernet between Macs; MLX's NCCL backend has no
all_gather at all). We leave that 1% for simplicity: replicated, every rank computes the
same logits and samples the same token with the same seed, with no exchange.

Quantized models (convert.py --quantize; ModelArgs.quantization): the packed arrays are
split as they are (they are never dequantized): `weight`, `scales` and `biases` by rows
for the row-split layers and along their last axis for wo and w2, which cuts the packed
columns and the quantization groups together. That needs the groups of a row to split
evenly over the ranks, which `shard` checks.
"""

import contextlib
import json
import math
import os
import re
import signal
import struct
import subprocess
import sys
import threading
import time
import traceback
import zipfile
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_map
from model import (
    Attention,
    FeedForward,
    WeightsError,
    check_finite,
    check_weights,
    load_model,
    stored_model,
    weights_file,
)


class ShardingError(Exception):
    """The model cannot be split over this many ranks."""


# ---- Splitting the model -------------------------------------------------------------

ROW_SPLIT = ("wq", "wk", "wv", "w1", "w3")  # split by output rows
COLUMN_SPLIT = ("wo", "w2")  # split by input columns: partial sums, added up by all_sum


class ShardedAttention(Attention):
    """Attention over this rank's heads; its output, a partial sum of wo's product,
    summed over the ranks."""

    def __call__(self, x, cache=None):
        return mx.distributed.all_sum(super().__call__(x, cache), group=self.group)


class ShardedFeedForward(FeedForward):
    """The feed-forward over this rank's hidden units, summed over the ranks."""

    def __call__(self, x):
        return mx.distributed.all_sum(super().__call__(x), group=self.group)


def shard(model, group):
    """Split every block of `model` over the ranks of `group`, in place, and return the
    model.

    Works on a model whose weights are loaded (each rank keeps its slices) and on a
    freshly built one, whose weights are still unevaluated random arrays: then nothing
    is computed or allocated, and the slices can be loaded from a file (`load_sharded`)
    or drawn at random (benchmark_tp.py). The layers keep their class (nn.Linear or
    nn.QuantizedLinear) and parameter names; only the attention and feed-forward modules
    change class, to add the all_sum.
    """
    n, rank = group.size(), group.rank()
    check_divisible(model.args, n)
    for block in model.layers:
        for module in (block.attention, block.feed_forward):
            for name in ROW_SPLIT + COLUMN_SPLIT:
                if name not in module:
                    continue
                layer = module[name]
                if name in COLUMN_SPLIT and "scales" in layer:
                    check_groups(layer, n)
                axis = 0 if name in ROW_SPLIT else -1
                # mx.contiguous: a compact copy of the slice, so that no product reads a
                # strided view.
                layer.update(
                    tree_map(
                        lambda w: mx.contiguous(rank_slice(w, axis, rank, n)),
                        layer.parameters(),
                    )
                )
            module.group = group
        block.attention.__class__ = ShardedAttention
        block.feed_forward.__class__ = ShardedFeedForward
    return model


def check_divisible(args, n):
    for count, what in (
        (args.n_heads, "attention heads"),
        (args.n_kv_heads, "key/value heads"),
        (args.hidden_dim, "feed-forward units"),
    ):
        if count % n:
            divisors = [
                d
                for d in range(1, count + 1)
                if count % d == 0
                and args.n_heads % d == 0
                and args.n_kv_heads % d == 0
                and args.hidden_dim % d == 0
            ]
            raise ShardingError(
                f"the model has {count} {what}, which do not split evenly over {n} "
                f"processes; use -n {' or '.join(map(str, divisors[:8]))}"
            )


def check_groups(layer, n):
    groups = layer["scales"].shape[-1]  # quantization groups per row
    if groups % n:
        raise ShardingError(
            f"a quantized layer has {groups} groups of {layer.group_size} inputs per "
            "row, which "
            f"do not split evenly over {n} processes; quantize with a smaller group "
            "size"
        )


def split_axis(name):
    """The axis of parameter `name` that is split over the ranks; None for the
    replicated ones."""
    layer = re.search(r"\.(\w+)\.(weight|scales|biases)$", name)
    if layer and layer.group(1) in ROW_SPLIT:
        return 0
    if layer and layer.group(1) in COLUMN_SPLIT:
        return -1  # for quantized weights: packed columns and quantization groups alike
    return None  # embedding, output layer, norms


def sharding_summary(model, group):
    """ ", split over N processes: layer weights per rank a + b + ... bytes, ..." for
    llama.py's load line. Every rank must call it: it gathers the ranks' byte counts."""
    split, replicated = weight_bytes(model)
    # Two float32 numbers, MB and bytes: a 70B shard's byte count overflows int32, and
    # float32 alone rounds it.
    sizes = gather_rows(np.array([split // 10**6, split % 10**6], np.float32), group)
    sizes = [int(mb) * 10**6 + int(b) for mb, b in sizes.tolist()]
    return (
        f", split over {group.size()} processes: layer weights per rank "
        f"{' + '.join(f'{s:,}' for s in sizes)} "
        f"bytes, replicated on each (embedding, output layer, norms) {replicated:,} "
        "bytes"
    )


def weight_bytes(model):
    """(bytes of the split layer weights, bytes of the replicated ones) this rank
    holds."""
    split = replicated = 0
    for name, p in nn.utils.tree_flatten(model.parameters()):
        if split_axis(name) is None:
            replicated += p.nbytes
        else:
            split += p.nbytes
    return split, replicated


# ---- Reading only this rank's slice of the weights file ------------------------------
#
# mx.load reads a whole array even when only a slice of it is used (measured: slicing
# 1/8 of the rows of a lazily loaded 134 MB array peaks at 134 MB). So the file is
# memory-mapped with NumPy, and each rank copies out only its slice: per-rank memory is
# its share plus the replicated parts.

SAFETENSORS_DTYPES = {
    "F16": np.float16,
    "BF16": np.uint16,
    "F32": np.float32,
    "F64": np.float64,
    "U8": np.uint8,
    "I8": np.int8,
    "U16": np.uint16,
    "I16": np.int16,
    "U32": np.uint32,
    "I32": np.int32,
    "U64": np.uint64,
    "I64": np.int64,
    "BOOL": np.bool_,
}


def memmap_safetensors(path):
    """{name: (memory-mapped array, is_bfloat16)}. The format: an 8-byte little-endian
    header length, a JSON header {name: {dtype, shape, data_offsets}}, then the data."""
    with open(path, "rb") as f:
        (header_length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_length))
    header.pop("__metadata__", None)
    arrays = {}
    for name, info in header.items():
        start, end = info["data_offsets"]
        dtype = np.dtype(SAFETENSORS_DTYPES[info["dtype"]])
        shape = tuple(info["shape"])
        if start == end:  # np.memmap cannot map zero bytes
            arrays[name] = (np.zeros(shape, dtype), False)
            continue
        arrays[name] = (
            np.memmap(path, dtype, "r", offset=8 + header_length + start, shape=shape),
            info["dtype"] == "BF16",
        )
    return arrays


def memmap_npz(path):
    """{name: (memory-mapped array, is_bfloat16)} for an uncompressed .npz (mx.savez
    writes those): a zip archive of .npy files stored as they are, each found through
    its zip entry and .npy header."""
    arrays = {}
    with zipfile.ZipFile(path) as archive, open(path, "rb") as f:
        for info in archive.infolist():
            if info.compress_type != zipfile.ZIP_STORED:
                raise ValueError(
                    f"{info.filename} is compressed; save the weights uncompressed "
                    "(convert.py does)"
                )
            f.seek(
                info.header_offset + 26
            )  # a zip entry: 30 fixed bytes, then its name and an extra field
            name_length, extra_length = struct.unpack("<HH", f.read(4))
            f.seek(info.header_offset + 30 + name_length + extra_length)
            version = np.lib.format.read_magic(f)
            read_header = (
                np.lib.format.read_array_header_1_0
                if version == (1, 0)
                else np.lib.format.read_array_header_2_0
            )
            shape, fortran_order, dtype = read_header(f)
            if dtype.hasobject:
                raise ValueError(f"{info.filename} holds Python objects")
            is_bfloat16 = dtype == np.dtype("V2")  # MLX stores bfloat16 as 2-byte void
            dtype = np.dtype(np.uint16) if is_bfloat16 else dtype
            name = info.filename.removesuffix(".npy")
            if int(np.prod(shape)) == 0:
                arrays[name] = (np.zeros(shape, dtype), False)
            else:
                order = (
                    "F" if fortran_order else "C"
                )  # MLX marks 1-D arrays Fortran-ordered
                arrays[name] = (
                    np.memmap(
                        path, dtype, "r", offset=f.tell(), shape=shape, order=order
                    ),
                    is_bfloat16,
                )
    return arrays


def to_mlx(array, is_bfloat16):
    """Copy a NumPy array (or memory-mapped slice) into an mx.array."""
    a = mx.array(np.ascontiguousarray(array))
    return a.view(mx.bfloat16) if is_bfloat16 else a


def rank_slice(array, axis, rank, n):
    """Rank `rank`'s piece of `array` split into `n` equal pieces along `axis` (the
    whole if axis is None)."""
    if axis is None:
        return array
    size = array.shape[axis] // n
    index = [slice(None)] * array.ndim
    index[axis] = slice(rank * size, (rank + 1) * size)
    return array[tuple(index)]


def load_sharded(path, group):
    """This rank's part of the Llama stored in `path` (.npz or .safetensors from
    convert.py), evaluated.

    Reads the configuration, checks that the model splits over `group.size()` ranks and
    that the file fits the model (as load_model does), then copies out only this rank's
    slices.
    """
    path = Path(path)
    if not path.exists():
        raise WeightsError(
            f"{path} does not exist on this machine; with several machines every one "
            "needs the weights at the same path"
        )
    path = weights_file(path)
    try:
        arrays = memmap_npz(path) if path.suffix == ".npz" else memmap_safetensors(path)
    except Exception as e:
        raise WeightsError(f"cannot read {path}: {e}") from None
    model = stored_model(
        arrays.pop("config", (None,))[0], path
    )  # unevaluated: no memory yet
    n, rank = group.size(), group.rank()
    check_weights(
        model, {name: a for name, (a, _) in arrays.items()}
    )  # whole shapes; reads nothing
    shard(model, group)
    weights = {
        name: to_mlx(rank_slice(a, split_axis(name), rank, n), bf16)
        for name, (a, bf16) in arrays.items()
    }
    check_weights(model, weights)
    check_finite(weights)
    model.load_weights(list(weights.items()))
    mx.eval(model.parameters())
    return model


# ---- Starting, and ending together ---------------------------------------------------


def load_split(weights, finish, errors, timeout=0):
    """(model, finish(model), summary) on every rank: this rank's part of the Llama in
    `weights` and whatever else the script loads (finish: the tokenizer, say). An
    exception of `errors` on any rank stops every rank, with one line from rank 0.
    Afterwards only rank 0 prints; summary is for its load line. From the start the
    ranks end together (keep_together): every token written is progress."""
    group, error, model, extra = None, None, None, None
    try:
        group = init_group()
        watchdog = keep_together(group, timeout)
        model = (
            load_sharded(weights, group) if group is not None else load_model(weights)
        )
        extra = finish(model)
    except (ShardingError, WeightsError, *errors) as e:
        error = str(e)
    stop_if_any_failed(group, error)
    if group is None:  # mlx.launch -n 1
        return model, extra, ""
    summary = sharding_summary(model, group)
    if group.rank() > 0:  # the other ranks compute what rank 0 does and print nothing
        sys.stdout = sys.stderr = open(os.devnull, "w")
    sys.stdout, sys.stdin = Written(sys.stdout, watchdog), Waited(sys.stdin, watchdog)
    watchdog.progress()
    return model, extra, summary


def keep_together(group, timeout):
    """Make this rank end when the run does, and return a Watchdog of `timeout` seconds
    (0: none).

    mlx.launch stops every process when one exits with an error. What it cannot see:
    Ctrl-C reaches every process while each may be waiting inside a collective
    operation, where Python cannot raise KeyboardInterrupt (so the signal writes to a
    pipe that a thread waits on, and the thread ends the process); a lost peer is an MLX
    RuntimeError (one line, not a traceback); and a process that hangs or is stopped
    leaves the others waiting forever (the Watchdog). MLX's ring backend also logs each
    failed send of a lost connection to stderr: those lines are dropped, the one line
    here says it."""
    if group is None:
        return Watchdog(0, 0)
    drop_ring_logs()
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    signal.set_wakeup_fd(write_end)
    signal.signal(
        signal.SIGINT, lambda *_: None
    )  # not KeyboardInterrupt: the thread below acts on it
    # mlx.launch sends SIGTERM to the others when one process dies: it may come before
    # the lost connection.
    signal.signal(signal.SIGTERM, lambda *_: None)

    def on_interrupt():
        signal_number = os.read(read_end, 1)[
            0
        ]  # the wakeup fd receives the signal's number
        if group.rank() == 0:
            print(
                "interrupted"
                if signal_number == signal.SIGINT
                else "error: another process of this run has stopped (mlx.launch "
                "ended this one); stopping",
                file=STDERR,
                flush=True,
            )
        os._exit(130 if signal_number == signal.SIGINT else 143)

    threading.Thread(target=on_interrupt, daemon=True).start()

    def on_error(kind, error, trace):
        if not issubclass(kind, RuntimeError):  # a bug: its traceback, on every rank
            traceback.print_exception(kind, error, trace, file=STDERR)
        elif group.rank() == 0:
            print(
                f"error: another process of this run has stopped ({error}); stopping",
                file=STDERR,
                flush=True,
            )

    sys.excepthook = on_error
    return Watchdog(timeout, group.rank())


STDERR = (
    sys.stderr
)  # this process's stderr, whatever sys.stderr becomes (os.devnull on ranks > 0)


def drop_ring_logs():
    """Route what MLX's C++ code writes to stderr (file descriptor 2) through a thread
    that drops the ring backend's "[ring] ..." lines; Python's own output (STDERR) goes
    straight to the real stderr."""
    global STDERR
    read_end, write_end = os.pipe()
    real = os.dup(2)
    os.dup2(write_end, 2)
    STDERR = sys.stderr = open(real, "w", buffering=1, closefd=False)

    def forward():
        for line in open(read_end, "rb"):
            if not line.startswith(b"[ring]"):
                os.write(real, line)

    threading.Thread(target=forward, daemon=True).start()


class Watchdog:
    """With `seconds` > 0: if the run makes no progress for that long, say so and end
    every rank of this machine (SIGKILL, which also ends a stopped process; mlx.launch's
    SIGTERM would wait for it forever). Rank r waits r seconds more, so the first
    healthy rank acts and the others do not repeat its line."""

    def __init__(self, seconds, rank):
        self.seconds, self.rank, self.last = seconds, rank, time.monotonic()
        if seconds > 0:
            threading.Thread(target=self.watch, daemon=True).start()

    def progress(self):
        self.last = time.monotonic()

    def pause(self):  # waiting for the user is not a hang
        self.last = math.inf

    def watch(self):
        while time.monotonic() - self.last < self.seconds + self.rank:
            time.sleep(0.5)
        print(
            f"error: process {self.rank} made no progress for {self.seconds:g} s; "
            "another process of this run "
            "may have stopped or hung: stopping them all (raise --timeout if a step is "
            "that slow)",
            file=STDERR,
            flush=True,
        )
        parent = subprocess.run(
            ["ps", "-o", "command=", "-p", str(os.getppid())],
            capture_output=True,
            text=True,
        )
        if (
            "mlx.launch" in parent.stdout
        ):  # its other processes here are this run's ranks
            children = subprocess.run(
                ["pgrep", "-P", str(os.getppid())], capture_output=True, text=True
            ).stdout
            for pid in {int(pid) for pid in children.split()} - {os.getpid()}:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
        os._exit(1)


class Written:
    """sys.stdout whose every write is progress for the Watchdog (llama.py writes each
    token)."""

    def __init__(self, stream, watchdog):
        self.stream, self.watchdog = stream, watchdog

    def write(self, text):
        self.watchdog.progress()
        return self.stream.write(text)

    def __getattr__(self, name):
        return getattr(self.stream, name)


class Waited:
    """sys.stdin whose reading is no hang for the Watchdog (a chat waiting for the
    user's next line)."""

    def __init__(self, stream, watchdog):
        self.stream, self.watchdog = stream, watchdog

    def readline(self):
        self.watchdog.pause()
        line = self.stream.readline()
        self.watchdog.progress()
        return line

    def __iter__(self):
        return iter(self.readline, "")

    def __getattr__(self, name):
        return getattr(self.stream, name)


def launched_rank():
    """This process's rank as mlx.launch set it (0 when started without mlx.launch),
    known even when the processes cannot connect: then rank 0 alone reports it."""
    return int(os.environ.get("MLX_RANK", 0))


def init_group():
    """The group of processes that mlx.launch started, or None for a single process."""
    hostfile = os.environ.get("MLX_HOSTFILE", "")
    if "MLX_RANK" not in os.environ or (
        os.environ.get("MLX_WORLD_SIZE", "1") == "1"
        and not (hostfile and Path(hostfile).read_text().strip())
    ):
        return None  # not started by mlx.launch, or by `mlx.launch -n 1`
    try:
        group = mx.distributed.init(strict=True)
    except RuntimeError as e:
        raise ShardingError(
            f"mlx.launch started {os.environ.get('MLX_WORLD_SIZE', 'several')} "
            "processes, but they "
            f"cannot connect ({e}): --backend nccl needs MLX's CUDA build and a GPU "
            "per process; --backend ring needs each host's IP address in the --hostfile"
        ) from None
    return group if group.size() > 1 else None


def stop_if_any_failed(group, error):
    """Every rank calls this with its own error message, or None. If any rank has one,
    rank 0 prints the first (prefixed "rank r: " unless r is 0) and every rank exits
    with status 1; otherwise it returns.

    Without it a rank that fails alone (say its machine lacks the weights file) would
    exit while the others wait forever in their first all_sum. `group` None: a single
    process, or processes that could not connect, which all meet the same error (rank 0
    still prints it alone).
    """
    if group is not None:
        message = (error or "").encode()[:1000]
        row = np.zeros(1001, np.float32)
        row[0] = len(message)
        row[1 : 1 + len(message)] = np.frombuffer(message, np.uint8)
        rows = gather_rows(
            row, group
        )  # (N, 1001): each rank's message length and bytes
        failed = [r for r in range(len(rows)) if rows[r, 0] > 0]
        error = None
        if failed:
            r = failed[0]
            error = bytes(rows[r, 1 : 1 + int(rows[r, 0])].astype(np.uint8)).decode(
                errors="replace"
            )
            error = error if r == 0 else f"rank {r}: {error}"
    if error is None:
        return
    rank = group.rank() if group is not None else launched_rank()
    if rank == 0:
        print(f"error: {error}", file=sys.stderr, flush=True)
    # mlx.launch stops every process as soon as one exits non-zero: the others leave
    # after rank 0 has printed.
    if group is not None:
        mx.eval(mx.distributed.all_sum(mx.zeros(1), group=group))
    elif rank > 0:
        time.sleep(1)
    sys.exit(1)


def gather_rows(row, group):
    """(N, len(row)) NumPy array of every rank's `row` (float32), the same on every
    rank.

    An all_sum of a matrix that is zero but for the rank's own row: MLX's NCCL backend
    has all_sum only (no all_gather), and every backend sums float32.
    """
    rows = np.zeros((group.size(), len(row)), np.float32)
    rows[group.rank()] = row
    return np.array(mx.distributed.all_sum(mx.array(rows), group=group))
