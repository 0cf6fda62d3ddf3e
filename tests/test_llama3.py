"""llama/: the Llama 3 family. Scaled RoPE (Llama 3.1), tied embeddings and GQA against
transformers from both checkpoint layouts; Meta's tiktoken-format tokenizer against a
reference byte-pair encoder written here; the chat formats' exact token ids; the
interactive chat's key/value cache; and the one-line errors.

Nothing is downloaded: the tokenizer is a small rank file trained in the test, the
models tiny and random."""

import json
import subprocess
import sys
from collections import Counter

import mlx.core as mx
import numpy as np
import pytest
import regex
import torch
from helpers import (
    LLAMA_PARAMS,
    ROOT,
    example_modules,
    hf_to_meta_state_dict,
    import_example,
    run_script,
    tiny_llama,
)

pytestmark = pytest.mark.usefixtures(
    "llama_on_path"
)  # tokenizer.py reads hf_tokenizer.py on demand

TOL = 1e-4  # float32 logits
# Meta's split pattern, copied from llama_models/llama3/tokenizer.py (not from
# llama/tokenizer.py).
META_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| "
    r"?[^\s\p{L}\p{N}]+[\r\n]*|"
    r"\s*[\r\n]+|\s+(?!\S)|\s+"
)
TRAINING_TEXT = (
    "Call me Ishmael. Some years ago, never mind how long precisely, having little or "
    "no money in my "
    "purse, I thought I would sail about. It's 1851; we'll see 2024 and 12345 too.\n\n "
    " Indented   spaces, café, naïve, 日本語 and ÿ. "
) * 3
TRICKY = [
    "Hello world",
    "  two leading spaces\n\n\n  then   runs\t\ttabs \r\n",
    "1234567890 3.14159 1,000,000",
    "<|eot_id|> looks special <|begin_of_text|><|start_header_id|>",
    "naïve café 日本語 🦙🤖 Здравствуйте",
    "I'm you'LL THEY'RE we've it's",
    "x" * 50,
    " " * 20 + "\n" * 5 + "a",
    "\u00a0nbsp\u2003em",
    "",
    "!!!??? ...",
]


# ---- A tiny Llama 3 tokenizer and its reference encoder ------------------------------


def reference_encode(ranks, text):
    """tiktoken's algorithm: split with Meta's pattern; a piece that is a token is that
    token, otherwise join the adjacent pair whose concatenation has the lowest rank
    until none is a token."""
    ids = []
    for piece in regex.findall(META_PATTERN, text):
        parts = [bytes([b]) for b in piece.encode()]
        if piece.encode() in ranks:
            parts = [piece.encode()]
        while len(parts) > 1:
            rank, i = min(
                (ranks.get(parts[i] + parts[i + 1], float("inf")), i)
                for i in range(len(parts) - 1)
            )
            if rank == float("inf"):
                break
            parts[i : i + 2] = [parts[i] + parts[i + 1]]
        ids += [ranks[p] for p in parts]
    return ids


def train_ranks(text, n_merges=60):
    """The 256 bytes (in a shuffled order, so ranks are not byte values) and n_merges
    byte-pair merges."""
    order = np.random.default_rng(0).permutation(256)
    ranks = {bytes([int(b)]): i for i, b in enumerate(order)}
    words = [
        [bytes([b]) for b in w.encode()] for w in regex.findall(META_PATTERN, text)
    ]
    for _ in range(n_merges):
        (a, b), _ = Counter(p for w in words for p in zip(w, w[1:])).most_common(1)[0]
        ranks[a + b] = len(ranks)
        merged = []
        for w in words:
            out = []
            for piece in w:
                if out and out[-1] == a and piece == b:
                    out[-1] = a + b
                else:
                    out.append(piece)
            merged.append(out)
        words = merged
    return ranks


def bytes_to_unicode():
    """GPT-2's table from the 256 byte values to printable characters, as byte-level BPE
    vocabularies use."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    others = [b for b in range(256) if b not in printable]
    return {
        **{b: chr(b) for b in printable},
        **{b: chr(256 + n) for n, b in enumerate(others)},
    }


def bpe_tokenizer(ranks, special_tokens=None):
    """The rank file as a Hugging Face `tokenizers` byte-level BPE (as transformers'
    TikTokenConverter builds it), to save as a tokenizer.json: a merge (a, b) for every
    way to split each token into two tokens, ordered by the token's rank, merges the
    same pairs in the same order as tiktoken."""
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
    )

    special_tokens = (
        special_tokens
        or import_example("llama", "llama3_tokenizer").LLAMA3_SPECIAL_TOKENS
    )
    table = bytes_to_unicode()
    symbol = {token: token.decode("latin-1").translate(table) for token in ranks}
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        splits = [
            (token[:i], token[i:])
            for i in range(1, len(token))
            if token[:i] in ranks and token[i:] in ranks
        ]
        merges += sorted(splits, key=lambda pair: (ranks[pair[0]], ranks[pair[1]]))
    bpe = models.BPE(
        {symbol[t]: rank for t, rank in ranks.items()},
        [(symbol[a], symbol[b]) for a, b in merges],
        ignore_merges=True,
    )
    tokenizer = Tokenizer(bpe)
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(META_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in special_tokens]
    )
    return tokenizer


def write_ranks(ranks, path):
    import base64

    path.write_text(
        "".join(
            f"{base64.b64encode(t).decode()} {r}\n"
            for t, r in sorted(ranks.items(), key=lambda x: x[1])
        )
    )
    return path


@pytest.fixture(scope="module")
def ranks():
    return train_ranks(TRAINING_TEXT)


@pytest.fixture(scope="module")
def rank_file(ranks, tmp_path_factory):
    return write_ranks(ranks, tmp_path_factory.mktemp("llama3") / "tokenizer.model")


@pytest.fixture(scope="module")
def tokenizer(rank_file):
    with example_modules("llama"):  # it reads llama3_tokenizer.py
        return import_example("llama", "tokenizer").load_tokenizer(rank_file)


def test_llama3_rank_file_encodes_as_metas_tokenizer(tokenizer, ranks):
    n = len(ranks)
    assert tokenizer.kind == "Llama 3" and tokenizer.vocab_size == n + 256
    for text in TRICKY + [TRAINING_TEXT]:
        assert tokenizer.encode(text) == reference_encode(ranks, text), text
        assert tokenizer.decode(tokenizer.encode(text)) == text
    assert (
        max(tokenizer.encode(TRICKY[3])) < n
    )  # "<|eot_id|>" typed by a user is plain text
    assert len(tokenizer.encode(TRAINING_TEXT)) < 0.7 * len(
        TRAINING_TEXT.encode()
    )  # the merges are used
    assert tokenizer.prompt("Call me") == [n] + reference_encode(
        ranks, "Call me"
    )  # <|begin_of_text|> first
    assert tokenizer.stop_ids == {
        n + 1,
        n + 8,
        n + 9,
    }  # <|end_of_text|>, <|eom_id|>, <|eot_id|>


def test_llama3_streamed_decode_equals_decoding_everything(tokenizer):
    StreamingDecoder = import_example("llama", "tokenizer").StreamingDecoder
    prompt = tokenizer.prompt("Call me Ishmael.")
    text = " Some years 1851, naïve 日本語🦙 ok\n\n  done"
    continuation = tokenizer.encode(text)
    decoder = StreamingDecoder(tokenizer, prompt)
    pieces = [decoder.add(t) for t in continuation]
    assert "".join(pieces) + decoder.add(None) == text
    assert "\ufffd" not in "".join(pieces)
    assert (
        "" in pieces
    )  # the 4 bytes of 🦙 are 4 tokens: held back until the character is complete


def test_tokenizer_kind_is_read_from_the_content(rank_file, ranks, tmp_path):
    tokenizer_module = import_example("llama", "tokenizer")
    renamed = tmp_path / "vocab.bin"
    renamed.write_bytes(rank_file.read_bytes())
    assert tokenizer_module.load_tokenizer(renamed).kind == "Llama 3"
    folder = tiny_llama(
        tmp_path / "hf"
    )  # a folder with a SentencePiece tokenizer.model
    assert tokenizer_module.load_tokenizer(folder).kind == "SentencePiece"
    bpe_tokenizer(ranks).save(str(folder / "tokenizer.json"))
    assert (
        tokenizer_module.load_tokenizer(folder).kind == "Hugging Face"
    )  # tokenizer.json comes first


# ---- Chat formats: a fixed two-turn conversation -------------------------------------

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Call me Ishmael."},
    {"role": "assistant", "content": "Hello, Ishmael."},
    {"role": "user", "content": "How long ago?"},
]
# Meta-Llama-3-8B-Instruct's chat_template.
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set "
    "content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ "
    "message['content'] | trim + "
    "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% "
    "endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


def test_llama3_chat_format_gives_metas_ids(tokenizer, ranks):
    chat = import_example("llama", "chat")
    n, enc = len(ranks), lambda text: reference_encode(ranks, text)
    begin, start, end, eot = n, n + 6, n + 7, n + 9
    expected = [begin]
    for role, content in [(m["role"], m["content"]) for m in CONVERSATION] + [
        ("assistant", None)
    ]:
        expected += [start] + enc(role) + [end] + enc("\n\n")
        if content is not None:
            expected += enc(content) + [eot]
    assert chat.chat_tokens(tokenizer, CONVERSATION) == expected


def test_llama2_chat_format_gives_metas_ids(tmp_path):
    from helpers import tiny_sentencepiece
    from sentencepiece import SentencePieceProcessor

    path = tiny_sentencepiece(tmp_path / "tokenizer.model")
    tokenizer = import_example("llama", "tokenizer").load_tokenizer(path)
    sp = SentencePieceProcessor(model_file=str(path))
    expected = (
        [1]
        + sp.encode(
            "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nCall me Ishmael. [/INST] Hello, "
            "Ishmael. "
        )
        + [2]
        + [1]
        + sp.encode("[INST] How long ago? [/INST]")
    )
    assert (
        import_example("llama", "chat").chat_tokens(tokenizer, CONVERSATION) == expected
    )


def test_hf_chat_template_gives_transformers_ids(tokenizer, ranks, tmp_path):
    from transformers import AutoTokenizer

    folder = tmp_path / "hf-tokenizer"
    folder.mkdir()
    tokenizer_module = import_example("llama", "tokenizer")
    bpe_tokenizer(ranks).save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": "<|begin_of_text|>",
                "eos_token": "<|eot_id|>",
                "chat_template": LLAMA3_TEMPLATE,
            }
        )
    )
    hf = tokenizer_module.load_tokenizer(folder)
    assert (
        hf.kind == "Hugging Face"
        and import_example("llama", "chat").hf_template(hf) == LLAMA3_TEMPLATE
    )
    ids = import_example("llama", "chat").chat_tokens(hf, CONVERSATION)
    reference = AutoTokenizer.from_pretrained(folder).apply_chat_template(
        CONVERSATION, add_generation_prompt=True, tokenize=True
    )
    assert ids == list(
        reference["input_ids"] if hasattr(reference, "keys") else reference
    )
    assert ids == import_example("llama", "chat").chat_tokens(
        tokenizer, CONVERSATION
    )  # the template is Meta's format


def test_chat_renders_a_hugging_face_template_in_a_fresh_process(
    llama3_model, ranks, tmp_path
):
    """A new process that has not imported transformers (which imports jinja2.ext)
    before llama.py renders one."""
    bpe_tokenizer(ranks).save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"})
    )
    (tmp_path / "chat_template.jinja").write_text(
        "{% for m in messages %}{% if loop.index0 > 5 %}{% break %}"
        "{% endif %}{{ m['content'] }}{% endfor %}"
    )  # loopcontrols' break
    result = run_script(
        "llama/llama.py",
        llama3_model,
        tmp_path,
        "--chat",
        "Call me Ishmael.",
        "--max-tokens",
        "3",
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("from the cache") == 1


def test_hf_model_stops_at_every_eos_id_of_its_generation_config(
    tokenizer, ranks, tmp_path
):
    tokenizer_module = import_example("llama", "tokenizer")
    bpe_tokenizer(ranks).save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "generation_config.json").write_text(
        json.dumps({"eos_token_id": [3, 5, 7]})
    )
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"eos_token": "<|eot_id|>"})
    )
    hf = tokenizer_module.load_tokenizer(tmp_path / "tokenizer.json")
    assert hf.stop_ids == {3, 5, 7, hf.token_id("<|eot_id|>")}
    chat = import_example(
        "llama", "chat"
    )  # no template, but Llama 3's header tokens: Meta's format
    assert chat.chat_tokens(hf, CONVERSATION) == chat.chat_tokens(
        tokenizer, CONVERSATION
    )


# ---- Llama 3.1 models: scaled RoPE, GQA, tied and untied output ----------------------


def llama3_rope(original_max_position_embeddings, factor=8.0, rope_theta=500000.0):
    return {
        "rope_type": "llama3",
        "factor": factor,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": original_max_position_embeddings,
        "rope_theta": rope_theta,
    }


@pytest.mark.parametrize(
    "head_dim, rope",
    [
        (128, llama3_rope(8192)),
        (64, llama3_rope(8192, factor=32.0)),
        (16, llama3_rope(32, rope_theta=10000.0)),
    ],
)
def test_scaled_rope_frequencies_equal_transformers(head_dim, rope):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = LlamaConfig(
        hidden_size=head_dim * 4, num_attention_heads=4, rope_parameters=rope
    )
    inv_freq, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    args = {k: v for k, v in rope.items() if k not in ("rope_type", "rope_theta")}
    periods = import_example("llama", "model").llama3_rope_freqs(
        head_dim, rope["rope_theta"], **args
    )
    np.testing.assert_allclose(1 / np.array(periods), inv_freq.numpy(), rtol=1e-6)
    assert not np.allclose(
        1 / np.array(periods),
        1 / rope["rope_theta"] ** (np.arange(0, head_dim, 2) / head_dim),
    )


def hf_logits(hf_model, ids):
    with torch.no_grad():
        return hf_model(torch.from_numpy(ids)).logits.numpy()


@pytest.mark.parametrize("layout", ["meta", "hf"])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_llama31_logits_match_transformers(layout, tied, tmp_path):
    from transformers import LlamaForCausalLM

    # Meta's params.json says only use_scaled_rope: Meta's constants (factor 8, old
    # context 8192) apply, so the reference uses them. The Hugging Face layout uses a
    # short old context, so all three frequency bands (kept, blended, slowed) turn by
    # noticeable angles within these 90 positions.
    rope = (
        llama3_rope(8192) if layout == "meta" else llama3_rope(32, rope_theta=10000.0)
    )
    folder = tiny_llama(
        tmp_path / "hf",
        seed=5,
        vocab_size=96,
        tie_word_embeddings=tied,
        rope_parameters=rope,
    )
    hf = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    if layout == "meta":
        source = tmp_path / "meta"
        source.mkdir()
        torch.save(
            hf_to_meta_state_dict(hf.state_dict()), source / "consolidated.00.pth"
        )  # tied: output == embedding
        params = {
            **LLAMA_PARAMS,
            "vocab_size": 96,
            "rope_theta": 500000.0,
            "use_scaled_rope": True,
        }
        (source / "params.json").write_text(json.dumps(params))
    else:
        source = folder
    result = run_script("llama/convert.py", source, tmp_path / "w.safetensors")
    assert result.returncode == 0, result.stderr
    assert "scaled x8" in result.stdout and ("tied embeddings" in result.stdout) == tied
    model = import_example("llama", "model").load_model(tmp_path / "w.safetensors")
    assert ("output" in model) != tied  # a tied model stores the matrix once
    ids = np.random.default_rng(1).integers(0, 96, (2, 90))
    np.testing.assert_allclose(
        np.array(model(mx.array(ids))), hf_logits(hf, ids), atol=TOL, rtol=0
    )


def test_hub_and_meta_llama31_configs_give_the_8b_model():
    convert = import_example("llama", "convert")
    hub = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_attention_heads": 32,
        "num_hidden_layers": 32,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "rms_norm_eps": 1e-05,
        "rope_theta": 500000.0,
        "max_position_embeddings": 131072,
        "tie_word_embeddings": False,
        "rope_scaling": {
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
            "rope_type": "llama3",
        },
    }
    params = {
        "dim": 4096,
        "ffn_dim_multiplier": 1.3,
        "multiple_of": 1024,
        "n_heads": 32,
        "n_kv_heads": 8,
        "n_layers": 32,
        "norm_eps": 1e-05,
        "rope_theta": 500000.0,
        "use_scaled_rope": True,
        "vocab_size": 128256,
    }
    a, b = convert.hf_args(hub), convert.meta_args(params, 128256)
    for args in (a, b):
        assert (
            args.hidden_dim,
            args.n_kv_heads,
            args.rope_theta,
            args.max_seq_len,
        ) == (14336, 8, 500000.0, 131072)
        assert args.rope_scaling == {
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        }
    llama_3_2_1b = {
        **params,
        "dim": 2048,
        "n_layers": 16,
        "ffn_dim_multiplier": 1.5,
        "multiple_of": 256,
    }
    assert (
        convert.meta_args(llama_3_2_1b, 128256).rope_scaling["factor"] == 32.0
    )  # as in its Hugging Face config
    assert (
        convert.meta_args({**params, "use_scaled_rope": False}, 128256).max_seq_len
        == 8192
    )  # Llama 3.0


def test_benchmark_8b_preset_is_the_llama31_8b_shape():
    from transformers import LlamaConfig

    benchmark = import_example("llama", "benchmark")
    args = benchmark.hf_args(LlamaConfig(**benchmark.PRESETS["8b"]).to_dict())
    assert (
        args.dim,
        args.n_layers,
        args.n_heads,
        args.n_kv_heads,
        args.hidden_dim,
        args.vocab_size,
    ) == (4096, 32, 32, 8, 14336, 128256)
    assert args.rope_theta == 500000.0 and args.rope_scaling["factor"] == 8.0


def test_mistral_without_sliding_window_and_tinyllama_shapes_match_transformers(
    tmp_path,
):
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
    )

    small = dict(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        rms_norm_eps=1e-5,
    )
    cases = {
        "mistral": (
            MistralForCausalLM,
            MistralConfig(
                **small,
                num_attention_heads=4,
                num_key_value_heads=2,
                sliding_window=None,
                rope_theta=1e6,
            ),
        ),
        # TinyLlama 1.1B: 32 query heads share 4 key/value heads (8 to 1); here 8 share
        # 1.
        "tinyllama": (
            LlamaForCausalLM,
            LlamaConfig(**small, num_attention_heads=8, num_key_value_heads=1),
        ),
    }
    ids = np.random.default_rng(2).integers(0, 64, (1, 20))
    for name, (cls, config) in cases.items():
        torch.manual_seed(0)
        hf = cls(config).eval()
        hf.save_pretrained(tmp_path / name)
        if (
            name == "mistral"
        ):  # Mistral's repositories also carry its own format, which is not read
            (tmp_path / name / "consolidated.safetensors").write_bytes(b"not read")
        result = run_script(
            "llama/convert.py", tmp_path / name, tmp_path / f"{name}.safetensors"
        )
        assert result.returncode == 0, result.stderr
        model = import_example("llama", "model").load_model(
            tmp_path / f"{name}.safetensors"
        )
        np.testing.assert_allclose(
            np.array(model(mx.array(ids))), hf_logits(hf, ids), atol=TOL, rtol=0
        )


@pytest.mark.parametrize(
    "change, message",
    [
        (
            {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]},
            "model_type 'qwen2' is not supported",
        ),
        (
            {"model_type": "mistral", "sliding_window": 4096},
            "sliding_window 4096 (Mistral 7B v0.1) is not supported",
        ),
        (
            {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}},
            "RoPE scaling 'yarn' is not supported",
        ),
        (
            {"rope_scaling": {"rope_type": "llama3", "factor": 8.0}},
            "llama3 RoPE scaling without low_freq_factor",
        ),
        ({"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported"),
    ],
)
def test_convert_refuses_other_models_with_one_line(change, message, tmp_path):
    folder = tiny_llama(tmp_path / "hf")
    config = json.loads((folder / "config.json").read_text())
    config.pop("rope_parameters", None)
    (folder / "config.json").write_text(json.dumps({**config, **change}))
    result = run_script("llama/convert.py", folder, tmp_path / "out.npz")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out.npz").exists()


# ---- llama.py: chat, and its one-line errors -----------------------------------------


@pytest.fixture(scope="module")
def llama3_model(ranks, tmp_path_factory):
    """A tiny Llama 3.1-style model whose vocabulary is the tiny rank file plus the 256
    special tokens."""
    folder = tiny_llama(
        tmp_path_factory.mktemp("llama3-model") / "hf",
        seed=7,
        vocab_size=len(ranks) + 256,
        max_position_embeddings=256,
        rope_parameters=llama3_rope(32, rope_theta=10000.0),
    )
    result = run_script("llama/convert.py", folder, folder.parent / "w.safetensors")
    assert result.returncode == 0, result.stderr
    return folder.parent / "w.safetensors"


def greedy_reply(model, tokenizer, tokens, max_tokens):
    """Recompute from scratch: greedy tokens after `tokens` up to a stop token or
    max_tokens."""
    reply = []
    while len(reply) < max_tokens:
        token = int(mx.argmax(model(mx.array([tokens + reply]))[0, -1]).item())
        reply.append(token)
        if token in tokenizer.stop_ids:
            break
    return reply


# --max-tokens 1: the reply stops at the first token, before its step runs, so the cache
# lacks it.
@pytest.mark.parametrize("max_tokens", [12, 1])
def test_interactive_chat_keeps_the_cache_and_answers_as_a_fresh_prompt_would(
    max_tokens, llama3_model, rank_file, tokenizer
):
    chat, model = (
        import_example("llama", "chat"),
        import_example("llama", "model").load_model(llama3_model),
    )
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "llama/llama.py"),
            str(llama3_model),
            str(rank_file),
            "--chat",
            "--system",
            "Be brief.",
            "--max-tokens",
            str(max_tokens),
        ],
        input="Call me Ishmael.\n\nHow long ago?\n",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    messages, expected = [{"role": "system", "content": "Be brief."}], ""
    for line in (
        "Call me Ishmael.",
        "How long ago?",
    ):  # the empty line in between is skipped
        messages.append({"role": "user", "content": line})
        reply = greedy_reply(
            model, tokenizer, chat.chat_tokens(tokenizer, messages), max_tokens
        )
        text = tokenizer.decode(
            reply[:-1] if reply[-1] in tokenizer.stop_ids else reply
        )
        messages.append({"role": "assistant", "content": text})
        expected += text + "\n"
    assert result.stdout == expected
    first_turn = len(chat.chat_tokens(tokenizer, messages[:2]))
    reused = [
        int(line.split("[")[1].split()[0])
        for line in result.stderr.splitlines()
        if "from the cache" in line
    ]
    assert (
        reused[0] == 0 and reused[1] >= first_turn
    )  # the second turn ran only the tokens after the first prompt


def test_chat_with_a_prompt_answers_once_without_reading_stdin(llama3_model, rank_file):
    from helpers import run_with_unread_stdin

    returncode, _, stderr, unread = run_with_unread_stdin(
        "llama/llama.py",
        llama3_model,
        rank_file,
        "--chat",
        "Call me Ishmael.",
        "--max-tokens",
        "4",
    )
    assert returncode == 0, stderr
    assert stderr.count("from the cache") == 1 and unread == "a line on stdin\n"


@pytest.mark.parametrize(
    "case, message",
    [
        ("vocabulary does not fit", "tokens but the weights expect"),
        ("unknown tokenizer kind", "not a tokenizer of a known kind"),
        ("no chat format", "has no known chat format"),
        ("system without chat", "--system needs --chat"),
        ("no prompt", "give a prompt to continue, --chat"),
        (
            "hub tokenizer offline",
            "cannot get 'meta-llama/Llama-3.1-8B-Instruct' from the Hugging Face Hub",
        ),
    ],
)
def test_llama_py_bad_llama3_input_gives_one_line(
    case, message, llama3_model, rank_file, ranks, tmp_path
):
    args = [llama3_model, rank_file, "Call me"]
    if case == "vocabulary does not fit":
        args[1] = write_ranks(
            dict(list(ranks.items())[:-3]), tmp_path / "tokenizer.model"
        )
    elif case == "unknown tokenizer kind":
        args[1] = tmp_path / "tokenizer.model"
        args[1].write_text("this is not a tokenizer\n")
    elif case == "no chat format":
        bpe_tokenizer(
            ranks, special_tokens=[f"<|special_{i}|>" for i in range(256)]
        ).save(str(tmp_path / "tokenizer.json"))
        args[1] = tmp_path / "tokenizer.json"
        args.append("--chat")
    elif case == "system without chat":
        args += ["--system", "Be brief."]
    elif case == "no prompt":
        args = args[:2]
    elif case == "hub tokenizer offline":  # tests run offline
        args[1] = "meta-llama/Llama-3.1-8B-Instruct"
    result = run_script("llama/llama.py", *args)
    assert result.returncode != 0
    assert message in result.stderr and "Traceback" not in result.stderr
    assert result.stdout == ""


def test_generate_says_through_the_cache_which_tokens_it_holds(llama3_model):
    """The first token is yielded as soon as the prompt pass ends, before its own step
    is built, so the cache then holds only the prompt; from the second token on, the
    yielded token's step is under way."""
    model = import_example("llama", "model").load_model(llama3_model)
    prompt = mx.array([5, 6, 7, 8])
    for n_taken, expected_offset in ((1, 4), (2, 6), (3, 7)):
        cache = model.make_cache()
        generator = model.generate(prompt, cache=cache)
        for _ in range(n_taken):
            next(generator)
        mx.eval([c.keys for c in cache])
        assert cache[0].offset == expected_offset, (n_taken, cache[0].offset)
