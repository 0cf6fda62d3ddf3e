"""An OpenAI-compatible HTTP server for a converted Llama, serving many clients at once.

    python llama/server.py weights.safetensors path/to/tokenizer --port 8080
    curl localhost:8080/v1/chat/completions -H 'Content-Type: application/json' \\
        -d '{"model": "weights", "messages": [{"role": "user", "content": "Hi"}]}'

Any OpenAI client works against http://HOST:PORT/v1: POST /v1/chat/completions (messages
in the model's chat format, chat.py), POST /v1/completions (a text or a list of token
ids), GET /v1/models and GET /health. Replies stream as server-sent events with
"stream": true. Greedy text is exactly what `llama.py` prints for the same prompt alone.

Continuous batching. One thread, the engine, owns the model; the HTTP side (FastAPI on
uvicorn) only tokenizes, queues a request as a Row and streams the text of the tokens
the engine sends back. The engine's loop, one iteration at a time:

1. admit: when there is room (--max-batch rows), the first waiting requests form a
   group, as many as fit --prefill-step prompt tokens once left-padded as batch.py pads
   them (at least one). The group's prompts run through the model in chunks of at most
   --prefill-step tokens (one chunk unless a prompt is that long), a chunk per
   iteration: a long prompt never stalls the running rows for longer than one chunk,
   as each chunk is followed by a decoding step for them. After its last chunk the
   group samples its first tokens and joins: its key/value cache rows are appended to
   the batch's (the shorter side padded on the left, see `join`);
2. step: one decoding step for every row at once (batch.py's BatchAttention: each row
   its own positions and a padding mask), each row sampled with its own settings
   (`sample_rows`; a row asked for JSON by `response_format` has the tokens that
   cannot continue its document masked out first, by structured.py);
3. read: each row's token goes to its client; a row that reached a stop token or its
   limit, or whose client went away, leaves the batch at once, and the cache columns
   that only padding uses any more are cut off (`trim`).

With --prompt-lookup K, a greedy request that decodes alone (nobody waiting) checks K
tokens copied from its own text in each pass (speculative.py's prompt lookup): the same
text, in fewer passes where the reply repeats its prompt. A batch decodes plain steps.

Requests beyond --max-batch wait, at most --max-queue of them; past that the server
answers 503 at once. Ctrl-C or SIGTERM stops accepting, lets what runs finish
(--shutdown-timeout seconds, then cancels it) and exits with one line.
"""

import argparse
import asyncio
import json
import math
import random
import signal
import socket
import sys
import threading
import time
import uuid
from collections import deque
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Literal

import mlx.core as mx
import uvicorn
from batch import BatchKVCache, Padding, batched, left_padded
from chat import chat_tokens
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from model import KVCache, WeightsError
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException
from tokenizer import StreamingDecoder, TokenizerError

from llama import in_range, load

# ---- A request in the batch ----------------------------------------------------------


class Row:
    """One request's place in the batch: its prompt, its sampling settings, the tokens
    it has generated, and the queue its client reads them from. Its `constraint`, when
    set (structured.py's, from `response_format`), masks its logits and ends it once
    its JSON document is complete."""

    def __init__(self, prompt, limit, temperature, top_p, seed, stop_ids):
        self.prompt, self.limit, self.stop_ids = prompt, limit, stop_ids
        self.temperature, self.top_p = temperature, top_p
        # Its own random stream (made on the engine's thread): a seed reproduces it.
        self.seed = random.getrandbits(63) if seed is None else seed % 2**63
        self.key = None
        self.constraint = None
        # The prompt, then each token generated (stop token excluded): prompt lookup
        # (--prompt-lookup) proposes from it as it grows.
        self.sequence = list(prompt)
        self.cancelled = False  # set by the HTTP side: the client went away
        self.queue = asyncio.Queue()  # (token or None, finish reason or None) per step

    @property
    def tokens(self):
        """The tokens generated so far, stop token excluded."""
        return self.sequence[len(self.prompt) :]

    def next_key(self):
        if self.key is None:
            self.key = mx.random.key(self.seed)
        self.key, key = mx.random.split(self.key)
        return key

    def add(self, token):
        """(token to send or None, finish reason or None) for this row's new token."""
        if self.cancelled:
            return None, "cancelled"
        if token in self.stop_ids:
            return None, "stop"
        self.sequence.append(token)
        if self.constraint:
            self.constraint.advance(token)
            if self.constraint.done:  # the document is complete: nothing may follow
                return token, "stop"
        generated = len(self.sequence) - len(self.prompt)
        return token, "length" if generated == self.limit else None


def sample_rows(logits, rows):
    """(B, vocab) logits -> (B,) tokens, row b sampled with rows[b]'s settings: greedy
    at temperature 0, else from softmax(logits / temperature) restricted to the smallest
    set of tokens whose probabilities add up to top_p (model.sample's rule, with each
    row's own random key). A row's constraint first sets the logits of the tokens that
    cannot continue its document to -inf."""
    constraints = [row.constraint for row in rows]
    if any(constraints):
        from structured import masked

        logits = masked(logits, constraints)  # each row's mask, made on the host
    greedy = mx.argmax(logits, axis=-1)
    if all(row.temperature == 0 for row in rows):
        return greedy
    greedy_rows = mx.array([row.temperature == 0 for row in rows])
    temperature = mx.array([row.temperature or 1.0 for row in rows])[:, None]
    top_p = mx.array([row.top_p for row in rows])[:, None]
    logits = logits.astype(mx.float32) / temperature
    order = mx.argsort(-logits, axis=-1)  # most likely first
    sorted_logits = mx.take_along_axis(logits, order, axis=-1)
    probs = mx.softmax(sorted_logits, axis=-1)
    # Keep a token if the tokens more likely than it add up to less than top_p.
    keep = (mx.cumsum(probs, axis=-1) - probs) < top_p
    # A categorical draw is the argmax of the logits plus Gumbel noise; one key per row.
    noise = mx.stack(
        [mx.random.gumbel(logits.shape[1:], key=row.next_key()) for row in rows]
    )
    choice = mx.argmax(mx.where(keep, sorted_logits, -mx.inf) + noise, axis=-1)
    sampled = mx.take_along_axis(order, choice[:, None], axis=-1)[:, 0]
    return mx.where(greedy_rows, greedy, sampled)


# ---- The batch's key/value cache -----------------------------------------------------


def padded(array, width, capacity):
    """(B, H, S, D) -> (B, H, capacity, D): zeros first, so that its S positions end at
    column `width`, and zeros after, room for the next steps to write in place."""
    S = array.shape[2]
    return mx.pad(array, [(0, 0), (0, 0), (width - S, capacity - width), (0, 0)])


def join(cache, group_cache):
    """The caches of two batches as one, rows of `cache` first. Both are left-padded;
    the shorter one gets more padding on the left, so every row's last position stays in
    the last column."""
    S, L = cache[0].offset, group_cache[0].offset
    width = max(S, L)
    capacity = KVCache.step * math.ceil((width + 1) / KVCache.step)
    padding = Padding(
        [pad + width - S for pad in cache[0].padding.host_pads]
        + [pad + width - L for pad in group_cache[0].padding.host_pads]
    )
    joined = []
    for layer, group_layer in zip(cache, group_cache):
        both = BatchKVCache(padding)
        both.keys, both.values = (
            mx.concatenate(
                [
                    padded(getattr(layer, name)[:, :, :S], width, capacity),
                    padded(getattr(group_layer, name)[:, :, :L], width, capacity),
                ]
            )
            for name in ("keys", "values")
        )
        both.offset = width
        joined.append(both)
    return joined


def trim(cache):
    """Cut off the leading columns that are padding in every row (after the rows that
    needed them left), so the cache is as wide as its longest row, however long the
    batch runs."""
    padding = cache[0].padding
    columns = min(padding.host_pads)
    if columns == 0:
        return
    padding.host_pads = [pad - columns for pad in padding.host_pads]
    padding.pads, padding.masks = padding.pads - columns, {}
    for layer in cache:  # the room after the last position stays
        layer.keys, layer.values = (
            layer.keys[:, :, columns:],
            layer.values[:, :, columns:],
        )
        layer.offset -= columns


# ---- The engine: one thread owns the model -------------------------------------------


class QueueFull(Exception):
    pass


class Group:
    """Rows being admitted: their left-padded prompts, their cache, the columns done."""

    def __init__(self, model, rows):
        self.rows = rows
        self.tokens, _, self.cache = left_padded(model, [row.prompt for row in rows])
        self.done = 0


class Engine:
    """The loop that owns the model: the batch's rows, their cache, the waiting rows."""

    def __init__(self, model, max_batch, max_queue, prefill_step, proposer=None):
        self.model, self.max_batch, self.max_queue = model, max_batch, max_queue
        self.prefill_step = prefill_step
        self.proposer = proposer  # --prompt-lookup's (speculative.py), or None
        self.lock = threading.Condition()  # guards `waiting`, `admitted` and `stopping`
        self.waiting = deque()  # rows not yet admitted
        self.admitted = 0  # rows decoding or being prefilled
        self.stopping = False
        self.rows = []  # the rows decoding, in the batch's order
        self.cache = None  # their BatchKVCache per layer
        self.token = None  # (B,) each row's newest token: sampled, not yet read or fed
        self.group = None  # the Group being prefilled
        self.loop = None  # the event loop of the HTTP side, set when it starts

    def submit(self, row):
        """Queue a row; QueueFull if --max-batch rows run and --max-queue rows wait."""
        with self.lock:
            if self.admitted + len(self.waiting) >= self.max_batch + self.max_queue:
                raise QueueFull
            self.waiting.append(row)
            self.lock.notify()

    def stop(self):
        with self.lock:
            self.stopping = True
            self.lock.notify()

    def run(self):
        """The loop, until stop()."""
        with batched(self.model):
            while self.iterate():
                pass

    def iterate(self):
        """Admit, prefill a chunk, decode a step, read; False once stop() was called."""
        with self.lock:
            while not (self.rows or self.group or self.waiting or self.stopping):
                self.lock.wait()
            if self.stopping:
                return False
            if self.group is None:
                self.group = self.admit()
        if self.group:
            self.prefill()
        if self.rows:
            self.step()
        return True

    def admit(self):
        """Under the lock: a Group of the first waiting rows, or None. A group fits the
        batch, and its padded prompts fit one --prefill-step chunk unless it is one row:
        of many requests that arrive together, the first ones start sooner."""
        rows, longest = [], 0
        while self.waiting and self.admitted + len(rows) < self.max_batch:
            row = self.waiting[0]
            longest = max(longest, len(row.prompt))
            if rows and (len(rows) + 1) * longest > self.prefill_step:
                break
            self.waiting.popleft()
            if not row.cancelled:  # a client that left while waiting frees its place
                rows.append(row)
        self.admitted += len(rows)
        return Group(self.model, rows) if rows else None

    def prefill(self):
        """One chunk of the group's prompts: --prefill-step prompt tokens in all, at
        least one column. After the last chunk the group's first tokens are sampled and
        the group joins."""
        group = self.group
        columns = max(1, self.prefill_step // len(group.rows))
        chunk = group.tokens[:, group.done : group.done + columns]
        group.done += chunk.shape[1]
        last = group.done == group.tokens.shape[1]
        logits = self.model(chunk, group.cache, last_only=last)
        if not last:  # start computing this chunk now, not with the next one
            mx.async_eval([(layer.keys, layer.values) for layer in group.cache])
            return
        logits = logits[:, -1]
        mx.async_eval(logits)  # the device runs it while the host makes masks, if any
        first = sample_rows(logits, group.rows)
        mx.async_eval(first)
        if self.rows:
            self.cache = join(self.cache, group.cache)
            self.token = mx.concatenate([self.token, first])
            mx.async_eval(self.token)  # see `read`
        else:
            self.cache, self.token = group.cache, first
        self.rows += group.rows
        self.group = None

    def step(self):
        """Feed each row's newest token, sample the next; send the newest to clients.

        As model.generate does, the next step is built and started before the newest
        tokens are read, so the host's work overlaps the device's. A constrained row's
        mask needs its newest token on the host, so then only the model's pass is
        started before the read: the device runs it while the host reads the tokens,
        advances the constraints and makes the masks; sampling follows. (The device
        waits only if the host takes longer than a pass.)"""
        if self.alone():
            return self.speculate()
        pending = self.token
        logits = self.model(pending[:, None], self.cache)[:, -1]
        if any(row.constraint for row in self.rows):
            mx.async_eval(logits)
            logits = self.read(pending, logits)
            self.token = None
            if self.rows:
                self.token = sample_rows(logits, self.rows)
                mx.async_eval(self.token)
            return
        self.token = sample_rows(logits, self.rows)
        mx.async_eval(self.token)
        self.token = self.read(pending, self.token)

    def alone(self):
        """Whether --prompt-lookup may decode: one greedy row, unconstrained, and no
        request waiting or joining (they would wait for its blocks)."""
        rows = self.rows
        return (
            self.proposer is not None
            and len(rows) == 1
            and rows[0].temperature == 0
            and rows[0].constraint is None
            and self.group is None
            and not self.waiting
        )

    def speculate(self):
        """For a row alone: send its newest token, then check the tokens prompt lookup
        proposes after it in one pass of the model (speculative.py) and send those
        kept; the model's token after them is the next newest. Greedy: the text is
        that of plain steps. (One block at a time: a request that arrives waits for
        one pass at most.)"""
        from speculative import start_known

        row = self.rows[0]
        self.read(self.token, None)  # may end the row
        if not self.rows:
            return
        # The cache holds every token of row.sequence but the last; a row alone has
        # no padding (trim), so the cache's positions are the sequence's.
        proposer = self.proposer
        block = start_known(self.model, self.cache, row.sequence, proposer, 0.0, 1.0)
        kept, new = block.read()
        proposer.proposed += block.n
        proposer.accepted += kept
        for layer in self.cache:  # forget the proposals rejected
            layer.offset = block.pos + 1 + kept
        for token in new[:-1]:  # the proposals kept, sent as plain steps send theirs
            self.read(mx.array([token]), None)
            if not self.rows:
                return
        self.token = mx.array(new[-1:])

    def read(self, pending, following):
        """Send each row its token; drop the rows that are done from the batch, and
        their rows of `following` (the next step's logits or tokens), returned."""
        events, going = [], []
        for i, (row, token) in enumerate(zip(self.rows, pending.tolist())):
            sent, finish = row.add(token)
            events.append((row, sent, finish))
            if finish is None:
                going.append(i)
        try:
            self.loop.call_soon_threadsafe(deliver, events)
        except RuntimeError:  # the HTTP side has stopped: nobody is listening any more
            pass
        if len(going) == len(self.rows):
            return following
        with self.lock:
            self.admitted -= len(self.rows) - len(going)
        self.rows = [self.rows[i] for i in going]
        if not going:
            self.cache = None
            return None
        keep = mx.array(going)
        self.cache[0].padding.keep(going)
        for layer in self.cache:
            layer.keep(keep)
        trim(self.cache)
        # An evaluation of its own: the next read of it then waits for it alone, not
        # for the whole step built on it.
        following = following[keep]
        mx.async_eval(following)
        return following


def deliver(events):
    """On the event loop: each row's (token, finish reason) into its queue."""
    for row, token, finish in events:
        row.queue.put_nowait((token, finish))


# ---- The HTTP side -------------------------------------------------------------------


class APIError(Exception):
    """An error with OpenAI's body: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status, message, param=None, code=None):
        super().__init__(message)
        self.status, self.param, self.code = status, param, code
        self.kind = "invalid_request_error" if status < 500 else "server_error"

    def response(self):
        error = dict(
            message=str(self), type=self.kind, param=self.param, code=self.code
        )
        return JSONResponse({"error": error}, status_code=self.status)


class Strict(BaseModel):
    # Strict types ("5" is not a number); fields this server does not use are ignored.
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(Strict):
    include_usage: bool = False


class JSONSchema(Strict):
    name: str  # a label only; the schema is enforced whether `strict` or not
    schema_: dict | None = Field(None, alias="schema")  # None: any JSON object
    strict: bool | None = None


class ResponseFormat(Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchema | None = None


class Sampling(Strict):
    """The fields both endpoints share, with OpenAI's ranges."""

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = None
    stop: str | Annotated[list[str], Field(max_length=4)] | None = None
    n: int = Field(1, ge=1, le=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None


class TextPart(Strict):
    type: Literal["text"]
    text: str


class Message(Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)


class CompletionRequest(Sampling):
    prompt: str | list[int] = Field(min_length=1)


@asynccontextmanager
async def lifespan(app):
    app.state.engine.loop = asyncio.get_running_loop()
    yield


app = FastAPI(lifespan=lifespan)


@app.exception_handler(APIError)
async def api_error(request, error):
    return error.response()


@app.exception_handler(RequestValidationError)
async def invalid_request(request, error):
    """Malformed JSON, a wrong type or out of range: 400, as at OpenAI."""
    first = error.errors()[0]
    if first["type"] == "json_invalid":
        message = f"We could not parse the JSON body of your request: {first['msg']}"
        return APIError(400, message).response()
    # The field at fault (its nested location may name union members: "stop.str").
    where = [str(part) for part in first["loc"] if part != "body"]
    param = where[0] if where else None
    message = f"Invalid value for '{param}': {first['msg']}" if param else first["msg"]
    return APIError(400, message, param, first["type"]).response()


@app.exception_handler(Exception)
async def server_error(request, error):
    """A bug: 500 with OpenAI's body (uvicorn prints the traceback)."""
    return APIError(500, f"{type(error).__name__}: {error}").response()


@app.exception_handler(HTTPException)
async def http_error(request, error):
    """An unknown path (404) or method (405), with OpenAI's body."""
    return APIError(error.status_code, str(error.detail)).response()


@app.get("/health")
async def health():
    engine = app.state.engine
    return {"status": "ok", "running": engine.admitted, "waiting": len(engine.waiting)}


@app.get("/v1/models")
async def models():
    model = dict(id=app.state.name, object="model", created=app.state.created)
    return {"object": "list", "data": [{**model, "owned_by": "mlx-examples"}]}


@app.post("/v1/chat/completions")
async def chat_completions(body: ChatRequest, request: Request):
    messages = []
    for message in body.messages:
        content = message.content
        if not isinstance(content, str):
            content = "".join(part.text for part in content)
        role = "system" if message.role == "developer" else message.role
        messages.append({"role": role, "content": content})
    # chat.py's formats take the roles (system,) user, assistant, user, ..., user.
    roles = [m["role"] for m in messages[messages[0]["role"] == "system" :]]
    if not roles or roles != ["user", "assistant"] * (len(roles) // 2) + ["user"]:
        message = "The roles must go (system,) user, assistant, user, ..., user."
        raise APIError(400, message, "messages")
    try:
        prompt = chat_tokens(app.state.tokenizer, messages)
    except TokenizerError as e:  # no chat format; roles the template refuses
        raise APIError(400, str(e), "messages") from None
    return await complete(body, prompt, "messages", request, "chat.completion")


@app.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request):
    if isinstance(body.prompt, str):
        prompt = app.state.tokenizer.prompt(body.prompt)
    else:
        prompt = body.prompt
        if not all(0 <= token < app.state.vocab_size for token in prompt):
            message = f"token ids must be from 0 to {app.state.vocab_size - 1}"
            raise APIError(400, message, "prompt")
    return await complete(body, prompt, "prompt", request, "text_completion")


def make_row(body, prompt, prompt_param):
    """The Row for a request, its fields checked against the model: 404 for another
    model's name, 400 for a prompt that leaves no room in the context."""
    state = app.state
    if body.model is not None and body.model != state.name:
        message = (
            f"The model '{body.model}' does not exist; this server has '{state.name}'."
        )
        raise APIError(404, message, "model", "model_not_found")
    room = state.context - len(prompt)
    if room < 1:
        message = (
            f"The prompt is {len(prompt)} tokens; this model's context is "
            f"{state.context}, reply included. Shorten the {prompt_param}."
        )
        raise APIError(400, message, prompt_param, "context_length_exceeded")
    max_tokens = body.max_completion_tokens or body.max_tokens
    if max_tokens is not None and max_tokens > room:
        param = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
        message = (
            f"This model's context is {state.context} tokens: the prompt has "
            f"{len(prompt)}, so {param} can be at most {room}, not {max_tokens}."
        )
        raise APIError(400, message, param, "context_length_exceeded")
    limit = max_tokens or min(state.max_tokens, room)
    stop_ids = state.tokenizer.stop_ids
    temperature = body.temperature or 0.0  # greedy unless asked, as llama.py
    top_p = 1.0 if body.top_p is None else body.top_p
    return Row(prompt, limit, temperature, top_p, body.seed, stop_ids)


async def constraint_for(response_format):
    """structured.py's constraint for a JSON `response_format`, else None; 400 for a
    schema or a tokenizer that llguidance cannot take. The first such request loads
    structured.py and builds llguidance's copy of the tokenizer, once (1-2 s for 128k
    tokens, holding Python's lock: every stream pauses that once); a schema compiles
    in a thread, while the event loop streams the other replies."""
    if response_format is None or response_format.type == "text":
        return None
    schema = None  # "json_object": any JSON object
    if response_format.type == "json_schema":
        if response_format.json_schema is None:
            message = 'A "json_schema" response_format needs a "json_schema" field.'
            raise APIError(400, message, "response_format")
        schema = response_format.json_schema.schema_
    from structured import SchemaError, engine_tokenizer, json_constraint

    try:
        engine_tokenizer(app.state.tokenizer)  # here: built once however many ask
        return await asyncio.to_thread(json_constraint, app.state.tokenizer, schema)
    except (SchemaError, TokenizerError) as e:
        raise APIError(400, str(e), "response_format") from None


async def complete(body, prompt, prompt_param, request, kind):
    """Queue the request's row and answer: a stream of events, or one JSON body."""
    row = make_row(body, prompt, prompt_param)
    row.constraint = await constraint_for(body.response_format)
    try:
        app.state.engine.submit(row)
    except QueueFull:
        message = "The server is busy (its queue is full); try again later."
        raise APIError(503, message, code="queue_full") from None
    reply = Reply(body, row, kind)
    if body.stream:
        events = reply.events(request)
        return StreamingResponse(events, media_type="text/event-stream")
    return await reply.whole(request)


async def watch(request, row):
    """Cancel the row when its client disconnects: the engine drops it next step."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    row.cancelled = True
    row.queue.put_nowait((None, "cancelled"))


class Reply:
    """The text of a row's tokens, as llama.py prints it, cut at a stop string."""

    def __init__(self, body, row, kind):
        self.row, self.kind = row, kind
        self.stops = [body.stop] if isinstance(body.stop, str) else body.stop or []
        self.stops = [stop for stop in self.stops if stop]
        self.usage = body.stream_options and body.stream_options.include_usage
        self.decoder = StreamingDecoder(app.state.tokenizer, row.prompt)
        prefix = "chatcmpl" if kind == "chat.completion" else "cmpl"
        self.id = f"{prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.generated = 0  # tokens received

    async def pieces(self, request):
        """Yield (text, finish reason or None) as the row's tokens arrive. Text that may
        be the start of a stop string is held back until the next tokens tell."""
        watcher = asyncio.create_task(watch(request, self.row))
        held = ""
        try:
            while True:
                token, finish = await self.row.queue.get()
                if finish == "cancelled":
                    return
                if token is not None:
                    held += self.decoder.add(token)
                    self.generated += 1
                if finish:
                    held += self.decoder.add(None)
                found = [held.find(stop) for stop in self.stops if stop in held]
                if found:
                    yield held[: min(found)], "stop"
                    return
                if finish:
                    yield held, finish
                    return
                keep = max((hold(held, stop) for stop in self.stops), default=0)
                yield held[: len(held) - keep], None
                held = held[len(held) - keep :]
        finally:
            watcher.cancel()
            self.row.cancelled = True  # finished, cut at a stop string or disconnected

    def usage_of(self):
        prompt, completion = len(self.row.prompt), self.generated
        total = prompt + completion
        return dict(
            prompt_tokens=prompt, completion_tokens=completion, total_tokens=total
        )

    def choice(self, text, finish, stream):
        """One choice of a body or a chunk, in the shape of this endpoint."""
        choice = dict(index=0, finish_reason=finish, logprobs=None)
        if self.kind == "text_completion":
            return {**choice, "text": text}
        if not stream:
            return {**choice, "message": {"role": "assistant", "content": text}}
        delta = {"content": text} if finish is None else {}
        return {**choice, "delta": delta}

    def body(self, choices, stream, **fields):
        kind = self.kind
        if stream and kind != "text_completion":
            kind += ".chunk"
        head = dict(id=self.id, object=kind, created=self.created, model=app.state.name)
        return {**head, "choices": choices, **fields}

    async def whole(self, request):
        text, finish = [], None
        async for piece, finish in self.pieces(request):
            text.append(piece)
        if finish is None:  # the client went away, or the server is stopping
            raise APIError(503, "The request was cancelled.", code="cancelled")
        choices = [self.choice("".join(text), finish, stream=False)]
        return self.body(choices, stream=False, usage=self.usage_of())

    async def events(self, request):
        """Server-sent events: a chunk per piece of text, the finish, usage if asked."""
        extra = {"usage": None} if self.usage else {}
        if self.kind == "chat.completion":
            choice = {**self.choice("", None, True), "delta": {"role": "assistant"}}
            yield sse(self.body([choice], stream=True, **extra))
        async for text, finish in self.pieces(request):
            if text:
                choice = self.choice(text, None, stream=True)
                yield sse(self.body([choice], stream=True, **extra))
            if finish:
                choice = self.choice("", finish, stream=True)
                yield sse(self.body([choice], stream=True, **extra))
        if self.usage:
            yield sse(self.body([], stream=True, usage=self.usage_of()))
        yield "data: [DONE]\n\n"


def hold(text, stop):
    """How many characters at the end of `text` could begin `stop`."""
    for n in range(min(len(stop) - 1, len(text)), 0, -1):
        if stop.startswith(text[-n:]):
            return n
    return 0


def sse(data):
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


# ---- Running it ----------------------------------------------------------------------


def batching_flags(parser):
    """The flags of the engine's loop: the batch, the queue, prefill, prompt lookup."""
    parser.add_argument(
        "--max-batch",
        type=in_range(int, 1),
        default=32,
        help="rows decoded at once (default: 32)",
    )
    parser.add_argument(
        "--max-queue",
        type=in_range(int, 0),
        default=64,
        help="requests waiting for a row; more are answered 503 (default: 64)",
    )
    parser.add_argument(
        "--prefill-step",
        type=in_range(int, 1),
        default=2048,
        help="prompt tokens per chunk of a joining group's prompt pass (default: 2048)",
    )
    parser.add_argument(
        "--prompt-lookup",
        type=in_range(int, 1, 64),
        metavar="K",
        help="a greedy request decoding alone checks K tokens copied from its text "
        "in one pass (speculative.py; the same text, faster where it repeats)",
    )
    parser.add_argument(
        "--ngram-size",
        type=in_range(int, 1, 64),
        default=2,
        help="tokens --prompt-lookup matches (default: 2)",
    )


def parse_args():
    parser = argparse.ArgumentParser(
        description="Serve a converted Llama over OpenAI's HTTP API, batching requests."
    )
    parser.add_argument("weights", help="the .npz or .safetensors file from convert.py")
    parser.add_argument(
        "tokenizer",
        help="the checkpoint's tokenizer (a file or folder, as llama.py takes)",
    )
    parser.add_argument("--adapter-path", help="LoRA adapters from lora.py --train")
    parser.add_argument("--host", default="127.0.0.1", help="default: 127.0.0.1")
    parser.add_argument(
        "--port", type=in_range(int, 0, 65535), default=8080, help="0: any free port"
    )
    parser.add_argument(
        "--model-name", help="the name clients use (default: the weights file's name)"
    )
    batching_flags(parser)
    parser.add_argument(
        "--max-tokens",
        type=in_range(int, 1),
        default=512,
        help="new tokens of a request that gives no max_tokens (default: 512)",
    )
    parser.add_argument(
        "--shutdown-timeout",
        type=in_range(float, 0),
        default=30.0,
        help="on Ctrl-C or SIGTERM, seconds to let running requests finish "
        "(default: 30)",
    )
    return parser.parse_args()


def serve(args, engine, sock):
    """uvicorn on `sock` in a thread of its own; the engine's loop in this one, the
    thread that loaded the model, until Ctrl-C or SIGTERM has stopped uvicorn."""
    config = uvicorn.Config(
        app,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=args.shutdown_timeout,
    )
    server = uvicorn.Server(config)

    def http():
        server.run(sockets=[sock])
        engine.stop()

    def stop(number, frame):
        # uvicorn stops accepting and lets the running requests finish; a second signal,
        # or --shutdown-timeout seconds, cancel them.
        server.force_exit = server.should_exit
        server.should_exit = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    thread = threading.Thread(target=http)
    thread.start()
    try:
        engine.run()
    except Exception as e:  # a bug, or the device out of memory: stop, saying why
        server.should_exit = server.force_exit = True
        thread.join()
        sys.exit(f"error: the model loop stopped: {type(e).__name__}: {e}")


def main():
    args = parse_args()
    # SIGTERM while loading stops it as Ctrl-C does.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    # IPPROTO_TCP named: asyncio then turns Nagle's algorithm off (TCP_NODELAY) on each
    # connection; without it every small event waits some 40 ms for the client's ACK.
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((args.host, args.port))
        sock.listen(2048)  # connections wait from here on, also before uvicorn starts
    except OSError as e:
        sys.exit(f"error: cannot listen on {args.host}:{args.port}: {e.strerror}")
    load_args = argparse.Namespace(chat=False, timeout=0, **vars(args))
    model, tokenizer, _ = load(load_args)
    state = app.state
    state.tokenizer, state.max_tokens = tokenizer, args.max_tokens
    state.name = args.model_name or Path(args.weights).stem
    state.context, state.vocab_size = model.args.max_seq_len, model.args.vocab_size
    state.created = int(time.time())
    proposer = None
    if args.prompt_lookup:  # speculative.py, read only then
        from speculative import PromptLookup

        proposer = PromptLookup(args.prompt_lookup, args.ngram_size)
    engine = Engine(model, args.max_batch, args.max_queue, args.prefill_step, proposer)
    state.engine = engine
    host, port = sock.getsockname()[:2]
    print(
        f"[serving {state.name} at http://{host}:{port}/v1, {args.max_batch} rows at "
        f"once, {args.max_queue} waiting]",
        file=sys.stderr,
        flush=True,
    )
    serve(args, engine, sock)
    stopped = "[server stopped]"
    if proposer:  # its summary: ", 62% of 120 proposed accepted"
        stopped = f"[server stopped; prompt lookup: {proposer.summary()[2:]}]"
    print(stopped, file=sys.stderr)


if __name__ == "__main__":
    try:
        main()
    except (WeightsError, TokenizerError, ValueError) as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:  # Ctrl-C while loading
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)
