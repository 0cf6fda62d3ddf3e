"""llama/structured.py: generation constrained to a JSON schema. Every complete document
validates, greedy or sampled; the mask only removes tokens; batch rows keep their own
schemas; bad input is refused in one line before generating."""

import json

import jsonschema
import mlx.core as mx
import numpy as np
import pytest
from helpers import LLAMA_TEXT, import_example, run_script, tiny_llama

pytestmark = pytest.mark.usefixtures("llama_on_path", "on_cpu")

SHORT = {"type": "string", "maxLength": 3}


def record(properties, *required):
    """An object schema: these properties, `required` of them required, no others."""
    return {
        "type": "object",
        "properties": properties,
        "required": list(required),
        "additionalProperties": False,
    }


DIGIT = {"type": "integer", "minimum": 0, "maximum": 9}
SCHEMAS = [
    {"type": "boolean"},
    {"type": "null"},
    {"enum": ["red", "green", "blue"]},
    {"type": "integer", "minimum": -5, "maximum": 40},
    {"type": "number", "minimum": 0, "maximum": 1},
    {"type": "string", "pattern": "^[a-c]{2,4}$"},
    {"type": "string", "pattern": "^[0-9]{3}-[0-9]{2}$"},
    {"type": "array", "items": DIGIT, "minItems": 2, "maxItems": 4},
    {"type": "array", "items": {"enum": ["x", "y"]}, "minItems": 3, "maxItems": 3},
    record({"ok": {"type": "boolean"}}, "ok"),
    record(
        {"name": SHORT, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
        "name",
        "age",
    ),
    record({"point": record({"x": DIGIT, "y": DIGIT}, "x", "y")}, "point"),
    record({"tags": {"type": "array", "items": SHORT, "minItems": 1, "maxItems": 2}}),
    {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 99}, {"type": "boolean"}]},
    {"anyOf": [record({"a": {"const": 1}}, "a"), {"enum": ["none"]}]},
    record(
        {
            "level": {"enum": ["low", "high"]},
            "score": {"type": "number", "minimum": -1, "maximum": 1},
        },
        "level",
    ),
    {
        "type": "array",
        "items": {"type": "array", "items": {"type": "boolean"}, "maxItems": 2},
        "minItems": 1,
        "maxItems": 2,
    },
    record(
        {
            "id": {"type": "string", "pattern": "^[A-Z][0-9]$"},
            "on": {"type": "boolean"},
        },
        "id",
        "on",
    ),
    record(
        {
            "user": record(
                {
                    "name": SHORT,
                    "langs": {"type": "array", "items": {"enum": ["en", "fr"]}},
                },
                "name",
                "langs",
            )
        },
        "user",
    ),
    {
        "type": "array",
        "items": {"anyOf": [{"type": "null"}, {"type": "integer", "minimum": 1}]},
        "minItems": 1,
        "maxItems": 3,
    },
]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A tiny Llama (context 256) converted by convert.py; its SentencePiece model."""
    folder = tiny_llama(
        tmp_path_factory.mktemp("llama_structured") / "hf", max_position_embeddings=256
    )
    result = run_script("llama/convert.py", folder, folder.parent / "hf.npz")
    assert result.returncode == 0, result.stderr
    return folder.parent / "hf.npz", folder / "tokenizer.model"


@pytest.fixture(scope="module")
def loaded(converted):
    model = import_example("llama", "model").load_model(converted[0])
    tokenizer = import_example("llama", "tokenizer").load_tokenizer(converted[1], 320)
    return model, tokenizer


def text_of(tokenizer, prompt, reply):
    """The reply's text as llama.py prints it after the prompt."""
    decoder = import_example("llama", "tokenizer").StreamingDecoder(tokenizer, prompt)
    return "".join(decoder.add(t) for t in reply) + decoder.add(None)


def constrained(model, tokenizer, prompts, schemas, max_tokens=120, temp=0.0):
    """(replies, constraints) of generate_batch, a constraint per row (None: none)."""
    structured = import_example("llama", "structured")
    constraints = [
        None if s is None else structured.json_constraint(tokenizer, s) for s in schemas
    ]
    replies = import_example("llama", "batch").generate_batch(
        model, prompts, max_tokens, temp, 1.0, tokenizer.stop_ids, constraints
    )
    return replies, constraints


@pytest.mark.parametrize("temp", [0.0, 1.0])
def test_every_document_of_20_schemas_is_complete_and_validates(loaded, temp):
    model, tokenizer = loaded
    for seed in (0, 1):
        mx.random.seed(seed)
        prompt = tokenizer.prompt(LLAMA_TEXT[seed])
        replies, constraints = constrained(
            model, tokenizer, [prompt] * len(SCHEMAS), SCHEMAS, temp=temp
        )
        for schema, reply, constraint in zip(SCHEMAS, replies, constraints):
            assert constraint.finish_reason == "stop", (schema, reply)
            jsonschema.validate(json.loads(text_of(tokenizer, prompt, reply)), schema)


def test_the_mask_only_removes_tokens(loaded):
    """At each step of a greedy constrained run, the token is the unconstrained greedy
    one wherever that one is allowed, and the most likely allowed one otherwise. The
    logits of every step come from one pass over the whole sequence, without cache."""
    model, tokenizer = loaded
    structured = import_example("llama", "structured")
    prompt = tokenizer.prompt("call me ishmael")
    kept = replaced = 0
    for schema in [*SCHEMAS[9:13], {"type": "string", "maxLength": 30}]:
        (reply,), _ = constrained(model, tokenizer, [prompt], [schema])
        logits = model(mx.array([prompt + reply]))[0, len(prompt) - 1 : -1]
        replay = structured.json_constraint(tokenizer, schema)
        for step, token in enumerate(reply):
            allowed = np.array(replay.mask(logits[step][None]))[0] > -np.inf
            row = np.array(logits[step])
            assert allowed[token]
            assert row[token] >= row[allowed].max() - 1e-4
            if allowed[row.argmax()]:
                assert row[token] >= row.max() - 1e-4
                kept += 1
            else:
                replaced += 1
            replay.advance(token)
    assert kept > 10 and replaced > 10  # both kinds of step were checked


def test_an_unconstrained_text_allowed_at_every_step_is_unchanged(converted):
    """Inside a JSON string most tokens are allowed: after the opening quote the
    constrained greedy text is the model's own greedy text for as long as that text is
    allowed. (The random model is made to prefer SentencePiece's text pieces to its byte
    tokens, which rarely form whole characters.)"""
    model = import_example("llama", "model").load_model(converted[0])
    tokenizer = import_example("llama", "tokenizer").load_tokenizer(converted[1])
    bytes_ = [i for i in range(320) if tokenizer.sp.is_byte(i)]
    model.output.weight[mx.array(bytes_)] = 0.0
    structured = import_example("llama", "structured")
    schema = {"type": "string", "maxLength": 40}
    longest = 0
    for text in LLAMA_TEXT[:4]:
        prompt = tokenizer.prompt(text)
        (reply,), _ = constrained(model, tokenizer, [prompt], [schema])
        quote = reply[0]
        batch = import_example("llama", "batch")
        (free,) = batch.generate_batch(model, [prompt + [quote]], 40)
        replay = structured.json_constraint(tokenizer, schema)
        replay.advance(quote)
        allowed = (
            0  # how many unconstrained tokens the schema allows, one after another
        )
        for token in free:
            if np.array(replay.mask(mx.zeros((1, 320))))[0, token] == -np.inf:
                break
            replay.advance(token)
            allowed += 1
        assert reply[1 : 1 + allowed] == free[:allowed]
        longest = max(longest, allowed)
    assert longest >= 5


def test_batch_rows_with_different_schemas_equal_their_single_runs(loaded):
    model, tokenizer = loaded
    rng = np.random.default_rng(0)
    prompts = [[1] + rng.integers(3, 320, n).tolist() for n in (4, 11, 1, 7, 20)]
    schemas = [SCHEMAS[10], SCHEMAS[2], None, SCHEMAS[18], SCHEMAS[7]]
    replies, constraints = constrained(model, tokenizer, prompts, schemas, 60)
    for prompt, schema, reply in zip(prompts, schemas, replies):
        assert constrained(model, tokenizer, [prompt], [schema], 60)[0] == [reply]
        if schema is not None:
            jsonschema.validate(json.loads(text_of(tokenizer, prompt, reply)), schema)
    alone = import_example("llama", "batch").generate_batch(model, [prompts[2]], 60)
    assert replies[2] == alone[0]  # the unconstrained row is untouched


def test_the_per_request_api_gives_the_batch_reply(loaded):
    """The server's way, a request at a time: mask(logits), sample, advance(token)."""
    model, tokenizer = loaded
    structured = import_example("llama", "structured")
    sample = import_example("llama", "model").sample
    prompt = tokenizer.prompt("call me ishmael")
    (expected,), _ = constrained(model, tokenizer, [prompt], [SCHEMAS[17]])
    constraint = structured.json_constraint(tokenizer, SCHEMAS[17])
    cache = model.make_cache()
    logits = model(mx.array([prompt]), cache, last_only=True)[:, -1]
    reply = []
    while not constraint.done:
        mx.async_eval(logits)  # the device runs the step while the host makes the mask
        token = sample(constraint.mask(logits), 0.0, 1.0)
        if token.item() in tokenizer.stop_ids:
            break
        reply.append(token.item())
        constraint.advance(reply[-1])
        logits = model(token[:, None], cache)[:, -1]
    assert reply == expected and constraint.finish_reason == "stop"


def test_a_byte_level_bpe_tokenizer_json_works_too(loaded, tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(LLAMA_TEXT, trainer)
    assert bpe.get_vocab_size() == 320
    bpe.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "</s>"})
    )
    model, _ = loaded
    tokenizer = import_example("llama", "tokenizer").load_tokenizer(tmp_path, 320)
    prompt = tokenizer.encode("call me ishmael")
    replies, constraints = constrained(model, tokenizer, [prompt] * 20, SCHEMAS)
    for schema, reply, constraint in zip(SCHEMAS, replies, constraints):
        assert constraint.finish_reason == "stop"
        jsonschema.validate(json.loads(text_of(tokenizer, prompt, reply)), schema)


def run_llama(converted, *args):
    return run_script("llama/llama.py", *converted, *args)


def test_llama_py_json_schema_prints_a_valid_document(converted, tmp_path):
    (tmp_path / "schema.json").write_text(json.dumps(SCHEMAS[17]))
    result = run_llama(
        converted, "--json-schema", tmp_path / "schema.json", "Hello", "--temp", "0.7"
    )
    assert result.returncode == 0, result.stderr
    jsonschema.validate(json.loads(result.stdout), SCHEMAS[17])
    assert "finish_reason stop" in result.stderr
    short = run_llama(converted, "--json", "Hello", "--max-tokens", "3")
    assert short.returncode == 1 and "finish_reason length" in short.stderr
    assert short.stderr.strip().splitlines()[-1].startswith("error: the JSON document")


def test_prompts_rows_carry_their_own_json_schema(converted, tmp_path):
    path = tmp_path / "prompts.jsonl"
    lines = [
        {"prompt": "The sea", "json_schema": SCHEMAS[11]},
        {"prompt": "Whale"},
        {"prompt": "Ahab", "json_schema": SCHEMAS[8]},
    ]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    (tmp_path / "schema.json").write_text(json.dumps(SCHEMAS[2]))
    result = run_llama(
        converted, "--prompts", path, "--json-schema", tmp_path / "schema.json"
    )
    assert result.returncode == 0, result.stderr
    out = [json.loads(line) for line in result.stdout.splitlines()]
    schemas = [SCHEMAS[11], SCHEMAS[2], SCHEMAS[8]]  # --json-schema: the others
    for line, schema in zip(out, schemas):
        assert line["finish_reason"] == "stop"
        jsonschema.validate(json.loads(line["text"]), schema)


@pytest.mark.parametrize(
    "content, words",
    [
        ("{not json", "is not JSON"),
        ('{"type": "array", "uniqueItems": true}', "uniqueItems"),
        ("[1, 2]", "object"),
    ],
)
def test_a_bad_schema_is_refused_in_one_line(converted, tmp_path, content, words):
    (tmp_path / "schema.json").write_text(content)
    result = run_llama(converted, "--json-schema", tmp_path / "schema.json", "Hello")
    assert result.returncode == 1 and result.stdout == ""
    assert words in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_a_tokenizer_the_engine_cannot_read_is_refused_in_one_line(converted, tmp_path):
    from tokenizers import Tokenizer, models

    words = {f"w{i}": i for i in range(320)}
    Tokenizer(models.WordLevel(words, unk_token="w0")).save(
        str(tmp_path / "tokenizer.json")
    )
    result = run_script(
        "llama/llama.py", converted[0], tmp_path / "tokenizer.json", "--json", "w1"
    )
    assert result.returncode == 1 and result.stdout == ""
    assert "llguidance cannot read" in result.stderr.splitlines()[-1]
