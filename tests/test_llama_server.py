"""llama/server.py: OpenAI's API over continuous batching. Each client gets the text
llama.py prints for its prompt alone, whoever else is in the batch; bad requests get
OpenAI's errors."""

import asyncio
import importlib.util
import json
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import jsonschema
import mlx.core as mx
import pytest
from helpers import LLAMA_TEXT, ROOT, import_example, run_script, tiny_llama

pytestmark = pytest.mark.usefixtures("llama_on_path")


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A tiny Hugging Face Llama (GQA, context 96) converted by convert.py, and its
    tokenizer.model."""
    folder = tiny_llama(tmp_path_factory.mktemp("llama_server") / "hf")
    result = run_script("llama/convert.py", folder, folder.parent / "hf.npz")
    assert result.returncode == 0, result.stderr
    return folder.parent / "hf.npz", folder / "tokenizer.model"


class Server:
    """llama/server.py in a subprocess, --port 0: its first line names the port."""

    def __init__(self, weights, tokenizer, *flags):
        command = [sys.executable, str(ROOT / "llama/server.py"), weights, tokenizer]
        self.process = subprocess.Popen(
            [*map(str, command), "--port", "0", *flags],
            stderr=subprocess.PIPE,
            text=True,
        )
        line = self.process.stderr.readline()
        assert line.startswith("[serving"), line + self.process.stderr.read()
        self.url = line.split(" at ")[1].split(",")[0]  # http://127.0.0.1:PORT/v1

    def stop(self, number=signal.SIGTERM):
        """(exit code, what it wrote on stderr after its first line)."""
        self.process.send_signal(number)
        code = self.process.wait(timeout=60)
        return code, self.process.stderr.read()


@pytest.fixture(scope="module")
def server(converted):
    """8 rows at once, 16 waiting: 16 clients fill the batch and the queue."""
    running = Server(*converted, "--max-batch", "8", "--max-queue", "16")
    yield running
    code, errors = running.stop()
    assert code == 0 and "Traceback" not in errors, errors


def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server.url, api_key="none", max_retries=0)


def complete(server, prompt, max_tokens, stream=False, **fields):
    """(text, finish_reason) of /v1/completions through the openai client."""
    reply = client(server).completions.create(
        model="hf", prompt=prompt, max_tokens=max_tokens, stream=stream, **fields
    )
    if not stream:
        return reply.choices[0].text, reply.choices[0].finish_reason
    chunks = [chunk.choices[0] for chunk in reply]
    return "".join(c.text for c in chunks), chunks[-1].finish_reason


def as_printed(text):
    """The text as run_script reads llama.py's stdout: a line, universal newlines."""
    return (text + "\n").replace("\r\n", "\n").replace("\r", "\n")


def test_openai_client_gets_the_text_llama_py_prints_streaming_and_not(
    converted, server
):
    weights, tokenizer = converted
    prompt = "call me ishmael"
    llama = "llama/llama.py"
    printed = run_script(llama, weights, tokenizer, prompt, "--max-tokens", "40")
    for stream in (False, True):
        text, finish = complete(server, prompt, 40, stream)
        assert as_printed(text) == printed.stdout and finish in ("stop", "length")
    printed = run_script(
        llama, weights, tokenizer, "--chat", prompt, "--max-tokens", "9"
    )
    messages = [{"role": "user", "content": prompt}]
    chat = client(server).chat.completions
    reply = chat.create(model="hf", messages=messages, max_tokens=9)
    assert as_printed(reply.choices[0].message.content) == printed.stdout
    assert reply.usage.completion_tokens <= 9 and reply.usage.prompt_tokens > 5
    chunks = chat.create(
        model="hf",
        messages=messages,
        max_tokens=9,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert as_printed(text) == printed.stdout
    assert chunks[-1].usage.total_tokens == reply.usage.total_tokens


PROMPTS = [" ".join(LLAMA_TEXT[i % 4].split()[: 2 + i]) for i in range(16)]


def test_16_concurrent_clients_each_get_their_single_run_text(server):
    """Half stream, half do not; each asks a different number of tokens, so rows leave
    at different steps and the 8 waiting requests join a running batch."""
    alone = [complete(server, p, 6 + i) for i, p in enumerate(PROMPTS)]
    with ThreadPoolExecutor(16) as pool:
        at_once = pool.map(
            lambda i: complete(server, PROMPTS[i], 6 + i, stream=i % 2 == 1),
            range(16),
        )
        assert list(at_once) == alone


def test_stop_strings_cut_the_text_and_a_seed_repeats_a_sample(server):
    text, _ = complete(server, PROMPTS[3], 20)
    stop = text[5:8]
    for stream in (False, True):
        cut, finish = complete(server, PROMPTS[3], 20, stream, stop=[stop, "@@@@"])
        assert (cut, finish) == (text[: text.index(stop)], "stop")
    sampled = [complete(server, PROMPTS[3], 20, temperature=1.0, seed=7) for _ in "ab"]
    assert sampled[0] == sampled[1] and sampled[0][0] != text


def engine_for(model, prefill_step=64):
    """A server Engine driven by hand, step by step, its events delivered at once."""
    server = import_example("llama", "server")
    engine = server.Engine(model, max_batch=4, max_queue=4, prefill_step=prefill_step)

    class Loop:
        def call_soon_threadsafe(self, function, *args):
            function(*args)

    engine.loop = Loop()
    return server, engine


def row_for(server, prompt, limit):
    return server.Row(prompt, limit, 0.0, 1.0, None, stop_ids=set())


def alone(model, prompt, max_tokens):
    tokens = []
    for token in model.generate(mx.array(prompt)):
        if len(tokens) == max_tokens:
            return tokens
        tokens.append(token)


@pytest.mark.usefixtures("on_cpu")
@pytest.mark.parametrize("prefill_step", [64, 5])
def test_a_request_arriving_mid_batch_joins_without_changing_the_others_tokens(
    converted, prefill_step
):
    """Rows join a batch that has run for some steps, with prompts shorter and longer
    than its cache (the batch or the newcomers get padded); --prefill-step 5: in chunks.
    A row that samples beside them changes nothing either."""
    model = import_example("llama", "model").load_model(converted[0])
    server, engine = engine_for(model, prefill_step)
    prompts = [[1, *range(5, 5 + n)] for n in (6, 3, 40, 12)]
    rows = [row_for(server, p, 24) for p in prompts]
    sampled = server.Row(prompts[1], 24, 1.0, 0.9, 7, stop_ids=set())
    engine.submit(sampled)  # a row that samples, in the batch from the start
    engine.submit(rows[0])
    with server.batched(model):
        for i, row in enumerate(rows[1:]):
            while len(rows[0].tokens) < 4 * (i + 1):
                engine.iterate()
            engine.submit(row)
        while engine.rows or engine.group:
            engine.iterate()
    assert [row.tokens for row in rows] == [alone(model, p, 24) for p in prompts]


@pytest.mark.usefixtures("on_cpu")
def test_long_prompts_go_in_chunks_and_rows_that_leave_shrink_the_cache_to_the_longest(
    converted,
):
    model = import_example("llama", "model").load_model(converted[0])
    server, engine = engine_for(model, prefill_step=32)
    long, short = [1, *range(5, 45)], [1, 7, 8]
    rows = [row_for(server, long, 30), row_for(server, short, 3)]
    for row in rows:
        engine.submit(row)
    with server.batched(model):
        engine.iterate()  # 41 + 3 tokens padded are more than 32: the long one alone
        assert engine.group.rows == rows[:1] and engine.group.done == 32
        engine.iterate()  # its last 9 columns; it joins, and a step
        assert engine.rows == rows[:1] and not engine.group
        engine.iterate()  # the short one joins, padded on the left
        assert engine.rows == rows and engine.cache[0].padding.host_pads[0] == 0
        rows[0].cancelled = True
        engine.iterate()
        assert engine.rows == [rows[1]]
        # the short row's prompt and tokens so far; the one in flight is fed next
        assert engine.cache[0].offset == len(short) + len(rows[1].tokens)
        while engine.rows:
            engine.iterate()
    assert rows[1].tokens == alone(model, short, 3) and engine.admitted == 0


SWITCH = {
    "type": "object",
    "properties": {
        "id": {"type": "string", "pattern": "^[A-Z][0-9]$"},
        "on": {"type": "boolean"},
    },
    "required": ["id", "on"],
    "additionalProperties": False,
}
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 3},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}
DIGITS = {"type": "array", "items": {"enum": [1, 2, 3]}, "minItems": 2, "maxItems": 4}


def json_schema(schema):
    """OpenAI's response_format for a JSON schema."""
    return {
        "type": "json_schema",
        "json_schema": {"name": "reply", "schema": schema, "strict": True},
    }


def test_response_format_json_schema_replies_validate_streaming_and_not(server):
    chat = client(server).chat.completions
    messages = [{"role": "user", "content": "call me ishmael"}]
    asked = dict(model="hf", messages=messages, max_tokens=40)
    reply = chat.create(**asked, response_format=json_schema(SWITCH))
    text = reply.choices[0].message.content
    jsonschema.validate(json.loads(text), SWITCH)
    assert reply.choices[0].finish_reason == "stop"
    chunks = list(
        chat.create(**asked, response_format=json_schema(SWITCH), stream=True)
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text
    assert chunks[-1].choices[0].finish_reason == "stop"
    sampled = chat.create(
        **asked, response_format=json_schema(SWITCH), temperature=1.0, seed=3
    )
    jsonschema.validate(json.loads(sampled.choices[0].message.content), SWITCH)
    # /v1/completions too (an extra field for the openai client); cut by max_tokens
    for stream in (False, True):
        extra_body = {"response_format": json_schema(PERSON)}
        text, finish = complete(server, PROMPTS[5], 40, stream, extra_body=extra_body)
        jsonschema.validate(json.loads(text), PERSON)
        cut = complete(server, PROMPTS[5], 3, stream, extra_body=extra_body)
        assert cut == (text[: len(cut[0])], "length")
    extra_body = {"response_format": {"type": "json_object"}}
    text, finish = complete(server, PROMPTS[2], 60, extra_body=extra_body)
    assert text.startswith("{") and (finish == "length" or json.loads(text) != [])


@pytest.mark.usefixtures("on_cpu")
def test_rows_with_different_schemas_and_a_free_row_each_equal_their_single_runs(
    converted,
):
    """Greedy rows under three schemas and an unconstrained row join a batch at
    different steps; each gets the tokens it gets alone (structured.py's own loop for
    the constrained ones, model.generate for the free one)."""
    model = import_example("llama", "model").load_model(converted[0])
    tokenizer = import_example("llama", "tokenizer").load_tokenizer(converted[1], 320)
    structured = import_example("llama", "structured")
    server, engine = engine_for(model)
    prompts = [[1, *range(5, 5 + n)] for n in (6, 3, 20, 12)]
    schemas = [SWITCH, None, PERSON, DIGITS]
    rows = []
    for prompt, schema in zip(prompts, schemas):
        stop_ids = set() if schema is None else tokenizer.stop_ids
        row = server.Row(prompt, 30, 0.0, 1.0, None, stop_ids)
        if schema:
            row.constraint = structured.json_constraint(tokenizer, schema)
        rows.append(row)
    with server.batched(model):
        for row in rows:
            engine.submit(row)
            for _ in range(3):
                engine.iterate()
        while engine.rows or engine.group:
            engine.iterate()
    for prompt, schema, row in zip(prompts, schemas, rows):
        if schema is None:
            assert row.tokens == alone(model, prompt, 30)
            continue
        constraint = structured.json_constraint(tokenizer, schema)
        (single,) = structured.generate_constrained(
            model, [prompt], 30, 0.0, 1.0, tokenizer.stop_ids, [constraint]
        )
        assert row.tokens == single and row.constraint.finish_reason == "stop"


def test_a_client_that_disconnects_mid_stream_frees_its_row(server):
    body = {"prompt": PROMPTS[0], "max_tokens": 80, "stream": True}
    with httpx.stream("POST", f"{server.url}/completions", json=body) as response:
        assert response.status_code == 200
        next(line for line in response.iter_lines() if line.startswith("data:"))
    health = server.url.removesuffix("/v1") + "/health"
    deadline = time.time() + 10
    while httpx.get(health).json()["running"] and time.time() < deadline:
        time.sleep(0.05)
    assert httpx.get(health).json() == {"status": "ok", "running": 0, "waiting": 0}
    assert complete(server, PROMPTS[2], 8) == complete(server, PROMPTS[2], 8)


BAD = [
    ('{"prompt": "a",', 400, None, None),  # malformed JSON
    ({"prompt": "a", "max_tokens": "5"}, 400, "max_tokens", "int_type"),
    ({"prompt": "a", "temperature": "hot"}, 400, "temperature", "float_type"),
    ({"prompt": "a", "stop": [1]}, 400, "stop", None),
    ({"prompt": "a", "max_tokens": 0}, 400, "max_tokens", None),
    ({"prompt": "a", "max_tokens": 95}, 400, "max_tokens", "context_length_exceeded"),
    ({"prompt": "whale " * 100}, 400, "prompt", "context_length_exceeded"),
    ({"prompt": [1, 400]}, 400, "prompt", None),
    ({"prompt": "a", "n": 2}, 400, "n", None),
    ({"prompt": "a", "model": "gpt-4o"}, 404, "model", "model_not_found"),
    ({"messages": [{"role": "user"}]}, 400, "messages", "missing"),
    (
        {"messages": [{"role": "user", "content": "whale " * 100}]},
        400,
        "messages",
        None,
    ),
    ({"messages": [{"role": "system", "content": "Be brief."}]}, 400, "messages", None),
    ({"messages": [{"role": "assistant", "content": "Hi"}]}, 400, "messages", None),
    ({"prompt": "a", "response_format": {"type": "xml"}}, 400, "response_format", None),
    (
        {"prompt": "a", "response_format": {"type": "json_schema"}},
        400,
        "response_format",
        None,
    ),
    (
        {"prompt": "a", "response_format": json_schema({"uniqueItems": True})},
        400,
        "response_format",
        None,
    ),
]


@pytest.mark.parametrize("body, status, param, code", BAD)
def test_bad_requests_get_openai_errors_and_the_server_goes_on(
    server, body, status, param, code
):
    path = "chat/completions" if "messages" in str(body) else "completions"
    content = body if isinstance(body, str) else json.dumps(body)
    response = httpx.post(
        f"{server.url}/{path}",
        content=content,
        headers={"Content-Type": "application/json"},
    )
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["message"]
    assert error["param"] == param
    if code:
        assert error["code"] == code
    assert httpx.get(server.url.removesuffix("/v1") + "/health").status_code == 200


def test_a_bad_schema_or_a_tokenizer_llguidance_cannot_read_gets_400(
    converted, server, tmp_path
):
    from openai import BadRequestError
    from tokenizers import Tokenizer, models

    def refusal(server, schema):
        with pytest.raises(BadRequestError) as refused:
            client(server).completions.create(
                model="hf",
                prompt="a",
                max_tokens=4,
                extra_body={"response_format": json_schema(schema)},
            )
        assert refused.value.body["param"] == "response_format"
        return refused.value.body["message"]

    assert "uniqueItems" in refusal(server, {"type": "array", "uniqueItems": True})
    words = {f"w{i}": i for i in range(320)}
    word_level = Tokenizer(models.WordLevel(words, unk_token="w0"))
    word_level.save(str(tmp_path / "tokenizer.json"))
    unreadable = Server(converted[0], tmp_path / "tokenizer.json")
    try:
        assert "llguidance cannot read" in refusal(unreadable, SWITCH)
        assert complete(unreadable, "w1 w2", 3)[1] == "length"  # the rest still works
    finally:
        assert unreadable.stop()[0] == 0


def test_prompt_lookup_gives_the_text_of_plain_steps(converted):
    weights, tokenizer = converted
    prompt = "the the the the the the"  # with --ngram-size 1: proposals at each step
    llama = "llama/llama.py"
    printed = run_script(llama, weights, tokenizer, prompt, "--max-tokens", "50")
    fast = Server(weights, tokenizer, "--prompt-lookup", "4", "--ngram-size", "1")
    try:
        for stream in (False, True):
            assert as_printed(complete(fast, prompt, 50, stream)[0]) == printed.stdout
    finally:
        code, errors = fast.stop()
    assert code == 0 and "prompt lookup:" in errors, errors
    proposed = errors.split("% of ")[1].split()[0]
    assert int(proposed) > 0, errors


def test_models_lists_the_served_model_and_unknown_paths_get_404(server):
    models = client(server).models.list()
    assert [m.id for m in models.data] == ["hf"]
    response = httpx.get(f"{server.url}/engines")
    assert response.status_code == 404 and response.json()["error"]["message"]


def test_a_full_queue_answers_503_at_once_and_sigterm_lets_running_requests_finish(
    converted,
):
    small = Server(*converted, "--max-batch", "1", "--max-queue", "1")
    body = {"prompt": PROMPTS[0], "max_tokens": 80, "stream": True}

    async def four_at_once():
        async with httpx.AsyncClient(base_url=small.url, timeout=60) as http:

            async def one():
                tic = time.perf_counter()
                async with http.stream("POST", "/completions", json=body) as response:
                    await response.aread()
                    return response, time.perf_counter() - tic

            return await asyncio.gather(*(one() for _ in range(4)))

    answers = asyncio.run(four_at_once())
    refused = [(r, s) for r, s in answers if r.status_code == 503]
    assert 1 <= len(refused) <= 2 and all(s < 2 for _, s in refused)
    assert all(r.json()["error"]["code"] == "queue_full" for r, _ in refused)
    served = [r for r, _ in answers if r.status_code == 200]
    assert served and all(r.text.endswith("data: [DONE]\n\n") for r in served)
    # SIGTERM in the middle of a stream: the stream still finishes, then the server
    # exits 0.
    with httpx.stream("POST", f"{small.url}/completions", json=body) as response:
        lines = response.iter_lines()
        next(line for line in lines if line.startswith("data:"))
        small.process.send_signal(signal.SIGTERM)
        rest = list(lines)
    assert '"finish_reason": "length"' in "".join(rest) and rest[-2] == "data: [DONE]"
    code, errors = small.process.wait(timeout=60), small.process.stderr.read()
    assert code == 0 and errors == "[server stopped]\n"


def test_bad_command_lines_get_one_line(converted, tmp_path):
    result = run_script("llama/server.py", tmp_path / "missing.npz", converted[1])
    assert result.returncode == 1 and "does not exist" in result.stderr
    assert len(result.stderr.splitlines()) == 1
    result = run_script("llama/server.py", *converted, "--max-batch", "0")
    assert result.returncode == 2 and "--max-batch" in result.stderr


def test_benchmark_tiny_preset_measures_the_server_and_skips_a_missing_mlx_lm(tmp_path):
    flags = "--preset tiny --max-tokens 4 --clients 1 3 --requests 1 --repeats 1"
    result = run_script(
        "llama/benchmark_server.py", *flags.split(), "--work-dir", tmp_path
    )
    assert result.returncode == 0, result.stderr
    rows = [line.split() for line in result.stdout.splitlines()[2:]]
    assert [row[:2] for row in rows if row[0] == "server.py"] == [
        ["server.py", "1"],
        ["server.py", "3"],
    ]
    assert all(row[-1] == "0" for row in rows)  # no failed requests
    if importlib.util.find_spec("mlx_lm") is None:
        assert "mlx_lm is not installed" in result.stderr
