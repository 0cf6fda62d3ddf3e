"""llama/perplexity.py: sliding-window perplexity, the sum of transformers' guide."""

import math

import pytest
from helpers import LLAMA_TEXT, run_script, tiny_llama


def transformers_perplexity(model, ids, window, stride):
    """transformers' "Perplexity of fixed-length models" loop, each window's mean loss
    weighted by the tokens it averages (the guide subtracts one per window, right for
    the first only)."""
    import torch

    nll_sum, n_tokens, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + window, len(ids))
        trg_len = end - prev_end
        input_ids = torch.tensor([ids[begin:end]])
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            loss = model(input_ids, labels=target_ids).loss
        valid = (target_ids[:, 1:] != -100).sum().item()  # the labels shift by one
        nll_sum += loss.item() * valid
        n_tokens += valid
        prev_end = end
        if end == len(ids):
            break
    return math.exp(nll_sum / n_tokens)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    folder = tiny_llama(tmp_path_factory.mktemp("ppl") / "hf")
    out = folder.parent / "tiny.safetensors"
    result = run_script("llama/convert.py", folder, out, "--dtype", "float32")
    assert result.returncode == 0, result.stderr
    text = folder.parent / "text.txt"
    text.write_text("\n".join(LLAMA_TEXT[:8]))
    return folder, out, text


@pytest.mark.parametrize("window,stride", [(96, 48), (40, 40), (32, 7)])
def test_perplexity_equals_transformers_within_1e_4(converted, window, stride):
    import torch
    from sentencepiece import SentencePieceProcessor
    from transformers import LlamaForCausalLM

    folder, weights, text = converted
    result = run_script(
        "llama/perplexity.py",
        weights,
        folder / "tokenizer.model",
        "--data",
        text,
        "--window",
        window,
        "--stride",
        stride,
    )
    assert result.returncode == 0, result.stderr
    model = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    ids = [tokenizer.bos_id()] + tokenizer.encode(text.read_text())  # BOS and the text
    assert len(ids) > window  # several windows
    expected = transformers_perplexity(model, ids, window, stride)
    assert abs(float(result.stdout) - expected) < 1e-4 * expected


def test_bad_input_is_refused_in_one_line(converted, tmp_path):
    folder, weights, text = converted
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    for args in (
        [weights, folder / "tokenizer.model", "--data", empty],
        [weights, folder / "tokenizer.model", "--data", tmp_path / "missing.txt"],
        [weights, "--data", text],
    ):
        result = run_script("llama/perplexity.py", *args)
        assert result.returncode == 1
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
