"""Sentence embeddings (bert/embed.py) against sentence-transformers, on tiny random
models saved offline."""

import json
import re

import mlx.core as mx
import numpy as np
import pytest
from helpers import import_example, run_script, tiny_bert, tiny_sentence_transformer

embed = import_example("bert", "embed")

# Of different lengths, so that batches of 2 are padded; the longest first and last, as
# sorting must restore order.
SENTENCES = [
    "the capital of france is paris, and paris is the capital of france.",
    "a b",
    "this is it",
    "an example of bert working on mlx",
    "it",
    "another string, a second string, that is a string to be with",
]


@pytest.fixture(scope="module")
def sentence_transformers():
    """sentence_transformers (a test dependency), imported once for the module: it takes
    seconds."""
    import sentence_transformers

    return sentence_transformers


@pytest.fixture(scope="module")
def converted(tmp_path_factory, sentence_transformers):
    """converted(pooling_mode, normalize) -> (sentence-transformers folder, its .npz),
    built once for each."""
    made = {}

    def make(pooling_mode="mean", normalize=True):
        if (pooling_mode, normalize) not in made:
            folder = tiny_sentence_transformer(
                tmp_path_factory.mktemp("st") / f"{pooling_mode}-{normalize}",
                pooling_mode,
                normalize,
            )
            result = run_script(
                "bert/convert.py",
                "--bert-model",
                folder,
                "--mlx-model",
                f"{folder}.npz",
            )
            assert result.returncode == 0, result.stderr
            made[pooling_mode, normalize] = folder, f"{folder}.npz"
        return made[pooling_mode, normalize]

    return make


def run_embed(capsys, *args):
    """bert/embed.py's command line in this process (a new one spends seconds
    importing), with its __main__'s handling of errors: (exit status, stdout, stderr).
    """
    try:
        embed.main(embed.parse_args([str(a) for a in args]))
        status, message = 0, ""
    except SystemExit as e:  # argparse
        status, message = e.code, ""
    except (ValueError, OSError) as e:
        status, message = 1, "error: " + " ".join(str(e).split()) + "\n"
    out, err = capsys.readouterr()
    return status, out, err + message


def reference(sentence_transformers, folder, sentences, batch_size=2):
    return sentence_transformers.SentenceTransformer(str(folder), device="cpu").encode(
        sentences, batch_size=batch_size
    )


@pytest.mark.parametrize("normalize", [True, False], ids=["normalized", "unnormalized"])
@pytest.mark.parametrize("pooling_mode", ["mean", "cls", "max"])
def test_embeddings_equal_sentence_transformers_in_padded_batches(
    converted, sentence_transformers, pooling_mode, normalize
):
    folder, npz = converted(pooling_mode, normalize)
    model, tokenizer, pooling = embed.load_encoder(str(folder), npz)
    assert (pooling.mode, pooling.normalize) == (
        pooling_mode,
        normalize,
    )  # what convert.py stored
    lengths = [len(ids) for ids in tokenizer(SENTENCES)["input_ids"]]
    assert len(set(lengths)) == len(
        SENTENCES
    )  # so every batch of 2 pads one of its sentences
    embeddings = embed.encode(model, tokenizer, SENTENCES, pooling, batch_size=2)
    assert embeddings.dtype == np.float32 and embeddings.shape == (len(SENTENCES), 32)
    np.testing.assert_allclose(
        embeddings,
        reference(sentence_transformers, folder, SENTENCES),
        atol=1e-5,
        rtol=0,
    )
    if normalize:
        np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1, atol=1e-6)


def test_a_plain_bert_gets_the_mean_pooling_sentence_transformers_gives_it(
    tmp_path, sentence_transformers, capsys
):
    from transformers import BertModel

    folder = tiny_bert(tmp_path / "bert", BertModel)
    assert (
        run_script(
            "bert/convert.py", "--bert-model", folder, "--mlx-model", tmp_path / "b.npz"
        ).returncode
        == 0
    )
    model, tokenizer, pooling = embed.load_encoder(str(folder), str(tmp_path / "b.npz"))
    assert pooling == embed.Pooling("mean", normalize=False)
    embeddings = embed.encode(model, tokenizer, SENTENCES, pooling, batch_size=4)
    np.testing.assert_allclose(
        embeddings,
        reference(sentence_transformers, folder, SENTENCES, 4),
        atol=1e-5,
        rtol=0,
    )
    status, _, err = run_embed(
        capsys, "--bert-model", folder, "--mlx-model", tmp_path / "b.npz", "a b", "it"
    )
    assert status == 0 and "no pooling stored" in err


@pytest.mark.parametrize(
    "max_seq_length", [None, 12], ids=["positions", "sentence_bert_config"]
)
def test_long_sentences_are_truncated_as_sentence_transformers_does_and_counted(
    converted, sentence_transformers, tmp_path, capsys, max_seq_length
):
    folder, _ = converted("mean", True)
    # A copy with sentence-transformers' limit in sentence_bert_config.json, converted
    # again.
    if max_seq_length:
        import shutil

        folder = shutil.copytree(folder, tmp_path / "short")
        settings = json.loads((folder / "sentence_bert_config.json").read_text())
        (folder / "sentence_bert_config.json").write_text(
            json.dumps({**settings, "max_seq_length": max_seq_length})
        )
        assert (
            run_script(
                "bert/convert.py",
                "--bert-model",
                folder,
                "--mlx-model",
                f"{folder}.npz",
            ).returncode
            == 0
        )
    npz, limit = (
        f"{folder}.npz",
        max_seq_length or 64,
    )  # the tiny model has 64 positions
    long = " ".join(["the capital of france is paris"] * 20)  # 120 words
    model, tokenizer, pooling = embed.load_encoder(str(folder), npz)
    embeddings = embed.encode(model, tokenizer, [long, "a b"], pooling)
    np.testing.assert_allclose(
        embeddings,
        reference(sentence_transformers, folder, [long, "a b"]),
        atol=1e-5,
        rtol=0,
    )
    status, _, err = run_embed(
        capsys, "--bert-model", folder, "--mlx-model", npz, long, "a b", long + " it"
    )
    assert status == 0, err
    assert (
        f"2 of 3 sentences were longer than {limit} tokens and were truncated to "
        f"{limit}" in err
    )


@pytest.mark.parametrize(
    "pooling_mode",
    ["weightedmean", "lasttoken", "mean_sqrt_len_tokens", ("mean", "max")],
)
def test_a_pooling_embed_does_not_implement_is_refused_in_one_line(
    tmp_path, sentence_transformers, pooling_mode
):
    folder = tiny_sentence_transformer(tmp_path / "st", pooling_mode)
    result = run_script(
        "bert/convert.py", "--bert-model", folder, "--mlx-model", tmp_path / "o.npz"
    )
    named = (
        " + ".join(pooling_mode) if isinstance(pooling_mode, tuple) else pooling_mode
    )
    assert (
        result.returncode == 1
        and result.stderr.count("\n") == 1
        and f"'{named}'" in result.stderr
    )
    assert (
        "implements mean, cls, max" in result.stderr
        and not (tmp_path / "o.npz").exists()
    )


def test_the_older_sentence_transformers_format_converts(converted, tmp_path):
    """all-MiniLM-L6-v2's files: pooling_mode_* booleans, word_embedding_dimension,
    max_seq_length, models.* types."""
    import shutil

    folder = shutil.copytree(converted("cls", True)[0], tmp_path / "old")
    (folder / "1_Pooling/config.json").write_text(
        json.dumps(
            {
                "word_embedding_dimension": 32,
                "pooling_mode_cls_token": False,
                "pooling_mode_mean_tokens": False,
                "pooling_mode_max_tokens": True,
                "pooling_mode_mean_sqrt_len_tokens": False,
            }
        )
    )
    (folder / "sentence_bert_config.json").write_text(
        json.dumps({"max_seq_length": 16, "do_lower_case": False})
    )
    modules = json.loads((folder / "modules.json").read_text())
    for module in modules:
        module["type"] = (
            "sentence_transformers.models." + module["type"].rsplit(".", 1)[-1]
        )
    (folder / "modules.json").write_text(json.dumps(modules))
    assert (
        run_script(
            "bert/convert.py", "--bert-model", folder, "--mlx-model", tmp_path / "o.npz"
        ).returncode
        == 0
    )
    assert embed.read_pooling(tmp_path / "o.npz") == embed.Pooling(
        "max", normalize=True, max_seq_length=16
    )


def test_a_module_embed_does_not_implement_is_refused_in_one_line(converted, tmp_path):
    import shutil

    folder = shutil.copytree(converted("mean", True)[0], tmp_path / "dense")
    modules = json.loads((folder / "modules.json").read_text())
    modules.insert(
        2,
        {
            "idx": 2,
            "name": "2",
            "path": "2_Dense",
            "type": "sentence_transformers.models.Dense",
        },
    )
    (folder / "modules.json").write_text(json.dumps(modules))
    result = run_script(
        "bert/convert.py", "--bert-model", folder, "--mlx-model", tmp_path / "o.npz"
    )
    assert result.returncode == 1 and result.stderr.count("\n") == 1
    assert (
        "Transformer, Pooling, Dense, Normalize" in result.stderr
        and not (tmp_path / "o.npz").exists()
    )


def test_cli_prints_the_cosine_similarity_matrix(converted):
    folder, npz = converted("mean", True)
    result = run_script(
        "bert/embed.py",
        "--bert-model",
        folder,
        "--mlx-model",
        npz,
        "a b",
        "a b",
        "this is it",
    )
    assert result.returncode == 0, result.stderr
    rows = [
        line
        for line in result.stdout.splitlines()
        if re.match(r"\s+\[\d\]\s+-?\d", line)
    ]
    similarity = np.array([[float(x) for x in row.split()[1:4]] for row in rows])
    assert (
        similarity.shape == (3, 3)
        and np.allclose(np.diag(similarity), 1)
        and np.allclose(similarity, similarity.T)
    )
    assert similarity[0, 1] == 1.0  # the same sentence twice


def test_out_writes_the_float32_embeddings_in_input_order(converted, tmp_path, capsys):
    folder, npz = converted("cls", False)
    (tmp_path / "in.txt").write_text(
        "\n".join(SENTENCES) + "\n\n"
    )  # blank lines are skipped
    status, out, err = run_embed(
        capsys,
        "--bert-model",
        folder,
        "--mlx-model",
        npz,
        "--input",
        tmp_path / "in.txt",
        "--out",
        tmp_path / "e.npy",
        "--batch-size",
        "2",
    )
    assert (
        status == 0 and f"Wrote the {len(SENTENCES)} x 32 float32 embeddings" in out
    ), err
    saved = np.load(tmp_path / "e.npy", allow_pickle=False)
    model, tokenizer, pooling = embed.load_encoder(str(folder), npz)
    assert saved.dtype == np.float32 and saved.shape == (len(SENTENCES), 32)
    np.testing.assert_array_equal(
        saved, embed.encode(model, tokenizer, SENTENCES, pooling, batch_size=2)
    )
    assert [
        p.name for p in tmp_path.iterdir() if p.name.startswith(".")
    ] == []  # no temporary file left


def test_search_prints_the_top_k_matches_best_first(converted, tmp_path, capsys):
    folder, npz = converted("mean", True)
    (tmp_path / "corpus.txt").write_text("\n".join(SENTENCES) + "\n")
    status, out, err = run_embed(
        capsys,
        "--bert-model",
        folder,
        "--mlx-model",
        npz,
        "--search",
        tmp_path / "corpus.txt",
        "--query",
        SENTENCES[3],
        "--top-k",
        "3",
    )
    assert status == 0, err
    matches = [
        re.match(r"\s*(-?\d\.\d{4})  line (\d+): (.*)", line)
        for line in out.splitlines()[1:]
    ]
    scores = [float(m[1]) for m in matches]
    assert len(matches) == 3 and scores == sorted(scores, reverse=True)
    assert (scores[0], matches[0][2], matches[0][3]) == (
        1.0,
        "4",
        SENTENCES[3],
    )  # the query itself, line 4


def test_search_ranks_by_cosine_similarity():
    corpus = np.array([[1, 0], [0, 1], [1, 1], [-1, 0]], dtype=np.float32)
    assert [
        i for i, _ in embed.search(np.array([1, 0.1], np.float32), corpus, top_k=3)
    ] == [0, 2, 1]


@pytest.mark.parametrize(
    "given, says",
    [
        ([], "no sentences"),
        (["  "], "no sentences"),
        (["--search", "{tmp}/good.txt", "--query", ""], "no sentences"),
        (["--input", "{tmp}/empty.txt"], "has no sentences"),
        (["--input", "{tmp}/blank.txt"], "has no sentences"),
        (["--input", "{tmp}/latin1.txt"], "latin1.txt is not UTF-8 text"),
        (["--input", "{tmp}/missing.txt"], "No such file or directory"),
        (
            ["--search", "{tmp}/blank.txt"],
            "--search CORPUS and --query TEXT go together",
        ),
    ],
)
def test_empty_or_unreadable_input_gives_one_line(
    converted, tmp_path, capsys, given, says
):
    folder, npz = converted("mean", True)
    # What building the fixture printed (transformers' progress bars, on some versions)
    capsys.readouterr()
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank.txt").write_text("\n  \n\n")
    (tmp_path / "latin1.txt").write_bytes("caf\u00e9\n".encode("latin-1"))
    (tmp_path / "good.txt").write_text("a b\n")
    given = [g.format(tmp=tmp_path) for g in given]
    status, _, err = run_embed(
        capsys, "--bert-model", folder, "--mlx-model", npz, *given
    )
    assert (
        status in (1, 2) and says in err.strip().splitlines()[-1]
    )  # 2: argparse's usage, then its error line
    assert status == 2 or err.count("\n") == 1


def test_float16_embeddings_stay_close(converted, sentence_transformers):
    folder, npz = converted("mean", True)
    model, tokenizer, pooling = embed.load_encoder(str(folder), npz, dtype=mx.float16)
    embeddings = embed.encode(model, tokenizer, SENTENCES, pooling)
    assert embeddings.dtype == np.float32
    assert (
        np.abs(embeddings - reference(sentence_transformers, folder, SENTENCES)).max()
        < 5e-3
    )


@pytest.mark.parametrize(
    "damage, says",
    [
        (b"{not json", "damaged"),
        (
            json.dumps({"mode": "weightedmean"}).encode(),
            "'weightedmean' is not implemented",
        ),
        (
            json.dumps({"mode": "mean", "max_seq_length": -3}).encode(),
            "max_seq_length is -3",
        ),
        (
            json.dumps({"mode": "mean", "extra": 1}).encode(),
            "unexpected keyword argument 'extra'",
        ),
        (json.dumps(["mean"]).encode(), "damaged"),
    ],
)
def test_a_damaged_stored_pooling_gives_one_line(
    converted, tmp_path, capsys, damage, says
):
    folder, npz = converted("mean", True)
    weights = dict(np.load(npz))
    weights["pooling"] = np.frombuffer(damage, dtype=np.uint8)
    np.savez(tmp_path / "bad.npz", **weights)
    with pytest.raises(ValueError, match="the pooling stored in .*bad.npz is damaged"):
        embed.load_encoder(str(folder), str(tmp_path / "bad.npz"))
    status, _, err = run_embed(
        capsys, "--bert-model", folder, "--mlx-model", tmp_path / "bad.npz", "a b"
    )
    assert status == 1 and err.count("\n") == 1 and says in err


def test_a_max_seq_length_beyond_the_positions_is_refused(converted, tmp_path, capsys):
    folder, npz = converted("mean", True)
    weights = dict(np.load(npz))
    weights["pooling"] = embed.pooling_array(embed.Pooling("mean", max_seq_length=65))
    np.savez(tmp_path / "long.npz", **weights)
    status, _, err = run_embed(
        capsys, "--bert-model", folder, "--mlx-model", tmp_path / "long.npz", "a b"
    )
    assert (
        status == 1 and "max_seq_length 65 is more than the model's 64 positions" in err
    )


@pytest.mark.parametrize(
    "flag, value",
    [
        ("--batch-size", "0"),
        ("--batch-size", "-2"),
        ("--batch-size", "nan"),
        ("--top-k", "0"),
        ("--top-k", "1.5"),
    ],
)
def test_counts_that_are_not_positive_whole_numbers_are_refused_by_argparse(
    flag, value
):
    with pytest.raises(SystemExit) as exit_:
        embed.parse_args(
            ["--bert-model", "x", "--mlx-model", "y.npz", "a b", flag, value]
        )
    assert exit_.value.code == 2


def test_progress_and_time_left_on_long_inputs(converted, capsys):
    folder, npz = converted("mean", True)
    model, tokenizer, pooling = embed.load_encoder(str(folder), npz)
    # What making the fixture printed (transformers' progress bars, on some versions)
    capsys.readouterr()
    progress = embed.Progress(100, verbose=True)
    progress.start -= 3
    progress.last = progress.start  # 3 s in, no report yet
    progress(25)
    assert re.fullmatch(
        r"  25 of 100 sentences, about \d+ s to go\n", capsys.readouterr().err
    )
    embed.encode(model, tokenizer, ["a b"] * 5, pooling, batch_size=2, verbose=True)
    assert capsys.readouterr().err.startswith("embedding 5 sentences in batches of 2")
