"""llama/lora.py: LoRA and QLoRA adapters beside an unchanged model, checked against
PEFT; training, exact resume, fusing, llama.py --adapter-path, and one line with a
non-zero exit for each kind of bad input."""

import gc
import json
import math
import signal
import subprocess
import sys

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
from helpers import (
    LLAMA_CONFIG,
    ROOT,
    import_example,
    run_script,
    tiny_llama,
    tiny_lora_data,
)
from mlx.utils import tree_flatten

TOL = 1e-5  # float32


pytestmark = pytest.mark.usefixtures("llama_on_path", "on_cpu")


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    return tiny_llama(tmp_path_factory.mktemp("llama_lora") / "hf")


@pytest.fixture(scope="module")
def weights(hf_folder):
    """{"float32" | "float16" | "4bit" | "8bit": path}: the tiny Llama as convert.py
    writes it."""
    convert = import_example("llama", "convert")
    paths = {}
    for name, dtype, quantization in (
        ("float32", None, None),
        ("float16", "float16", None),
        ("4bit", None, {"group_size": 64, "bits": 4}),
        ("8bit", None, {"group_size": 64, "bits": 8}),
    ):
        args, arrays = convert.convert(
            str(hf_folder), dtype=dtype, quantization=quantization
        )
        convert.save(args, arrays, hf_folder.parent / f"{name}.safetensors")
        paths[name] = hf_folder.parent / f"{name}.safetensors"
    return paths


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_lora_data(tmp_path_factory.mktemp("lora_data") / "text")


def lora_adapters():
    return import_example("llama", "lora_adapters")


def lora_data():
    return import_example("llama", "lora_data")


def lora_training():
    return import_example("llama", "lora_training")


def load(path):
    return import_example("llama", "model").load_model(path)


def arrays(model):
    return {k: np.array(v) for k, v in tree_flatten(model.parameters())}


def tokens(T=24, seed=0):
    return mx.array(
        np.random.default_rng(seed).integers(0, LLAMA_CONFIG["vocab_size"], (2, T))
    )


def random_adapters(model, seed=1, std=0.3):
    """Give every LoRALinear of `model` a nonzero B (untrained ones change nothing)."""
    rng = np.random.default_rng(seed)
    for _, module in model.named_modules():
        if isinstance(module, lora_adapters().LoRALinear):
            module.lora_b = mx.array(
                rng.normal(0, std, module.lora_b.shape).astype(np.float32)
            )
    return model


def run_lora(*args, cwd=None):
    return run_script("llama/lora.py", *args, cwd=cwd, timeout=300)


def train_args(weights_file, hf_folder, data, adapters, *more):
    return [
        "--model",
        weights_file,
        "--tokenizer",
        hf_folder / "tokenizer.model",
        "--data",
        data,
        "--train",
        "--adapter-path",
        adapters,
        "--steps-per-eval",
        "0",
        "--val-batches",
        "1",
        *map(str, more),
    ]


def saved(folder):
    """({name: array} of adapters.safetensors, its metadata)."""
    loaded, metadata = mx.load(
        str(folder / "adapters.safetensors"), return_metadata=True
    )
    return {k: np.array(v) for k, v in loaded.items()}, metadata


BLAS_WARNING = (
    "warning: MLX is using the reference BLAS"  # on a CPU without OpenBLAS preloaded
)


def log_softmax(logits):
    """log p of (T, vocab) logits, in float64: the reference for the loss."""
    logits = np.asarray(logits, dtype=np.float64)
    top = logits.max(-1, keepdims=True)
    return logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))


def fuse_args(weights_file, adapters, save_path):
    return [
        "--model",
        weights_file,
        "--adapter-path",
        adapters,
        "--fuse",
        "--save-path",
        save_path,
    ]


def assert_one_error_line(result):
    assert result.returncode != 0
    lines = [
        line
        for line in result.stderr.strip().splitlines()
        if not line.startswith(BLAS_WARNING)
    ]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


# ---- The layer, against PEFT ---------------------------------------------------------


def test_lora_layer_equals_peft_lora_linear():
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    peft_model = get_peft_model(
        torch.nn.Sequential(torch.nn.Linear(64, 48, bias=False)),
        LoraConfig(r=4, lora_alpha=12, target_modules=["0"], lora_dropout=0.0),
    )
    layer = peft_model.base_model.model[0]
    # a change of the size of the base output
    a, b = 0.1 * torch.randn(4, 64), 0.1 * torch.randn(48, 4)
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(a)
        layer.lora_B["default"].weight.copy_(b)
    x = torch.randn(3, 5, 64)
    expected = peft_model(x).detach().numpy()

    linear = nn.Linear(64, 48, bias=False)
    linear.weight = mx.array(layer.base_layer.weight.detach().numpy())
    ours = lora_adapters().LoRALinear(linear, rank=4, alpha=12)
    assert ours.scale == layer.scaling["default"] == 3.0
    # PEFT's init
    assert np.all(np.abs(np.array(ours.lora_a)) <= 1 / 8)
    assert not np.any(np.array(ours.lora_b))
    ours.lora_a, ours.lora_b = mx.array(a.numpy()), mx.array(b.numpy())
    np.testing.assert_allclose(
        np.array(ours(mx.array(x.numpy()))), expected, rtol=TOL, atol=TOL
    )


def test_adapted_llama_logits_equal_peft_on_transformers(hf_folder, weights):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    hf = get_peft_model(
        LlamaForCausalLM.from_pretrained(hf_folder, dtype=torch.float32).eval(),
        LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0
        ),
    )
    model = lora_adapters().linear_to_lora_layers(
        load(weights["float32"]), [0, 1], ["wq", "wv"], rank=4, alpha=8
    )
    rng = np.random.default_rng(0)
    for i in range(2):
        for hf_name, ours in (
            ("q_proj", model.layers[i].attention.wq),
            ("v_proj", model.layers[i].attention.wv),
        ):
            peft_layer = getattr(hf.base_model.model.model.layers[i].self_attn, hf_name)
            for name, shape in (("A", ours.lora_a.shape), ("B", ours.lora_b.shape)):
                value = rng.normal(0, 0.3, shape).astype(np.float32)
                with torch.no_grad():
                    getattr(peft_layer, f"lora_{name}")["default"].weight.copy_(
                        torch.from_numpy(value)
                    )
                setattr(ours, f"lora_{name.lower()}", mx.array(value))
    ids = tokens()
    with torch.no_grad():
        expected = hf(torch.tensor(np.array(ids), dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(np.array(model(ids)), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["float32", "4bit"])
def test_untrained_adapters_give_exactly_the_base_logits(name, weights):
    model = load(weights[name])
    before = np.array(model(tokens()))
    lora_adapters().linear_to_lora_layers(
        model, [0, 1], list(lora_adapters().LINEAR_KEYS), rank=8, alpha=16
    )
    assert np.array_equal(np.array(model(tokens())), before)


@pytest.mark.parametrize("bits", [4, 8])
def test_dequantizing_layers_give_the_quantized_outputs_and_input_gradients(bits):
    # lora.py trains and tests a quantized model through dense products with its
    # dequantized weights; llama.py generates with mx.quantized_matmul. The same
    # function of the input, and the same gradient.
    mx.random.seed(0)
    linear = nn.QuantizedLinear.from_linear(nn.Linear(128, 96), 64, bits)  # with a bias
    # as a tied output layer
    embedding = nn.QuantizedEmbedding.from_embedding(nn.Embedding(96, 128), 64, bits)
    x, cotangent = mx.random.normal((3, 5, 128)), mx.random.normal((3, 5, 96))
    expected = [mx.vjp(f, [x], [cotangent]) for f in (linear, embedding.as_linear)]
    lora_training().dequantizing_layers(nn.Sequential(linear, embedding))
    assert (
        type(linear) is lora_training().DequantizingLinear
        and type(embedding) is lora_training().DequantizingEmbedding
    )
    for f, (outputs, grads) in zip((linear, embedding.as_linear), expected):
        outputs_dense, grads_dense = mx.vjp(f, [x], [cotangent])
        np.testing.assert_allclose(
            np.array(outputs_dense[0]), np.array(outputs[0]), rtol=TOL, atol=TOL
        )
        np.testing.assert_allclose(
            np.array(grads_dense[0]), np.array(grads[0]), rtol=TOL, atol=TOL
        )


@pytest.mark.parametrize("checkpoint", [False, True])
def test_qlora_loss_and_gradients_through_dequantized_weights_equal_quantized_matmuls(
    checkpoint, weights
):
    model = random_adapters(
        lora_adapters().linear_to_lora_layers(
            load(weights["4bit"]), [0, 1], ["wq", "wv", "w2"], 4, 8
        )
    )
    loss_and_grad = nn.value_and_grad(model, lora_training().loss_fn)
    batch = lora_data().pad(examples())
    (loss, _), grads = loss_and_grad(model, *batch)
    lora_training().dequantizing_layers(model)
    if checkpoint:
        lora_training().checkpoint_blocks(model)
    (loss_dense, _), grads_dense = loss_and_grad(model, *batch)
    assert abs(loss.item() - loss_dense.item()) < TOL
    for (k, g), (_, g2) in zip(tree_flatten(grads), tree_flatten(grads_dense)):
        np.testing.assert_allclose(
            np.array(g2), np.array(g), rtol=1e-5, atol=1e-6, err_msg=k
        )


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("checkpoint", [False, True], ids=["", "grad-checkpoint"])
def test_a_qlora_step_never_holds_the_float_weights_of_all_blocks(compiled, checkpoint):
    # A plain x @ dequantize(W).T would keep every block's float W for the backward
    # pass, and so would mx.compile (a GPU's step) if it could merge the forward pass's
    # dequantize with the backward pass's or with --grad-checkpoint's recomputation
    # (measured: 1.07-1.17x all blocks' float weights at the peak before
    # dequantized_product's mx.depends; 0.17-0.25x after, 0.33-0.35x for an eager
    # checkpointed step). Wide layers and 8 tokens, so the weights dwarf the
    # activations.
    model_py = import_example("llama", "model")
    model = model_py.Llama(
        model_py.ModelArgs(
            dim=384, n_layers=12, n_heads=3, vocab_size=256, hidden_dim=1536
        )
    )
    nn.quantize(model, 64, 4)
    lora_training().dequantizing_layers(
        lora_adapters().linear_to_lora_layers(
            model, range(12), ["wq", "wv"], rank=4, alpha=8
        )
    )
    if checkpoint:
        lora_training().checkpoint_blocks(model)
    float_bytes = 4 * sum(  # float32 (out, in) weights
        m.scales.size * m.group_size
        for block in model.layers
        for m in block.modules()
        if isinstance(m, nn.QuantizedLinear)
    )
    optimizer = optim.AdamW(learning_rate=1e-2)
    optimizer.init(model.trainable_parameters())
    step = lora_training().make_step(model, optimizer, compile=compiled)
    batch = lora_data().pad([(list(range(1, 10)), [True] * 9)])
    mx.eval(model.parameters(), optimizer.state, batch)
    gc.collect()
    mx.clear_cache()
    resting = mx.get_active_memory()
    mx.reset_peak_memory()
    mx.eval(step(*batch), model.state, optimizer.state)
    bound = float_bytes / (2 if checkpoint and not compiled else 3)
    assert mx.get_peak_memory() - resting < bound, (
        mx.get_peak_memory() - resting,
        float_bytes,
    )


# ---- Training, in process ------------------------------------------------------------


def examples(n=4):
    return [(list(range(3, 20 + i)), [True] * (17 + i)) for i in range(n)]


@pytest.mark.parametrize("name", ["float32", "4bit", "8bit"])
def test_training_changes_the_adapters_only_and_a_quantized_base_stays_quantized(
    name, weights
):
    model = load(weights[name])
    before = arrays(model)
    lora_training().dequantizing_layers(
        lora_adapters().linear_to_lora_layers(
            model, [0, 1], ["wq", "wv", "w2"], rank=4, alpha=8
        )
    )
    optimizer = optim.AdamW(learning_rate=1e-2, bias_correction=True)
    optimizer.init(model.trainable_parameters())
    step = lora_training().make_step(model, optimizer)
    for _ in range(3):
        loss, n, finite = step(*lora_data().pad(examples()))
        mx.eval(loss, n, finite, model.state, optimizer.state)
        assert finite.item()
    after = arrays(model)
    base = {
        k.replace(".linear.", "."): v for k, v in after.items() if ".lora_" not in k
    }
    assert base.keys() == before.keys()
    assert all(np.array_equal(base[k], before[k]) for k in before), (
        "a base parameter changed"
    )
    assert all(np.any(v) for k, v in after.items() if k.endswith("lora_b")), (
        "an adapter did not train"
    )
    quantized = isinstance(model.layers[0].attention.wq.linear, nn.QuantizedLinear)
    assert quantized == (name != "float32")


def test_the_compiled_step_trains_as_the_plain_one(weights):
    # lora.py compiles its step on a GPU only (on a CPU, MLX's compiler takes about 10 s
    # the first time): this is the check, on the CPU, that the compiled step carries the
    # model's and the optimizer's state, on a QLoRA model with its dequantizing layers
    # (mx.custom_function) and checkpointed blocks.
    trained = []
    for compile in (False, True):
        mx.random.seed(0)
        model = lora_adapters().linear_to_lora_layers(
            load(weights["4bit"]), [0, 1], ["wq", "wv"], rank=4, alpha=8
        )
        lora_training().checkpoint_blocks(lora_training().dequantizing_layers(model))
        optimizer = optim.AdamW(learning_rate=1e-2, bias_correction=True)
        optimizer.init(model.trainable_parameters())
        step = lora_training().make_step(model, optimizer, compile=compile)
        for _ in range(3):
            mx.eval(step(*lora_data().pad(examples())), model.state, optimizer.state)
        trained.append(
            {k: np.array(v) for k, v in tree_flatten(model.trainable_parameters())}
        )
    assert trained[0].keys() == trained[1].keys() and np.any(
        trained[0]["layers.0.attention.wq.lora_b"]
    )
    for k in trained[0]:
        np.testing.assert_allclose(
            trained[1][k], trained[0][k], rtol=1e-5, atol=1e-6, err_msg=k
        )


def test_grad_checkpoint_gives_the_same_loss_and_gradients(weights):
    model = random_adapters(
        lora_adapters().linear_to_lora_layers(
            load(weights["float32"]), [0, 1], ["wq", "wv"], 4, 8
        )
    )
    loss_and_grad = nn.value_and_grad(model, lora_training().loss_fn)
    batch = lora_data().pad(examples())
    (loss, _), grads = loss_and_grad(model, *batch)
    lora_training().checkpoint_blocks(model)
    (loss_checkpointed, _), grads_checkpointed = loss_and_grad(model, *batch)
    assert abs(loss.item() - loss_checkpointed.item()) < TOL
    for (k, g), (_, g2) in zip(tree_flatten(grads), tree_flatten(grads_checkpointed)):
        np.testing.assert_allclose(
            np.array(g2), np.array(g), rtol=1e-5, atol=1e-6, err_msg=k
        )


def test_the_loss_is_the_mean_cross_entropy_of_the_counted_tokens_only(weights):
    model = load(weights["float32"])
    batch = [
        (list(range(5, 25)), [False] * 12 + [True] * 8),
        (list(range(7, 19)), [False] * 3 + [True] * 9),
    ]
    inputs, targets, mask = lora_data().pad(batch)
    # the longest, 20 tokens, less one, padded to a multiple of 32
    assert inputs.shape == (2, 32)
    loss, n = lora_training().loss_fn(model, inputs, targets, mask)
    expected = []
    for t, counted in batch:
        log_p = log_softmax(np.array(model(mx.array([t[:-1]])))[0])
        expected += [-log_p[j - 1, t[j]] for j in range(1, len(t)) if counted[j]]
    assert n.item() == len(expected) == 8 + 9
    assert abs(loss.item() - np.mean(expected)) < 1e-5


def test_mask_prompt_counts_only_the_completion_and_the_assistant_reply(
    hf_folder, weights
):
    tokenizer = import_example("llama", "tokenizer").load_tokenizer(
        hf_folder / "tokenizer.model"
    )
    example = {"prompt": "call me", "completion": " ishmael some years ago"}
    tokens_, counted = lora_data().encode(example, tokenizer, mask_prompt=True)
    prompt, completion = (
        tokenizer.prompt("call me"),
        tokenizer.encode(" ishmael some years ago"),
    )
    assert tokens_ == prompt + completion + [tokenizer.eos_id]
    assert counted == [False] * len(prompt) + [True] * (len(completion) + 1)
    assert lora_data().encode(example, tokenizer, False)[1] == [True] * len(tokens_)

    messages = [
        {"role": "user", "content": "call me"},
        {"role": "assistant", "content": "ishmael"},
        {"role": "user", "content": "how long"},
        {"role": "assistant", "content": "never mind"},
    ]
    tokens_, counted = lora_data().encode({"messages": messages}, tokenizer, True)
    chat_tokens = import_example("llama", "chat").chat_tokens
    assert tokens_[: len(chat_tokens(tokenizer, messages[:3]))] == chat_tokens(
        tokenizer, messages[:3]
    )
    replies = [t for t, c in zip(tokens_, counted) if c]
    # the two replies, each with its EOS
    assert tokenizer.decode(replies) == "ishmael never mind"
    assert replies.count(tokenizer.eos_id) == 2 and tokens_[-1] == tokenizer.eos_id


def test_mask_prompt_on_the_command_line_counts_the_completion_tokens(
    hf_folder, weights, tmp_path
):
    data = tiny_lora_data(tmp_path / "completion", kind="completion")
    tokenizer = import_example("llama", "tokenizer").load_tokenizer(
        hf_folder / "tokenizer.model"
    )
    lines = [
        json.loads(line) for line in (data / "train.jsonl").read_text().splitlines()
    ]
    expected = sum(len(tokenizer.encode(line["completion"])) + 1 for line in lines)
    result = run_lora(
        *train_args(
            weights["float32"],
            hf_folder,
            data,
            tmp_path / "a",
            "--iters",
            1,
            "--mask-prompt",
        )
    )
    assert result.returncode == 0, result.stderr
    assert "train.jsonl: 16 examples, " in result.stdout
    assert f", {expected} of them counted in the loss" in result.stdout


# ---- Fusing --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["float32", "4bit"])
def test_fused_logits_equal_the_adapted_model(name, weights, tmp_path):
    model = random_adapters(
        lora_adapters().linear_to_lora_layers(
            load(weights[name]), [0, 1], list(lora_adapters().LINEAR_KEYS), 4, 8
        )
    )
    adapted = np.array(model(tokens()))
    lora_adapters().fuse(model)
    convert = import_example("llama", "convert")
    convert.save(
        model.args, dict(tree_flatten(model.parameters())), tmp_path / "f.safetensors"
    )
    fused = load(tmp_path / "f.safetensors")
    assert fused.args.quantization is None and isinstance(
        fused.layers[0].feed_forward.w1, nn.Linear
    )
    # W x + s B (A x) and (W + s B A) x round differently: within 1e-5 of the logits'
    # scale (about 9 here).
    assert (
        np.abs(np.array(fused(tokens())) - adapted).max() <= TOL * np.abs(adapted).max()
    )


# ---- The command line ----------------------------------------------------------------


def train_losses(stdout):
    return [
        float(line.split("train loss ")[1].split(",")[0])
        for line in stdout.splitlines()
        if "train loss" in line
    ]


def test_training_loss_falls_and_test_reports_loss_and_perplexity(
    hf_folder, weights, data, tmp_path
):
    result = run_lora(
        *train_args(
            weights["float32"],
            hf_folder,
            data,
            tmp_path / "a",
            "--iters",
            30,
            "--learning-rate",
            "1e-2",
            "--test",
        )
    )
    assert result.returncode == 0, result.stderr
    losses = train_losses(result.stdout)
    assert len(losses) == 4 and losses[-1] < 0.8 * losses[0], result.stdout
    test_line = result.stdout.strip().splitlines()[-1]
    loss, perplexity = (
        float(test_line.split()[2].rstrip(",")),
        float(test_line.split()[4]),
    )
    assert (
        test_line.startswith("test loss ")
        and abs(perplexity - math.exp(loss)) < 1e-3 * perplexity
    )
    assert saved(tmp_path / "a")[1]["step"] == "30"
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert (config["rank"], config["alpha"], config["scale"]) == (8, 16, 2.0)
    assert config["layers"] == [0, 1] and config["keys"] == ["wq", "wv"]
    assert config["base_model"]["dim"] == 64


def test_test_alone_reports_the_base_models_mean_cross_entropy(
    hf_folder, weights, data, tmp_path
):
    result = run_lora(
        "--model",
        weights["float32"],
        "--tokenizer",
        hf_folder / "tokenizer.model",
        "--data",
        data,
        "--test",
        "--adapter-path",
        tmp_path / "none",
    )
    assert result.returncode == 0, result.stderr
    tokenizer = import_example("llama", "tokenizer").load_tokenizer(
        hf_folder / "tokenizer.model"
    )
    model, nll = load(weights["float32"]), []
    for line in (data / "test.jsonl").read_text().splitlines():
        ids = tokenizer.prompt(json.loads(line)["text"]) + [tokenizer.eos_id]
        log_p = log_softmax(np.array(model(mx.array([ids[:-1]])))[0])
        nll += [-log_p[j, ids[j + 1]] for j in range(len(ids) - 1)]
    # test loss L, perplexity P (N tokens)
    words = result.stdout.strip().splitlines()[-1].split()
    assert (
        words[:2] == ["test", "loss"]
        and f"{float(words[2].rstrip(',')):.3f}" == f"{np.mean(nll):.3f}"
    )
    assert (
        abs(float(words[4]) - math.exp(np.mean(nll))) < 1e-5 * math.exp(np.mean(nll))
        and words[5] == f"({len(nll)}"
    )


def test_a_resumed_run_continues_as_the_uninterrupted_one(
    hf_folder, weights, data, tmp_path
):
    # Batches of 2 of 16 examples: 8 steps an epoch, so the 10 steps cross into the
    # second epoch; dropout checks that the random state follows too.
    common = (
        "--batch-size",
        2,
        "--dropout",
        "0.1",
        "--learning-rate",
        "1e-2",
        "--keys",
        "all",
        "--save-every",
        100,
    )
    straight = run_lora(
        *train_args(
            weights["float32"],
            hf_folder,
            data,
            tmp_path / "straight",
            "--iters",
            10,
            *common,
        )
    )
    first = run_lora(
        *train_args(
            weights["float32"],
            hf_folder,
            data,
            tmp_path / "resumed",
            "--iters",
            5,
            *common,
        )
    )
    rest = run_lora(
        *train_args(
            weights["float32"],
            hf_folder,
            data,
            tmp_path / "resumed",
            "--iters",
            10,
            *common,
            "--resume-adapter-file",
            tmp_path / "resumed" / "adapters.safetensors",
        )
    )
    for result in (straight, first, rest):
        assert result.returncode == 0, result.stderr
    assert "resuming after step 5" in rest.stdout
    (a, meta_a), (b, meta_b) = saved(tmp_path / "straight"), saved(tmp_path / "resumed")
    assert meta_a["step"] == meta_b["step"] == "10" and a.keys() == b.keys()
    assert any(k.startswith("training.") for k in a)
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=1e-6, atol=1e-7, err_msg=k)


def test_ctrl_c_saves_exactly_the_step_it_stopped_at(
    hf_folder, weights, data, tmp_path
):
    args = train_args(
        weights["float32"],
        hf_folder,
        data,
        tmp_path / "stopped",
        "--iters",
        100000,
        "--steps-per-report",
        1,
        "--learning-rate",
        "1e-2",
    )
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "llama/lora.py"), *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    for line in process.stdout:
        if line.startswith("step 3/"):
            break
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    stopped, metadata = saved(tmp_path / "stopped")
    step = int(metadata["step"])
    assert f"stopped after step {step};" in stderr and step >= 3
    again = run_lora(
        *train_args(
            weights["float32"],
            hf_folder,
            data,
            tmp_path / "again",
            "--iters",
            step,
            "--learning-rate",
            "1e-2",
        )
    )
    assert again.returncode == 0, again.stderr
    straight, _ = saved(tmp_path / "again")
    for k in straight:
        np.testing.assert_allclose(
            stopped[k], straight[k], rtol=1e-6, atol=1e-7, err_msg=k
        )


def test_qlora_trains_a_4bit_model_and_fuses_it_to_one_llama_runs(
    hf_folder, weights, data, tmp_path
):
    result = run_lora(
        *train_args(
            weights["4bit"],
            hf_folder,
            data,
            tmp_path / "a",
            "--iters",
            3,
            "--grad-checkpoint",
        )
    )
    assert result.returncode == 0, result.stderr
    fused = run_lora(
        *fuse_args(weights["4bit"], tmp_path / "a", tmp_path / "f.safetensors")
    )
    assert fused.returncode == 0, fused.stderr
    assert load(tmp_path / "f.safetensors").args.quantization is None
    run = run_script(
        "llama/llama.py",
        tmp_path / "f.safetensors",
        hf_folder / "tokenizer.model",
        "call me",
        "--max-tokens",
        4,
    )
    assert run.returncode == 0 and run.stdout.strip(), run.stderr


@pytest.fixture(scope="module")
def adapters(weights, tmp_path_factory):
    """An adapter folder for the float32 model with nonzero adapters (as after
    training)."""
    folder = tmp_path_factory.mktemp("adapters") / "adapters"
    folder.mkdir()
    model = random_adapters(
        lora_adapters().linear_to_lora_layers(
            load(weights["float32"]), [0, 1], ["wq", "wv"], 4, 8
        ),
        std=2.0,
    )
    lora_adapters().save_adapters(folder, model.trainable_parameters(), {}, 0, {})
    config = {
        "rank": 4,
        "alpha": 8,
        "scale": 2.0,
        "dropout": 0.0,
        "layers": [0, 1],
        "keys": ["wq", "wv"],
    }
    lora_adapters().save_config(folder, config)
    return folder


def test_llama_py_with_adapters_prints_what_the_fused_model_prints(
    weights, hf_folder, adapters, tmp_path
):
    tokenizer = hf_folder / "tokenizer.model"
    base = run_script(
        "llama/llama.py", weights["float32"], tokenizer, "call me", "--max-tokens", 8
    )
    adapted = run_script(
        "llama/llama.py",
        weights["float32"],
        tokenizer,
        "--adapter-path",
        adapters,
        "call me",
        "--max-tokens",
        8,
    )
    fuse = run_lora(*fuse_args(weights["float32"], adapters, tmp_path / "f.npz"))
    fused = run_script(
        "llama/llama.py", tmp_path / "f.npz", tokenizer, "call me", "--max-tokens", 8
    )
    chat = run_script(
        "llama/llama.py",
        weights["float32"],
        tokenizer,
        "--adapter-path",
        adapters,
        "--chat",
        "call me",
        "--max-tokens",
        4,
    )
    for result in (base, adapted, fuse, fused, chat):
        assert result.returncode == 0, result.stderr
    assert "LoRA adapters of rank 4 on wq/wv of 2 blocks" in adapted.stderr
    assert adapted.stdout == fused.stdout != base.stdout


def broken_adapters(adapters, tmp_path, change):
    folder = tmp_path / "broken"
    folder.mkdir()
    arrays_, _ = saved(adapters)
    config = json.loads((adapters / "adapter_config.json").read_text())
    change(arrays_, config)
    mx.save_safetensors(
        str(folder / "adapters.safetensors"),
        {k: mx.array(v) for k, v in arrays_.items()},
    )
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize(
    "change, message",
    [
        (
            lambda a, c: a.update(
                {"layers.1.attention.wq.lora_a": np.zeros((4, 32), np.float32)}
            ),
            r"layers.1.attention.wq.lora_a is \(4, 32\), this model needs \(4, 64\)",
        ),
        (
            lambda a, c: c.update(layers=[0, 5]),
            "the adapters are for block 5, this model has 2 blocks",
        ),
        (lambda a, c: c.update(rank="eight"), "rank 'eight' is not a positive integer"),
        (
            lambda a, c: a.update(
                {"layers.0.attention.wv.lora_b": np.full((32, 4), np.nan, np.float32)}
            ),
            "non-finite",
        ),
    ],
)
def test_adapters_that_do_not_fit_give_one_line(
    change, message, weights, hf_folder, adapters, tmp_path
):
    import re

    folder = broken_adapters(adapters, tmp_path, change)
    generate = run_script(
        "llama/llama.py",
        weights["float32"],
        hf_folder / "tokenizer.model",
        "--adapter-path",
        folder,
        "hi",
    )
    fuse = run_lora(*fuse_args(weights["float32"], folder, tmp_path / "f.safetensors"))
    for result in (generate, fuse):
        assert re.search(message, assert_one_error_line(result)), result.stderr
    assert not (tmp_path / "f.safetensors").exists()


BAD_DATA = {
    "missing": (None, "train.jsonl does not exist"),
    "empty": ("\n\n", "train.jsonl is empty"),
    "not JSON": (
        '{"text": "a"}\n{"text": "b"}\n{"text": \n',
        "train.jsonl line 3 is not JSON",
    ),
    "not UTF-8": (b'{"text": "caf\xe9"}\n', "train.jsonl line 1 is not UTF-8"),
    "unknown keys": (
        '{"text": "a"}\n{"txt": "b"}\n',
        'train.jsonl line 2: expected an object with "text"',
    ),
    "roles": (
        '{"messages": [{"role": "assistant", "content": "a"}]}\n',
        "train.jsonl line 1: the roles must go",
    ),
}


@pytest.mark.parametrize("case", BAD_DATA)
def test_bad_data_gives_one_line_naming_the_file_and_line(
    case, weights, hf_folder, data, tmp_path
):
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "valid.jsonl").write_text((data / "valid.jsonl").read_text())
    content, message = BAD_DATA[case]
    if content is not None:
        path = folder / "train.jsonl"
        path.write_bytes(content) if isinstance(content, bytes) else path.write_text(
            content
        )
    result = run_lora(
        *train_args(weights["float32"], hf_folder, folder, tmp_path / "a", "--iters", 1)
    )
    assert message in assert_one_error_line(result)
    assert not (tmp_path / "a").exists()


def test_mask_prompt_with_text_lines_and_unwritable_adapter_path_give_one_line(
    weights, hf_folder, data, tmp_path
):
    result = run_lora(
        *train_args(
            weights["float32"],
            hf_folder,
            data,
            tmp_path / "a",
            "--iters",
            1,
            "--mask-prompt",
        )
    )
    assert "train.jsonl line 1: --mask-prompt needs" in assert_one_error_line(result)
    (tmp_path / "file").write_text("")
    result = run_lora(
        *train_args(
            weights["float32"], hf_folder, data, tmp_path / "file" / "a", "--iters", 1
        )
    )
    assert assert_one_error_line(result).startswith("error: cannot write")


def test_texts_longer_than_max_seq_length_are_cut_and_counted(
    weights, hf_folder, data, tmp_path
):
    result = run_lora(
        *train_args(
            weights["float32"],
            hf_folder,
            data,
            tmp_path / "a",
            "--iters",
            1,
            "--max-seq-length",
            8,
        )
    )
    assert result.returncode == 0, result.stderr
    assert (
        "train.jsonl: 16 examples, 128 tokens, 112 of them counted in the loss; 16 "
        "longer than 8 tokens, cut there" in result.stdout
    )


@pytest.mark.parametrize(
    "flags",
    [
        "--learning-rate nan",
        "--learning-rate -1",
        "--rank 0",
        "--dropout 1",
        "--iters 0",
        "--seed -1",
        "--num-layers 0",
    ],
)
def test_flags_out_of_range_are_refused(flags, weights, hf_folder, data, tmp_path):
    result = run_lora(
        *train_args(weights["float32"], hf_folder, data, tmp_path / "a"), *flags.split()
    )
    assert (
        result.returncode == 2
        and "Traceback" not in result.stderr
        and "error:" in result.stderr
    )


def test_adapter_files_are_written_atomically_with_the_users_umask(tmp_path):
    import os

    old = os.umask(0o027)
    try:
        import_example("llama", "model").write_atomically(
            tmp_path / "x.json", lambda tmp: open(tmp, "w").write("{}")
        )
        with pytest.raises(ZeroDivisionError):
            import_example("llama", "model").write_atomically(
                tmp_path / "x.json", lambda tmp: (open(tmp, "w").write("half"), 1 / 0)
            )
    finally:
        os.umask(old)
    assert (tmp_path / "x.json").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "x.json").read_text() == "{}" and os.listdir(tmp_path) == [
        "x.json"
    ]


def test_adapters_under_mlx_launch_are_refused_in_one_line(
    weights, hf_folder, adapters
):
    result = run_script(
        "llama/llama.py",
        weights["float32"],
        hf_folder / "tokenizer.model",
        "--adapter-path",
        adapters,
        "hi",
        env={"MLX_RANK": "0"},
    )
    assert (
        "--adapter-path runs on one process; fuse the adapters"
        in assert_one_error_line(result)
    )


# ---- Faults a user meets: one line, nothing half-written -----------------------------


def hf_tokenizer(folder, chat_template=None):
    """A word-level tokenizer.json of LLAMA_TEXT's words, with or without a chat
    template."""
    from helpers import LLAMA_TEXT
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    words = sorted({w for s in LLAMA_TEXT for w in s.split()})[:300]
    tokens = ["<unk>", "<s>", "</s>", ".", *words]
    tokens += [f"<extra_{i}>" for i in range(LLAMA_CONFIG["vocab_size"] - len(tokens))]
    vocab = {t: i for i, t in enumerate(tokens)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.add_special_tokens([AddedToken(t, special=True) for t in ("<s>", "</s>")])
    folder.mkdir()
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": "</s>"}
    if chat_template is not None:
        config["chat_template"] = chat_template
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder / "tokenizer.json"


def data_folder(folder, train_lines, valid_lines=None):
    folder.mkdir()
    (folder / "train.jsonl").write_text(
        "".join(json.dumps(x) + "\n" for x in train_lines)
    )
    valid = train_lines if valid_lines is None else valid_lines
    (folder / "valid.jsonl").write_text("".join(json.dumps(x) + "\n" for x in valid))
    return folder


MESSAGES = {
    "messages": [
        {"role": "user", "content": "Call me"},
        {"role": "assistant", "content": "Ishmael."},
    ]
}


@pytest.mark.parametrize(
    "template, message",
    [(None, "no known chat format"), ("{% if false %}x{% endif %}", "no tokens")],
)
def test_messages_a_tokenizer_cannot_render_give_one_line_without_chat_advice(
    template, message, weights, tmp_path
):
    tokenizer = hf_tokenizer(tmp_path / "tok", template)
    folder = data_folder(tmp_path / "data", [MESSAGES] * 4)
    args = train_args(weights["float32"], tmp_path / "tok", folder, tmp_path / "a")
    args[args.index("--tokenizer") + 1] = tokenizer
    line = assert_one_error_line(run_lora(*args, "--iters", 1))
    assert "train.jsonl line 1" in line and message in line and "--chat" not in line


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"text": "\\ud800 Ishmael"}\n', "not UTF-8 text"),
        ("[" * 100_000 + "\n", "nests too deeply"),
    ],
    ids=["lone surrogate", "deep nesting"],
)
def test_a_line_of_unusable_json_gives_one_line(
    line, message, weights, hf_folder, data, tmp_path
):
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "valid.jsonl").write_text((data / "valid.jsonl").read_text())
    (folder / "train.jsonl").write_text('{"text": "Call me Ishmael."}\n' + line)
    args = train_args(
        weights["float32"], hf_folder, folder, tmp_path / "a", "--iters", 1
    )
    assert "train.jsonl line 2" in assert_one_error_line(run_lora(*args))


def test_examples_are_cut_at_the_models_context_and_masked_batches_count_tokens(
    weights, hf_folder, tmp_path
):
    # The tiny model's context is 96 tokens: a 200-word completion would train past it.
    # With --mask-prompt, an example whose prompt fills the context counts no token:
    # left out.
    long = {"prompt": "call me " * 100, "completion": " ishmael"}
    short = {"prompt": "call me", "completion": " ishmael some years ago"}
    folder = data_folder(tmp_path / "data", [short] * 4, [long, short])
    result = run_lora(
        *train_args(
            weights["float32"], hf_folder, folder, tmp_path / "a", "--iters", 1
        ),
        "--mask-prompt",
        "--batch-size",
        1,
        "--val-batches",
        -1,
    )
    assert result.returncode == 0, result.stderr
    assert "the model's context is 96 tokens" in result.stdout
    assert "valid.jsonl: 1 examples" in result.stdout and "1 left out" in result.stdout


def test_a_diverging_run_keeps_the_adapters_of_the_last_sound_step(
    hf_folder, weights, data, tmp_path
):
    # Adam moves B by about the learning rate at the first step: step 2's loss is not
    # finite, so step 1's adapters (finite, about 1e30) are not kept: step 0's are.
    args = train_args(
        weights["float32"], hf_folder, data, tmp_path / "a", "--iters", 10
    )
    result = run_lora(*args, "--learning-rate", "1e30")
    line = assert_one_error_line(result)
    assert result.returncode == 1 and "diverged" in line
    arrays_, metadata = saved(tmp_path / "a")
    assert f"adapters of step {metadata['step']} " in line
    assert all(np.abs(v).max() < 10 for k, v in arrays_.items() if "lora" in k)


def test_a_resume_with_other_settings_or_a_damaged_step_is_refused(
    hf_folder, weights, data, tmp_path
):
    args = train_args(weights["float32"], hf_folder, data, tmp_path / "a", "--iters", 2)
    assert run_lora(*args).returncode == 0
    file = tmp_path / "a" / "adapters.safetensors"
    other = tiny_lora_data(tmp_path / "other", kind="text", n_train=17)
    for flags, message in [
        (["--seed", "1"], "--seed 0, not 1"),
        (["--batch-size", "2"], "--batch-size 4, not 2"),
        (["--learning-rate", "1e-3"], "--learning-rate 0.0001, not 0.001"),
    ]:
        resumed = run_lora(*args[:-1], 4, *flags, "--resume-adapter-file", file)
        assert message in assert_one_error_line(resumed)
    resumed = train_args(
        weights["float32"], hf_folder, other, tmp_path / "b", "--iters", 4
    )
    line = assert_one_error_line(run_lora(*resumed, "--resume-adapter-file", file))
    assert "--data another train.jsonl" in line
    arrays_, metadata = saved(tmp_path / "a")
    mx.save_safetensors(
        str(file),
        {k: mx.array(v) for k, v in arrays_.items()},
        {**metadata, "step": "-5"},
    )
    resumed = run_lora(*args[:-1], 4, "--resume-adapter-file", file)
    assert "step '-5'" in assert_one_error_line(resumed)


def test_adapters_of_another_vocabulary_or_a_huge_alpha_are_refused(
    weights, hf_folder, adapters, tmp_path
):
    def other_vocabulary(arrays_, config):
        config["base_model"] = {"vocab_size": 128256, "dim": 64}

    def huge_alpha(arrays_, config):
        config["alpha"] = 1e308

    for change, message in [
        (other_vocabulary, "vocab_size 128256 (this model: 320)"),
        (huge_alpha, "alpha 1e+308"),
    ]:
        (tmp_path / change.__name__).mkdir()
        folder = broken_adapters(adapters, tmp_path / change.__name__, change)
        save = tmp_path / "f.safetensors"
        fuse = run_lora(*fuse_args(weights["float32"], folder, save))
        assert message in assert_one_error_line(fuse) and not save.exists()


def test_a_missing_adapter_folder_is_named_as_given(weights, hf_folder, tmp_path):
    fuse = run_lora(
        *fuse_args(weights["float32"], tmp_path / "nope", tmp_path / "f.npz")
    )
    assert f"--adapter-path {tmp_path / 'nope'} first" in assert_one_error_line(fuse)


def test_fuse_refuses_to_overwrite_the_model_a_folder_or_to_write_under_a_file(
    weights, adapters, tmp_path
):
    (tmp_path / "folder.safetensors").mkdir()
    (tmp_path / "file").write_text("")
    for save_path, message in [
        (weights["float32"], "is --model"),
        (tmp_path / "folder.safetensors", "is a folder"),
        (tmp_path / "file" / "f.safetensors", "is a file"),
    ]:
        before = save_path.stat().st_mtime if save_path.is_file() else None
        result = run_lora(*fuse_args(weights["float32"], adapters, save_path))
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert message in result.stderr.strip().splitlines()[-1]
        assert before is None or save_path.stat().st_mtime == before


def full_disk(limit=20_000):
    """A preexec_fn: no file can grow over `limit` bytes (EFBIG), as on a full disk."""
    import resource

    def limit_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return limit_files


def test_a_full_disk_gives_one_line_and_leaves_no_file(
    weights, hf_folder, data, adapters, tmp_path
):
    save = tmp_path / "f.safetensors"
    args = fuse_args(weights["float32"], adapters, save)
    for command, written in [
        (args, save),
        (
            train_args(
                weights["float32"], hf_folder, data, tmp_path / "a", "--iters", 1
            ),
            tmp_path / "a" / "adapters.safetensors",
        ),
    ]:
        result = subprocess.run(
            [sys.executable, str(ROOT / "llama/lora.py"), *map(str, command)],
            capture_output=True,
            text=True,
            preexec_fn=full_disk(),
            timeout=300,
        )
        assert "cannot write" in assert_one_error_line(result) and not written.exists()
        assert not [p for p in written.parent.iterdir() if ".tmp" in p.name]


def test_test_with_stdout_closed_or_full_gives_no_traceback(
    weights, hf_folder, data, tmp_path
):
    args = [
        "--model",
        weights["float32"],
        "--tokenizer",
        hf_folder / "tokenizer.model",
        "--data",
        data,
        "--test",
        "--adapter-path",
        tmp_path / "none",
    ]
    command = [sys.executable, str(ROOT / "llama/lora.py"), *map(str, args)]
    closed = subprocess.run(
        " ".join(map(shlex_quote, command)) + " | head -c1",
        shell=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert "adapters" not in closed.stderr and "Traceback" not in closed.stderr
    with open("/dev/full", "w") as full:
        result = subprocess.run(command, stdout=full, stderr=subprocess.PIPE, text=True)
    assert "cannot write to stdout" in assert_one_error_line(result)


def shlex_quote(text):
    import shlex

    return shlex.quote(str(text))


def test_ctrl_c_while_mlx_loads_gives_one_line(weights, hf_folder, data, tmp_path):
    import time
    from pathlib import Path

    args = fuse_args(weights["float32"], tmp_path / "none", tmp_path / "f.npz")
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "llama/lora.py"), *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    maps = Path(f"/proc/{process.pid}/maps")
    while process.poll() is None and "mlx" not in maps.read_text():
        time.sleep(0.002)  # until MLX's library is being loaded
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    # (if MLX has loaded by then, main's own line: "interrupted; nothing saved ...")
    lines = stderr.strip().splitlines()
    assert process.returncode == 130 and len(lines) == 1, stderr
    assert lines[0].startswith("interrupted"), stderr


def test_help_says_the_flags_are_mlx_lms_and_the_example_data_trains(
    weights, hf_folder, tmp_path
):
    help_ = run_lora("--help").stdout
    assert (
        "mlx-lm" in help_ and "--learning-rate" in help_ and "--fine-tune-type" in help_
    )
    written = run_script("llama/lora_data.py", tmp_path / "data")
    assert written.returncode == 0, written.stderr
    result = run_lora(
        *train_args(weights["float32"], hf_folder, tmp_path / "data", tmp_path / "a"),
        "--iters",
        2,
    )
    assert result.returncode == 0 and "train.jsonl: 1000 examples" in result.stdout
