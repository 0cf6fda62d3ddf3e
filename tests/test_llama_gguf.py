"""llama/gguf_file.py: GGUF files as llama.cpp writes them, run as transformers does."""

import random

import numpy as np
import pytest
from helpers import ROOT, run_script

pytestmark = pytest.mark.usefixtures("llama_on_path", "on_cpu")

CONFIG = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
)
TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
WORDS = (
    "the cat sat on a mat and then it ran to see what was there , . ! 12 34 é ü 日本"
)
HF_TO_GGUF = {
    "model.embed_tokens": "token_embd",
    "model.norm": "output_norm",
    "lm_head": "output",
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.down_proj": "ffn_down",
    "mlp.up_proj": "ffn_up",
}


def bpe_tokenizer():
    """A byte-level BPE (GPT-2 style, as SmolLM2's) trained on a few sentences: ~300
    tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(
        [WORDS] * 20 + ["hello world, how are you?"] * 5, trainer
    )
    return tokenizer


def llama_cpp_permute(w, n_heads):
    """convert_hf_to_gguf.py's permute: Hugging Face's rows of wq/wk in Meta's order."""
    return (
        w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def gguf_name(name):
    """'model.layers.1.self_attn.q_proj.weight' -> 'blk.1.attn_q.weight'."""
    module = name.removesuffix(".weight")
    if module.startswith("model.layers."):
        _, _, layer, rest = module.split(".", 3)
        return f"blk.{layer}.{HF_TO_GGUF[rest]}.weight"
    return f"{HF_TO_GGUF[module]}.weight"


def write_gguf(
    path, state_dict, kind, tokenizer, architecture="llama", vocab=True, embedding=None
):
    """`state_dict` (a tiny LlamaForCausalLM's) as llama.cpp's converter writes it:
    matrices as `kind` (F32, F16, Q8_0, Q4_0, Q4_1, Q5_0; the embedding `embedding` if
    given), norms F32, wq/wk rows permuted."""
    import gguf
    from gguf import GGMLQuantizationType as T

    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_block_count(CONFIG["num_hidden_layers"])
    writer.add_context_length(CONFIG["max_position_embeddings"])
    writer.add_embedding_length(CONFIG["hidden_size"])
    writer.add_feed_forward_length(CONFIG["intermediate_size"])
    writer.add_head_count(CONFIG["num_attention_heads"])
    writer.add_head_count_kv(CONFIG["num_key_value_heads"])
    writer.add_rope_freq_base(CONFIG["rope_theta"])
    writer.add_layer_norm_rms_eps(CONFIG["rms_norm_eps"])
    writer.add_rope_dimension_count(16)
    if vocab:
        vocabulary = tokenizer.get_vocab()
        tokens = sorted(vocabulary, key=vocabulary.get)
        model = tokenizer.to_str()
        import json

        merges = json.loads(model)["model"]["merges"]
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_types([3 if t in SPECIAL else 1 for t in tokens])
        writer.add_token_merges(
            [" ".join(m) if isinstance(m, list) else m for m in merges]
        )
        writer.add_bos_token_id(vocabulary["<|im_start|>"])
        writer.add_eos_token_id(vocabulary["<|im_end|>"])
        writer.add_add_bos_token(False)
        writer.add_chat_template(TEMPLATE)
    for name, tensor in state_dict.items():
        w = tensor.float().numpy()
        stored = embedding if embedding and "embed" in name else kind
        if "q_proj" in name:
            w = llama_cpp_permute(w, CONFIG["num_attention_heads"])
        if "k_proj" in name:
            w = llama_cpp_permute(w, CONFIG["num_key_value_heads"])
        if w.ndim == 1 or stored == "F32":
            writer.add_tensor(gguf_name(name), w)
        elif stored == "F16":
            writer.add_tensor(gguf_name(name), w.astype(np.float16))
        else:
            blocks = gguf.quants.quantize(w, T[stored])
            writer.add_tensor(gguf_name(name), blocks, raw_dtype=T[stored])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(a tiny random Hugging Face Llama's state dict, its BPE tokenizer, a folder)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = bpe_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=tokenizer.get_vocab_size(), **CONFIG)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # wider than the default init, so that greedy tokens differ
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.3)
    return model.state_dict(), tokenizer, tmp_path_factory.mktemp("gguf")


def state_dict_of(model):
    return {k: v.float().numpy() for k, v in model.state_dict().items()}


def transformers_model(path):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    ).eval()


@pytest.mark.parametrize("kind", ["F32", "F16", "Q8_0", "Q4_0", "Q4_1", "Q5_0"])
def test_logits_and_greedy_text_equal_transformers_reading_the_same_file(tiny, kind):
    import mlx.core as mx
    import torch
    from gguf_file import load_gguf

    state_dict, tokenizer, folder = tiny
    path = write_gguf(folder / f"tiny.{kind}.gguf", state_dict, kind, tokenizer)
    model, note = load_gguf(path, dtype=mx.float32)
    reference = transformers_model(path)
    tokens = [5, 17, 200, 33, 101, 7, 250, 64]
    ours = np.array(model(mx.array([tokens])))
    with torch.no_grad():
        theirs = reference(torch.tensor([tokens])).logits.numpy()
    assert np.abs(ours - theirs).max() < 1e-4
    kept = "kept quantized" in note and "0 tensors" not in note
    assert kept == (kind in ("Q8_0", "Q4_0", "Q4_1"))
    assert ("Q5_0 dequantized" in note) == (kind == "Q5_0")
    greedy = reference.generate(
        torch.tensor([tokens]), max_new_tokens=12, do_sample=False, min_new_tokens=12
    )[0, len(tokens) :].tolist()
    ours = [t for _, t in zip(range(12), model.generate(mx.array(tokens)))]
    assert ours == greedy


@pytest.mark.parametrize("kind", ["Q8_0", "Q4_0", "Q4_1"])
def test_kept_blocks_hold_the_values_gguf_dequantizes(tiny, kind):
    """mx.load's repacking and gguf_file's own (for files mx.load cannot read whole)
    give MLX affine groups whose values are exactly gguf.quants.dequantize's."""
    import gguf
    import mlx.core as mx
    from gguf_file import affine_from_blocks, read_tensors

    state_dict, tokenizer, folder = tiny
    path = write_gguf(folder / f"blocks.{kind}.gguf", state_dict, kind, tokenizer)
    loaded, _, _ = read_tensors(path)
    bits = 8 if kind == "Q8_0" else 4
    for tensor in gguf.GGUFReader(path).tensors:
        if tensor.tensor_type.name != kind:
            continue
        expected = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        name = tensor.name.removesuffix(".weight")
        ours = affine_from_blocks(np.asarray(tensor.data), kind)
        theirs = [loaded[f"{name}.{k}"] for k in ("weight", "scales", "biases")]
        for packed, scales, biases in (ours, theirs):
            values = mx.dequantize(
                packed, scales.astype(mx.float32), biases.astype(mx.float32), 32, bits
            )
            np.testing.assert_array_equal(np.array(values), expected)


def test_tokenizer_equals_transformers_on_many_strings(tiny):
    from gguf_file import GGUFTokenizer
    from transformers import AutoTokenizer

    _, tokenizer, folder = tiny
    path = folder / "tiny.F32.gguf"
    if not path.exists():
        write_gguf(path, tiny[0], "F32", tokenizer)
    ours = GGUFTokenizer(path)
    theirs = AutoTokenizer.from_pretrained(folder, gguf_file=path.name)
    rng = random.Random(0)
    pieces = WORDS.split() + ["  ", "\n", "\t", "<|im_end|>", "Hello", "?!", "ÿ", "🙂"]
    for _ in range(300):
        text = "".join(rng.choice(pieces) + rng.choice(["", " "]) for _ in range(8))
        ids = ours.prompt(text)  # a prompt's "<|im_end|>" is text, not the token
        assert ids == theirs(text, split_special_tokens=True)["input_ids"], text
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True)


def run_llama(*args):
    return run_script("llama/llama.py", *args, "--max-tokens", "8")


def test_llama_py_runs_a_gguf_with_its_own_tokenizer_and_chat_template(tiny):
    state_dict, tokenizer, folder = tiny
    path = write_gguf(folder / "run.Q4_0.gguf", state_dict, "Q4_0", tokenizer)
    plain = run_llama(path, "the cat sat")
    assert plain.returncode == 0, plain.stderr
    assert "GGUF" in plain.stderr and "kept quantized" in plain.stderr
    chat = run_llama(path, "--chat", "hello")
    assert chat.returncode == 0, chat.stderr
    assert "8 tokens" in chat.stderr or "generation" in chat.stderr


def test_bad_gguf_files_are_refused_in_one_line(tiny, tmp_path):
    import gguf

    state_dict, tokenizer, folder = tiny
    good = write_gguf(tmp_path / "good.gguf", state_dict, "Q8_0", tokenizer)
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(good.read_bytes()[:-1000])
    mistral = write_gguf(tmp_path / "gpt2.gguf", state_dict, "F16", tokenizer, "gpt2")
    no_vocab = write_gguf(
        tmp_path / "novocab.gguf", state_dict, "F16", tokenizer, vocab=False
    )
    # An unknown tensor type id: the first tensor's type field, patched.
    unknown = tmp_path / "unknown.gguf"
    data = bytearray(good.read_bytes())
    first = gguf.GGUFReader(good).tensors[0]
    where = data.index(first.name.encode()) + len(first.name) + 4 + 8 * len(first.shape)
    data[where : where + 4] = (200).to_bytes(4, "little")
    unknown.write_bytes(bytes(data))
    cases = {
        truncated: "past the end",
        mistral: "llama",
        no_vocab: "tokenizer",
        unknown: "cannot read",
    }
    for path, words in cases.items():
        result = run_llama(path, "hello")
        assert result.returncode == 1, (path, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
        assert words in lines[0], lines[0]
    assert ROOT.exists()


@pytest.fixture(scope="module")
def hf_folder(tiny):
    """The tiny model as a Hugging Face folder with tokenizer.json and chat template."""
    import json

    from transformers import LlamaConfig, LlamaForCausalLM

    state_dict, tokenizer, folder = tiny
    hf = folder / "hf"
    config = LlamaConfig(vocab_size=tokenizer.get_vocab_size(), **CONFIG)
    model = LlamaForCausalLM(config)
    model.load_state_dict(state_dict)
    model.save_pretrained(hf)
    tokenizer.save(str(hf / "tokenizer.json"))
    special = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>"}
    config = {**special, "chat_template": TEMPLATE}
    (hf / "tokenizer_config.json").write_text(json.dumps(config))
    (hf / "special_tokens_map.json").write_text(json.dumps(special))
    converted = folder / "hf.safetensors"
    result = run_script("llama/convert.py", hf, converted, "--dtype", "float32")
    assert result.returncode == 0, result.stderr
    return hf, converted, model.eval()


@pytest.mark.parametrize("kind", ["F16", "Q8_0", "Q4_0"])
def test_export_is_read_back_by_gguf_and_transformers(hf_folder, kind, tmp_path):
    import gguf
    import mlx.core as mx
    import torch
    from gguf_file import GGUFTokenizer, load_gguf
    from transformers import AutoTokenizer

    hf, converted, original = hf_folder
    out = tmp_path / f"export.{kind}.gguf"
    result = run_script(
        "llama/convert.py", converted, out, "--gguf-type", kind, "--tokenizer", hf
    )
    assert result.returncode == 0, result.stderr
    types = {t.tensor_type.name for t in gguf.GGUFReader(out).tensors}
    assert types == {kind, "F32"}
    model, _ = load_gguf(out, dtype=mx.float32)
    theirs = transformers_model(out)
    tokens = [5, 17, 200, 33, 101, 7]
    with torch.no_grad():
        expected = theirs(torch.tensor([tokens])).logits.numpy()
        before = original(torch.tensor([tokens])).logits.numpy()
    ours = np.array(model(mx.array([tokens])))
    assert np.abs(ours - expected).max() < 1e-4
    if kind == "F16":  # the original model, to float16's rounding
        assert np.abs(expected - before).max() < 0.02
    # Each matrix holds what gguf's own quantize makes of the original's (rows
    # permuted).
    q_proj = state_dict_of(original)["model.layers.1.self_attn.q_proj.weight"]
    q_proj = llama_cpp_permute(q_proj, CONFIG["num_attention_heads"])
    tensor = next(
        t for t in gguf.GGUFReader(out).tensors if t.name == "blk.1.attn_q.weight"
    )
    stored = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    reference = gguf.quants.quantize(q_proj, gguf.GGMLQuantizationType[kind])
    expected = gguf.quants.dequantize(reference, gguf.GGMLQuantizationType[kind])
    np.testing.assert_array_equal(stored, expected)
    text = "the cat sat on a mat, 日本 <|im_end|>"
    tokenizer = AutoTokenizer.from_pretrained(tmp_path, gguf_file=out.name)
    source = AutoTokenizer.from_pretrained(hf)
    assert tokenizer(text)["input_ids"] == source(text)["input_ids"]
    assert GGUFTokenizer(out).config["chat_template"] == TEMPLATE


def test_gguf_to_safetensors_keeps_the_blocks_and_back(tiny, tmp_path):
    import mlx.core as mx
    from gguf_file import load_gguf
    from model import load_model

    state_dict, tokenizer, folder = tiny
    source = write_gguf(tmp_path / "src.Q8_0.gguf", state_dict, "Q8_0", tokenizer)
    out = tmp_path / "q8.safetensors"
    result = run_script("llama/convert.py", source, out)
    assert result.returncode == 0, result.stderr
    assert "8-bit in groups of 32" in result.stdout
    converted = load_model(out)
    model, _ = load_gguf(source, dtype=mx.float16)
    tokens = mx.array([[5, 17, 200, 33]])
    assert mx.array_equal(converted(tokens), model(tokens))
    again = tmp_path / "again.Q8_0.gguf"
    result = run_script(
        "llama/convert.py", out, again, "--gguf-type", "Q8_0", "--tokenizer", source
    )
    assert result.returncode == 0, result.stderr
    back, _ = load_gguf(again, dtype=mx.float16)
    assert mx.array_equal(back(tokens), model(tokens))


def test_a_gguf_mixing_bit_widths_is_refused_by_convert_in_one_line(tiny, tmp_path):
    state_dict, tokenizer, folder = tiny
    path = write_gguf(
        tmp_path / "mixed.gguf", state_dict, "Q4_0", tokenizer, embedding="Q8_0"
    )
    result = run_script("llama/convert.py", path, tmp_path / "out.safetensors")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "4 and 8-bit" in lines[0], result.stderr
    assert run_llama(path, "the cat").returncode == 0  # llama.py runs it as it is


@pytest.mark.parametrize("bits", [4, 8])
def test_cpu_routed_product_equals_the_quantized_one(bits):
    """quantize.py: on the CPU, many rows use the dequantized weight; same values."""
    import mlx.core as mx
    import mlx.nn as nn
    from quantize import DEQUANTIZE_ROWS, route_around_cpu_quantized_matmul

    mx.random.seed(0)
    model = nn.Sequential(nn.Linear(64, 96), nn.Embedding(50, 64))
    nn.quantize(model, group_size=32, bits=bits)
    linear, embedding = route_around_cpu_quantized_matmul(model).layers
    assert type(linear).__name__ == "CPUQuantizedLinear"
    for rows in (1, DEQUANTIZE_ROWS, 40):
        x = mx.random.normal((2, rows, 64))
        expected = nn.QuantizedLinear.__call__(linear, x)
        assert mx.allclose(linear(x), expected, rtol=1e-5, atol=1e-5)
        expected = nn.QuantizedEmbedding.as_linear(embedding, x)
        assert mx.allclose(embedding.as_linear(x), expected, rtol=1e-5, atol=1e-5)


def test_convert_dequantizes_a_mixed_gguf_on_request(tiny, tmp_path):
    """--dtype (or --quantize) on a GGUF: float weights of the blocks' values first."""
    import mlx.core as mx
    from gguf_file import load_gguf
    from model import load_model

    state_dict, tokenizer, folder = tiny
    path = write_gguf(
        tmp_path / "m.gguf", state_dict, "Q4_1", tokenizer, embedding="Q8_0"
    )
    out = tmp_path / "f32.safetensors"
    result = run_script("llama/convert.py", path, out, "--dtype", "float32")
    assert result.returncode == 0, result.stderr
    tokens = mx.array([[5, 17, 200, 33]])
    model, _ = load_gguf(path, dtype=mx.float32)
    assert mx.allclose(load_model(out)(tokens), model(tokens), atol=1e-5, rtol=1e-5)


def test_perplexity_of_a_gguf_equals_transformers_on_the_same_file(tiny, tmp_path):
    from test_llama_perplexity import transformers_perplexity
    from transformers import AutoTokenizer

    state_dict, tokenizer, folder = tiny
    path = write_gguf(tmp_path / "p.Q4_1.gguf", state_dict, "Q4_1", tokenizer)
    text = tmp_path / "text.txt"
    text.write_text(" ".join([WORDS, "hello world, how are you?"] * 6))
    args = ["--data", text, "--window", 32, "--stride", 12]
    result = run_script("llama/perplexity.py", path, *args)
    assert result.returncode == 0, result.stderr
    ids = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)(
        text.read_text()
    )["input_ids"]
    expected = transformers_perplexity(transformers_model(path), ids, 32, 12)
    assert abs(float(result.stdout) - expected) < 1e-4 * expected


def test_lora_fuse_to_a_gguf_equals_the_fused_safetensors(tiny, tmp_path):
    """lora.py --fuse --save-path x.gguf: the model with its adapters merged, in float16
    for llama.cpp, with the tokenizer of --tokenizer inside."""
    import mlx.core as mx
    from gguf_file import load_gguf
    from lora_adapters import linear_to_lora_layers, save_adapters, save_config
    from mlx.utils import tree_flatten, tree_unflatten
    from model import load_model

    state_dict, tokenizer, folder = tiny
    source = write_gguf(tmp_path / "base.F32.gguf", state_dict, "F32", tokenizer)
    base = tmp_path / "base.safetensors"
    assert run_script("llama/convert.py", source, base).returncode == 0
    model = linear_to_lora_layers(load_model(base), [0, 1], ["wq", "wv"], 4, 8)
    mx.random.seed(0)
    trained = tree_flatten(model.trainable_parameters())  # as if after training
    model.update(tree_unflatten([(k, mx.random.normal(v.shape)) for k, v in trained]))
    adapters = tmp_path / "adapters"
    adapters.mkdir()
    save_adapters(adapters, model.trainable_parameters(), {}, 0, {})
    config = dict(rank=4, alpha=8, scale=2.0, dropout=0.0, layers=[0, 1])
    save_config(adapters, {**config, "keys": ["wq", "wv"]})
    for fused in (tmp_path / "f.safetensors", tmp_path / "f.gguf"):
        fuse = run_script(
            "llama/lora.py", "--model", base, "--adapter-path", adapters, "--fuse",
            "--save-path", fused, "--tokenizer", source,
        )  # fmt: skip
        assert fuse.returncode == 0, fuse.stderr
    tokens = mx.array([[5, 17, 200, 33]])
    expected = load_model(tmp_path / "f.safetensors")(tokens)
    exported, _ = load_gguf(tmp_path / "f.gguf")
    # float16 in the file: about 1e-3 of the logits' size
    assert mx.allclose(exported(tokens), expected, rtol=1e-2, atol=5e-2)
    assert not mx.allclose(load_model(base)(tokens), expected, atol=1e-2)  # adapted
    result = run_llama(tmp_path / "f.gguf", "the cat sat")  # its own tokenizer
    assert result.returncode == 0 and result.stdout.strip(), result.stderr
