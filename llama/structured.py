"""Structured output: generation constrained to a JSON schema (llama.py --json-schema).

At every step the grammar engine, llguidance, reads the schema and the text so far and
marks the tokens that can continue a valid document: a bitmask, one bit per token of the
vocabulary. The others get a logit of -inf before sampling, so greedy decoding and
sampling alike pick only tokens that keep the document valid; once it is complete, only
a stop token may follow. The mask only removes tokens: where the model's own choice is
allowed, it stays the choice.

    from structured import json_constraint
    constraint = json_constraint(tokenizer, schema)  # a dict; None: any JSON object
    # each step, for one sequence:
    token = sample(constraint.mask(logits), temp, top_p)  # logits (1, vocab)
    constraint.advance(token.item())  # then constraint.done: the document is complete

JSON comes out on one line, with at most one space between its tokens.
"""

import json
import sys
import time
from functools import cache

import llguidance
import mlx.core as mx
import numpy as np
from batch import batched, left_padded, prompt_tokens
from llguidance.numpy import fill_next_token_bitmask, fill_next_token_bitmask_par
from model import sample
from tokenizer import StreamingDecoder, TokenizerError

ANY_OBJECT = {"type": "object"}  # --json, and response_format {"type": "json_object"}
# At most one space between the tokens of JSON: a model free to add whitespace may add
# it without end. (llguidance 1.9.1's custom separators, ", " and ": ", make masks that
# allow tokens it then refuses.)
LAYOUT = {"whitespace_pattern": " ?"}


class SchemaError(ValueError):
    """A schema that is not JSON, or not one the engine supports."""


def grammar_of(schema, where):
    """llguidance's grammar for a schema (a dict), checked: a keyword it does not
    implement is named."""
    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, LAYOUT)
    except ValueError:
        raise SchemaError(
            f"{where}: a JSON schema is an object, not {schema!r}"
        ) from None
    failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar)
    if failed:
        raise SchemaError(
            f"{where}: the schema is not one llguidance supports ({messages[0]}); "
            "remove or rewrite that keyword"
        )
    return grammar


def read_schema(path):
    """The JSON schema in the file `path`, checked."""
    try:
        with open(path, encoding="utf-8") as f:
            schema = json.load(f)
    except OSError as e:
        raise SchemaError(f"cannot read the schema file {path}: {e.strerror}") from None
    except ValueError as e:
        raise SchemaError(f"{path} is not JSON ({e}); give a JSON schema") from None
    grammar_of(schema, path)
    return schema


def read_schemas(args):
    """{None: the schema of every prompt (--json-schema; --json: any object) or None,
    line number: the "json_schema" of that line of a --prompts .jsonl}, all checked
    before the model loads."""
    schemas = {None: read_schema(args.json_schema) if args.json_schema else None}
    if args.json and not args.json_schema:
        schemas[None] = ANY_OBJECT
    if args.prompts and str(args.prompts).endswith(".jsonl"):
        with open(args.prompts, encoding="utf-8") as f:  # read_prompts checked it
            for number, line in enumerate(f, 1):
                record = json.loads(line) if line.strip() else {}
                if "json_schema" in record:
                    where = f"{args.prompts} line {number}"
                    grammar_of(record["json_schema"], where)
                    schemas[number] = record["json_schema"]
    return schemas


# ---- The tokenizer as llguidance reads it --------------------------------------------


class SentencePieceVocabulary:
    """A SentencePiece model as llguidance.TokenizerWrapper reads it: each token's bytes
    ("▁" is a space, <0x41> the byte 0x41), the control tokens by name, the encoder."""

    def __init__(self, sp):
        self.sp, n = sp, sp.vocab_size()
        self.eos_token_id, self.bos_token_id = sp.eos_id(), sp.bos_id()
        self.special_token_ids = [
            i for i in range(n) if sp.is_control(i) or sp.is_unknown(i)
        ]
        self.tokens = [self.token_bytes(i) for i in range(n)]

    def token_bytes(self, i):
        piece = self.sp.id_to_piece(i)
        if self.sp.is_byte(i):
            return bytes([int(piece[3:5], 16)])
        return piece.replace("\u2581", " ").encode()

    def __call__(self, text):
        """`text` as it continues a sequence: without the "▁" that SentencePiece puts in
        front of a text. (Bytes are refused, so that TokenizerWrapper passes text.)"""
        if not isinstance(text, str):
            raise TypeError("SentencePieceVocabulary encodes text, not bytes")
        pieces = self.sp.encode(text, out_type=str)
        if pieces and pieces[0].startswith("\u2581") and not text.startswith(" "):
            pieces[0] = pieces[0][1:]
        ids = []
        for piece in filter(None, pieces):
            if self.sp.piece_to_id(piece) != self.sp.unk_id():
                ids.append(self.sp.piece_to_id(piece))
                continue
            for byte in piece.replace("\u2581", " ").encode():
                ids.append(self.sp.piece_to_id(f"<0x{byte:02X}>"))
        return ids


@cache
def engine_tokenizer(tokenizer):
    """llguidance's LLTokenizer for one of tokenizer.py's tokenizers (about 1 s for 128k
    tokens, so built once): every token's bytes, and the stop tokens that may end a
    complete document."""
    options = dict(n_vocab=tokenizer.vocab_size, eos_token=sorted(tokenizer.stop_ids))
    try:
        if tokenizer.kind == "Hugging Face":
            return llguidance.LLTokenizer(tokenizer.tokenizer.to_str(), **options)
        if tokenizer.kind == "Llama 3":
            from llguidance.tiktoken import lltokenizer_from_encoding

            return lltokenizer_from_encoding(tokenizer.tiktoken, **options)
        vocabulary = SentencePieceVocabulary(tokenizer.sp)
        return llguidance.LLTokenizer(
            llguidance.TokenizerWrapper(vocabulary), **options
        )
    except Exception as e:  # the engine's own reasons, one line
        raise TokenizerError(
            f"llguidance cannot read this {tokenizer.kind} tokenizer for "
            f"JSON output ({str(e).splitlines()[0]})"
        ) from None


# ---- One sequence's constraint -------------------------------------------------------


class JSONConstraint:
    """The state of one sequence's document: which tokens may come next."""

    def __init__(self, engine, grammar):
        self.matcher = llguidance.LLMatcher(engine, grammar, log_level=0)
        if self.matcher.is_error():
            raise SchemaError(self.matcher.get_error())
        self.bitmask = np.full((1, (engine.vocab_size + 31) // 32), -1, np.int32)

    def mask(self, logits):
        """(1, vocab) logits with -inf for every token that cannot come next. The mask
        is computed here, on the host: while `logits` is still being computed on the
        device (started by mx.async_eval), the two overlap."""
        fill_next_token_bitmask(self.matcher, self.bitmask)
        return apply_bitmask(logits, self.bitmask)

    def advance(self, token):
        if not self.matcher.consume_token(token):  # a token mask() did not allow
            error = self.matcher.get_error().splitlines()[0]
            raise ValueError(f"token {token} breaks the JSON document: {error}")

    @property
    def done(self):
        """The document is complete and nothing can continue it (only a stop token)."""
        return self.matcher.is_stopped()

    @property
    def finish_reason(self):
        """'stop': the document is complete; 'length': the tokens ran out before."""
        return "stop" if self.matcher.is_accepting() else "length"


def json_constraint(tokenizer, schema=None):
    """A fresh constraint for one sequence: `schema` (a dict); None: any JSON object."""
    schema = ANY_OBJECT if schema is None else schema
    return JSONConstraint(engine_tokenizer(tokenizer), grammar_of(schema, "the schema"))


def apply_bitmask(logits, bitmask):
    """(B, vocab) logits with -inf where the (B, ceil(vocab / 32)) int32 bitmask has a
    0: bit j of word w allows token 32 w + j. Unpacked on the device: 4 bytes of
    transfer per 32 tokens."""
    words = mx.array(bitmask)[:, :, None]  # (B, words, 1)
    bits = (words >> mx.arange(32, dtype=mx.int32)) & 1  # (B, words, 32)
    allowed = bits.reshape(bits.shape[0], -1)[:, : logits.shape[-1]]
    return mx.where(allowed.astype(mx.bool_), logits, -mx.inf)


# ---- Generation ----------------------------------------------------------------------


@cache
def executor():
    """llguidance's threads, which fill the masks of a batch's rows in parallel."""
    return llguidance.LLExecutor()


def masked(logits, constraints):
    """The (B, vocab) logits of the rows, each under its constraint (None: none). The
    masks are computed on the host by llguidance's threads, a row each, while the device
    computes the logits."""
    rows = [(c.matcher, i) for i, c in enumerate(constraints) if c is not None]
    if not rows:
        return logits
    bitmask = np.full(
        (len(constraints), constraints[rows[0][1]].bitmask.shape[1]), -1, np.int32
    )
    fill_next_token_bitmask_par(executor(), rows, bitmask)
    return apply_bitmask(logits, bitmask)


def generate_constrained(
    model, prompts, max_tokens, temp, top_p, stop_ids, constraints, on_token=None
):
    """batch.generate_batch with each row under its constraint (or None): the replies,
    each up to a stop token (not included), its document's end, max_tokens or the end of
    the context. on_token(row, token) is called as each token comes (llama.py prints).

    The masks of step n + 1 need token n on the host. So the loop starts the model's
    step n + 1 on token n while it is still lazy, then reads token n and computes the
    masks of step n + 1 while the device runs that step; then it starts sampling n + 1
    and builds the model's step n + 2 on it. The device waits only when the host's masks
    and graph building take longer than a step."""
    limits = [min(max_tokens, model.args.max_seq_len - len(p)) for p in prompts]
    tokens, padding, cache = left_padded(model, prompts)
    replies, rows = [[] for _ in prompts], list(range(len(prompts)))
    with batched(model):
        logits = model(tokens, cache, last_only=True)[:, -1]
        mx.async_eval(logits)  # the prompts' pass runs while the first masks are made
        token = sample(masked(logits, constraints), temp, top_p)
        while True:
            # Token n in an evaluation of its own: reading it below waits for it alone.
            # (Evaluated only within step n + 1, reading it waits for that whole step.)
            mx.async_eval(token)
            logits = model(token[:, None], cache)[:, -1]
            mx.async_eval(logits)  # step n + 1 runs on token n
            going = []  # the rows that go on
            for i, (row, t) in enumerate(zip(rows, token.tolist())):
                if t in stop_ids:
                    continue
                replies[row].append(t)
                if constraints[row] is not None:
                    constraints[row].advance(t)
                if on_token:
                    on_token(row, t)
                ended = constraints[row] is not None and constraints[row].done
                if len(replies[row]) < limits[row] and not ended:
                    going.append(i)
            if not going:
                return replies
            if len(going) < len(rows):  # rows that ended leave the batch
                keep = mx.array(going)
                padding.keep(going)
                for layer_cache in cache:
                    layer_cache.keep(keep)
                logits, rows = logits[keep], [rows[i] for i in going]
            row_constraints = [constraints[row] for row in rows]
            token = sample(masked(logits, row_constraints), temp, top_p)


def row_constraints(tokenizer, schemas, numbers):
    """For the prompts of these line numbers of a --prompts file: each one's constraint
    (its own "json_schema", else the one of --json-schema or --json), or None."""
    constraints = []
    for number in numbers:
        schema = schemas.get(number, schemas[None])
        constraint = None if schema is None else json_constraint(tokenizer, schema)
        constraints.append(constraint)
    return constraints


def generate_json(model, tokenizer, args, schema):
    """llama.py --json-schema / --json with one prompt: the document streamed to stdout,
    its speed and finish_reason to stderr; a document cut short by --max-tokens or the
    context is an error."""
    ids = prompt_tokens(tokenizer, args.prompt, args.chat, args.system)
    limit = model.args.max_seq_len
    if len(ids) >= limit:
        raise ValueError(
            f"the prompt is {len(ids)} tokens; the model's context is {limit}"
        )
    constraint = json_constraint(tokenizer, schema)
    decoder, tic = StreamingDecoder(tokenizer, ids), time.perf_counter()

    def show(row, token):
        print(decoder.add(token), end="", flush=True)

    (reply,) = generate_constrained(
        model,
        [ids],
        args.max_tokens,
        args.temp,
        args.top_p,
        tokenizer.stop_ids,
        [constraint],
        show,
    )
    print(decoder.add(None), flush=True)
    seconds = time.perf_counter() - tic
    print(
        f"[prompt {len(ids)} tokens | generation {len(reply)} tokens in "
        f"{seconds:.2f} s | finish_reason {constraint.finish_reason}]",
        file=sys.stderr,
    )
    if constraint.finish_reason == "length":
        raise ValueError(
            f"the JSON document is incomplete after {len(reply)} tokens; "
            "raise --max-tokens (or shorten the prompt, if the context is full)"
        )
