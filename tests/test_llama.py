"""llama/: conversion from Hugging Face and Meta checkpoints, parity with transformers,
the KV cache, and llama.py end to end with a SentencePiece model trained here."""

import json
import sys

import mlx.core as mx
import numpy as np
import pytest
import torch
from helpers import (
    LLAMA_PARAMS,
    hf_to_meta_state_dict,
    import_example,
    run_script,
    split_meta_state_dict,
    tiny_llama,
)

TOL = 1e-4  # float32 logits


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    return tiny_llama(tmp_path_factory.mktemp("llama") / "hf")


@pytest.fixture(scope="module")
def hf_model(hf_folder):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(hf_folder, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def converted(hf_folder):
    """The Hugging Face folder converted with convert.py."""
    out = hf_folder.parent / "hf.npz"
    result = run_script("llama/convert.py", hf_folder, out)
    assert result.returncode == 0, result.stderr
    return out


@pytest.fixture(scope="module")
def meta_folder(hf_model, tmp_path_factory):
    """The same weights as a one-shard Meta checkpoint."""
    folder = tmp_path_factory.mktemp("meta") / "llama-tiny"
    folder.mkdir()
    torch.save(
        hf_to_meta_state_dict(hf_model.state_dict()), folder / "consolidated.00.pth"
    )
    (folder / "params.json").write_text(json.dumps(LLAMA_PARAMS))
    return folder


def tokens(B=2, T=24, seed=0):
    return np.random.default_rng(seed).integers(0, 320, (B, T))


def hf_logits(hf_model, ids):
    with torch.no_grad():
        return hf_model(torch.from_numpy(ids)).logits.numpy()


def mlx_logits(weights, ids):
    model = import_example("llama", "model").load_model(weights)
    return np.array(model(mx.array(ids)))


def test_hf_checkpoint_logits_match_transformers(hf_model, converted):
    ids = tokens()
    np.testing.assert_allclose(
        mlx_logits(converted, ids), hf_logits(hf_model, ids), atol=TOL, rtol=0
    )


@pytest.mark.parametrize(
    "variant",
    [dict(tie_word_embeddings=True), dict(max_shard_size="40KB")],
    ids=["tied embeddings (as Llama 3.2 1B)", "sharded safetensors"],
)
def test_hf_variants_match_transformers(variant, tmp_path):
    from transformers import LlamaForCausalLM

    folder = tiny_llama(tmp_path / "hf", seed=3, **variant)
    if "max_shard_size" in variant:
        assert len(list(folder.glob("*.safetensors"))) > 1
    result = run_script("llama/convert.py", folder, tmp_path / "w.safetensors")
    assert result.returncode == 0, result.stderr
    hf = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = tokens(seed=4)
    np.testing.assert_allclose(
        mlx_logits(tmp_path / "w.safetensors", ids),
        hf_logits(hf, ids),
        atol=TOL,
        rtol=0,
    )


def test_meta_checkpoint_logits_match_transformers(hf_model, meta_folder, tmp_path):
    # Meta's wq/wk rows are in interleaved-RoPE order, HF's in halves order: the logits
    # must still agree.
    result = run_script(
        "llama/convert.py", meta_folder, tmp_path / "meta.npz", "--max-seq-len", "96"
    )
    assert result.returncode == 0, result.stderr
    assert "RoPE interleaved (Meta)" in result.stdout
    ids = tokens(seed=1)
    np.testing.assert_allclose(
        mlx_logits(tmp_path / "meta.npz", ids),
        hf_logits(hf_model, ids),
        atol=TOL,
        rtol=0,
    )


def test_single_meta_pth_file_converts(meta_folder, tmp_path):
    result = run_script(
        "llama/convert.py",
        meta_folder / "consolidated.00.pth",
        tmp_path / "one.safetensors",
    )
    assert result.returncode == 0, result.stderr


def test_two_shard_meta_checkpoint_converts_to_the_same_weights(
    hf_model, meta_folder, tmp_path
):
    folder = tmp_path / "llama-tiny-2-shards"
    folder.mkdir()
    meta = hf_to_meta_state_dict(hf_model.state_dict())
    for i, shard in enumerate(split_meta_state_dict(meta, 2)):
        torch.save(shard, folder / f"consolidated.{i:02d}.pth")
    (folder / "params.json").write_text(json.dumps(LLAMA_PARAMS))
    for source, out in ((meta_folder, "one.npz"), (folder, "two.npz")):
        result = run_script("llama/convert.py", source, tmp_path / out)
        assert result.returncode == 0, result.stderr
    read_arrays = import_example("llama", "model").read_arrays
    one, two = read_arrays(tmp_path / "one.npz"), read_arrays(tmp_path / "two.npz")
    assert one.keys() == two.keys()
    for name in one:
        assert mx.array_equal(one[name], two[name]).item(), name


def test_bfloat16_meta_checkpoint_keeps_its_bits(hf_model, tmp_path):
    # Meta ships bfloat16 weights; numpy has no bfloat16, so the converter moves the raw
    # bits.
    folder = tmp_path / "llama-bf16"
    folder.mkdir()
    meta = {
        k: v.to(torch.bfloat16)
        for k, v in hf_to_meta_state_dict(hf_model.state_dict()).items()
    }
    torch.save(meta, folder / "consolidated.00.pth")
    (folder / "params.json").write_text(json.dumps(LLAMA_PARAMS))
    read_arrays = import_example("llama", "model").read_arrays
    for out in (
        "bf16.safetensors",
        "bf16.npz",
    ):  # .npz is read back through NumPy, which has no bfloat16
        result = run_script("llama/convert.py", folder, tmp_path / out)
        assert result.returncode == 0, result.stderr
        converted = read_arrays(tmp_path / out)
        for name in (
            "layers.0.attention.wq.weight",
            "tok_embeddings.weight",
            "norm.weight",
        ):
            assert converted[name].dtype == mx.bfloat16
            expected = meta[name].view(torch.int16).numpy()
            assert np.array_equal(np.array(converted[name].view(mx.int16)), expected), (
                out,
                name,
            )


def test_kv_cache_matches_full_recompute(converted):
    model_module = import_example("llama", "model")
    model = model_module.load_model(converted)
    ids = mx.array(tokens(B=1, T=20, seed=2))
    full = model(ids)  # (1, 20, vocab), no cache
    cache = [model_module.KVCache() for _ in model.layers]
    model_module.KVCache.step = 8  # grow the cache several times within 20 tokens
    try:
        pieces = [model(ids[:, :5], cache)] + [
            model(ids[:, t : t + 1], cache) for t in range(5, 20)
        ]
    finally:
        model_module.KVCache.step = 256
    np.testing.assert_allclose(
        np.array(mx.concatenate(pieces, axis=1)), np.array(full), atol=TOL, rtol=0
    )


def test_generate_is_greedy_decoding_of_the_logits(converted):
    model = import_example("llama", "model").load_model(converted)
    sequence = [1, 17, 42, 99]
    generator = model.generate(mx.array(sequence), temp=0.0)
    for _ in range(6):
        expected = int(mx.argmax(model(mx.array([sequence]))[0, -1]).item())
        sequence.append(next(generator))
        assert sequence[-1] == expected


def test_top_p_samples_only_from_the_nucleus():
    sample = import_example("llama", "model").sample
    logits = mx.log(mx.array([[0.5, 0.3, 0.15, 0.05]] * 2000))
    mx.random.seed(0)
    drawn = np.array(sample(logits, temp=1.0, top_p=0.7))
    assert set(drawn.tolist()) == {
        0,
        1,
    }  # 0.5 < 0.7, so the second token is needed; 0.5 + 0.3 >= 0.7 stops there
    assert abs((drawn == 0).mean() - 0.5 / 0.8) < 0.05
    drawn = np.array(sample(logits, temp=1.0, top_p=1.0))
    assert set(drawn.tolist()) == {0, 1, 2, 3}


def test_float16_conversion_is_close_and_safetensors_equals_npz(
    hf_folder, converted, tmp_path
):
    result = run_script(
        "llama/convert.py", hf_folder, tmp_path / "w.safetensors", "--dtype", "float16"
    )
    assert result.returncode == 0, result.stderr
    model = import_example("llama", "model").load_model(tmp_path / "w.safetensors")
    assert model.tok_embeddings.weight.dtype == mx.float16
    read_arrays = import_example("llama", "model").read_arrays
    assert (
        read_arrays(tmp_path / "w.safetensors")["config"].tolist()
        == read_arrays(converted)["config"].tolist()
    )
    ids = tokens(B=1, T=8)
    np.testing.assert_allclose(
        np.array(model(mx.array(ids)).astype(mx.float32)),
        mlx_logits(converted, ids),
        atol=0.1,
    )


def hf_greedy_continuation(hf_model, sp, prompt, max_tokens):
    """transformers' greedy continuation of BOS + prompt, up to EOS, as text after the
    prompt's text."""
    ids = [sp.bos_id()] + sp.encode(prompt)
    with torch.no_grad():
        out = hf_model.generate(
            torch.tensor([ids]),
            max_new_tokens=max_tokens,
            do_sample=False,
            eos_token_id=sp.eos_id(),
            pad_token_id=sp.eos_id(),
        )
    generated = out[0, len(ids) :].tolist()
    if sp.eos_id() in generated:
        generated = generated[: generated.index(sp.eos_id())]
    return sp.decode(ids + generated)[len(sp.decode(ids)) :]


def test_llama_py_greedy_output_equals_transformers_generate(
    hf_folder, hf_model, converted
):
    from sentencepiece import SentencePieceProcessor

    sp = SentencePieceProcessor(model_file=str(hf_folder / "tokenizer.model"))
    prompt = "call me ishmael"
    result = run_script(
        "llama/llama.py",
        converted,
        hf_folder / "tokenizer.model",
        prompt,
        "--max-tokens",
        "30",
    )
    assert result.returncode == 0, result.stderr
    expected = hf_greedy_continuation(hf_model, sp, prompt, 30)
    assert len(expected) > 10  # real text, not an immediate end of sequence
    assert result.stdout == expected + "\n"
    assert "tokens/s" in result.stderr and "peak memory" in result.stderr


def test_streaming_decoder_prints_spaces_and_multibyte_characters(hf_folder):
    from sentencepiece import SentencePieceProcessor

    llama = import_example("llama", "llama")
    sp = SentencePieceProcessor(model_file=str(hf_folder / "tokenizer.model"))
    prompt, continuation = (
        sp.encode("the quick"),
        sp.encode(" brown café, naïve €"),
    )  # € is byte tokens only
    decoder = llama.StreamingDecoder(sp, prompt)
    pieces = [decoder.add(t) for t in continuation]
    assert "".join(pieces) == sp.decode(prompt + continuation)[len(sp.decode(prompt)) :]
    assert "\ufffd" not in "".join(pieces)


def test_llama_py_does_not_read_stdin(converted, hf_folder):
    from helpers import run_with_unread_stdin

    returncode, _, stderr, unread = run_with_unread_stdin(
        "llama/llama.py",
        converted,
        hf_folder / "tokenizer.model",
        "call me",
        "--max-tokens",
        "3",
    )
    assert returncode == 0, stderr
    assert unread == "a line on stdin\n"


@pytest.mark.parametrize(
    "case, message",
    [
        ("empty prompt", "the prompt is empty"),
        ("long prompt", "the model's context is 96"),
        ("wrong tokenizer", "has 300 tokens but the weights expect 320"),
        ("not a tokenizer", "cannot load"),
        ("missing weights", "does not exist; write it with convert.py"),
        ("corrupt weights", "cannot read"),
        (
            "a model folder as the weights",
            "is a folder, not a weights file; convert it into one first: python "
            "llama/convert.py",
        ),
        (
            "weights and tokenizer swapped",
            "llama.py takes the weights first, then the tokenizer",
        ),
    ],
)
def test_llama_py_bad_input_gives_one_line(
    case, message, converted, hf_folder, tmp_path
):
    from helpers import tiny_sentencepiece

    weights, tokenizer, prompt = converted, hf_folder / "tokenizer.model", "call me"
    if case == "empty prompt":
        prompt = "  "
    elif case == "long prompt":
        prompt = "call me ishmael " * 40
    elif case == "wrong tokenizer":
        tokenizer = tiny_sentencepiece(tmp_path / "small.model", vocab_size=300)
    elif case == "not a tokenizer":
        tokenizer = converted
    elif case == "missing weights":
        weights = tmp_path / "nothing.npz"
    elif case == "corrupt weights":
        weights = tmp_path / "corrupt.npz"
        weights.write_bytes(converted.read_bytes()[:5000])
    elif case == "a model folder as the weights":
        weights = hf_folder
    elif case == "weights and tokenizer swapped":
        weights, tokenizer = tokenizer, weights
    result = run_script("llama/llama.py", weights, tokenizer, prompt)
    assert result.returncode != 0
    assert message in result.stderr.strip().splitlines()[-1], (
        result.stderr
    )  # after argparse's usage, if any
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


def test_convert_names_missing_and_misshaped_weights(hf_folder, tmp_path):
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((hf_folder / "config.json").read_text())
    weights = load_file(hf_folder / "model.safetensors")
    del weights["model.layers.1.mlp.up_proj.weight"]
    weights["model.norm.weight"] = torch.ones(65)
    save_file(weights, broken / "model.safetensors")
    result = run_script("llama/convert.py", broken, tmp_path / "out.npz")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "missing layers.1.feed_forward.w3.weight" in result.stderr
    assert "norm.weight is (65,), expected (64,)" in result.stderr
    assert not (tmp_path / "out.npz").exists()


def test_convert_refuses_what_it_cannot_convert(hf_folder, tmp_path):
    scaled = tiny_llama(
        tmp_path / "scaled",
        rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 5000.0},
    )
    result = run_script("llama/convert.py", scaled, tmp_path / "out.npz")
    assert (
        result.returncode != 0
        and "RoPE scaling 'linear' is not supported" in result.stderr
    )
    result = run_script("llama/convert.py", tmp_path / "nowhere", tmp_path / "out.npz")
    assert result.returncode != 0 and "does not exist" in result.stderr
    result = run_script(
        "llama/convert.py", tmp_path / "consolidated.00.pth", tmp_path / "out.npz"
    )
    assert (
        result.returncode != 0 and "consolidated.00.pth does not exist" in result.stderr
    )
    result = run_script(
        "llama/convert.py", "meta-llama/Llama-2-7b-hf", tmp_path / "out.npz"
    )  # offline in tests
    assert (
        result.returncode != 0
        and "cannot get 'meta-llama/Llama-2-7b-hf' from the Hugging Face Hub"
        in result.stderr
    )
    result = run_script("llama/convert.py", hf_folder, tmp_path / "out.bin")
    assert (
        result.returncode != 0 and "must end in .npz or .safetensors" in result.stderr
    )
    assert not list(tmp_path.glob("out*"))


def test_benchmark_times_the_same_model_in_both_frameworks():
    benchmark = import_example("llama", "benchmark")
    hf = benchmark.torch_model("tiny", "float32", "cpu", seed=0)
    ids = tokens(B=1, T=12)
    np.testing.assert_allclose(
        np.array(benchmark.mlx_model(hf)(mx.array(ids))),
        hf_logits(hf, ids),
        atol=TOL,
        rtol=0,
    )


def test_a_one_process_float_run_reads_neither_tp_nor_quantize(converted, hf_folder):
    """tp.py (mlx.launch runs) and quantize.py (quantized files) are features beside the
    model, as chat.py (--chat), hub.py (Hub names), hf_tokenizer.py (tokenizer.json),
    batch.py (--prompts) and lora.py (--adapter-path) are: a plain run of llama.py with
    a float model and a tokenizer.model imports none of them."""
    import os
    import subprocess
    import sys

    from helpers import ROOT

    code = (
        "import os, runpy, sys; sys.argv = sys.argv[1:]; sys.path.insert(0, "
        "os.path.dirname(sys.argv[0])); "
        "runpy.run_path(sys.argv[0], run_name='__main__'); "
        "print(sorted({'tp', 'quantize', 'chat', 'hub', 'hf_tokenizer', 'batch', "
        "'llama3_tokenizer', 'lora', 'model'} & set(sys.modules)), file=sys.stderr)"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLX_")}
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            code,
            str(ROOT / "llama/llama.py"),
            str(converted),
            str(hf_folder / "tokenizer.model"),
            "call me",
            "--max-tokens",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    assert (
        result.stderr.strip().splitlines()[-1] == "['model']"
    )  # model.py is, so the check would see the others


def test_convert_of_a_large_checkpoint_says_how_far_it_is(
    hf_folder, tmp_path, monkeypatch, capsys
):
    import sys

    convert = import_example("llama", "convert")
    monkeypatch.setattr(
        convert, "PROGRESS_BYTES", 1
    )  # this tiny checkpoint counts as large
    monkeypatch.setattr(
        sys, "argv", ["convert.py", str(hf_folder), str(tmp_path / "w.safetensors")]
    )
    convert.main()
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("converting 21 arrays: ") and lines[0].endswith(" MB"), (
        lines
    )
    assert any(
        line.startswith("  100% in ") and line.endswith(" s left") for line in lines
    ), lines
    assert lines[-1] == f"writing {tmp_path / 'w.safetensors'}"


def test_benchmark_says_what_it_does_then_how_long_each_part_takes():
    result = run_script(
        "llama/benchmark.py",
        "--preset",
        "tiny",
        "--prompt-tokens",
        "8",
        "--max-tokens",
        "4",
        "--repeats",
        "2",
    )
    assert result.returncode == 0, result.stderr
    progress = [line for line in result.stderr.splitlines() if line.startswith("[")]
    assert "building a random tiny-preset float32 Llama" in progress[0], result.stderr
    for framework in ("PyTorch", "MLX"):
        assert any(
            f"{framework}: warm-up run" in line and "2 timed runs, about" in line
            for line in progress
        ), progress


def test_llama_py_warns_when_mlx_computes_with_the_reference_blas(converted, hf_folder):
    # This process has loaded MLX as llama.py will: the same libraries are mapped (or
    # not) there.
    maps = open("/proc/self/maps").read() if sys.platform.startswith("linux") else ""
    reference = (
        mx.default_device() == mx.cpu
        and "mlx_cpu.libs/libblas" in maps
        and "/libopenblas" not in maps
    )
    result = run_script(
        "llama/llama.py",
        converted,
        hf_folder / "tokenizer.model",
        "call me",
        "--max-tokens",
        "2",
    )
    assert result.returncode == 0, result.stderr
    assert ("warning: MLX is using the reference BLAS" in result.stderr) == reference, (
        result.stderr
    )
