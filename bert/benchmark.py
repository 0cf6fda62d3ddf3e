"""Forward throughput (sequences/s) of the MLX BERT against transformers' BertModel
(SDPA attention), and sentence embeddings (sentences/s) of embed.py's encode() against
sentence-transformers' encode().

    python bert/benchmark.py                       # bert-base shape, CPU, float32
    python bert/benchmark.py --device gpu --dtype float16 --shapes 32x128
    python bert/benchmark.py --tiny --repeats 1    # a tiny model, a quick check
    python bert/benchmark.py --embed --device gpu --dtype float16 --repeats 5
    python bert/benchmark.py --embed --tiny --sentences 64 --repeats 1

--embed times MiniLM's and bert-base's shapes; --tiny a tiny model, for a quick check.

Random weights, no download. Each row: median seconds per forward pass of each
framework, the throughput, and the ratio (above 1: MLX is faster). On Linux CPU, preload
OpenBLAS first (see the README); PyTorch is then timed in a child process without
LD_PRELOAD, since the preload would also replace PyTorch's own MKL. Progress and the
time left go to stderr as it runs; the table to stdout.
"""

import sys

try:  # Ctrl-C while the libraries load ends with one line too
    import argparse
    import json
    import os
    import statistics
    import subprocess
    import time
    from pathlib import Path

    import mlx.core as mx
    import mlx.nn as nn
    import numpy as np
    from embed import positive_int
    from model import DTYPES, Bert, BertConfig
except KeyboardInterrupt:
    print("interrupted", file=sys.stderr)
    sys.exit(130)

BASE = dict(
    vocab_size=30522,
    hidden_size=768,
    num_hidden_layers=12,
    num_attention_heads=12,
    intermediate_size=3072,
    max_position_embeddings=512,
)
TINY = dict(
    vocab_size=100,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=37,
    max_position_embeddings=64,
)
# all-MiniLM-L6-v2's shape, for --embed (bert-base is the other); the tiny one has room
# for 100 words.
MINILM = dict(
    BASE,
    hidden_size=384,
    num_hidden_layers=6,
    num_attention_heads=12,
    intermediate_size=1536,
)
TINY_EMBED = dict(TINY, vocab_size=1100, max_position_embeddings=128)


def warn_if_reference_blas():
    """mlx[cpu] on Linux ships netlib's reference BLAS (~30x slower matmul) unless
    OpenBLAS is preloaded."""
    if not sys.platform.startswith("linux"):
        return
    with open("/proc/self/maps") as f:
        libs = {line.split()[-1] for line in f if "/" in line}
    reference = any("mlx_cpu.libs/libblas" in lib for lib in libs)
    openblas = any(lib.rsplit("/", 1)[-1].startswith("libopenblas") for lib in libs)
    if reference and not openblas:
        print(
            "warning: MLX is using the reference BLAS bundled with mlx[cpu] (slow "
            "matmul); see README.md to preload OpenBLAS",
            file=sys.stderr,
        )


def say(message):
    print(message, file=sys.stderr, flush=True)


def duration(seconds):
    if seconds < 1:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds:.1f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


class Progress:
    """Says on stderr how the timings go and how long the rest will take: after the
    first forward pass, every 10 s within a long timing, and at the end of each. The
    time left is estimated from the passes so far in seconds per token (B*T), so that a
    small shape after a large one is not overrated."""

    def __init__(self, tokens_to_run):
        self.tokens_left, self.tokens_done, self.seconds = tokens_to_run, 0, 0.0
        self.start = self.last_said = time.perf_counter()

    def say(self, message):
        now = time.perf_counter()
        left = self.seconds / self.tokens_done * self.tokens_left
        say(
            f"{message}; {duration(now - self.start)} so far, about {duration(left)} "
            "to go"
        )
        self.last_said = now

    def forward_done(self, label, seconds, tokens, what="a forward pass"):
        self.tokens_left, self.tokens_done = (
            self.tokens_left - tokens,
            self.tokens_done + tokens,
        )
        self.seconds += seconds
        if self.tokens_done == tokens or time.perf_counter() - self.last_said > 10:
            self.say(f"{label}: {what} took {duration(seconds)}")

    def timing_done(self, label, median):
        self.say(f"{label}: median {duration(median)} a pass")


def median_seconds(fn, repeats, warmup=2, on_pass=lambda seconds: None):
    """Median seconds of `repeats` calls of fn after `warmup` untimed ones;
    on_pass(seconds) after each call."""
    times = []
    for _ in range(warmup + repeats):
        tic = time.perf_counter()
        fn()
        times.append(time.perf_counter() - tic)
        on_pass(times[-1])
    return statistics.median(times[warmup:])


def batch(vocab_size, B, T, seed=0):
    """Token ids and an attention mask with some padding in each row but the first."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab_size, (B, T)).astype(np.int32)
    lengths = np.maximum(1, T - rng.integers(0, T // 4 + 1, B))
    lengths[0] = T
    mask = (np.arange(T)[None, :] < lengths[:, None]).astype(np.int32)
    return ids, mask


def time_shapes(name, forward, inputs, shapes, repeats, progress):
    """{"BxT": median seconds} of forward(*inputs(B, T)) for each shape, each timing
    reported to `progress`."""
    result = {}
    for B, T in shapes:
        args, label = inputs(B, T), f"{name} {B}x{T}"

        def on_pass(seconds):
            return progress.forward_done(label, seconds, B * T)

        result[f"{B}x{T}"] = median_seconds(
            lambda: forward(*args), repeats, on_pass=on_pass
        )
        progress.timing_done(label, result[f"{B}x{T}"])
    return result


def time_mlx(config, shapes, dtype, repeats, progress):
    """({shape: seconds} eager, {shape: seconds} mx.compile'd) for the MLX Bert."""
    model = Bert(BertConfig(**config))
    model.set_dtype(DTYPES[dtype])
    model.eval()
    mx.eval(model.parameters())

    def inputs(B, T):
        return [mx.array(a) for a in batch(config["vocab_size"], B, T)]

    compiled_model = mx.compile(model)
    # mx.eval: MLX is lazy, so a pass is timed only once its output is computed.
    return [
        time_shapes(
            name,
            lambda ids, mask: mx.eval(f(ids, attention_mask=mask)),
            inputs,
            shapes,
            repeats,
            progress,
        )
        for name, f in (("MLX", model), ("MLX compiled", compiled_model))
    ]


def time_torch(config, shapes, dtype, repeats, device, progress):
    import torch
    from transformers import BertConfig as HFConfig
    from transformers import BertModel

    hf_config = HFConfig(**config, attn_implementation="sdpa")
    model = BertModel(hf_config).to(device=device, dtype=getattr(torch, dtype)).eval()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def forward(ids, mask):
        with torch.inference_mode():
            model(input_ids=ids, attention_mask=mask)
        sync()

    def inputs(B, T):
        return [
            torch.from_numpy(a).long().to(device)
            for a in batch(config["vocab_size"], B, T)
        ]

    return time_shapes("PyTorch", forward, inputs, shapes, repeats, progress)


def profile_layer(config, B, T, dtype, repeats):
    """{piece: (MLX ms, PyTorch ms or None)} for one MLX encoder layer at (B, T): where
    does the time go?"""
    import torch

    D, F, H = (
        config["hidden_size"],
        config["intermediate_size"],
        config["num_attention_heads"],
    )
    dt = DTYPES[dtype]
    x, h = (
        mx.random.normal((B * T, D)).astype(dt),
        mx.random.normal((B * T, F)).astype(dt),
    )
    w_d, w_up, w_down = (
        mx.random.normal(s).astype(dt) for s in [(D, D), (F, D), (D, F)]
    )
    q = mx.random.normal((B, H, T, D // H)).astype(dt)
    norm = mx.fast.layer_norm
    mx.eval(x, h, w_d, w_up, w_down, q)
    pieces = {
        "4 attention projections (B*T, D) @ (D, D)": lambda: [
            x @ w_d.T for _ in range(4)
        ],
        "feed-forward up + down matmuls": lambda: [x @ w_up.T, h @ w_down.T],
        "GELU (exact, erf) on (B*T, 4D)": lambda: nn.gelu(h),
        "scaled_dot_product_attention": lambda: mx.fast.scaled_dot_product_attention(
            q, q, q, scale=0.125
        ),
        "2 LayerNorms on (B*T, D)": lambda: [
            norm(x, None, None, 1e-12) for _ in range(2)
        ],
        "exp on (B*T, 4D), for scale": lambda: mx.exp(h),
        "multiply on (B*T, 4D), for scale": lambda: h * h,
    }
    # The element-wise pieces in PyTorch on the same device, for comparison (no BLAS
    # involved).
    th = torch.randn(
        B * T,
        F,
        dtype=getattr(torch, dtype),
        device="cuda" if mx.default_device() == mx.gpu else "cpu",
    )
    sync = torch.cuda.synchronize if th.is_cuda else (lambda: None)
    torch_pieces = {
        "GELU (exact, erf) on (B*T, 4D)": lambda: torch.nn.functional.gelu(th),
        "exp on (B*T, 4D), for scale": lambda: torch.exp(th),
        "multiply on (B*T, 4D), for scale": lambda: th * th,
    }
    result = {}
    for name, fn in pieces.items():
        ms_mlx = 1e3 * median_seconds(lambda: mx.eval(fn()), repeats)
        ms_torch = (
            1e3 * median_seconds(lambda: (torch_pieces[name](), sync()), repeats)
            if name in torch_pieces
            else None
        )
        result[name] = (ms_mlx, ms_torch)
    return result


def torch_in_child(argv):
    """Rerun this script for PyTorch alone, without LD_PRELOAD; returns its {shape:
    seconds}. Its progress lines reach stderr directly."""
    say("PyTorch, in a child process without LD_PRELOAD:")
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    result = subprocess.run(
        [sys.executable, __file__, *argv, "--only", "torch"],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    if result.returncode != 0:
        sys.exit(
            "error: the PyTorch child process failed (exit status "
            f"{result.returncode}); its message is above"
        )
    return json.loads(result.stdout.splitlines()[-1])


# ------------------------------------------------------- --embed: sentence embeddings


def embed_sentences(n, seed=0):
    """(n sentences of 5 to 100 words, the vocabulary): words drawn from 1,000 made-up
    ones, seeded."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    vocabulary = sorted(
        {"".join(rng.choice(letters, rng.integers(3, 9))) for _ in range(1000)}
    )
    return [
        " ".join(rng.choice(vocabulary, rng.integers(5, 101))) for _ in range(n)
    ], vocabulary


def save_random_bert(config, vocabulary, folder):
    """A random BertModel of `config` (seeded) and a WordPiece tokenizer (HF's fast one)
    of `vocabulary`, in `folder`."""
    import torch
    from transformers import BertConfig as HFConfig
    from transformers import BertModel, BertTokenizer

    folder.mkdir(parents=True)
    (folder / "vocab.txt").write_text(
        "\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *vocabulary]) + "\n"
    )
    torch.manual_seed(0)
    BertModel(HFConfig(**config)).save_pretrained(folder)
    BertTokenizer(str(folder / "vocab.txt")).save_pretrained(folder)
    return folder


def sentence_transformer(folder, dtype, device):
    """sentence-transformers' model of `folder` with mean pooling and normalization, as
    all-MiniLM-L6-v2's."""
    import torch
    from sentence_transformers import SentenceTransformer

    try:
        from sentence_transformers.sentence_transformer.modules import (
            Normalize,
            Pooling,
            Transformer,
        )
    except ImportError:  # sentence-transformers before 6
        from sentence_transformers.models import Normalize, Pooling, Transformer
    transformer = Transformer(str(folder))
    dim = transformer.auto_model.config.hidden_size
    modules = [transformer, Pooling(dim, pooling_mode="mean"), Normalize()]
    return (
        SentenceTransformer(modules=modules, device=device)
        .to(getattr(torch, dtype))
        .eval()
    )


def mlx_encoder(folder, dtype):
    """(model, tokenizer) of `folder` for embed.encode, converted as convert.py converts
    it."""
    import convert
    from model import load_model

    np.savez(folder / "mlx.npz", **convert.convert(str(folder))[0])
    return load_model(str(folder), str(folder / "mlx.npz"), DTYPES[dtype])


def time_passes(label, encode_all, repeats, progress, work):
    """Seconds of each of `repeats` passes of encode_all() over all sentences, after one
    warm-up pass that compiles every batch shape; each pass reported to `progress` as
    `work` (a pass's share of the total)."""
    times = []
    for i in range(1 + repeats):
        tic = time.perf_counter()
        # Returns NumPy arrays, so the work is done when it returns (MLX and CUDA alike)
        encode_all()
        times.append(time.perf_counter() - tic)
        progress.forward_done(
            f"{label} {'warm-up' if i == 0 else f'pass {i}'}",
            times[-1],
            work,
            what="a pass",
        )
    return times[1:]


def time_embed_st(args, folders, sentences, progress):
    """{shape: [seconds of each pass]} of sentence-transformers' encode()."""
    device = "cuda" if args.device == "gpu" else "cpu"
    result = {}
    for name, folder in folders.items():
        st = sentence_transformer(folder, args.dtype, device)

        def encode_all():
            return st.encode(sentences, batch_size=args.batch_size)

        result[name] = time_passes(
            f"sentence-transformers {name}",
            encode_all,
            args.repeats,
            progress,
            embed_work(args, name),
        )
    return result


def time_embed_mlx(args, folders, sentences, progress):
    """({shape: [seconds]} of embed.encode (and of it with mx.compile, or None), {shape:
    max |MLX - s-t|})."""
    import embed

    device = "cuda" if args.device == "gpu" else "cpu"
    times, compiled, difference = {}, {}, {}
    pooling = embed.Pooling("mean", normalize=True)
    for name, folder in folders.items():
        model, tokenizer = mlx_encoder(folder, args.dtype)

        def encode_all(forward=None):
            return embed.encode(
                model, tokenizer, sentences, pooling, args.batch_size, forward=forward
            )

        times[name] = time_passes(
            f"MLX {name}", encode_all, args.repeats, progress, embed_work(args, name)
        )
        if args.compile:
            forward = mx.compile(embed.embedder(model, pooling))
            compiled[name] = time_passes(
                f"MLX compiled {name}",
                lambda: encode_all(forward),
                args.repeats,
                progress,
                embed_work(args, name),
            )
        # The two agree: one batch checked against sentence-transformers (in this
        # process, whatever the timing).
        batch = sentences[: args.batch_size]
        reference = sentence_transformer(folder, args.dtype, device).encode(
            batch, batch_size=args.batch_size
        )
        difference[name] = float(np.abs(encode_all()[: len(batch)] - reference).max())
    return times, compiled if args.compile else None, difference


def embed_work(args, name):
    config = args.embed_shapes[
        name
    ]  # a pass's cost, roughly: sentences x layers x hidden_size^2
    return args.sentences * config["num_hidden_layers"] * config["hidden_size"] ** 2


def run_embed(args, argv):
    import tempfile

    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils.logging import disable_progress_bar

    # transformers' and the Hub's bars for saving and loading the models, between our
    # lines.
    disable_progress_bar()
    disable_progress_bars()
    sentences, vocabulary = embed_sentences(args.sentences)
    if args.only is None:
        say(
            f"timing sentence embeddings of {args.sentences:,} sentences (5 to 100 "
            "words) at the "
            f"{', '.join(args.embed_shapes)} shape on {args.device}, {args.dtype}, "
            f"batch {args.batch_size}: "
            f"MLX{', MLX compiled' if args.compile else ''} and "
            "sentence-transformers, 1 warm-up and "
            f"{args.repeats} timed passes each over all sentences"
        )
    frameworks = (
        1 if args.only else 2 + args.compile
    )  # the child process times sentence-transformers alone
    progress = Progress(
        frameworks
        * (1 + args.repeats)
        * sum(embed_work(args, name) for name in args.embed_shapes)
    )
    with tempfile.TemporaryDirectory() as tmp:
        say("saving the random models (seeded) ...")
        folders = {
            name: save_random_bert(config, vocabulary, Path(tmp) / name)
            for name, config in args.embed_shapes.items()
        }
        if args.only == "torch":
            return print(json.dumps(time_embed_st(args, folders, sentences, progress)))
        t_mlx, t_compiled, difference = time_embed_mlx(
            args, folders, sentences, progress
        )
        separate = args.device == "cpu" and "LD_PRELOAD" in os.environ
        t_st = (
            torch_in_child(argv)
            if separate
            else time_embed_st(args, folders, sentences, progress)
        )
    print_embed_table(args, t_mlx, t_compiled, t_st, difference, separate)


def print_embed_table(args, t_mlx, t_compiled, t_st, difference, separate):
    import sentence_transformers
    import torch

    def rate(times):
        return [args.sentences / t for t in times]  # sentences/s of each pass

    def number(x):
        return f"{x:,.0f}" if x >= 100 else f"{x:.1f}"

    def shown(times):
        return (
            f"{number(statistics.median(rate(times)))} "
            f"({number(min(rate(times)))}-{number(max(rate(times)))})"
        )

    gpu = f" ({torch.cuda.get_device_name()})" if args.device == "gpu" else ""
    print(
        f"sentence embeddings: {args.sentences:,} sentences of 5 to 100 words, batch "
        f"{args.batch_size}, {args.dtype}, "
        "random weights, mean pooling + normalization, median (range) of "
        f"{args.repeats} passes, tokenization "
        f"included; MLX {mx.__version__} on {mx.default_device()}{gpu}; "
        "sentence-transformers "
        f"{sentence_transformers.__version__}, PyTorch {torch.__version__} on "
        f"{'cuda' if args.device == 'gpu' else 'cpu'}"
        f"{' (in a child process without LD_PRELOAD)' if separate else ''}"
    )
    compiled_header = (
        f" {'MLX compiled sent/s':>24} {'compiled/s-t':>12}" if t_compiled else ""
    )
    print(
        f"{'shape':>9} {'s-t sent/s':>24} {'MLX sent/s':>24} "
        f"{'MLX/s-t':>8}{compiled_header} {'max |MLX - s-t|':>16}"
    )
    for name in t_mlx:

        def ratio(times):
            return f"{statistics.median(t_st[name]) / statistics.median(times):.2f}x"

        compiled = (
            f" {shown(t_compiled[name]):>24} {ratio(t_compiled[name]):>12}"
            if t_compiled
            else ""
        )
        print(
            f"{name:>9} {shown(t_st[name]):>24} {shown(t_mlx[name]):>24} "
            f"{ratio(t_mlx[name]):>8}{compiled} "
            f"{difference[name]:>16.1e}"
        )


# ---------------------------------------------------------------- command line


def parse_shape(text):
    try:
        B, T = (int(x) for x in text.lower().split("x"))
        assert B > 0 and T > 0
    except (ValueError, AssertionError):
        raise argparse.ArgumentTypeError(
            f"expected BATCHxTOKENS such as 8x128, got {text!r}"
        ) from None
    return B, T


def workload_flags(parser):
    """The model, the shapes, where, and how often."""
    parser.add_argument(
        "--shapes",
        type=parse_shape,
        nargs="+",
        help="batch shapes as BATCHxTOKENS (default: 8x128 1x16; with --tiny 8x64 "
        "1x16)",
    )
    parser.add_argument(
        "--device",
        choices=["cpu", "gpu"],
        default="cpu",
        help="cpu, or gpu: MLX's GPU backend against PyTorch on CUDA (default: cpu)",
    )
    parser.add_argument(
        "--dtype",
        choices=list(DTYPES),
        default="float32",
        help="weights and activations (default: float32)",
    )
    parser.add_argument(
        "--repeats",
        type=positive_int,
        default=10,
        help="timed forward passes (with --embed: passes over all sentences); the "
        "median is used (default: 10)",
    )
    parser.add_argument(
        "--tiny",
        action="store_true",
        help="a tiny 2-layer model instead of bert-base (for tests)",
    )


def job_flags(parser):
    """--profile and --embed, in place of the forward table, and --embed's options."""
    parser.add_argument(
        "--profile",
        action="store_true",
        help="instead, time the pieces of one MLX encoder layer at the first shape",
    )
    parser.add_argument(
        "--embed",
        action="store_true",
        help="instead, time sentence embeddings (embed.py's encode against "
        "sentence-transformers' "
        "encode, tokenization included) at the shapes of all-MiniLM-L6-v2 and "
        "bert-base",
    )
    parser.add_argument(
        "--sentences",
        type=positive_int,
        default=1000,
        help="with --embed: sentences (default: 1000)",
    )
    parser.add_argument(
        "--batch-size",
        type=positive_int,
        default=32,
        help="with --embed: batch size (default: 32)",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="with --embed: also time MLX with mx.compile",
    )
    parser.add_argument(
        "--only", choices=["torch"], help=argparse.SUPPRESS
    )  # used by torch_in_child


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description="BERT forward throughput, MLX vs transformers (PyTorch); with "
        "--embed, sentence embeddings, MLX vs sentence-transformers."
    )
    workload_flags(parser)
    job_flags(parser)
    args = parser.parse_args(argv)
    args.config = TINY if args.tiny else BASE
    args.shapes = args.shapes or [(8, 64 if args.tiny else 128), (1, 16)]
    args.embed_shapes = (
        {"tiny": TINY_EMBED} if args.tiny else {"minilm": MINILM, "bert-base": BASE}
    )
    if max(T for _, T in args.shapes) > args.config["max_position_embeddings"]:
        parser.error(
            f"sequences longer than {args.config['max_position_embeddings']} tokens "
            "do not fit the model"
        )
    return args


def print_profile(args):
    import torch

    B, T = args.shapes[0]
    print(
        f"one {'tiny' if args.tiny else 'bert-base'} layer at {B}x{T}, {args.dtype}, "
        f"MLX {mx.__version__} on {mx.default_device()}, median ms of {args.repeats}; "
        f"the element-wise pieces also in PyTorch {torch.__version__}:",
        flush=True,
    )
    print(f"  {'MLX':>8}  {'PyTorch':>8}")
    for name, (ms, ms_torch) in profile_layer(
        args.config, B, T, args.dtype, args.repeats
    ).items():
        print(
            f"  {ms:8.2f}  {ms_torch if ms_torch is not None else float('nan'):8.2f}  "
            f"{name}"
        )


def run_forward(args, argv):
    import torch

    torch_device = "cuda" if args.device == "gpu" else "cpu"
    tokens = (2 + args.repeats) * sum(
        B * T for B, T in args.shapes
    )  # of one framework's passes over every shape
    if args.only == "torch":
        print(
            json.dumps(
                time_torch(
                    args.config,
                    args.shapes,
                    args.dtype,
                    args.repeats,
                    torch_device,
                    Progress(tokens),
                )
            )
        )
        return
    name = "tiny" if args.tiny else "bert-base"
    shapes = " ".join(f"{B}x{T}" for B, T in args.shapes)
    say(
        f"timing {name} forward passes at {shapes} on {args.device}, {args.dtype}: "
        f"MLX, MLX compiled and PyTorch, {2 + args.repeats} passes each (2 warm-up)"
    )
    progress = Progress(3 * tokens)
    t_mlx, t_mlx_compiled = time_mlx(
        args.config, args.shapes, args.dtype, args.repeats, progress
    )
    separate = args.device == "cpu" and "LD_PRELOAD" in os.environ
    if separate:
        t_torch = torch_in_child(argv)
    else:
        t_torch = time_torch(
            args.config, args.shapes, args.dtype, args.repeats, torch_device, progress
        )

    gpu = f" ({torch.cuda.get_device_name()})" if args.device == "gpu" else ""
    print(
        f"{name} shape, random weights, {args.dtype}, "
        f"median of {args.repeats}; MLX {mx.__version__} on "
        f"{mx.default_device()}{gpu}; "
        f"PyTorch {torch.__version__} on {torch_device}"
        f"{' (in a child process without LD_PRELOAD)' if separate else ''}, "
        "transformers SDPA attention"
    )
    print(
        f"{'shape':>7} {'MLX seq/s':>10} {'MLX compiled':>13} {'PyTorch seq/s':>14} "
        f"{'MLX/PyTorch':>12}"
    )
    for shape in t_mlx:
        B = int(shape.split("x")[0])
        best = min(t_mlx[shape], t_mlx_compiled[shape])
        print(
            f"{shape:>7} {B / t_mlx[shape]:>10.1f} {B / t_mlx_compiled[shape]:>13.1f} "
            f"{B / t_torch[shape]:>14.1f} {t_torch[shape] / best:>11.2f}x"
        )


def main(argv=None):
    import torch

    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.device == "gpu":
        if not mx.is_available(mx.gpu) or not torch.cuda.is_available():
            sys.exit(
                "error: --device gpu needs MLX's GPU backend and PyTorch with CUDA; "
                "use --device cpu"
            )
        mx.set_default_device(mx.gpu)
    elif args.only is None:
        mx.set_default_device(mx.cpu)
        warn_if_reference_blas()
    if args.profile:
        return print_profile(args)
    return run_embed(args, argv) if args.embed else run_forward(args, argv)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # a benchmark writes nothing
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except (ValueError, OSError) as e:
        sys.exit("error: " + " ".join(str(e).split()))  # one line
