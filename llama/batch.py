"""Batched generation: many prompts decoded together, one model step for all of them.

One sequence decodes at the pace of the host (building and launching a step's graph),
not of the device; a step for 16 rows costs the host the same and the device little
more, so total tokens/s grows with the batch. `llama.py --prompts FILE` runs this file;
model.py does not know about it.

The layout: prompts are left-padded to the longest, so every row's next token sits in
the last column and one key/value cache of shape (B, n_kv_heads, positions, head_dim)
serves the batch. Row b's first pads[b] positions are padding. Two things keep each row
exactly as if it ran alone:
- positions: RoPE rotates row b's tokens by their position in that row (mx.fast.rope
  takes one offset per row). Attention scores depend only on the distance between
  positions, so a shift would change nothing but the rounding; with its own positions a
  row computes the very numbers it computes alone;
- a mask: no query sees a padding key. With no padding (prompts of one length) there is
  no mask at all and attention keeps the fused kernel's fast path.
A row that ends (a stop token, its token limit) leaves the batch: its cache rows are
dropped at once, so it costs no further steps.

    from batch import generate_batch
    prompts = [tokenizer.prompt(p) for p in texts]
    # one list of token ids per prompt, in order
    replies = generate_batch(
        model, prompts, max_tokens=100, stop_ids=tokenizer.stop_ids
    )
"""

import json
import sys
import time
from collections import deque
from contextlib import contextmanager

import mlx.core as mx
import mlx.nn as nn
from model import Attention, KVCache, sample
from tokenizer import StreamingDecoder


class Padding:
    """The left padding of the rows of a batch, shared by the caches of all layers."""

    def __init__(self, pads):
        # (B,) padding positions at the start of each row, as an array and as a list:
        # the list tells on the host whether there is any, where reading the array
        # would wait for the step under way
        self.pads, self.host_pads = mx.array(pads), list(pads)
        self.masks = {}  # the mask of this step, made once for all layers

    @property
    def any(self):
        return max(self.host_pads) > 0

    def mask(self, T, S):
        """(B, 1, T, S) True where a query may see a key: causal, and no real token
        sees padding. A padding query sees the padding before it (a row of all False
        would make its softmax NaN)."""
        if not self.any:
            return "causal" if T > 1 else None
        if (T, S) not in self.masks:
            # (S,) and (T, 1) positions
            keys, queries = mx.arange(S), mx.arange(S - T, S)[:, None]
            pads = self.pads[:, None, None, None]
            self.masks = {
                (T, S): (keys <= queries) & ((keys >= pads) | (queries < pads))
            }
        return self.masks[(T, S)]

    def keep(self, rows):
        """Keep only `rows` (a list of row indices)."""
        self.host_pads = [self.host_pads[i] for i in rows]
        self.pads, self.masks = self.pads[mx.array(rows)], {}


class BatchKVCache(KVCache):
    """One layer's keys and values for a batch of left-padded rows (model.KVCache,
    and the padding)."""

    def __init__(self, padding):
        super().__init__()
        self.padding = padding

    def keep(self, rows):
        """Drop every row but `rows` (an int array)."""
        self.keys, self.values = self.keys[rows], self.values[rows]


class BatchAttention(Attention):
    """model.Attention with each row's own positions and the padding mask (swapped in
    by `batched`)."""

    def __call__(self, x, cache):
        B, T, _ = x.shape
        q, k, v = (
            w(x).reshape(B, T, -1, self.head_dim).transpose(0, 2, 1, 3)
            for w in (self.wq, self.wk, self.wv)
        )
        # (B,) each row's position of the first of these T tokens (without padding:
        # the same for all rows)
        positions = (
            cache.offset - cache.padding.pads if cache.padding.any else cache.offset
        )
        q, k = self.rope(q, offset=positions), self.rope(k, offset=positions)
        k, v = cache.update(k, v)
        mask = cache.padding.mask(T, k.shape[2])
        out = mx.fast.scaled_dot_product_attention(
            q, k, v, scale=self.head_dim**-0.5, mask=mask
        )
        return self.wo(out.transpose(0, 2, 1, 3).reshape(B, T, -1))


class BatchQuantizedLinear(nn.QuantizedLinear):
    """nn.QuantizedLinear with the rows of the batch as the rows of one product. A
    decoding step's input is (B, 1, dim); MLX 0.32.4's CUDA backend multiplies that as B
    products of one row each, (B, dim) as one."""

    def __call__(self, x):
        return super().__call__(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], -1)


def left_padded(model, prompts):
    """(tokens, padding, cache) for a batch of prompts (lists of token ids): the
    (B, longest) tokens, each row left-padded with token 0; their Padding; a
    BatchKVCache per layer, empty."""
    longest = max(len(p) for p in prompts)
    padding = Padding([longest - len(p) for p in prompts])
    tokens = mx.array(
        [[0] * pad + list(p) for p, pad in zip(prompts, padding.host_pads)]
    )
    return tokens, padding, [BatchKVCache(padding) for _ in model.layers]


@contextmanager
def batched(model):
    """The model with BatchAttention in every block and BatchQuantizedLinear for its
    quantized linear layers, as it was afterwards: a class swap, the same weights."""
    swaps = [(layer.attention, BatchAttention) for layer in model.layers]
    swaps += [
        (m, BatchQuantizedLinear)
        for _, m in model.named_modules()
        if type(m) is nn.QuantizedLinear
    ]
    classes = [module.__class__ for module, _ in swaps]
    for module, cls in swaps:
        module.__class__ = cls
    try:
        yield model
    finally:
        for (module, _), cls in zip(swaps, classes):
            module.__class__ = cls


def generate_batch(
    model, prompts, max_tokens, temp=0.0, top_p=1.0, stop_ids=(), constraints=None
):
    """Each prompt's reply: its tokens up to a stop token (not included), max_tokens of
    them, or the end of the context. `prompts` are lists of token ids (BOS included, as
    tokenizer.prompt gives), each shorter than the context. Greedy (temp 0) replies are
    token for token those of model.generate for the prompt alone. `constraints`: a
    structured.JSONConstraint or None per prompt (structured.py)."""
    if constraints is not None and any(constraints):
        from structured import generate_constrained

        return generate_constrained(
            model, prompts, max_tokens, temp, top_p, stop_ids, constraints
        )
    limits = [min(max_tokens, model.args.max_seq_len - len(p)) for p in prompts]
    tokens, padding, cache = left_padded(model, prompts)
    replies = [[] for _ in prompts]
    rows = list(range(len(prompts)))  # rows[i]: the prompt in row i
    with batched(model):
        # (B,) the first tokens
        token = sample(model(tokens, cache, last_only=True)[:, -1], temp, top_p)
        while True:
            # Build and start the next step before reading this one's tokens, as
            # model.generate does.
            next_token = sample(model(token[:, None], cache)[:, -1], temp, top_p)
            mx.async_eval(next_token)
            going = []  # the rows that go on
            for i, (row, t) in enumerate(zip(rows, token.tolist())):
                if t in stop_ids:
                    continue
                replies[row].append(t)
                if len(replies[row]) < limits[row]:
                    going.append(i)
            if not going:
                return replies
            # rows that ended leave the batch (the step under way still has them)
            if len(going) < len(rows):
                keep = mx.array(going)
                padding.keep(going)
                for layer_cache in cache:
                    layer_cache.keep(keep)
                next_token, rows = next_token[keep], [rows[i] for i in going]
                # Evaluated on its own: reading it then waits for it alone, not for
                # the whole next step built on it.
                mx.async_eval(next_token)
            token = next_token


# ---- llama.py --prompts ---------------------------------------------------------


class PromptsError(ValueError):
    """A prompts file that cannot be read."""


def read_prompts(path):
    """[(line number, prompt)] of a prompts file, and the number of blank lines
    skipped. A prompt is a line of text, or in a .jsonl file {"prompt": text} or
    {"messages": [{"role", "content"}, ...]} (the chat format)."""
    try:
        lines = open(path, encoding="utf-8").read().splitlines()
    except (OSError, UnicodeError) as e:
        raise PromptsError(f"cannot read the prompts file {path}: {e}") from None
    prompts = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if not str(path).endswith(".jsonl"):
            prompts.append((number, line))
            continue
        try:
            record = json.loads(line)
            # "\ud800" in JSON is a lone surrogate, which no tokenizer can encode.
            json.dumps(record, ensure_ascii=False).encode()
            prompt = None
            if isinstance(record, dict):
                prompt = record.get("prompt", record.get("messages"))
        except (ValueError, RecursionError):  # RecursionError: [[[[... nested deep
            prompt = None
        if not (
            isinstance(prompt, str)
            and prompt.strip()
            or isinstance(prompt, list)
            and prompt
            and all(
                isinstance(m, dict)
                and isinstance(m.get("role"), str)
                and isinstance(m.get("content"), str)
                for m in prompt
            )
        ):
            raise PromptsError(
                f'{path} line {number} is not {{"prompt": text}} or '
                '{"messages": [{"role": ..., "content": ...}, ...]}'
            )
        prompts.append((number, prompt))
    if not prompts:
        raise PromptsError(f"{path} holds no prompts (one per line)")
    return prompts, len(lines) - len(prompts)


def prompt_tokens(tokenizer, prompt, chat, system):
    """A prompt's token ids: a text (in the chat format with --chat), or a
    conversation."""
    if isinstance(prompt, str) and not chat:
        return tokenizer.prompt(prompt)
    from chat import chat_tokens

    messages = (
        prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
    )
    return chat_tokens(
        tokenizer, [{"role": "system", "content": system}] * bool(system) + messages
    )


def run_prompts(model, tokenizer, args, prompts, blank, schemas=None):
    """llama.py --prompts: one JSON line per prompt of read_prompts on stdout, in input
    order, `--batch-size` prompts at a time; progress, then the total tokens/s and peak
    memory, on stderr. A prompt too long for the context gets {"prompt", "error"} in its
    place, and the others still run. `schemas` (structured.py) constrain some rows."""
    encoded = [
        (number, prompt, prompt_tokens(tokenizer, prompt, args.chat, args.system))
        for number, prompt in prompts
    ]
    todo, results, limit = [], {}, model.args.max_seq_len  # results: {line: JSON}
    for number, prompt, ids in encoded:
        if len(ids) < limit:
            todo.append((number, prompt, ids))
            continue
        error = (
            f"the prompt is {len(ids)} tokens; the model's context is {limit}, "
            "reply included"
        )
        print(f"error: {args.prompts} line {number}: {error}; skipped", file=sys.stderr)
        results[number] = {"prompt": prompt, "error": error}
    if not todo:
        raise PromptsError(f"every prompt of {args.prompts} is longer than the context")
    skipped = f"; {blank} blank line{'s' * (blank > 1)} skipped" if blank else ""
    print(
        f"[{len(todo)} prompt{'s' * (len(todo) > 1)}, {args.batch_size} at a time"
        f"{skipped}]",
        file=sys.stderr,
    )
    order, tic, generated = deque(n for n, _, _ in encoded), time.perf_counter(), 0
    try:
        for start in range(0, len(todo), args.batch_size):
            batch = todo[start : start + args.batch_size]
            results.update(batch_results(model, tokenizer, args, batch, schemas))
            while order and order[0] in results:  # each line whose turn has come
                line = results.pop(order.popleft())
                print(json.dumps(line, ensure_ascii=False), flush=True)
                generated += line.get("generated_tokens", 0)
            done, seconds = start + len(batch), time.perf_counter() - tic
            print(
                f"[{done}/{len(todo)} prompts, {generated / seconds:.1f} tokens/s, "
                f"about {seconds / done * (len(todo) - done):.0f} s left]",
                file=sys.stderr,
                flush=True,
            )
        for number in order:  # skipped prompts after the last one that ran
            print(json.dumps(results.pop(number), ensure_ascii=False), flush=True)
    except KeyboardInterrupt:
        written = len(encoded) - len(order)
        raise KeyboardInterrupt(
            f"after {written} of {len(encoded)} replies (JSON lines) were written"
        ) from None
    print(
        f"[generated {generated} tokens in {seconds:.1f} s, "
        f"{generated / seconds:.1f} tokens/s | "
        f"peak memory {mx.get_peak_memory() / 2**30:.2f} GiB]",
        file=sys.stderr,
    )


def batch_results(model, tokenizer, args, batch, schemas):
    """{line number: its JSON line} for one batch of (number, prompt, ids)."""
    constraints = None
    if schemas:  # --json-schema, --json, "json_schema" lines: structured.py
        from structured import row_constraints

        constraints = row_constraints(tokenizer, schemas, [n for n, _, _ in batch])
    replies = generate_batch(
        model,
        [ids for _, _, ids in batch],
        args.max_tokens,
        args.temp,
        args.top_p,
        tokenizer.stop_ids,
        constraints,
    )
    results = {}
    for i, ((number, prompt, ids), reply) in enumerate(zip(batch, replies)):
        # The text exactly as llama.py prints it for this prompt alone.
        decoder = StreamingDecoder(tokenizer, ids)
        text = "".join(decoder.add(t) for t in reply) + decoder.add(None)
        results[number] = {
            "prompt": prompt,
            "text": text,
            "generated_tokens": len(reply),
        }
        if constraints and constraints[i]:
            results[number]["finish_reason"] = constraints[i].finish_reason
    return results
