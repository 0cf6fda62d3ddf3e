"""llama/speculative.py: prompt lookup and a draft model change no greedy token and no
sampling distribution; the cache is rolled back; llama.py's flags, refusals and chat."""

import os
import subprocess
import sys
from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pytest
from helpers import ROOT, import_example, run_script, tiny_llama
from mlx.utils import tree_flatten, tree_map
from scipy.stats import chisquare

pytestmark = pytest.mark.usefixtures("llama_on_path", "on_cpu")


def random_llama(seed, vocab_size=320, max_seq_len=256):
    """A tiny Llama (GQA) with weights wide enough that its tokens differ."""
    model_module = import_example("llama", "model")
    args = model_module.ModelArgs(
        dim=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        vocab_size=vocab_size,
        hidden_dim=128,
        rope_traditional=False,
        max_seq_len=max_seq_len,
    )
    mx.random.seed(seed)
    model = model_module.Llama(args)
    model.update(
        tree_map(lambda p: mx.random.normal(p.shape) * 0.3, model.parameters())
    )
    mx.eval(model.parameters())
    return model


def first(tokens, n):
    """The first n tokens of a generator of tokens."""
    return [token for _, token in zip(range(n), tokens)]


def plain(model, prompt, n):
    return first(model.generate(mx.array(prompt)), n)


def repeating_prompt(seed, length=24, vocab_size=320):
    """Random tokens, then the same tokens again: a prompt with something to look up."""
    half = np.random.default_rng(seed).integers(3, vocab_size, length // 2).tolist()
    return half + half


@pytest.fixture(scope="module")
def target():
    return random_llama(0)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A tiny Hugging Face Llama (context 96) converted by convert.py; its tokenizer."""
    folder = tiny_llama(tmp_path_factory.mktemp("llama_speculative") / "hf")
    result = run_script("llama/convert.py", folder, folder.parent / "hf.npz")
    assert result.returncode == 0, result.stderr
    return folder.parent / "hf.npz", folder / "tokenizer.model"


def test_greedy_prompt_lookup_gives_plain_tokens_for_every_k(target):
    speculative = import_example("llama", "speculative")
    for seed in range(3):
        prompt = repeating_prompt(seed)
        expected = plain(target, prompt, 60)
        for k in (1, 2, 5, 10):
            for ngram_size in (1, 3):
                lookup = speculative.PromptLookup(k, ngram_size)
                tokens = speculative.speculative_generate(target, prompt, lookup)
                assert first(tokens, 60) == expected, (seed, k, ngram_size)
                assert lookup.proposed > 0
        assert lookup.accepted > 0  # the model repeats itself: some proposals are kept


def test_model_as_its_own_draft_accepts_every_proposal(target):
    speculative = import_example("llama", "speculative")
    prompt = repeating_prompt(3)
    for k in (1, 3, 7):
        draft = speculative.DraftModel(target, k)
        tokens = speculative.speculative_generate(target, prompt, draft)
        assert first(tokens, 50) == plain(target, prompt, 50)
        assert draft.accepted == draft.proposed > 0


def test_unrelated_draft_accepts_almost_nothing_and_gives_plain_tokens(target):
    speculative = import_example("llama", "speculative")
    prompt = repeating_prompt(4)
    draft = speculative.DraftModel(random_llama(1), 4)
    tokens = speculative.speculative_generate(target, prompt, draft)
    assert first(tokens, 50) == plain(target, prompt, 50)
    assert draft.proposed > 40 and draft.accepted <= 0.1 * draft.proposed


def test_cache_after_rejections_equals_a_fresh_recompute(target):
    """After blocks with rejected proposals, the model's cached keys and values are
    those of running it on the tokens kept, from scratch; so are the draft's once it
    proposes again."""
    speculative = import_example("llama", "speculative")
    prompt = repeating_prompt(5)
    draft = speculative.DraftModel(random_llama(1), 5)
    cache, tokens = target.make_cache(), []
    for token in speculative.speculative_generate(target, prompt, draft, cache=cache):
        tokens.append(token)
        # At a block's end the cache holds every token but the last one.
        if len(tokens) >= 30 and cache[0].offset == len(prompt) + len(tokens) - 1:
            break
    assert draft.proposed > draft.accepted  # some proposals were rejected
    sequence = prompt + tokens
    mx.eval(draft.propose(sequence, 1, 0.0, 1.0))
    for model, kept_cache in ((target, cache), (draft.model, draft.cache)):
        offset = kept_cache[0].offset
        assert offset >= len(sequence) - 1
        fresh = model.make_cache()
        model(mx.array(sequence[:offset])[None], fresh)
        for kept, recomputed in zip(kept_cache, fresh):
            for a, b in (
                (kept.keys, recomputed.keys),
                (kept.values, recomputed.values),
            ):
                np.testing.assert_allclose(
                    np.array(a[:, :, :offset]), np.array(b[:, :, :offset]), atol=1e-5
                )


def test_cache_holds_the_tokens_yielded_while_passes_run_ahead(target):
    """Prompt lookup builds each pass before the one under way is read, on a guess of
    how many proposals that one keeps (here wrong both ways at times); after every
    token, greedy or sampled, the cached positions a caller keeps (up to
    cache[0].offset, at most the tokens so far) hold the keys and values of a fresh run
    on those tokens."""
    speculative = import_example("llama", "speculative")
    prompt = repeating_prompt(6)
    accepted = {}
    for temp, seed in ((0.0, 0), (0.1, 0), (0.1, 1), (0.1, 2)):
        mx.random.seed(seed)
        lookup = speculative.PromptLookup(4, 1)
        cache, tokens = target.make_cache(), []
        stream = speculative.speculative_generate(
            target, prompt, lookup, temp, cache=cache
        )
        for token in stream:
            tokens.append(token)
            sequence = prompt + tokens
            held = min(cache[0].offset, len(sequence))
            fresh = target.make_cache()
            target(mx.array(sequence[:held])[None], fresh)
            for kept, recomputed in zip(cache, fresh):
                np.testing.assert_allclose(
                    np.array(kept.keys[:, :, :held]),
                    np.array(recomputed.keys[:, :, :held]),
                    atol=1e-5,
                )
            if len(tokens) == 40:
                break
        assert lookup.accepted < lookup.proposed
        accepted[temp] = accepted.get(temp, 0) + lookup.accepted
        if temp == 0:
            assert tokens == plain(target, prompt, 40)
    assert accepted[0.0] > 0 and accepted[0.1] > 0


def test_context_end_inside_a_block_stops_as_plain_decoding():
    """Proposals stop at the context's end: the tokens up to it are plain decoding's,
    and no position past it is computed."""
    speculative = import_example("llama", "speculative")
    model = random_llama(0, max_seq_len=40)
    prompt = repeating_prompt(3, length=30)
    room = 40 - len(prompt)  # as llama.py stops: when the context is full
    for proposer in (speculative.PromptLookup(10, 1), speculative.DraftModel(model, 7)):
        cache = model.make_cache()
        tokens = speculative.speculative_generate(model, prompt, proposer, cache=cache)
        assert first(tokens, room) == plain(model, prompt, room)
        assert cache[0].offset <= 40 and proposer.accepted > 0


def test_stop_token_inside_a_block_ends_the_reply_as_plain_decoding(target, converted):
    """llama.py's generate with a stop token that falls inside an accepted block."""
    llama = import_example("llama", "llama")
    speculative = import_example("llama", "speculative")
    tokenizer = import_example("llama", "tokenizer")
    tok = tokenizer.load_tokenizer(converted[1], 320)
    prompt = repeating_prompt(7)
    expected = plain(target, prompt, 40)
    # A token that first comes well inside the reply, as the stop token.
    index = next(i for i in range(5, 40) if expected[i] not in expected[:i])
    tok.stop_ids = {expected[index]}
    replies = []
    for proposer in (
        None,
        speculative.DraftModel(target, 6),
        speculative.PromptLookup(9),
    ):
        args = SimpleNamespace(temp=0.0, top_p=1.0, max_tokens=40, proposer=proposer)
        replies.append(llama.generate(target, tok, args, prompt)[0])
    assert replies[0] == replies[1] == replies[2] == expected[:index]


# ---- Sampling: the distribution of the first tokens ----------------------------------


def exact_distribution(model, prompt, temp, top_p, n):
    """The probabilities (vocab,) * n of the first n sampled tokens, enumerated."""
    speculative = import_example("llama", "speculative")
    vocab = model.args.vocab_size
    joint = np.ones([1])
    sequences = np.array([prompt])
    for _ in range(n):
        logits = model(mx.array(sequences))[:, -1]
        p = np.array(speculative.probabilities(logits, temp, top_p))
        joint = (joint[:, None] * p).reshape(-1)
        sequences = np.concatenate(
            [
                np.repeat(sequences, vocab, 0),
                np.tile(np.arange(vocab), len(sequences))[:, None],
            ],
            axis=1,
        )
    return joint.reshape((vocab,) * n)


def chi_square_p_value(samples, probabilities):
    """The p-value of samples (N, n) drawn from `probabilities` (vocab,) * n; cells
    expected fewer than 5 times are pooled."""
    expected = probabilities.reshape(-1) * len(samples)
    index = np.ravel_multi_index(samples.T, probabilities.shape)
    observed = np.bincount(index, minlength=expected.size)
    small = expected < 5
    observed = np.append(observed[~small], observed[small].sum())
    expected = np.append(expected[~small], expected[small].sum())
    return chisquare(observed, expected * observed.sum() / expected.sum()).pvalue


def test_sampled_tokens_have_plain_samplings_distribution():
    """With --temp and --top-p, the first three tokens (the last two from proposed
    blocks) follow the model's distribution exactly, for prompt lookup and for an
    unrelated draft model; the distribution at another temperature is rejected by the
    same samples."""
    speculative = import_example("llama", "speculative")
    model, other = random_llama(2, vocab_size=8), random_llama(3, vocab_size=8)
    prompt = [1, 2, 3, 4, 5, 6, 7, 0, 1, 2]  # every token occurs: 1-grams always match
    mx.random.seed(0)
    for proposer, top_p in (
        (speculative.PromptLookup(3, 1), 0.8),
        (speculative.DraftModel(other, 3), 1.0),
    ):
        samples, proposed, accepted = [], 0, 0
        for _ in range(1200):
            tokens = speculative.speculative_generate(
                model, prompt, proposer, 1.0, top_p
            )
            samples.append(first(tokens, 3))
            proposed += proposer.proposed
            accepted += proposer.accepted
        assert 0.03 * proposed < accepted < 0.9 * proposed  # both rules at work
        exact = exact_distribution(model, prompt, 1.0, top_p, 3)
        assert chi_square_p_value(np.array(samples), exact) > 0.01
        colder = exact_distribution(model, prompt, 0.8, top_p, 3)
        assert chi_square_p_value(np.array(samples), colder) < 1e-3


# ---- llama.py ------------------------------------------------------------------------


def chat_run(converted, lines, *flags):
    """llama.py --chat with `lines` on stdin: (return code, stdout, stderr)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, str(ROOT / "llama/llama.py"), *map(str, converted)]
    result = subprocess.run(
        [*command, "--chat", "--max-tokens", "10", *map(str, flags)],
        input="".join(f"{line}\n" for line in lines),
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    return result.returncode, result.stdout, result.stderr


def test_chat_turns_give_plain_replies_and_the_share_accepted(converted):
    """Two turns, the second ending at the context's end (96 tokens), with a cache kept
    between them."""
    lines = ["call me ishmael some years ago", "never mind how long precisely"]
    code, expected, err = chat_run(converted, lines)
    assert code == 0, err
    for flags in (
        ["--prompt-lookup", 4, "--ngram-size", 1],
        ["--draft-model", converted[0]],
    ):
        code, out, err = chat_run(converted, lines, *flags)
        assert code == 0, err
        assert out == expected
        assert "proposed accepted" in err


def test_refusals_are_one_line(converted, tmp_path):
    model_module = import_example("llama", "model")
    convert = import_example("llama", "convert")
    other = random_llama(0, vocab_size=256)
    weights = dict(tree_flatten(other.parameters()))
    convert.save(other.args, weights, tmp_path / "draft.safetensors")
    assert (
        model_module.load_model(tmp_path / "draft.safetensors").args.vocab_size == 256
    )
    cases = {
        "vocabulary": ["--draft-model", tmp_path / "draft.safetensors"],
        "at least 1": ["--prompt-lookup", 0],
        "pick one": ["--prompt-lookup", 3, "--draft-model", converted[0]],
    }
    for words, flags in cases.items():
        result = run_script("llama/llama.py", *converted, "call me", *flags)
        assert result.returncode != 0
        assert "Traceback" not in result.stderr
        assert result.stdout == ""
        lines = [line for line in result.stderr.splitlines() if "error" in line]
        assert len(lines) == 1 and words in lines[0]
