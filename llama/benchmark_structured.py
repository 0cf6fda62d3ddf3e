"""Structured output's cost: the decoding step under a JSON schema, and without one.

    python llama/benchmark_structured.py --device gpu --preset 7b --dtype float16
    python llama/benchmark_structured.py --preset tiny --vocab-size 2048 \
        --max-tokens 16 --repeats 1  # seconds, on a CPU

The model has random weights and the shape of --preset; its vocabulary is the
tokenizer's: --tokenizer (any that tokenizer.py reads, e.g. Meta's Llama 3
tokenizer.model) or, without one, a made-up Llama 3-style one of --vocab-size tokens (a
tiktoken rank file of word-like byte strings, in a temporary folder). The masks' cost
grows with the vocabulary, so it should be real-sized.

For each batch size B (default 1 and 16), greedy, median of --repeats runs after a
warm-up:
- unconstrained: as llama.py runs it, model.generate at batch 1, batch.generate_batch
  above;
- constrained: structured.generate_constrained with every row under SCHEMA below, an
  array of records that cannot end within --max-tokens, so every row makes every step;
- the host's masks alone: llguidance computing the B masks of each step, each row
  replaying a realistic document, without the model (the constrained loop hides this
  behind the device's step). Mean and largest per step.
A decoding step is (time for --max-tokens tokens - time for 1) / (--max-tokens - 1): the
prompt's pass is left out. Also printed: the seconds llguidance takes to read the
tokenizer (once) and to compile PERSON, a typical schema, and compute its first mask
(once per request).
"""

import argparse
import base64
import json
import statistics
import tempfile
import time
from pathlib import Path

import llguidance
import mlx.core as mx
import numpy as np
from batch import generate_batch
from llguidance.numpy import fill_next_token_bitmask_par
from model import Llama, ModelArgs, warn_if_reference_blas
from structured import engine_tokenizer, generate_constrained, json_constraint
from timing import say
from tokenizer import load_tokenizer

from llama import in_range

PRESETS = {
    "tiny": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=192),
    "7b": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, hidden_dim=11008),
    "8b": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, hidden_dim=14336),
}
DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "email": {"type": "string", "pattern": "^[a-z]{1,8}@[a-z]{1,8}\\.com$"},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string"}},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "email", "role", "tags", "active"],
    "additionalProperties": False,
}
SCHEMA = {"type": "array", "items": PERSON, "minItems": 10000}


def made_up_tokenizer(folder, vocab_size, seed=0):
    """A Llama 3-style tokenizer.model (tiktoken ranks; tokenizer.py adds 256 special
    tokens) of vocab_size tokens: the 256 bytes, then words with and without a leading
    space, runs of JSON punctuation, numbers of up to 3 digits and pieces of accented
    letters, all distinct."""
    rng = np.random.default_rng(seed)
    letters = "etaoinshrdlcumwfgypbvkjxqz"
    weights = 1 / np.arange(1, 27)
    tokens = [bytes([b]) for b in range(256)]
    seen = set(tokens)
    while len(tokens) < vocab_size - 256:
        kind = rng.random()
        if kind < 0.85:
            n = int(rng.integers(2, 11))
            word = "".join(rng.choice(list(letters), n, p=weights / weights.sum()))
            token = (" " * int(rng.random() < 0.6) + word).encode()
        elif kind < 0.92:
            token = "".join(rng.choice(list('{}[]",: .'), int(rng.integers(2, 4))))
            token = token.encode()
        elif kind < 0.97:
            token = str(int(rng.integers(0, 1000))).encode()
        else:
            token = "".join(rng.choice(list("éèàüöçñ"), 2)).encode()
        if token not in seen:
            seen.add(token)
            tokens.append(token)
    lines = [f"{base64.b64encode(t).decode()} {rank}" for rank, t in enumerate(tokens)]
    path = Path(folder) / "tokenizer.model"
    path.write_text("\n".join(lines) + "\n")
    return path


def median_range(run, repeats):
    """(median, min, max) seconds of run() over `repeats` calls after a warm-up call."""
    run()
    times = []
    for _ in range(repeats):
        tic = time.perf_counter()
        run()
        times.append(time.perf_counter() - tic)
    return statistics.median(times), min(times), max(times)


def step_seconds(generate, max_tokens, repeats):
    """(median, min, max) seconds of a decoding step: runs of max_tokens, less of 1."""
    first = median_range(lambda: generate(1), repeats)[0]
    runs = median_range(lambda: generate(max_tokens), repeats)
    return tuple((t - first) / (max_tokens - 1) for t in runs)


def unconstrained(model, prompts):
    """generate(n): n greedy tokens per prompt, as llama.py makes them unconstrained."""
    if len(prompts) > 1:
        return lambda n: generate_batch(model, prompts, n)

    def generate(n):
        tokens = model.generate(mx.array(prompts[0]))
        return [next(tokens) for _ in range(n)]

    return generate


def constrained(model, tokenizer, prompts):
    """generate(n): n greedy tokens per prompt, every row under SCHEMA."""

    def generate(n):
        constraints = [json_constraint(tokenizer, SCHEMA) for _ in prompts]
        replies = generate_constrained(
            model, prompts, n, 0.0, 1.0, tokenizer.stop_ids, constraints
        )
        assert all(len(reply) == n for reply in replies)
        return replies

    return generate


def people(seed, n=8):
    """A JSON array of n records valid under PERSON, as a model might write them,
    without its closing "]"."""
    rng = np.random.default_rng(seed)
    names = ["Ada Lovelace", "Grace Hopper", "Alan Turing", "Edsger Dijkstra", "Zoë"]
    tags = ["ops", "on call", "backend", "ml", "weekend"]
    records = [
        dict(
            name=str(rng.choice(names)),
            age=int(rng.integers(18, 90)),
            email=f"{rng.choice(['ada', 'grace', 'alan'])}@example.com",
            role=str(rng.choice(["admin", "user", "guest"])),
            tags=[str(t) for t in rng.choice(tags, int(rng.integers(0, 3)))],
            active=bool(rng.random() < 0.5),
        )
        for _ in range(n)
    ]
    return json.dumps(records, ensure_ascii=False)[:-1]


def mask_seconds(tokenizer, B):
    """(mean, max) seconds the host spends on one step's masks for B rows (llguidance's
    threads), each row replaying its own document of realistic records: the text decides
    the cost (a string under a pattern costs more than free text), and random weights
    write no realistic text."""
    documents = [tokenizer.encode(people(seed)) for seed in range(B)]
    constraints = [json_constraint(tokenizer, SCHEMA) for _ in documents]
    executor = llguidance.LLExecutor()
    bitmask = np.full((B, constraints[0].bitmask.shape[1]), -1, np.int32)
    rows = [(c.matcher, i) for i, c in enumerate(constraints)]
    times = []
    for step in range(min(map(len, documents))):
        tic = time.perf_counter()
        fill_next_token_bitmask_par(executor, rows, bitmask)
        times.append(time.perf_counter() - tic)
        for constraint, document in zip(constraints, documents):
            constraint.advance(document[step])
    return statistics.mean(times), max(times)


def compile_seconds(tokenizer, repeats=20):
    """Median seconds from PERSON to its first mask: grammar, matcher, one mask."""
    times = []
    for _ in range(repeats):
        tic = time.perf_counter()
        constraint = json_constraint(tokenizer, PERSON)
        constraint.mask(mx.zeros((1, tokenizer.vocab_size)))
        times.append(time.perf_counter() - tic)
    return statistics.median(times)


def parse_args():
    parser = argparse.ArgumentParser(
        description="Decoding step under a JSON schema (structured.py), and without."
    )
    parser.add_argument("--preset", choices=list(PRESETS), default="tiny")
    parser.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32")
    parser.add_argument(
        "--tokenizer",
        help="a tokenizer file or folder (default: a made-up one, --vocab-size tokens)",
    )
    parser.add_argument(
        "--vocab-size",
        type=in_range(int, 512, 2**20),
        default=128256,
        help="tokens of the made-up tokenizer, special ones included "
        "(default: 128256, as Llama 3's)",
    )
    parser.add_argument(
        "--batch-sizes",
        type=in_range(int, 1, 256),
        nargs="+",
        default=[1, 16],
        help="prompts per batch (default: 1 16)",
    )
    parser.add_argument(
        "--prompt-tokens",
        type=in_range(int, 1, 2048),
        default=32,
        help="tokens per prompt (default: 32)",
    )
    parser.add_argument(
        "--max-tokens",
        type=in_range(int, 2, 2048),
        default=128,
        help="new tokens per prompt (default: 128)",
    )
    parser.add_argument(
        "--repeats",
        type=in_range(int, 1, 100),
        default=3,
        help="timed runs after a warm-up (default: 3)",
    )
    args = parser.parse_args()
    if args.device == "gpu" and not mx.is_available(mx.gpu):
        parser.error("--device gpu needs MLX's GPU backend; use --device cpu")
    return args


def load(args, folder):
    """(model, tokenizer, seconds to read the tokenizer for llguidance)."""
    source = args.tokenizer or made_up_tokenizer(folder, args.vocab_size)
    tokenizer = load_tokenizer(source)
    tic = time.perf_counter()
    engine_tokenizer(tokenizer)
    engine = time.perf_counter() - tic
    shape = dict(PRESETS[args.preset], vocab_size=tokenizer.vocab_size)
    model = Llama(ModelArgs(**shape, max_seq_len=4096))
    model.set_dtype(
        DTYPES[args.dtype]
    )  # before the random weights are made: no float32 copy
    mx.eval(model.parameters())
    return model, tokenizer, engine


def main():
    args = parse_args()
    mx.set_default_device(mx.gpu if args.device == "gpu" else mx.cpu)
    if args.device == "cpu":
        warn_if_reference_blas()
    with tempfile.TemporaryDirectory() as folder:
        model, tokenizer, engine = load(args, folder)
    kind = f"{tokenizer.kind} tokenizer of {tokenizer.vocab_size} tokens"
    say(f"random {args.preset} {args.dtype} Llama, {kind}")
    rng = np.random.default_rng(0)
    rows = []
    for B in args.batch_sizes:
        prompts = [rng.integers(0, 256, args.prompt_tokens).tolist() for _ in range(B)]
        say(f"batch {B}: unconstrained, then constrained")
        plain = step_seconds(
            unconstrained(model, prompts), args.max_tokens, args.repeats
        )
        generate = constrained(model, tokenizer, prompts)
        json_steps = step_seconds(generate, args.max_tokens, args.repeats)
        masks = mask_seconds(tokenizer, B)
        rows.append((B, plain, json_steps, masks))
    report(args, kind, rows, engine, compile_seconds(tokenizer))


def report(args, kind, rows, engine, compiled):
    print(
        f"{args.preset} preset, random {args.dtype} weights, {kind}; decoding step, "
        "greedy, "
        f"median [min-max] of {args.repeats} runs of {args.max_tokens} tokens; MLX "
        f"{mx.__version__} on {mx.default_device()}; "
        f"llguidance {llguidance.__version__}"
    )
    print(
        f"{'batch':>5} {'unconstrained ms':>17} {'constrained ms':>17} {'ratio':>6} "
        f"{'host masks ms, mean and max':>28}"
    )
    for B, plain, json_steps, masks in rows:
        spans = [
            f"{t[0] * 1e3:.2f} [{t[1] * 1e3:.2f}-{t[2] * 1e3:.2f}]"
            for t in (plain, json_steps)
        ]
        print(
            f"{B:>5} {spans[0]:>17} {spans[1]:>17} {json_steps[0] / plain[0]:>5.2f}x "
            f"{masks[0] * 1e3:>18.2f} {masks[1] * 1e3:>9.2f}"
        )
    print(
        f"llguidance reads the tokenizer in {engine:.2f} s (once); "
        "a typical schema (PERSON) compiles "
        f"and gives its first mask in {compiled * 1e3:.2f} ms (once per request)"
    )


if __name__ == "__main__":
    main()
