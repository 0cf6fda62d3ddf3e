"""Speculative decoding speed (speculative.py): plain decoding against prompt lookup
and a draft model.

    python llama/benchmark_speculative.py smol.safetensors smol-hf  # a model, --chat
    python llama/benchmark_speculative.py --preset 7b --dtype float16  # rejected blocks
    python llama/benchmark_speculative.py --preset tiny --repeats 1  # seconds, on a CPU

With a model (a convert.py file and its tokenizer), each task is one chat message,
answered greedily for up to --max-tokens tokens (or to a stop token) by plain decoding
(model.generate), prompt lookup with each of --k (--ngram-size) and a draft model:
--draft-model, or by default the model itself quantized to 4 bits. Three tasks repeat
their input (edit a code file, quote a document, rewrite a paragraph), one does not (a
story). Tokens/s counts the reply's tokens from the first one (the prompt pass) to the
last, median and range of --repeats runs after a warm-up; "same" says whether the text
is plain decoding's, "accepted" is the share of proposed tokens kept.

With --preset, random weights: the time of a plain decoding step against a token when
every proposal is rejected (a block of K proposals yields one token), the worst case of
speculation. speculative.py builds each pass while the one before runs, on a guess;
after a rejected block it guesses none kept, so then blocks alternate with plain steps
on the model's own token ("tokens per pass": 1.00 means no pass was built on a wrong
guess). On a CPU, --dtype float32 with OpenBLAS (see the top README) is bound by the
host as a GPU is; float16 products on a CPU are slow and grow with K. Progress goes to
stderr, the tables to stdout.
"""

import argparse
import statistics
import sys
import time
from dataclasses import replace

import mlx.core as mx
import numpy as np
from chat import chat_tokens
from model import Llama, ModelArgs, WeightsError, load_model, warn_if_reference_blas
from quantize import quantize
from speculative import DraftModel, PromptLookup, Proposer, speculative_generate
from tokenizer import TokenizerError, load_tokenizer

from llama import in_range

CODE = '''import json
from pathlib import Path


def load_scores(path):
    """Read a JSON file of {name: score}."""
    with open(path) as f:
        scores = json.load(f)
    return {name: float(score) for name, score in scores.items()}


def best_players(scores, count=3):
    """The names of the `count` players with the highest scores."""
    ranked = sorted(scores.items(), key=lambda item: item[1], reverse=True)
    return [name for name, _ in ranked[:count]]


def average_score(scores):
    """The mean of all scores, or 0 for no scores."""
    if not scores:
        return 0.0
    return sum(scores.values()) / len(scores)


def save_report(scores, path):
    report = {"best": best_players(scores), "average": average_score(scores)}
    Path(path).write_text(json.dumps(report, indent=2))
'''

DOCUMENT = """The Harbour Library opens at nine in the morning from Monday to Friday and
at ten on Saturdays; it is closed on Sundays and public holidays. Members may borrow up
to eight books at a time for three weeks, and a loan can be renewed twice online or at
the front desk, unless another member has reserved the book. Late returns cost twenty
cents per book per day, up to a maximum of five euros per book. The reading room on the
second floor is kept silent, and laptops may be used there only with the sound turned
off. Children under twelve must be accompanied by an adult after six in the evening.
Lost membership cards are replaced at the front desk for a fee of two euros."""

PARAGRAPH = """Our team spent the autumn rebuilding the colour pipeline of the old print
shop. The first weeks went to measuring every press, because nobody had written down how
the machines had drifted over the years. We then replaced the hand-tuned curves with
profiles computed from those measurements, and the colour of a test page now agrees
across all four presses. The remaining work is to train the staff, to move the profiles
into the shared catalogue, and to check each press again in the spring, when the
humidity changes."""

TASKS = {
    "edit code": "Rename the function best_players to top_players in this code and "
    f"print the whole code again:\n\n```python\n{CODE}```",
    "quote document": f"Text:\n\n{DOCUMENT}\n\nQuestion: How many books may members "
    "borrow, and what do late returns cost? Answer by quoting the exact sentences from "
    "the text.",
    "rewrite paragraph": "Repeat this paragraph word for word, only writing color "
    f"instead of colour:\n\n{PARAGRAPH}",
    "open-ended": "Write a short story about a lighthouse keeper who finds a message "
    "in a bottle.",
}


class Counted:
    """A model that counts its forward passes (speculative_generate's; model.generate
    makes one per token)."""

    def __init__(self, model):
        self.model, self.args, self.passes = model, model.args, 0

    def __call__(self, *args, **kwargs):
        self.passes += 1
        return self.model(*args, **kwargs)

    def make_cache(self):
        return self.model.make_cache()


def decode(model, prompt, proposer, max_tokens, stop_ids):
    """(the reply's tokens, seconds from its first token to its last)."""
    if proposer is None:
        stream = model.model.generate(mx.array(prompt))
    else:
        stream = speculative_generate(model, prompt, proposer)
    tokens, first = [], None
    for token in stream:
        first = first or time.perf_counter()
        tokens.append(token)
        if len(tokens) == max_tokens or token in stop_ids:
            break
    return tokens, time.perf_counter() - first


def measure(model, prompt, methods, args, stop_ids=(), label=""):
    """{name: (median, low, high tokens/s of the timed runs, the reply, share accepted,
    tokens per forward pass)} for methods {name: proposer or None (plain)}. The methods
    take turns run by run, so that a drift of the machine's speed touches them alike."""
    counted, rates, last = Counted(model), {name: [] for name in methods}, {}
    for repeat in range(args.repeats + 1):  # the first round warms up
        say(f"{label}round {repeat + 1} of {args.repeats + 1}")
        for name, proposer in methods.items():
            counted.passes = 0
            tokens, seconds = decode(
                counted, prompt, proposer, args.max_tokens, stop_ids
            )
            rates[name].append((len(tokens) - 1) / seconds)
            accepted = (
                proposer.accepted / max(proposer.proposed, 1) if proposer else None
            )
            per_pass = len(tokens) / counted.passes if proposer else 1.0
            last[name] = (tokens, accepted, per_pass)
    results = {}
    for name, (tokens, accepted, per_pass) in last.items():
        timed = rates[name][1:]
        median = statistics.median(timed)
        results[name] = (median, min(timed), max(timed), tokens, accepted, per_pass)
    return results


def rate(median, low, high):
    return f"{median:.1f} ({low:.1f}-{high:.1f})"


def quantized_draft(model):
    """The model itself at 4 bits (groups of 64): a draft with the same tokenizer."""
    draft = Llama(replace(model.args, quantization=None))
    draft.update(model.parameters())  # the same arrays, not copies
    quantize(draft, 64, 4)
    mx.eval(draft.parameters())
    return draft


def real_model(args):
    """The task table for a converted model with its tokenizer, with --chat."""
    model = load_model(args.weights)
    tokenizer = load_tokenizer(args.tokenizer, model.args.vocab_size)
    if args.draft_model:
        draft, draft_name = load_model(args.draft_model), "draft model"
    else:
        draft, draft_name = quantized_draft(model), "4-bit self-draft"
    methods = {"plain": None}
    for k in args.k:
        methods[f"prompt lookup K={k}"] = PromptLookup(k, args.ngram_size)
    methods[f"{draft_name} K={args.num_draft_tokens}"] = DraftModel(
        draft, args.num_draft_tokens
    )
    print(
        "| task | method | tokens/s, median (range) | vs plain | accepted "
        "| tokens per pass | same |"
    )
    print("|---|---|---|---|---|---|---|")
    for task in args.tasks:
        message = TASKS[task]
        prompt = chat_tokens(tokenizer, [{"role": "user", "content": message}])
        results = measure(model, prompt, methods, args, tokenizer.stop_ids, f"{task}: ")
        plain_rate, plain_tokens = results["plain"][0], results["plain"][3]
        for name, (median, low, high, tokens, accepted, per_pass) in results.items():
            share = "" if accepted is None else f"{accepted:.0%}"
            same = "yes" if tokens == plain_tokens else "NO"
            print(
                f"| {task} | {name} | {rate(median, low, high)} | "
                f"{median / plain_rate:.2f}x | {share} | {per_pass:.2f} | {same} |",
                flush=True,
            )


VOCAB = 32000
PRESETS = {
    "tiny": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=192),
    "small": dict(dim=768, n_layers=12, n_heads=12, hidden_dim=2048),
    "7b": dict(dim=4096, n_layers=32, n_heads=32, hidden_dim=11008),
}


class Rejected(Proposer):
    """Random proposals: with random weights the model's argmax almost never agrees."""

    rng = np.random.default_rng(0)

    def propose(self, tokens, n, temp, top_p):
        return self.rng.integers(0, VOCAB, n).tolist(), None


def rejected_blocks(args):
    """Time per token of plain steps against blocks of K proposals, all rejected."""
    mx.random.seed(args.seed)
    model = Llama(ModelArgs(**PRESETS[args.preset], vocab_size=VOCAB))
    model.set_dtype(getattr(mx, args.dtype))
    mx.eval(model.parameters())
    prompt = np.random.default_rng(args.seed).integers(3, VOCAB, 128).tolist()
    methods = {"plain": None, **{k: Rejected(k) for k in args.k}}
    results = measure(model, prompt, methods, args, label=f"{args.preset}: ")
    plain = results.pop("plain")
    print(
        "| decoding | ms per token, median (range) | vs a plain step | accepted "
        "| tokens per pass |"
    )
    print("|---|---|---|---|---|")
    print(f"| plain step | {ms(*plain[:3])} | 1.00x | | 1.00 |")
    for k, (median, low, high, _, accepted, per_pass) in results.items():
        print(
            f"| blocks of K={k}, all rejected | {ms(median, low, high)} | "
            f"{plain[0] / median:.2f}x | {accepted:.0%} | {per_pass:.2f} |",
            flush=True,
        )


def ms(median, low, high):
    """Tokens/s as milliseconds per token (the range reversed)."""
    return f"{1000 / median:.2f} ({1000 / high:.2f}-{1000 / low:.2f})"


def say(message):
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def parse_args():
    parser = argparse.ArgumentParser(
        description="Tokens/s of plain decoding, prompt lookup and a draft model."
    )
    parser.add_argument("weights", nargs="?", help="a convert.py weights file")
    parser.add_argument("tokenizer", nargs="?", help="its tokenizer (as llama.py)")
    parser.add_argument(
        "--preset",
        choices=list(PRESETS),
        help="instead of a model: random weights of this shape, to time a rejection",
    )
    parser.add_argument(
        "--dtype", choices=["float16", "bfloat16", "float32"], default="float16"
    )
    parser.add_argument(
        "--k",
        type=in_range(int, 1, 64),
        nargs="+",
        default=[2, 5, 10],
        help="proposals per block (prompt lookup; --preset: rejected blocks)",
    )
    parser.add_argument("--ngram-size", type=in_range(int, 1, 64), default=2)
    parser.add_argument("--draft-model", help="default: the model at 4 bits")
    parser.add_argument("--num-draft-tokens", type=in_range(int, 1, 64), default=3)
    parser.add_argument(
        "--tasks",
        nargs="+",
        choices=list(TASKS),
        default=list(TASKS),
        help="the tasks to run (default: all)",
    )
    parser.add_argument("--max-tokens", type=in_range(int, 2), default=200)
    parser.add_argument("--repeats", type=in_range(int, 1), default=3)
    parser.add_argument("--seed", type=in_range(int, 0), default=0)
    args = parser.parse_args()
    if (args.preset is None) == (args.tokenizer is None):
        parser.error("give a weights file and its tokenizer, or --preset")
    return args


def main():
    args = parse_args()
    warn_if_reference_blas()
    print(
        f"MLX {mx.__version__}, {mx.default_device()}, --max-tokens {args.max_tokens}"
    )
    if args.preset:
        rejected_blocks(args)
    else:
        real_model(args)


if __name__ == "__main__":
    try:
        main()
    except (WeightsError, TokenizerError) as e:  # a file that is not a model's
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)
