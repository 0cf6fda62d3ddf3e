"""Fine-tune a converted Llama with LoRA (QLoRA on a 4- or 8-bit one), test it, fuse the
adapters.

    python llama/lora_data.py data    # an example data folder: sums to complete
    python llama/lora.py --model weights.safetensors --tokenizer tokenizer.model \\
        --data data --train --iters 600
    python llama/lora.py --model weights.safetensors --tokenizer tokenizer.model \\
        --data data --test
    python llama/llama.py weights.safetensors tokenizer.model --adapter-path adapters \\
        "What is 12 + 30?"
    python llama/lora.py --model weights.safetensors --adapter-path adapters --fuse \\
        --save-path fused.safetensors

The flags are mlx-lm's (mlx_lm.lora; mlx_lm.fuse for --save-path) where it has one;
--rank, --alpha, --dropout and --keys stand for its configuration file's
lora_parameters.

By default the adapters (rank 8, alpha 16: scale alpha / rank) sit on the attention's wq
and wv of the last 16 blocks; --keys chooses other layers (all: every linear layer of a
block). A 4- or 8-bit model from convert.py --quantize stays quantized (QLoRA): training
multiplies by each layer's dequantized weight, made for the product and again for the
backward pass.

--data is a folder with train.jsonl, valid.jsonl and, for --test, test.jsonl, one JSON
object a line: {"text": ...}, {"prompt": ..., "completion": ...} or {"messages": [...]}
(in the model's chat format). The loss is the mean cross-entropy of the counted tokens:
all, or with --mask-prompt only completions and assistant replies. Examples are cut at
--max-seq-length tokens or the model's context, whichever is shorter. A batch is
--batch-size examples of similar length padded to a multiple of 32 tokens, the batches
shuffled every epoch by --seed.

--adapter-path gets adapters.safetensors (with AdamW's state and the step) and
adapter_config.json, written atomically every --save-every steps and at the end;
--resume-adapter-file continues exactly as the uninterrupted run would have, with the
same settings. Ctrl-C or SIGTERM stops after the step under way and saves it. A
diverging step stops the run and keeps the adapters of the last sound one.

--fuse writes W + scale * B @ A into every adapted layer, as convert.py writes a model,
so llama.py runs it with no flag. A quantized base is written dequantized: quantizing
again would round away most of the adapters' change; for a small file keep the base and
--adapter-path.
"""

import os
import signal
import sys


def stop_at_once(signum, frame):
    os.write(2, b"interrupted\n")
    os._exit(130)  # not an exception: a library's import cannot catch it


if __name__ == "__main__":  # Ctrl-C while MLX loads (tenths of a second): one line
    signal.signal(signal.SIGINT, stop_at_once)

# Before MLX starts: its CUDA backend sends work to the GPU in CUDA graphs of up to
# 1,000 MB of inputs (on an H100 or H200) and keeps those inputs until their graph has
# run, up to 10 graphs ahead: at a 7B step's peak, about 8 GB more than the step needs.
# Graphs of 100 MB keep about 1 GB, at about the same speed (on an H200).
if sys.platform != "darwin":
    os.environ.setdefault("MLX_MAX_MB_PER_BUFFER", "100")

import argparse  # noqa: E402 (after the settings above)
import math  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import mlx.core as mx  # noqa: E402
from lora_adapters import (  # noqa: E402
    ADAPTERS,
    LINEAR_KEYS,
    load_adapters,
    save_fused,
)
from model import WeightsError, load_model  # noqa: E402
from tokenizer import TokenizerError, load_tokenizer  # noqa: E402


class Stop:
    """Ctrl-C and SIGTERM: during training (train() sets .training), a request to stop
    after the step under way (a second one stops at once); otherwise KeyboardInterrupt,
    which removes temporary files on its way out."""

    def __init__(self):
        self.training, self.requested = False, None
        signal.signal(signal.SIGINT, self)
        signal.signal(signal.SIGTERM, self)

    def __call__(self, signum, frame):
        if not self.training or self.requested:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name


def run(args, stop):
    """Everything after the flags: returns the exit status."""
    tic = time.perf_counter()
    model = load_model(args.model)
    if args.fuse:
        save_fused(model, args.adapter_path, Path(args.save_path), args.tokenizer)
        print(
            f"wrote {args.save_path}: the model with the adapters of "
            f"{args.adapter_path} merged; run it with llama.py {args.save_path} "
            'TOKENIZER "prompt"'
        )
        return 0
    from lora_data import load_data  # --train and --test
    from lora_training import dequantizing_layers, evaluate, run_training

    dequantizing_layers(model)  # a quantized model's products for training and --test
    tokenizer = load_tokenizer(args.tokenizer, model.args.vocab_size)
    print(
        f"loaded {args.model} in {time.perf_counter() - tic:.1f} s, {tokenizer.kind} "
        "tokenizer",
        flush=True,
    )
    max_length = min(args.max_seq_length, model.args.max_seq_len)
    if max_length < args.max_seq_length:
        print(
            f"the model's context is {max_length} tokens: examples are cut there, not "
            f"at --max-seq-length {args.max_seq_length}"
        )
    splits = ["train", "valid"] * args.train + ["test"] * args.test
    data = {}  # all read and checked before any training
    for name in splits:
        path = Path(args.data) / f"{name}.jsonl"
        data[name] = load_data(path, tokenizer, args.mask_prompt, max_length)
    status = 0
    if args.train:
        status = run_training(model, data, args, stop)
    elif (Path(args.adapter_path) / ADAPTERS).is_file():
        described = load_adapters(model, args.adapter_path)
        print(f"testing with the adapters of {args.adapter_path}{described}")
    else:
        print(f"no adapters in {args.adapter_path}: testing the model as it is")
    if args.test and status == 0:
        loss, n = evaluate(model, data["test"], args.batch_size, args.test_batches)
        perplexity = math.exp(min(loss, 700))
        print(f"test loss {loss:.3f}, perplexity {perplexity:.3f} ({n} tokens)")
    return status


def check_flags(p, args):
    """The checks argparse cannot make flag by flag: p.error for the first one that
    fails."""
    if not (args.train or args.test or args.fuse):
        p.error("say what to do: --train, --test or --fuse")
    if args.fuse and (args.train or args.test):
        p.error("--fuse is a step of its own; run it after --train")
    if not args.fuse and not args.tokenizer:
        p.error("--train and --test need --tokenizer")
    if args.resume_adapter_file and not args.train:
        p.error("--resume-adapter-file needs --train")
    if not args.fuse:
        return
    save = Path(args.save_path or "")
    if save.suffix not in (".safetensors", ".npz", ".gguf"):
        p.error("--fuse needs --save-path ending in .safetensors, .npz or .gguf")
    if save.suffix == ".gguf" and not args.tokenizer:
        p.error(
            "--fuse to a .gguf needs --tokenizer (a .gguf, or a tokenizer.json folder)"
        )
    if save.exists() and save.resolve() == Path(args.model).resolve():
        p.error(
            f"--save-path {save} is --model: give a new file, the base stays as it is"
        )
    if save.is_dir():
        p.error(f"--save-path {save} is a folder; give the file to write in it")
    file = next((f for f in save.parents if f.exists() and not f.is_dir()), None)
    if file:
        p.error(f"--save-path {save}: {file} is a file, not a folder")


D = "default: %(default)s"


def in_range(kind, low, high=math.inf, above=False):
    """An argparse type: a finite `kind` from `low` (or just above it) to `high`."""

    def parse(text):
        value = kind(text)  # argparse says "invalid int value" for a ValueError
        if not (value > low if above else value >= low) or not value <= high:
            lowest = f"above {low}" if above else f"at least {low}"
            highest = f" and at most {high}" if high < math.inf else ""
            raise argparse.ArgumentTypeError(f"{text} is not {lowest}{highest}")
        return value

    parse.__name__ = kind.__name__
    return parse


def add_training_flags(p):
    add = p.add_argument
    add("--num-layers", type=in_range(int, -1), help="adapt the last N (16); -1: all")
    add("--keys", nargs="+", choices=[*LINEAR_KEYS, "all"], default=["wq", "wv"])
    add("--rank", type=in_range(int, 1), default=8, help=D)
    add("--alpha", type=in_range(float, 0, 1e6, above=True), default=16.0, help=D)
    add("--dropout", type=in_range(float, 0, 0.999), default=0.0, help=D)
    add("--batch-size", type=in_range(int, 1), default=4, help=D)
    add("--iters", type=in_range(int, 1), default=1000, help="steps in all; " + D)
    add("--learning-rate", type=in_range(float, 0, above=True), default=1e-4, help=D)
    add("--steps-per-report", type=in_range(int, 1), default=10, help=D)
    add("--steps-per-eval", type=in_range(int, 0), default=200, help="0: none; " + D)
    add("--val-batches", type=in_range(int, -1), default=25, help="-1: all; " + D)
    add("--test-batches", type=in_range(int, -1), default=-1, help="-1: all; " + D)
    add("--save-every", type=in_range(int, 1), default=100, help=D)
    add("--max-seq-length", type=in_range(int, 2), default=2048, help=D)
    add("--mask-prompt", action="store_true", help="count only completions, replies")
    add("--grad-checkpoint", action="store_true", help="less memory, 1/3 more time")
    add("--seed", type=in_range(int, 0, 2**32 - 1), default=0, help=D)


def parse_args(argv=None):
    formatter = argparse.RawDescriptionHelpFormatter
    p = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    add = p.add_argument
    add("--model", required=True, help="the .safetensors or .npz file of convert.py")
    add("--tokenizer", help="the model's tokenizer, as for llama.py (--train, --test)")
    add("--data", default="data", help="folder of train, valid, test.jsonl; " + D)
    add("--train", action="store_true", help="train adapters")
    add(
        "--test", action="store_true", help="the loss on test.jsonl (with any adapters)"
    )
    add("--fuse", action="store_true", help="merge the adapters into the model")
    add("--save-path", help="the fused model to write: .safetensors, .npz or .gguf")
    add("--adapter-path", default="adapters", help="the adapters' folder; " + D)
    add("--resume-adapter-file", help="continue training this adapters.safetensors")
    add("--fine-tune-type", choices=["lora"], default="lora", help="lora only, here")
    add_training_flags(p)
    args = p.parse_args(argv)
    if 0 in (args.num_layers, args.val_batches, args.test_batches):
        p.error(
            "--num-layers, --val-batches and --test-batches are -1 (all) or at least 1"
        )
    check_flags(p, args)
    return args


def main():
    args = parse_args()
    mx.random.seed(args.seed)
    try:
        sys.exit(run(args, Stop()))
    except (WeightsError, TokenizerError) as e:  # adapters, data too
        sys.exit(f"error: {e}")
    except BrokenPipeError:  # the reader of stdout left (| head): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
    except OSError as e:  # a full disk, stdout too (> /dev/full)
        where = e.filename or "to stdout"
        sys.exit(f"error: cannot write {where}: {e.strerror or e}")
    except KeyboardInterrupt:
        print("interrupted; nothing saved since the last save", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
