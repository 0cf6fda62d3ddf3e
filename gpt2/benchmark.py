"""Training-step time of main.py's GPT (compiled MLX step, at each --dtype) against the
same model in PyTorch: nanoGPT's way (bfloat16 autocast, torch.compile, fused AdamW,
flash attention with dropout), the anchor, and plain eager float32.

    python gpt2/benchmark.py --device gpu --config nanogpt  # anchor, eager, MLX x 2
    python gpt2/benchmark.py                                # CPU: eager, MLX float32
    python gpt2/benchmark.py --dtype float32 bfloat16       # CPU: also MLX bfloat16
    python gpt2/benchmark.py --race input.txt               # GPU: time to val <= 1.47
    python gpt2/benchmark.py --tiny --steps 3 --repeats 1   # a quick check

Configs: "walkthrough" is main.py's default (3 layers, 4 heads, n_embd 128, ctx 128,
batch 64, dropout 0.1); "nanogpt" is nanoGPT's Shakespeare-char config (6 layers, 6
heads, 384, ctx 256, batch 64, dropout 0.2). Vocabulary 65 (Tiny Shakespeare's
characters), random token batches, AdamW. A step is forward, backward and the optimizer
update, timed until the new weights exist. Each variant runs --steps steps per repeat;
the median repeat is used. Ratios are against the anchor (against PyTorch eager where
the anchor is off: by default on the CPU, where torch.compile takes minutes).

On a GPU, float32 matmuls are full float32 in both frameworks by default: this script
sets MLX_ENABLE_TF32=0 (MLX's CUDA backend would use TF32) unless you set it, and
PyTorch's TF32 follows it.
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault(
    "MLX_ENABLE_TF32", "0"
)  # before MLX starts: compare full float32 with full float32

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import torch
import torch.nn as tnn
import torch.nn.functional as F
from dropout import Dropout
from main import (
    DTYPES,
    bounded,
    make_train_step,
    new_model,
    warn_if_reference_blas,
)
from model import GPTConfig
from nanogpt_reference import TorchGPT, make_step, race

TF32 = os.environ["MLX_ENABLE_TF32"] != "0"
torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = (
    TF32  # PyTorch follows MLX
)

CONFIGS = {
    "walkthrough": dict(
        n_layer=3, n_head=4, n_embd=128, block_size=128, batch_size=64, dropout=0.1
    ),
    "nanogpt": dict(
        n_layer=6, n_head=6, n_embd=384, block_size=256, batch_size=64, dropout=0.2
    ),
}
TINY = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, batch_size=4)
VOCAB = 65


def batches(c, steps, seed=0):
    rng = np.random.default_rng(seed)
    return [
        rng.integers(0, VOCAB, (2, c["batch_size"], c["block_size"])).astype(np.int32)
        for _ in range(steps)
    ]


def time_steps(run_steps, repeats, label="", unit="step"):
    """Median seconds per step over `repeats` runs of run_steps() (after one warm-up
    run, which compiles). Says on stderr what it times, how long the warm-up took, and
    when it is done."""
    if label:
        print(f"  {label}: warm-up (compiles)...", file=sys.stderr, flush=True)
    tic = time.perf_counter()
    n = run_steps()
    warmup = time.perf_counter() - tic
    if label:
        print(
            f"  {label}: warm-up {warmup:.1f} s; {repeats} timed runs of {n} "
            f"{unit}s, about {repeats * warmup:.0f} s or less",
            file=sys.stderr,
            flush=True,
        )
    times = []
    for _ in range(repeats):
        tic = time.perf_counter()
        n = run_steps()
        times.append((time.perf_counter() - tic) / n)
    if label:
        print(
            f"  {label}: {1e3 * statistics.median(times):.2f} ms/{unit}",
            file=sys.stderr,
            flush=True,
        )
    return statistics.median(times)


def time_mlx(c, steps, repeats, dtype, change=None, label=""):
    """Median seconds per step of main.py's compiled step; change(model), if given,
    alters the model first."""
    mx.random.seed(0)
    model = new_model(
        GPTConfig(
            vocab_size=VOCAB,
            block_size=c["block_size"],
            n_layer=c["n_layer"],
            n_head=c["n_head"],
            n_embd=c["n_embd"],
            dropout=c["dropout"],
        )
    )  # main.py's model, its kernels on CUDA
    model.train()
    if change:
        change(model)
    optimizer = optim.AdamW(learning_rate=1e-3)
    train_step, state = make_train_step(model, optimizer, DTYPES[dtype])  # main.py's
    data = [tuple(mx.array(a) for a in b) for b in batches(c, steps)]
    mx.eval(state, data)

    def run_steps():
        for x, y in data:
            loss = train_step(x, y)
            mx.async_eval(
                state, loss
            )  # as main.py: queue the step, prepare the next one meanwhile
        mx.eval(state, loss)
        return len(data)

    return time_steps(run_steps, repeats, label)


TORCH_WAYS = {
    "nanogpt": "PyTorch nanoGPT's way (bf16 autocast, torch.compile, fused AdamW)",
    "eager": "PyTorch eager float32",
}


def time_torch(c, steps, repeats, device, way, label=""):
    """way "nanogpt": bfloat16 autocast + torch.compile + fused AdamW + flash attention
    with dropout (the anchor); "eager": float32, no compile, the default AdamW."""
    torch.manual_seed(0)
    model = TorchGPT({**c, "vocab_size": VOCAB}).to(device).train()
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=1e-3, fused=way == "nanogpt" and device == "cuda"
    )
    step = make_step(model, optimizer, device, nanogpt=way == "nanogpt")
    data = [
        tuple(torch.from_numpy(a).long().to(device) for a in b)
        for b in batches(c, steps)
    ]
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def run_steps():
        for x, y in data:
            step(x, y)
        sync()
        return len(data)

    return time_steps(run_steps, repeats, label)


def piece_inputs(c, tdev):
    """Random inputs of the pieces' shapes at config c: (x, h, w, q) in MLX and the
    same in PyTorch on `tdev`, with gradients."""
    B, T, D, H = c["batch_size"], c["block_size"], c["n_embd"], c["n_head"]
    rng = np.random.default_rng(0)
    x_np, h_np = (
        rng.standard_normal((B * T, D), np.float32),
        rng.standard_normal((B * T, 4 * D), np.float32),
    )
    w_np, q_np = (
        rng.standard_normal((4 * D, D), np.float32) * 0.02,
        rng.standard_normal((B, H, T, D // H), np.float32),
    )
    mlx_inputs = tuple(mx.array(a) for a in (x_np, h_np, w_np, q_np))
    torch_inputs = tuple(
        torch.from_numpy(a).to(tdev).requires_grad_() for a in (x_np, h_np, w_np, q_np)
    )
    return mlx_inputs, torch_inputs


def mlx_grad(f, *args):
    """The gradients of f(*args).sum() as a call without arguments; compiled, as in
    the training step."""
    grad = mx.compile(mx.grad(lambda *a: f(*a).sum(), argnums=list(range(len(args)))))
    return lambda: grad(*args)


def torch_grad(f, *args):
    """The gradients of f(*args).sum() as a call without arguments; eager."""
    return lambda: torch.autograd.grad(f(*args).sum(), args)


def step_pieces(c, tdev):
    """{piece: (MLX call, PyTorch call)} for the pieces of one training step at
    config c."""
    D, H = c["n_embd"], c["n_head"]
    (x, h, w, q), (tx, th, tw, tq) = piece_inputs(c, tdev)
    norm = nn.LayerNorm(D)
    tnorm = tnn.LayerNorm(D).to(tdev)
    scale = (D // H) ** -0.5
    dropout = Dropout(c["dropout"])  # the model's: a Philox kernel on an NVIDIA GPU
    return {
        "c_fc matmul (B*T, D) @ (D, 4D), fwd+bwd": (
            mlx_grad(lambda a, b: a @ b.T, x, w),
            torch_grad(lambda a, b: a @ b.T, tx, tw),
        ),
        "GELU (tanh) on (B*T, 4D), fwd+bwd": (
            mlx_grad(nn.gelu_approx, h),
            torch_grad(lambda a: F.gelu(a, approximate="tanh"), th),
        ),
        "LayerNorm on (B*T, D), fwd+bwd": (mlx_grad(norm, x), torch_grad(tnorm, tx)),
        "causal attention (no dropout), fwd+bwd": (
            mlx_grad(
                lambda a: mx.fast.scaled_dot_product_attention(
                    a, a, a, scale=scale, mask="causal"
                ),
                q,
            ),
            torch_grad(
                lambda a: F.scaled_dot_product_attention(a, a, a, is_causal=True), tq
            ),
        ),
        f"dropout {c['dropout']} on (B*T, 4D)": (
            lambda: dropout(h),
            lambda: F.dropout(th.detach(), c["dropout"]),
        ),
    }


def profile_pieces(c, device, repeats):
    """{piece: (MLX ms, PyTorch ms)} for the pieces of one training step at config c,
    each forward and backward where it has one (MLX compiled, PyTorch eager): where does
    the step's time go?"""
    tdev = "cuda" if device == "gpu" else "cpu"
    sync = torch.cuda.synchronize if device == "gpu" else (lambda: None)
    pieces = step_pieces(c, tdev)

    def one_step(fn):  # fn as a run of one step, for time_steps
        def run():
            fn()
            return 1

        return run

    result = {}
    for name, (mlx_fn, torch_fn) in pieces.items():
        result[name] = (
            1e3
            * time_steps(
                one_step(lambda: mx.eval(mlx_fn())), repeats, f"{name}, MLX", "call"
            ),
            1e3
            * time_steps(
                one_step(lambda: (torch_fn(), sync())),
                repeats,
                f"{name}, PyTorch",
                "call",
            ),
        )
    return result


def dropouts(model):
    """Every dropout of the model: nn.Dropout, or (on CUDA) cuda_dropout.py's classes,
    which derive from it."""
    return [
        module for _, module in model.named_modules() if isinstance(module, nn.Dropout)
    ]


def bernoulli_dropout(model):
    """Every dropout as nn.Dropout draws it (mx.random.bernoulli), not by the Philox
    kernel."""
    for dropout in dropouts(model):
        dropout.kernel = False


def unfused_attention_dropout(model):
    """The attention probabilities by mx.softmax, then dropped by dropout.py's kernel:
    two steps, not one."""
    for block in model.h:
        block.attn.attn_dropout.fused = False


def no_dropout(model):
    """Every dropout off (the identity); the attention stays explicit unless
    fused_attention is applied."""
    for dropout in dropouts(model):
        dropout.eval()


def fused_attention(model):
    """Attention through mx.fast.scaled_dot_product_attention, without dropout on its
    probabilities."""
    for block in model.h:
        block.attn.dropout = 0.0


# Where does dropout's time go? main.py's model (the first row) against variants that
# drop one cost each.
ABLATIONS = {
    "main.py's model": None,
    "attention: mx.softmax, then dropout.py's kernel (not fused)": (
        unfused_attention_dropout
    ),
    "dropout by mx.random.bernoulli (nn.Dropout), not the kernels": bernoulli_dropout,
    "no dropout on attention probabilities: fused attention": fused_attention,
    "explicit (B, H, T, T) attention, no dropout at all": no_dropout,
    "no dropout at all, fused attention": lambda m: (no_dropout(m), fused_attention(m)),
}


def torch_times(configs, steps, repeats, device, ways):
    """{config: {way: median seconds per step}} of PyTorch, announced as it goes."""
    return {
        name: {
            way: time_torch(c, steps, repeats, device, way, f"{name} {TORCH_WAYS[way]}")
            for way in ways
        }
        for name, c in configs.items()
    }


def torch_in_child(argv):
    """Rerun this script for PyTorch alone, without LD_PRELOAD; returns its {config:
    {way: seconds}}."""
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    # Its progress lines (stderr) come straight through; its result is the last line of
    # its stdout.
    result = subprocess.run(
        [sys.executable, __file__, *argv, "--only", "torch"],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    if result.returncode != 0:
        sys.exit(
            "error: the PyTorch child process failed (exit status "
            f"{result.returncode}); see its message above"
        )
    return json.loads(result.stdout.splitlines()[-1])


# main.py's flags for nanoGPT's Shakespeare-char config (see README.md)
NANOGPT_MAIN_FLAGS = [
    "--ctx-len",
    "256",
    "--n-emb",
    "384",
    "--n-heads",
    "6",
    "--n-layers",
    "6",
    "--dropout",
    "0.2",
    "--batch-size",
    "64",
    "--lr",
    "1e-3",
    "--min-lr",
    "1e-4",
    "--warmup",
    "100",
    "--weight-decay",
    "0.1",
    "--beta2",
    "0.99",
    "--grad-clip",
    "1.0",
    "--epochs",
    "32",
]


def run_race(data, target):
    """MLX (main.py, nanoGPT's config, 32 epochs, --dtype bfloat16) against nanoGPT's
    recipe in PyTorch, one after the other on this GPU: the wall time until the
    validation loss is <= target."""
    command = [
        sys.executable,
        os.path.join(os.path.dirname(__file__), "main.py"),
        "--data",
        str(data),
        "--out",
        os.path.join(os.path.dirname(os.path.abspath(data)), "race-mlx"),
        *NANOGPT_MAIN_FLAGS,
        "--dtype",
        "bfloat16",
        "--max-tokens",
        "1",
    ]
    print("MLX:", " ".join(command[1:]), flush=True)
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"error: main.py failed: {result.stderr.strip().splitlines()[-1:]}")
    epochs = [
        (int(e), float(v), float(t))
        for e, v, t in re.findall(
            r"Epoch (\d+) \| train = [\d.]+ \| val = ([\d.]+) \| [\d,]+ tokens/s "
            r"\| ([\d.]+) s",
            result.stdout,
        )
    ]
    steps, n_epochs = map(
        int, re.search(r"([\d]+) steps in (\d+) epochs", result.stdout).groups()
    )
    per_epoch = round(
        steps / n_epochs
    )  # 61 on Tiny Shakespeare; PyTorch evaluates as often
    for epoch, val, seconds in epochs:
        print(
            f"epoch {epoch} (step {per_epoch * epoch}) | val = {val:.4f} | "
            f"{seconds:.1f} s"
        )
    print("PyTorch: nanoGPT's recipe (nanogpt_reference.py)", flush=True)
    history = race(data, target, eval_interval=per_epoch)

    def first(runs):
        return next(((s, v, t) for s, v, t in runs if v <= target), None)

    mlx, ref = first([(per_epoch * e, v, t) for e, v, t in epochs]), first(history)
    print(f"first val <= {target} ({torch.cuda.get_device_name()}):")
    for name, hit in (
        ("MLX bfloat16 (main.py)", mlx),
        ("PyTorch nanoGPT's recipe", ref),
    ):
        print(
            f"{name:>26}: "
            + (
                f"step {hit[0]}, val {hit[1]:.4f}, {hit[2]:.1f} s"
                if hit
                else "not reached"
            )
        )


def print_profile(name, c, args, torch_device):
    tf32 = "TF32 matmuls" if TF32 else "full float32 matmuls"
    print(
        f"{name} config{' (--tiny)' if args.tiny else ''}, float32, {tf32}, median of "
        f"{args.repeats}; MLX {mx.__version__} on {mx.default_device()} (compiled, "
        f"except dropout); PyTorch {torch.__version__} on {torch_device} (eager, in "
        f"this process{' with LD_PRELOAD' if 'LD_PRELOAD' in os.environ else ''})",
        flush=True,
    )
    rows = profile_pieces(c, args.device, args.repeats)
    print(f"{'piece':>42} {'MLX ms':>8} {'PyTorch ms':>11} {'MLX/PyTorch':>12}")
    for piece, (ms, ms_torch) in rows.items():
        print(f"{piece:>42} {ms:>8.3f} {ms_torch:>11.3f} {ms / ms_torch:>11.2f}x")


def print_ablation(name, c, args, dtype, gpu):
    print(
        f"{name} config{' (--tiny)' if args.tiny else ''}, dropout {c['dropout']}, "
        f"MLX {dtype}, {args.steps} steps x median of {args.repeats}; MLX "
        f"{mx.__version__} on {mx.default_device()}"
        + (f" ({torch.cuda.get_device_name()})" if gpu else ""),
        flush=True,
    )
    seconds = {
        variant: time_mlx(c, args.steps, args.repeats, dtype, change, variant)
        for variant, change in ABLATIONS.items()
    }
    first = seconds["main.py's model"]
    print(f"{'variant':>62} {'ms/step':>9} {'vs main.py':>11}")
    for variant, t in seconds.items():
        print(f"{variant:>62} {1e3 * t:>9.2f} {1e3 * (t - first):>+10.2f} ms")


def print_comparison(configs, args, argv, dtypes, ways, gpu):
    """The main table: PyTorch's ways and MLX's dtypes, per config, against the first
    PyTorch way."""
    torch_device, tf32 = (
        "cuda" if gpu else "cpu",
        "TF32 matmuls" if TF32 else "full float32 matmuls",
    )
    separate = not gpu and "LD_PRELOAD" in os.environ
    t_torch = (
        torch_in_child(argv)
        if separate
        else torch_times(configs, args.steps, args.repeats, torch_device, ways)
    )
    t_mlx = {
        name: {
            dtype: time_mlx(
                c, args.steps, args.repeats, dtype, label=f"{name} MLX {dtype}"
            )
            for dtype in dtypes
        }
        for name, c in configs.items()
    }
    device = f" ({torch.cuda.get_device_name()})" if gpu else ""
    print(
        f"random batches, {args.steps} steps x median of {args.repeats}; float32 in "
        f"{tf32}; MLX {mx.__version__} on {mx.default_device()}{device} (compiled "
        f"step, float32 master weights); PyTorch {torch.__version__} on "
        f"{torch_device}{' in a child process without LD_PRELOAD' if separate else ''}"
    )
    reference = ways[0]
    print(
        f"{'config':>12} {'variant':>66} {'ms/step':>9} {'tokens/s':>10} "
        f"{'vs ' + reference:>11}"
    )
    for name, c in configs.items():
        tokens = c["batch_size"] * c["block_size"]
        rows = [(TORCH_WAYS[way], t_torch[name][way]) for way in ways]
        rows += [(f"MLX {dtype}", t_mlx[name][dtype]) for dtype in dtypes]
        for variant, seconds in rows:
            print(
                f"{name:>12} {variant:>66} {1e3 * seconds:>9.2f} "
                f"{tokens / seconds:>10,.0f} "
                f"{seconds / t_torch[name][reference]:>10.2f}x"
            )


def workload_flags(parser):
    """What is timed, where, and how often."""
    parser.add_argument(
        "--config",
        choices=list(CONFIGS),
        nargs="+",
        help="which configs to time (default: both on a GPU; walkthrough on the CPU, "
        "where nanogpt takes about 20 minutes)",
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
        nargs="+",
        help="MLX compute dtypes to time (default: both on a GPU, float32 on the CPU)",
    )
    parser.add_argument(
        "--anchor",
        action=argparse.BooleanOptionalAction,
        help="time PyTorch the nanoGPT way (bfloat16 autocast + torch.compile + fused "
        "AdamW); ratios are against it (default: on a GPU only; on the CPU "
        "torch.compile takes minutes)",
    )
    parser.add_argument(
        "--steps",
        type=bounded(int, 1),
        help="training steps per timed run (default: 10 on a GPU, 3 on the CPU)",
    )
    parser.add_argument(
        "--repeats",
        type=bounded(int, 1),
        default=3,
        help="timed runs after a warm-up; the median is used (default: 3)",
    )
    parser.add_argument(
        "--tiny",
        action="store_true",
        help="shrink every config to 2 tiny layers (for tests)",
    )


def mode_flags(parser):
    """The other jobs, in place of the main table."""
    parser.add_argument(
        "--profile",
        action="store_true",
        help="instead: time the pieces of a step (matmul, GELU, LayerNorm, attention, "
        "dropout) "
        "in both frameworks, at the last --config",
    )
    parser.add_argument(
        "--ablation",
        action="store_true",
        help="instead: time main.py's MLX step (first --dtype, default bfloat16 on a "
        "GPU) against "
        "variants without parts of dropout's cost, at the last --config",
    )
    parser.add_argument(
        "--race",
        type=Path,
        metavar="INPUT_TXT",
        help="instead: train nanoGPT's config on this text with main.py (bfloat16) and "
        "with nanoGPT's recipe in PyTorch; print the wall time each takes to reach "
        "--target (GPU only; main.py's "
        "checkpoint goes to race-mlx/ beside the text)",
    )
    parser.add_argument(
        "--target",
        type=bounded(float, 0),
        default=1.47,
        help="validation loss for --race (default: 1.47)",
    )
    parser.add_argument(
        "--only", choices=["torch"], help=argparse.SUPPRESS
    )  # used by torch_in_child


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description="GPT training-step time: compiled MLX at each --dtype against "
        "PyTorch the nanoGPT way (the anchor) and PyTorch eager."
    )
    workload_flags(parser)
    mode_flags(parser)
    return parser.parse_args(argv)


def select_device(args, gpu):
    """MLX's default device: the GPU for --device gpu and --race, else the CPU."""
    if gpu or args.race:
        if not mx.is_available(mx.gpu) or not torch.cuda.is_available():
            sys.exit(
                "error: --device gpu and --race need MLX's GPU backend and PyTorch "
                "with CUDA; use --device cpu"
            )
        mx.set_default_device(mx.gpu)
    else:
        mx.set_default_device(mx.cpu)
        warn_if_reference_blas()


def announce(args, configs):
    """One line on stderr: what is timed, before the first (slow) warm-up."""
    mode = (
        "the pieces of a step"
        if args.profile
        else "dropout's ablation"
        if args.ablation
        else "training steps"
    )
    print(
        f"Timing {mode} on {args.device} ({', '.join(configs)}"
        f"{', --tiny' if args.tiny else ''}); each timing "
        "starts with a warm-up run that compiles; progress on stderr",
        file=sys.stderr,
        flush=True,
    )


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    gpu = args.device == "gpu"
    if args.config is None:
        args.config = list(CONFIGS) if gpu else ["walkthrough"]
    if args.steps is None:
        args.steps = 10 if gpu else 3
    configs = {
        name: {**CONFIGS[name], **(TINY if args.tiny else {})} for name in args.config
    }
    dtypes = args.dtype or (list(DTYPES) if gpu else ["float32"])
    ways = (["nanogpt"] if (gpu if args.anchor is None else args.anchor) else []) + [
        "eager"
    ]
    if args.only == "torch":
        print(
            json.dumps(
                torch_times(
                    configs, args.steps, args.repeats, "cuda" if gpu else "cpu", ways
                )
            )
        )
        return
    select_device(args, gpu)
    if args.race:
        if not args.race.is_file():
            sys.exit(
                f"error: {args.race} does not exist; give Tiny Shakespeare's input.txt"
            )
        return run_race(args.race, args.target)
    announce(args, configs)
    if args.profile:
        return print_profile(*list(configs.items())[-1], args, "cuda" if gpu else "cpu")
    if args.ablation:
        return print_ablation(
            *list(configs.items())[-1],
            args,
            (args.dtype or ["bfloat16" if gpu else "float32"])[0],
            gpu,
        )
    print_comparison(configs, args, argv, dtypes, ways, gpu)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # the PyTorch child gets it too: the parent says it
        if "--only" not in sys.argv:
            print("Interrupted", file=sys.stderr)
        sys.exit(130)
