"""Write a GGUF file (llama.cpp, Ollama, LM Studio): a converted model, or another GGUF.

    python llama/convert.py model.safetensors model.gguf --gguf-type Q4_0 --tokenizer hf
    python llama/convert.py SmolLM2-135M-Instruct.Q4_1.gguf smol.gguf --gguf-type Q8_0

Every matrix is dequantized to float32 and stored as F16, or quantized by llama.cpp's
own `gguf` package to Q8_0 or Q4_0; norms stay F32. A model converted from Hugging Face
(rope_traditional False) has its wq and wk rows permuted into llama.cpp's order first
(the permute of llama.cpp's convert_hf_to_gguf.py). The tokenizer and chat template are
copied from a .gguf, or made from a Hugging Face folder's BPE tokenizer.json by
gguf.vocab.
"""

from pathlib import Path

import mlx.core as mx
import numpy as np
from gguf_file import NAMES, load_gguf
from model import WeightsError, write_atomically


def llama_cpp_permute(w, n_heads):
    """llama.cpp's convert_hf_to_gguf permute: Hugging Face's rows of wq or wk in Meta's
    order."""
    return (
        w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def gguf_tensors(model, gguf_type):
    """(GGUF name, numpy array, ggml type) for every weight of `model`, dequantized and
    then stored as `gguf_type` (F16, Q8_0 or Q4_0; norms stay F32)."""
    from gguf import GGMLQuantizationType, quants

    ours = {v: k for k, v in NAMES.items()}
    args = model.args
    for name, module in model.named_modules():
        if not hasattr(module, "weight") or not name:
            continue
        w = module.weight
        if "scales" in module:  # in float32: a float16 scale * q + bias would round
            scales, biases = (
                a.astype(mx.float32) for a in (module.scales, module.biases)
            )
            w = mx.dequantize(w, scales, biases, module.group_size, module.bits)
        w = np.array(w.astype(mx.float32))
        if not args.rope_traditional and name.endswith(("wq", "wk")):
            heads = args.n_heads if name.endswith("wq") else args.n_kv_heads
            w = llama_cpp_permute(w, heads)
        layer, _, module_name = name.rpartition("layers.")[2].partition(".")
        if name.startswith("layers."):
            gguf_name = f"blk.{layer}.{ours[module_name]}.weight"
        else:
            gguf_name = f"{ours[name]}.weight"
        kind = GGMLQuantizationType[gguf_type if w.ndim == 2 else "F32"]
        if kind == GGMLQuantizationType.F16:
            yield gguf_name, w.astype(np.float16), kind
        else:
            yield gguf_name, quants.quantize(w, kind), kind


def write_gguf(path, model, tokenizer_source, gguf_type="F16"):
    """`model` as a GGUF file llama.cpp reads, with the tokenizer and chat template of
    `tokenizer_source` (a .gguf, or a Hugging Face folder with tokenizer.json)."""
    import gguf

    args = model.args
    if args.rope_scaling is not None:
        raise WeightsError(
            "a model with scaled RoPE (Llama 3.1) cannot be written as GGUF here"
        )

    def write(tmp):
        writer = gguf.GGUFWriter(str(tmp), "llama")
        writer.add_block_count(args.n_layers)
        writer.add_context_length(args.max_seq_len)
        writer.add_embedding_length(args.dim)
        writer.add_feed_forward_length(args.hidden_dim)
        writer.add_head_count(args.n_heads)
        writer.add_head_count_kv(args.n_kv_heads)
        writer.add_rope_freq_base(args.rope_theta)
        writer.add_rope_dimension_count(args.head_dim)
        writer.add_layer_norm_rms_eps(args.norm_eps)
        writer.add_vocab_size(args.vocab_size)
        writer.add_file_type(gguf.LlamaFileType[f"MOSTLY_{gguf_type}"])
        add_tokenizer(writer, Path(tokenizer_source), args.vocab_size)
        for name, array, kind in gguf_tensors(model, gguf_type):
            writer.add_tensor(name, array, raw_dtype=kind)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    write_atomically(path, write)


def add_tokenizer(writer, source, vocab_size):
    """The tokenizer.* metadata: copied from a .gguf, or made from a Hugging Face
    folder by llama.cpp's own gguf.vocab (BPE tokenizer.json; merges, special ids, chat
    template)."""
    import gguf

    if source.suffix == ".gguf":
        reader = gguf.GGUFReader(source)
        for field in reader.fields.values():
            if field.name.startswith("tokenizer."):
                kind = (
                    field.types[-1]
                    if field.types[0] == gguf.GGUFValueType.ARRAY
                    else None
                )
                writer.add_key_value(field.name, field.contents(), field.types[0], kind)
        return
    folder = source if source.is_dir() else source.parent
    try:
        vocab = gguf.vocab.BpeVocab(folder)
    except Exception as e:
        raise WeightsError(
            f"cannot read a BPE tokenizer.json in {folder} for the GGUF ({e})"
        ) from None
    tokens, _, types = zip(*vocab.all_tokens())
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(list(tokens))
    writer.add_token_types(list(types))
    gguf.vocab.SpecialVocab(folder, load_merges=True, n_vocab=vocab_size).add_to_gguf(
        writer
    )


def convert_to_gguf(args):
    """convert.py CHECKPOINT OUT.gguf: a converted file (or a GGUF) written as a GGUF of
    args.gguf_type, with the tokenizer of args.tokenizer (default: a .gguf checkpoint's
    own)."""
    from model import load_model  # a .safetensors or .npz from convert.py

    source = Path(args.checkpoint)
    if source.suffix == ".gguf":
        model, _ = load_gguf(source, dtype=mx.float32)
    else:
        model = load_model(source)  # a .safetensors or .npz from convert.py
    tokenizer = args.tokenizer or (source if source.suffix == ".gguf" else None)
    if tokenizer is None:
        raise WeightsError(
            "a .gguf output needs --tokenizer: the Hugging Face folder or .gguf "
            "to take the tokenizer and chat template from"
        )
    write_gguf(args.output, model, tokenizer, args.gguf_type)
    size = Path(args.output).stat().st_size / 2**20
    return f"Wrote {args.output} ({args.gguf_type}, {size:.1f} MiB)"
