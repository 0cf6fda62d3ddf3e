"""llama/batch.py: batched generation gives each prompt exactly what it gets alone,
and llama.py --prompts writes one JSON line per prompt, in input order."""

import json

import mlx.core as mx
import numpy as np
import pytest
from helpers import import_example, run_script, tiny_llama
from mlx.utils import tree_map

pytestmark = pytest.mark.usefixtures("llama_on_path", "on_cpu")


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A tiny Hugging Face Llama (GQA, context 96) converted with convert.py, with its
    tokenizer.model."""
    folder = tiny_llama(tmp_path_factory.mktemp("llama_batch") / "hf")
    result = run_script("llama/convert.py", folder, folder.parent / "hf.npz")
    assert result.returncode == 0, result.stderr
    return folder.parent / "hf.npz", folder / "tokenizer.model"


def alone(model, prompt, max_tokens, temp=0.0):
    """model.generate's first max_tokens tokens for one prompt, as llama.py runs it."""
    tokens = []
    for token in model.generate(mx.array(prompt), temp=temp):
        if len(tokens) == max_tokens:
            return tokens
        tokens.append(token)


def prompts_of(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [[1] + rng.integers(3, 320, n - 1).tolist() for n in lengths]


LENGTHS = (
    5,
    17,
    1,
    30,
    12,
)  # one batch, four different paddings and one row without any


def test_greedy_batch_of_different_lengths_equals_each_prompt_alone(converted):
    model = import_example("llama", "model").load_model(converted[0])
    prompts = prompts_of(LENGTHS)
    replies = import_example("llama", "batch").generate_batch(model, prompts, 20)
    assert replies == [alone(model, p, 20) for p in prompts]


def test_quantized_batch_equals_each_prompt_alone(converted, tmp_path):
    convert = import_example("llama", "convert")
    args, weights = convert.convert(
        str(converted[1].parent), quantization={"group_size": 32, "bits": 4}
    )
    convert.save(args, weights, tmp_path / "q.safetensors")
    model = import_example("llama", "model").load_model(tmp_path / "q.safetensors")
    prompts = prompts_of(LENGTHS, seed=1)
    assert import_example("llama", "batch").generate_batch(model, prompts, 12) == [
        alone(model, p, 12) for p in prompts
    ]


def test_batch_quantized_products_equal_the_quantized_ones():
    """BatchQuantizedLinear multiplies (B, 1, dim) as one (B, dim) product: the same
    numbers as nn.QuantizedLinear."""
    import mlx.nn as nn

    batch = import_example("llama", "batch")
    layer = nn.QuantizedLinear(64, 96, bias=False, group_size=32, bits=4)
    x = mx.random.normal((16, 1, 64))
    expected = layer(x)
    layer.__class__ = batch.BatchQuantizedLinear
    assert layer(x).shape == (16, 1, 96)
    np.testing.assert_allclose(
        np.array(layer(x)), np.array(expected), atol=1e-5, rtol=1e-5
    )


def test_meta_layout_with_scaled_rope_batch_equals_alone():
    """Interleaved RoPE pairs (Meta's layout) and Llama 3.1's rescaled frequencies take
    the same row positions."""
    model_module = import_example("llama", "model")
    args = model_module.ModelArgs(
        dim=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=1,
        vocab_size=320,
        hidden_dim=128,
        rope_traditional=True,
        max_seq_len=128,
        rope_scaling={
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
    )
    mx.random.seed(0)
    model = model_module.Llama(args)
    model.update(
        tree_map(lambda p: mx.random.normal(p.shape) * 0.3, model.parameters())
    )
    prompts = prompts_of((40, 3, 22), seed=2)
    assert import_example("llama", "batch").generate_batch(model, prompts, 16) == [
        alone(model, p, 16) for p in prompts
    ]


def test_each_row_caches_the_keys_and_values_of_its_prompt_alone(converted):
    """Padding shifts no position: row b's cached keys, rotated by RoPE, are those of
    its prompt run alone."""
    model = import_example("llama", "model").load_model(converted[0])
    batch = import_example("llama", "batch")
    prompts = prompts_of(LENGTHS)
    longest = max(LENGTHS)
    tokens, _, cache = batch.left_padded(model, prompts)
    with batch.batched(model):
        model(tokens, cache)
    for b, prompt in enumerate(prompts):
        single = model.make_cache()
        model(mx.array([prompt]), single)
        for layer, layer_single in zip(cache, single):
            for batched_array, alone_array in (
                (layer.keys, layer_single.keys),
                (layer.values, layer_single.values),
            ):
                np.testing.assert_allclose(
                    np.array(batched_array[b, :, longest - len(prompt) : longest]),
                    np.array(alone_array[0, :, : len(prompt)]),
                    atol=1e-5,
                )


def test_rows_that_stop_leave_the_batch_and_the_others_go_on_unchanged(converted):
    model = import_example("llama", "model").load_model(converted[0])
    prompts = prompts_of(LENGTHS)
    full = [alone(model, p, 20) for p in prompts]
    stop_ids = {full[0][3], full[2][0]}  # row 0 stops after 3 tokens, row 2 at once
    replies = import_example("llama", "batch").generate_batch(
        model, prompts, 20, stop_ids=stop_ids
    )
    for reply, tokens in zip(replies, full):
        end = next((i for i, t in enumerate(tokens) if t in stop_ids), len(tokens))
        assert reply == tokens[:end]  # the stop token itself is not part of the reply
    assert replies[2] == [] and len(replies[0]) == 3


def test_each_row_stops_at_the_end_of_its_own_context(converted):
    model = import_example("llama", "model").load_model(converted[0])  # context 96
    prompts = prompts_of((90, 10))
    replies = import_example("llama", "batch").generate_batch(model, prompts, 20)
    assert [len(r) for r in replies] == [6, 20]
    assert replies[0] == alone(model, prompts[0], 6)


def test_sampling_with_a_seed_is_reproducible(converted):
    model = import_example("llama", "model").load_model(converted[0])
    batch = import_example("llama", "batch")
    prompts = prompts_of(LENGTHS)
    runs = []
    for _ in range(2):
        mx.random.seed(7)
        runs.append(batch.generate_batch(model, prompts, 12, temp=1.0, top_p=0.9))
    assert runs[0] == runs[1]
    assert runs[0] != batch.generate_batch(model, prompts, 12)  # sampled, not greedy


def test_batched_model_is_the_plain_model_afterwards(converted):
    model = import_example("llama", "model").load_model(converted[0])
    batch = import_example("llama", "batch")
    with batch.batched(model):
        assert all(
            type(layer.attention) is batch.BatchAttention for layer in model.layers
        )
    assert all(
        type(layer.attention) is import_example("llama", "model").Attention
        for layer in model.layers
    )


# ---- llama.py --prompts ---------------------------------------------------------


def test_prompts_file_gives_one_json_line_per_prompt_in_order_as_llama_py_prints(
    converted, tmp_path
):
    weights, tokenizer = converted
    texts = [
        "Call me Ishmael.",
        "The sea",
        "whale",
        "Some years ago never mind how long precisely",
    ]
    (tmp_path / "prompts.txt").write_text(
        "\n".join(texts[:2] + ["", "   "] + texts[2:]) + "\n"
    )
    result = run_script(
        "llama/llama.py",
        weights,
        tokenizer,
        "--prompts",
        tmp_path / "prompts.txt",
        "--max-tokens",
        "7",
        "--batch-size",
        "3",
    )
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["prompt"] for line in lines] == texts
    assert "2 blank lines skipped" in result.stderr and "tokens/s" in result.stderr
    for text, line in zip(texts, lines):
        single = run_script(
            "llama/llama.py", weights, tokenizer, text, "--max-tokens", "7"
        )
        assert line["text"] + "\n" == single.stdout
        assert line["generated_tokens"] == 7


def test_jsonl_prompts_and_messages_use_the_prompt_and_chat_formats(
    converted, tmp_path
):
    weights, tokenizer = converted
    model = import_example("llama", "model").load_model(weights)
    tok = import_example("llama", "tokenizer").load_tokenizer(tokenizer)
    messages = [{"role": "user", "content": "Who is Ahab?"}]
    path = tmp_path / "prompts.jsonl"
    path.write_text(
        json.dumps({"prompt": "The sea"})
        + "\n"
        + json.dumps({"messages": messages})
        + "\n"
    )
    result = run_script(
        "llama/llama.py", weights, tokenizer, "--prompts", path, "--max-tokens", "5"
    )
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert lines[1]["prompt"] == messages
    chat_ids = import_example("llama", "chat").chat_tokens(tok, messages)
    expected = alone(model, chat_ids, 5)
    decoder = import_example("llama", "tokenizer").StreamingDecoder(tok, chat_ids)
    assert lines[1]["text"] == "".join(decoder.add(t) for t in expected) + decoder.add(
        None
    )


def test_a_prompt_longer_than_the_context_is_reported_by_line_and_the_others_run(
    converted, tmp_path
):
    weights, tokenizer = converted
    (tmp_path / "prompts.txt").write_text("The sea\n" + "whale " * 200 + "\nCall me\n")
    result = run_script(
        "llama/llama.py",
        weights,
        tokenizer,
        "--prompts",
        tmp_path / "prompts.txt",
        "--max-tokens",
        "3",
    )
    assert result.returncode == 0, result.stderr
    assert "line 2: the prompt is" in result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [("error" in line, "text" in line) for line in lines] == [
        (False, True),
        (True, False),
        (False, True),
    ]


@pytest.mark.parametrize(
    "content, flags, message",
    [
        ("\n  \n", [], "holds no prompts"),
        ('{"prompt": "a"}\n{"prompt": 3}\n', [], "line 2 is not"),
        ('{"messages": [{"role": "user"}]}\n', [], "line 1 is not"),
        ("whale " * 200 + "\n", [], "every prompt"),
        ("The sea\n", ["--batch-size", "0"], "--batch-size"),
        ("The sea\n", ["a prompt too"], "--prompts replaces the prompt"),
    ],
)
def test_bad_prompts_input_is_refused_with_one_line(
    content, flags, message, converted, tmp_path
):
    weights, tokenizer = converted
    suffix = ".jsonl" if content.startswith("{") else ".txt"
    path = tmp_path / f"prompts{suffix}"
    path.write_text(content)
    result = run_script("llama/llama.py", weights, tokenizer, "--prompts", path, *flags)
    assert result.returncode != 0 and message in result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_prompts_file_that_is_not_utf8_is_refused_before_loading(converted, tmp_path):
    (tmp_path / "prompts.txt").write_bytes(b"caf\xe9\n")
    result = run_script(
        "llama/llama.py",
        "missing.npz",
        converted[1],
        "--prompts",
        tmp_path / "prompts.txt",
    )
    assert result.returncode == 1 and "cannot read the prompts file" in result.stderr
    assert "Traceback" not in result.stderr
