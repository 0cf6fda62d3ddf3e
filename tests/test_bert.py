"""BERT in MLX against transformers, on tiny random checkpoints saved to local folders
by the test."""

import re

import mlx.core as mx
import numpy as np
import pytest
import torch
from helpers import (
    BERT_VOCAB as VOCAB,
)
from helpers import (
    import_example,
    run_script,
)
from helpers import (
    tiny_bert as save_checkpoint,
)
from transformers import BertForMaskedLM, BertForPreTraining, BertModel, BertTokenizer

model_py = import_example("bert", "model")
convert = import_example("bert", "convert")

SENTENCES = [
    "this is an example of bert working on mlx.",
    "a second string",
    "another.",
]
PAIRS = (
    ["the capital of france is paris.", "this is it"],
    ["it is a string.", "a b c d e f g"],
)


@pytest.fixture(scope="module")
def pretraining(tmp_path_factory):
    """A BertForPreTraining checkpoint (encoder, pooler, MLM head, NSP head), like
    bert-base-uncased, converted."""
    folder = save_checkpoint(tmp_path_factory.mktemp("bert") / "hf", BertForPreTraining)
    npz = folder.parent / "bert.npz"
    result = run_script("bert/convert.py", "--bert-model", folder, "--mlx-model", npz)
    assert result.returncode == 0, result.stderr
    return folder, npz


def run_both(folder, npz, *texts):
    model, tokenizer = model_py.load_model(str(folder), str(npz))
    tokens = tokenizer(*texts, return_tensors="np", padding=True)
    output, pooled = model(**{k: mx.array(v) for k, v in tokens.items()})
    with torch.no_grad():
        reference = BertModel.from_pretrained(folder).eval()(
            **{k: torch.from_numpy(v) for k, v in tokens.items()}
        )
    return tokens, model, (np.array(output), np.array(pooled)), reference


def test_output_and_pooled_equal_transformers_on_a_padded_batch(pretraining):
    tokens, _, (output, pooled), reference = run_both(*pretraining, SENTENCES)
    assert (tokens["attention_mask"] == 0).any()  # the batch really is padded
    # Padded positions included: they are computed the same way in both.
    np.testing.assert_allclose(
        output, reference.last_hidden_state.numpy(), atol=1e-5, rtol=0
    )
    np.testing.assert_allclose(
        pooled, reference.pooler_output.numpy(), atol=1e-5, rtol=0
    )


def test_output_equals_transformers_on_sentence_pairs(pretraining):
    tokens, _, (output, pooled), reference = run_both(*pretraining, *PAIRS)
    assert tokens["token_type_ids"].max() == 1  # the second segment is marked
    np.testing.assert_allclose(
        output, reference.last_hidden_state.numpy(), atol=1e-5, rtol=0
    )
    np.testing.assert_allclose(
        pooled, reference.pooler_output.numpy(), atol=1e-5, rtol=0
    )


def test_padding_does_not_change_the_real_tokens(pretraining):
    folder, npz = pretraining
    model, tokenizer = model_py.load_model(str(folder), str(npz))
    alone = tokenizer(["a second string"], return_tensors="np")
    padded = tokenizer(
        ["a second string", SENTENCES[0]], return_tensors="np", padding=True
    )
    out_alone, _ = model(**{k: mx.array(v) for k, v in alone.items()})
    out_padded, _ = model(**{k: mx.array(v) for k, v in padded.items()})
    T = alone["input_ids"].shape[1]
    np.testing.assert_allclose(
        np.array(out_padded)[0, :T], np.array(out_alone)[0], atol=1e-5
    )


@pytest.mark.parametrize("hf_class", [BertForMaskedLM, BertForPreTraining])
def test_masked_lm_logits_equal_transformers(tmp_path, hf_class):
    folder = save_checkpoint(tmp_path / "hf", hf_class, seed=1)
    assert (
        run_script(
            "bert/convert.py", "--bert-model", folder, "--mlx-model", tmp_path / "b.npz"
        ).returncode
        == 0
    )
    model, tokenizer = model_py.load_model(str(folder), str(tmp_path / "b.npz"))
    tokens = tokenizer(
        ["the capital of france is [MASK].", "a [MASK] string"],
        return_tensors="np",
        padding=True,
    )
    hidden, _ = model(**{k: mx.array(v) for k, v in tokens.items()})
    logits = np.array(model.mlm(hidden, model.embeddings.word_embeddings))
    with torch.no_grad():
        reference = BertForMaskedLM.from_pretrained(folder).eval()(
            **{k: torch.from_numpy(v) for k, v in tokens.items()}
        )
    np.testing.assert_allclose(logits, reference.logits.numpy(), atol=1e-5, rtol=0)


def test_a_checkpoint_without_mlm_head_converts_and_says_so(tmp_path):
    folder = save_checkpoint(tmp_path / "hf", BertModel)
    result = run_script(
        "bert/convert.py", "--bert-model", folder, "--mlx-model", tmp_path / "b.npz"
    )
    assert result.returncode == 0 and "without the masked-LM head" in result.stdout
    result = run_script(
        "bert/main.py",
        "--bert-model",
        folder,
        "--mlx-model",
        tmp_path / "b.npz",
        "a [MASK].",
    )
    assert (
        result.returncode == 1
        and "no masked-LM head" in result.stderr
        and "Traceback" not in result.stderr
    )


def test_old_gamma_beta_names_and_bert_prefix_are_mapped():
    assert (
        convert.hf_to_mlx_name("bert.encoder.layer.3.output.LayerNorm.gamma")
        == "encoder.layers.3.ffn_norm.weight"
    )
    assert (
        convert.hf_to_mlx_name("bert.embeddings.LayerNorm.beta")
        == "embeddings.norm.bias"
    )
    assert convert.hf_to_mlx_name("cls.seq_relationship.weight") is None
    with pytest.raises(convert.ConversionError, match="lm_head"):
        convert.hf_to_mlx_name("lm_head.weight")


@pytest.mark.parametrize(
    "damage, named",
    [
        ("extra", r"not in model: encoder.layers.9.extra"),
        ("missing", r"Missing 1 parameters: encoder.layers.1.ffn_norm.bias"),
        (
            "shape",
            r"shape \(32, 32\) but received shape \(32, 16\) for parameter "
            r"encoder.layers.0.attention.query.weight",
        ),
    ],
)
def test_weights_that_do_not_fit_are_named(pretraining, tmp_path, damage, named):
    folder, npz = pretraining
    weights = dict(np.load(npz))
    if damage == "extra":
        weights["encoder.layers.9.extra"] = np.zeros(3, np.float32)
    elif damage == "missing":
        del weights["encoder.layers.1.ffn_norm.bias"]
    else:
        weights["encoder.layers.0.attention.query.weight"] = weights[
            "encoder.layers.0.attention.query.weight"
        ][:, :16]
    np.savez(tmp_path / "bad.npz", **weights)
    with pytest.raises(ValueError, match=r"cannot load .*bad.npz: ") as error:
        model_py.load_model(str(folder), str(tmp_path / "bad.npz"))
    assert re.search(named, " ".join(str(error.value).split()))


def test_a_tokenizer_larger_than_the_vocabulary_is_refused(pretraining, tmp_path):
    folder, npz = pretraining
    other = tmp_path / "other"
    other.mkdir()
    for name in ("config.json",):
        (other / name).write_text((folder / name).read_text())
    (other / "vocab.txt").write_text(
        "\n".join(VOCAB + [f"extra{i}" for i in range(10)]) + "\n"
    )
    BertTokenizer(str(other / "vocab.txt")).save_pretrained(other)
    with pytest.raises(ValueError, match="tokenizer"):
        model_py.load_model(str(other), str(npz))


def test_corrupt_weights_give_one_line(pretraining, tmp_path):
    folder, _ = pretraining
    (tmp_path / "bad.npz").write_bytes(b"not a zip file")
    result = run_script(
        "bert/model.py", "--bert-model", folder, "--mlx-model", tmp_path / "bad.npz"
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "bad.npz" in result.stderr.strip().splitlines()[-1]
    assert result.stderr.count("\n") == 1


def test_convert_refuses_a_missing_folder_and_writes_nothing(tmp_path):
    result = run_script(
        "bert/convert.py",
        "--bert-model",
        tmp_path / "nope" / "here",
        "--mlx-model",
        tmp_path / "o.npz",
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "is not a folder" in result.stderr
    assert not (tmp_path / "o.npz").exists()


@pytest.mark.parametrize("given", ["weights/bert-bas", "./bert", "a_file"])
def test_convert_says_a_mistyped_local_folder_is_not_a_folder(tmp_path, given):
    (
        tmp_path / "weights"
    ).mkdir()  # "weights/bert-bas" looks like org/name, but weights/ is a folder here
    (tmp_path / "a_file").write_text("")
    result = run_script(
        "bert/convert.py",
        "--bert-model",
        given,
        "--mlx-model",
        tmp_path / "o.npz",
        cwd=tmp_path,
    )
    assert result.returncode == 1 and result.stderr.startswith(
        f"error: {given} is not a folder"
    )
    assert (
        len(result.stderr.strip().splitlines()) == 1
        and "Hub" not in result.stderr.split(";")[0]
    )


def test_convert_takes_org_slash_name_as_a_hub_name(tmp_path):
    result = run_script(
        "bert/convert.py",
        "--bert-model",
        "google-bert/bert-base-uncased",
        "--mlx-model",
        tmp_path / "o.npz",
    )
    assert (
        result.returncode == 1
    )  # offline in tests: the Hub is asked and cannot answer
    assert (
        "cannot get 'google-bert/bert-base-uncased' from the Hugging Face Hub"
        in result.stderr
    )


def test_convert_reads_pytorch_bin_checkpoints(tmp_path, pretraining):
    folder, npz = pretraining
    bin_folder = save_checkpoint(tmp_path / "bin", BertForPreTraining)
    state_dict = BertForPreTraining.from_pretrained(folder).state_dict()
    (bin_folder / "model.safetensors").unlink()
    torch.save(state_dict, bin_folder / "pytorch_model.bin")
    assert (
        run_script(
            "bert/convert.py",
            "--bert-model",
            bin_folder,
            "--mlx-model",
            tmp_path / "b.npz",
        ).returncode
        == 0
    )
    a, b = np.load(npz), np.load(tmp_path / "b.npz")
    assert sorted(a.files) == sorted(b.files)
    for k in a.files:
        np.testing.assert_array_equal(a[k], b[k])


def test_fill_mask_prints_top_k_with_probabilities(pretraining):
    folder, npz = pretraining
    result = run_script(
        "bert/main.py",
        "--bert-model",
        folder,
        "--mlx-model",
        npz,
        "--top-k",
        "3",
        "the capital of france is [MASK].",
        "a [MASK] b [MASK]",
    )
    assert result.returncode == 0, result.stderr
    lines = [
        line for line in result.stdout.splitlines() if "[MASK] " in line and ":" in line
    ]
    assert len(lines) == 3  # one line per [MASK]
    probabilities = [float(p.split(")")[0]) for p in lines[0].split("(")[1:]]
    assert len(probabilities) == 3 and probabilities == sorted(
        probabilities, reverse=True
    )


def test_fill_mask_equals_transformers_top_token(pretraining):
    folder, npz = pretraining
    main = import_example("bert", "main")
    model, tokenizer = model_py.load_model(str(folder), str(npz))
    (fills,) = main.fill_mask(
        model, tokenizer, ["the capital of france is [MASK]."], top_k=1
    )
    tokens = tokenizer(["the capital of france is [MASK]."], return_tensors="pt")
    with torch.no_grad():
        logits = BertForMaskedLM.from_pretrained(folder).eval()(**tokens).logits[0]
    position = (tokens["input_ids"][0] == tokenizer.mask_token_id).nonzero()[0, 0]
    assert fills[0][0][0] == tokenizer.convert_ids_to_tokens(
        int(logits[position].argmax())
    )
    assert abs(fills[0][0][1] - float(logits[position].softmax(-1).max())) < 1e-5


def test_float16_inference_stays_close(pretraining):
    folder, npz = pretraining
    model, tokenizer = model_py.load_model(str(folder), str(npz), dtype=mx.float16)
    tokens = tokenizer(SENTENCES, return_tensors="np", padding=True)
    output, _ = model(**{k: mx.array(v) for k, v in tokens.items()})
    assert output.dtype == mx.float16
    _, _, (reference, _), _ = run_both(folder, npz, SENTENCES)
    assert np.abs(np.array(output.astype(mx.float32)) - reference).max() < 0.05


def test_an_unreachable_model_name_gives_one_line(pretraining):
    _, npz = pretraining
    result = run_script(
        "bert/model.py", "--bert-model", "no-such-org/no-such-bert", "--mlx-model", npz
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith(
        "error: "
    )


def test_benchmark_says_at_once_what_it_times_and_then_its_progress_and_time_left(
    tmp_path,
):
    result = run_script(
        "bert/benchmark.py",
        "--tiny",
        "--repeats",
        "1",
        "--shapes",
        "2x16",
        "1x8",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    lines = [
        line for line in result.stderr.splitlines() if not line.startswith("warning:")
    ]
    assert lines[0].startswith("timing tiny forward passes at 2x16 1x8")
    assert "to go" in lines[1]  # the estimate, after the first forward pass
    ends = [line for line in lines if "median" in line]
    assert [line.split(":")[0] for line in ends] == [
        "MLX 2x16",
        "MLX 1x8",
        "MLX compiled 2x16",
        "MLX compiled 1x8",
        "PyTorch 2x16",
        "PyTorch 1x8",
    ]
    assert all("so far, about" in line for line in ends)
    assert (
        "shape" in result.stdout and "MLX/PyTorch" in result.stdout
    )  # the table stays on stdout
