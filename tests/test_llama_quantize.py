"""llama/ quantized models (quantize.py): convert.py --quantize, mlx-lm's pre-quantized
layout, loading with no flag, generation, and one-line errors for quantizations that
cannot work."""

import json
from dataclasses import replace

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from helpers import LLAMA_CONFIG, import_example, run_script, tiny_llama
from safetensors.numpy import load_file

TOL = 1e-4  # float32 logits

HF_LINEARS = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
)


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    return tiny_llama(tmp_path_factory.mktemp("llama_quantize") / "hf")


pytestmark = pytest.mark.usefixtures("llama_on_path", "on_cpu")


def arrays(model):
    return {k: np.array(v) for k, v in nn.utils.tree_flatten(model.parameters())}


def converted_model(folder, tmp_path, group_size, bits, suffix=".safetensors"):
    """convert.convert(..., quantize) saved with convert.save and read back with
    load_model."""
    convert = import_example("llama", "convert")
    args, weights = convert.convert(
        str(folder), quantization={"group_size": group_size, "bits": bits}
    )
    convert.save(args, weights, tmp_path / f"q{suffix}")
    return import_example("llama", "model").load_model(tmp_path / f"q{suffix}")


def dequantized_model(quantized):
    """A float32 Llama without quantization whose weights are `quantized`'s,
    dequantized."""
    model_module = import_example("llama", "model")
    q = quantized.args.quantization
    params = dict(nn.utils.tree_flatten(quantized.parameters()))
    weights = []
    for name, value in params.items():
        layer = name.removesuffix("weight")
        if name.endswith((".scales", ".biases")):
            continue
        if layer + "scales" in params:
            value = mx.dequantize(
                value,
                params[layer + "scales"],
                params[layer + "biases"],
                q["group_size"],
                q["bits"],
            )
        weights.append((name, value.astype(mx.float32)))
    model = model_module.Llama(replace(quantized.args, quantization=None))
    model.load_weights(weights)
    return model


def tokens(T=24, seed=0):
    return mx.array(
        np.random.default_rng(seed).integers(0, LLAMA_CONFIG["vocab_size"], (2, T))
    )


@pytest.mark.parametrize("bits, group_size", [(4, 64), (8, 32)])
def test_quantized_logits_equal_the_dequantized_float32_model(
    bits, group_size, hf_folder, tmp_path
):
    model_module = import_example("llama", "model")
    quantized = converted_model(hf_folder, tmp_path, group_size, bits)
    assert quantized.args.quantization == {"group_size": group_size, "bits": bits}
    assert isinstance(quantized.layers[0].feed_forward.w2, nn.QuantizedLinear)
    assert isinstance(quantized.output, nn.QuantizedLinear)
    assert isinstance(quantized.tok_embeddings, nn.QuantizedEmbedding)
    assert quantized.layers[0].attention.wq.weight.dtype == mx.uint32
    ids = tokens()
    logits = np.array(quantized(ids))
    np.testing.assert_allclose(
        logits, np.array(dequantized_model(quantized)(ids)), atol=TOL, rtol=0
    )
    # ... and quantization did change them: the float32 checkpoint's logits are
    # measurably elsewhere.
    original = model_module.load_model(_float32(hf_folder, tmp_path))
    assert np.abs(logits - np.array(original(ids))).max() > 10 * TOL


def _float32(folder, tmp_path):
    convert = import_example("llama", "convert")
    args, weights = convert.convert(str(folder))
    convert.save(args, weights, tmp_path / "f32.npz")
    return tmp_path / "f32.npz"


def test_tied_embedding_is_the_quantized_output_layer(tmp_path):
    folder = tiny_llama(tmp_path / "tied", tie_word_embeddings=True)
    quantized = converted_model(folder, tmp_path, 32, 4)
    assert "output" not in quantized
    ids = tokens(T=8)
    np.testing.assert_allclose(
        np.array(quantized(ids)),
        np.array(dequantized_model(quantized)(ids)),
        atol=TOL,
        rtol=0,
    )


def test_convert_quantize_saves_loads_and_generates(hf_folder, tmp_path):
    from sentencepiece import SentencePieceProcessor

    model_module = import_example("llama", "model")
    for suffix in (".npz", ".safetensors"):
        result = run_script(
            "llama/convert.py",
            hf_folder,
            tmp_path / f"q{suffix}",
            "--quantize",
            "--q-bits",
            "4",
            "--q-group-size",
            "32",
        )
        assert result.returncode == 0, result.stderr
        assert "4-bit in groups of 32" in result.stdout
    config = json.loads(
        bytes(model_module.read_arrays(tmp_path / "q.npz")["config"].tolist()).decode()
    )
    assert config["quantization"] == {"group_size": 32, "bits": 4}
    npz, safetensors = (
        model_module.load_model(tmp_path / f"q{suffix}")
        for suffix in (".npz", ".safetensors")
    )
    in_process = converted_model(hf_folder, tmp_path, 32, 4)
    for a, b, c in zip(
        arrays(npz).items(), arrays(safetensors).items(), arrays(in_process).items()
    ):
        assert (
            a[0] == b[0] == c[0]
            and np.array_equal(a[1], b[1])
            and np.array_equal(a[1], c[1])
        ), a[0]

    sp = SentencePieceProcessor(model_file=str(hf_folder / "tokenizer.model"))
    ids = [sp.bos_id()] + sp.encode("call me ishmael")
    generated = []
    for token in safetensors.generate(mx.array(ids)):
        if token == sp.eos_id() or len(generated) == 20:
            break
        generated.append(token)
    expected = sp.decode(ids + generated)[len(sp.decode(ids)) :]
    result = run_script(
        "llama/llama.py",
        tmp_path / "q.safetensors",
        hf_folder / "tokenizer.model",
        "call me ishmael",
        "--max-tokens",
        "20",
    )
    assert result.returncode == 0, result.stderr
    assert len(expected) > 5 and result.stdout == expected + "\n"


def mlx_lm_folder(
    hf_folder,
    folder,
    group_size=64,
    bits=4,
    config_group_size=None,
    leave_lm_head=True,
    **extra,
):
    """`hf_folder` as mlx-lm saves a quantized model: config.json with "quantization"
    and packed weights with .scales/.biases beside them; lm_head left in floating point
    (a per-layer `false`)."""
    folder.mkdir()
    quantization = {
        "group_size": config_group_size or group_size,
        "bits": bits,
        **extra,
    }
    if leave_lm_head:
        quantization["lm_head"] = False
    config = {
        **json.loads((hf_folder / "config.json").read_text()),
        "quantization": quantization,
        "quantization_config": quantization,
    }
    (folder / "config.json").write_text(json.dumps(config))
    weights = {}
    for name, value in load_file(hf_folder / "model.safetensors").items():
        value = mx.array(value)
        quantized = (
            name.startswith("model.embed_tokens")
            or name.split(".")[-2] in HF_LINEARS
            or (name.startswith("lm_head") and not leave_lm_head)
        )
        if quantized:
            prefix = name.removesuffix("weight")
            weights[name], weights[prefix + "scales"], weights[prefix + "biases"] = (
                mx.quantize(value, group_size, bits)
            )
        else:
            weights[name] = value
    mx.save_safetensors(
        str(folder / "model.safetensors"), weights, metadata={"format": "mlx"}
    )
    return folder


def test_mlx_lm_layout_converts_to_the_same_arrays(hf_folder, tmp_path):
    folder = mlx_lm_folder(hf_folder, tmp_path / "mlx-lm")
    result = run_script(
        "llama/convert.py", folder, tmp_path / "from-mlx-lm.safetensors"
    )
    assert result.returncode == 0, result.stderr
    model_module = import_example("llama", "model")
    from_mlx_lm = arrays(model_module.load_model(tmp_path / "from-mlx-lm.safetensors"))
    quantized_here = arrays(converted_model(hf_folder, tmp_path, 64, 4))
    assert from_mlx_lm.keys() == quantized_here.keys()
    for name, value in quantized_here.items():
        assert from_mlx_lm[name].dtype == value.dtype and np.array_equal(
            from_mlx_lm[name], value
        ), name
    # --dtype changes the scales, biases and norms; the packed weights stay as they
    # were.
    result = run_script(
        "llama/convert.py", folder, tmp_path / "f16.npz", "--dtype", "float16"
    )
    assert result.returncode == 0, result.stderr
    f16 = arrays(model_module.load_model(tmp_path / "f16.npz"))
    assert (
        f16["layers.0.attention.wq.scales"].dtype == np.float16
        and f16["norm.weight"].dtype == np.float16
    )
    assert np.array_equal(
        f16["layers.0.attention.wq.weight"],
        quantized_here["layers.0.attention.wq.weight"],
    )


@pytest.mark.parametrize(
    "case, message",
    [
        ("--q-bits 3", "argument --q-bits: invalid choice: 3 (choose from 4, 8)"),
        ("--q-bits 0", "argument --q-bits: invalid choice: 0 (choose from 4, 8)"),
        (
            "--q-group-size 48",
            "argument --q-group-size: invalid choice: 48 (choose from 32, 64, 128)",
        ),
        (
            "--q-group-size 128",
            "dim 64 is not a multiple of the quantization group size 128; use a group "
            "size of 32 or 64",
        ),
        ("--q-bits without --quantize", "--q-bits and --q-group-size need --quantize"),
        (
            "mlx-lm scales that do not fit",
            "layers.0.attention.wk.biases is (32, 2), expected (32, 1)",
        ),
        ("mlx-lm 3-bit", "config.json: 3-bit quantization is not supported"),
        ("mlx-lm mixed bits", "per-layer quantization (model.layers.0.mlp.down_proj"),
        (
            "mlx-lm requantized",
            "already quantized (4 bits, groups of 64); convert it without --quantize",
        ),
        ("gptq", "'gptq'-quantized checkpoints are not supported"),
    ],
)
def test_convert_refuses_quantizations_that_cannot_work_with_one_line(
    case, message, hf_folder, tmp_path
):
    source, flags = (
        hf_folder,
        ["--quantize", *case.split()[:2]] if case.startswith("--q-") else [],
    )
    if case == "--q-bits without --quantize":
        flags = ["--q-bits", "8"]
    elif (
        case == "mlx-lm scales that do not fit"
    ):  # quantized with groups of 32, config.json says 64
        source = mlx_lm_folder(
            hf_folder, tmp_path / "m", group_size=32, config_group_size=64
        )
    elif case == "mlx-lm 3-bit":
        source = mlx_lm_folder(hf_folder, tmp_path / "m", bits=3)
    elif case == "mlx-lm mixed bits":
        source = mlx_lm_folder(
            hf_folder,
            tmp_path / "m",
            **{"model.layers.0.mlp.down_proj": {"group_size": 64, "bits": 8}},
        )
    elif case == "mlx-lm requantized":
        source, flags = (
            mlx_lm_folder(hf_folder, tmp_path / "m"),
            ["--quantize", "--q-bits", "8"],
        )
    elif case == "gptq":
        source = tmp_path / "gptq"
        source.mkdir()
        config = {
            **json.loads((hf_folder / "config.json").read_text()),
            "quantization_config": {"quant_method": "gptq"},
        }
        (source / "config.json").write_text(json.dumps(config))
        (source / "model.safetensors").write_bytes(
            (hf_folder / "model.safetensors").read_bytes()
        )
    result = run_script(
        "llama/convert.py", source, tmp_path / "out.safetensors", *flags
    )
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert message in lines[-1] and (
        len(lines) == 1 or lines[0].startswith("usage:")
    ), result.stderr  # argparse's
    assert not list(tmp_path.glob("*out*")) and not list(tmp_path.glob("*.safetensors"))


def test_llama_py_refuses_a_file_whose_scales_do_not_fit_with_one_line(
    hf_folder, tmp_path, monkeypatch
):
    convert = import_example("llama", "convert")
    args, weights = convert.convert(
        str(hf_folder), quantization={"group_size": 64, "bits": 4}
    )
    convert.save(
        replace(args, quantization={"group_size": 32, "bits": 4}),
        weights,
        tmp_path / "bad.npz",
    )
    result = run_script(
        "llama/llama.py", tmp_path / "bad.npz", hf_folder / "tokenizer.model", "call me"
    )
    assert result.returncode != 0 and result.stdout == ""
    assert "the configuration says 4-bit weights in groups of 32" in result.stderr
    assert "layers.0.attention.wq.scales is (64, 1), expected (64, 2)" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_logit_distance_is_zero_for_the_same_logits_and_counts_top1_changes():
    benchmark = import_example("llama", "benchmark")
    logits = mx.random.normal((1, 6, 50), key=mx.random.key(1))
    kl, same = benchmark.logit_distance(logits, logits)
    assert abs(kl) < 1e-6 and same == 1.0
    changed = logits.at[0, :3, 0].add(100.0)  # three positions now prefer token 0
    kl, same = benchmark.logit_distance(logits, changed)
    assert kl > 1.0 and same == 0.5


def test_benchmark_quantize_prints_speed_memory_and_quality():
    result = run_script(
        "llama/benchmark.py",
        "--preset",
        "tiny",
        "--quantize",
        "4",
        "8",
        "--q-group-size",
        "32",
        "--prompt-tokens",
        "16",
        "--max-tokens",
        "4",
        "--repeats",
        "1",
    )
    assert result.returncode == 0, result.stderr
    rows = {line.strip().split("  ")[0]: line for line in result.stdout.splitlines()}
    assert {"float32", "4-bit", "8-bit"} <= set(rows), result.stdout
    assert (
        "mean KL" in result.stdout and "%" in rows["8-bit"] and "peak" in result.stdout
    )


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--q-bits", "3"], "invalid choice: 3"),
        (["--q-group-size", "48"], "invalid choice: 48"),
    ],
)
def test_unsupported_quantization_is_refused_before_reading_the_checkpoint(
    flags, message, tmp_path
):
    # A Hub name that cannot be fetched offline: the settings are refused first, so
    # nothing would be downloaded.
    result = run_script(
        "llama/convert.py",
        "meta-llama/Llama-2-7b-hf",
        tmp_path / "q.safetensors",
        "--quantize",
        *flags,
    )
    assert result.returncode != 0 and message in result.stderr.strip().splitlines()[-1]
    assert "Hub" not in result.stderr and not (tmp_path / "q.safetensors").exists()
