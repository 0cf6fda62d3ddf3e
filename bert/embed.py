"""Sentence embeddings with the MLX BERT, equal to sentence-transformers' `encode()`,
and semantic search.

    python bert/embed.py --bert-model sentence-transformers/all-MiniLM-L6-v2 \\
        --mlx-model weights/minilm.npz "A man is eating food." "A man is eating bread."
    python bert/embed.py ... --input sentences.txt --out embeddings.npy
    python bert/embed.py ... --search corpus.txt --query "Who is eating?" --top-k 5

The first prints the cosine similarity of every pair; the second writes the (N, dim)
float32 embeddings; the third prints the corpus lines (one sentence a line) most similar
to the query, with their scores.

A sentence embedding pools the encoder's last hidden states over the real (not padding)
tokens: their mean, the [CLS] token's vector, or their element-wise max; then, for most
models, scales it to length 1. convert.py stores which, read from the
sentence-transformers folder (modules.json, 1_Pooling/config.json, 2_Normalize), in the
.npz; a plain BERT gets the mean, unnormalized, as in sentence-transformers.

As sentence-transformers does, sentences are sorted by length so that each batch holds
sentences of similar length (less padding), encoded, and returned in their original
order; a sentence longer than the model's max_seq_length (sentence_bert_config.json;
else the tokenizer's limit, at most the positions) is truncated to it. Batches are
padded to a multiple of PAD_TO tokens, so that a few shapes recur.
"""

import sys

try:  # Ctrl-C while the libraries load ends with one line too
    import argparse
    import json
    import os
    import time
    from dataclasses import asdict, dataclass
    from pathlib import Path

    import mlx.core as mx
    import numpy as np
    from model import DTYPES, load_model, utf8
except KeyboardInterrupt:
    print("interrupted", file=sys.stderr)
    sys.exit(130)

POOLING_MODES = ("mean", "cls", "max")
PAD_TO = (
    32  # each new shape costs new kernels on a GPU; 32 keeps them few, padding little
)


@dataclass
class Pooling:
    mode: str = "mean"
    normalize: bool = False
    # None: the tokenizer's model_max_length, at most the model's positions
    max_seq_length: int | None = None
    do_lower_case: bool = False

    def __post_init__(self):
        """Refuse, as a whole, a pooling that embed.py does not implement or a damaged
        one: ValueError naming it."""
        if self.mode not in POOLING_MODES:
            raise ValueError(
                f"the pooling {self.mode!r} is not implemented here; embed.py "
                f"implements {', '.join(POOLING_MODES)}"
            )
        if type(self.normalize) is not bool or type(self.do_lower_case) is not bool:
            raise ValueError(
                "normalize and do_lower_case must be true or false, not "
                f"{self.normalize!r}, {self.do_lower_case!r}"
            )
        length = self.max_seq_length
        if length is not None and (type(length) is not int or not 2 <= length <= 2**20):
            raise ValueError(
                f"max_seq_length is {length!r}; it must be a whole number from 2 to "
                "1,048,576"
            )


def pooling_array(pooling):
    """A Pooling as the uint8 array of its JSON bytes: the `pooling` entry convert.py
    stores beside the weights."""
    return np.frombuffer(json.dumps(asdict(pooling)).encode(), dtype=np.uint8)


def read_pooling(weights_path):
    """The Pooling stored in weights_path by convert.py, or None (a plain BERT)."""
    with np.load(weights_path, allow_pickle=False) as npz:
        stored = npz["pooling"] if "pooling" in npz.files else None
    if stored is None:
        return None
    try:
        return Pooling(**json.loads(stored.astype(np.uint8).tobytes().decode()))
    except (ValueError, TypeError) as e:  # not JSON, a wrong or missing key or value
        raise ValueError(
            f"the pooling stored in {weights_path} is damaged ({e}); convert the model "
            "again"
        ) from None


def load_encoder(bert_model, weights_path, dtype=mx.float32, verbose=False):
    """(Bert, tokenizer, Pooling) for `encode`: load_model's two, and the pooling
    convert.py stored (for a plain BERT, sentence-transformers' default: the mean,
    unnormalized; verbose: say so on stderr)."""
    model, tokenizer = load_model(bert_model, weights_path, dtype)
    pooling = read_pooling(weights_path)
    if pooling is None and verbose:
        print(
            f"note: {weights_path} has no pooling stored (a plain BERT, not a "
            "sentence-transformers model): the mean of the token vectors, "
            "unnormalized, as sentence-transformers does for such models",
            file=sys.stderr,
        )
    return model, tokenizer, pooling or Pooling()


def max_length(model, tokenizer, pooling):
    """The most tokens a sentence keeps, [CLS] and [SEP] included."""
    positions = model.config.max_position_embeddings
    if pooling.max_seq_length is None:
        return min(tokenizer.model_max_length, positions)
    if pooling.max_seq_length > positions:
        raise ValueError(
            f"max_seq_length {pooling.max_seq_length} is more than the model's "
            f"{positions} positions"
        )
    return pooling.max_seq_length


def pool(hidden, mask, pooling):
    """(B, T, D) last hidden states and the (B, T) mask of real tokens -> (B, D)
    float32 sentence embeddings."""
    hidden = hidden.astype(mx.float32)  # pooled in float32, as sentence-transformers
    mask = mask[..., None]
    if pooling.mode == "cls":
        x = hidden[:, 0]
    elif pooling.mode == "max":
        x = mx.where(mask, hidden, -mx.inf).max(axis=1)
    else:
        x = (hidden * mask).sum(axis=1) / mx.maximum(mask.sum(axis=1), 1e-9)
    if pooling.normalize:
        norm = mx.sqrt((x * x).sum(axis=-1, keepdims=True))
        x = x / mx.maximum(norm, 1e-12)  # torch.nn.functional.normalize's eps
    return x


def embedder(model, pooling):
    """(input_ids, mask) -> (B, D) sentence embeddings: the last hidden states, pooled
    (the model's pooler is never computed)."""
    return lambda ids, mask: pool(model(ids, attention_mask=mask)[0], mask, pooling)


def tokenize(tokenizer, sentences, max_len):
    """(input_ids (B, T), mask (B, T), how many were truncated) for one batch, T a
    multiple of PAD_TO (at most max_len)."""
    ids = tokenizer(
        sentences,
        return_attention_mask=False,
        return_token_type_ids=False,
        verbose=False,
    )["input_ids"]
    truncated = sum(len(row) > max_len for row in ids)
    # Truncation as transformers' (and so sentence-transformers'): keep [CLS] and the
    # first tokens, end with [SEP].
    ids = [row if len(row) <= max_len else row[: max_len - 1] + row[-1:] for row in ids]
    T = min(-(-max(map(len, ids)) // PAD_TO) * PAD_TO, max_len)
    lengths = np.array([len(row) for row in ids])
    padded = np.full((len(ids), T), tokenizer.pad_token_id or 0, dtype=np.int32)
    for row, tokens in zip(padded, ids):
        row[: len(tokens)] = tokens
    return mx.array(padded), mx.array(np.arange(T) < lengths[:, None]), truncated


class Progress:
    """How far encode() is and the time left, on stderr: after 2 s, then every 10 s."""

    def __init__(self, total, verbose):
        self.total, self.verbose = total, verbose
        self.start = self.last = time.perf_counter()

    def __call__(self, done):
        now = time.perf_counter()
        wait = 2 if self.last == self.start else 10
        if self.verbose and now - self.last > wait and done < self.total:
            left = (now - self.start) / done * (self.total - done)
            print(
                f"  {done:,} of {self.total:,} sentences, about {left:.0f} s to go",
                file=sys.stderr,
                flush=True,
            )
            self.last = now


def encode(
    model,
    tokenizer,
    sentences,
    pooling=Pooling(),
    batch_size=32,
    verbose=False,
    forward=None,
):
    """(N, D) float32 numpy sentence embeddings of `sentences`, in their order, as
    `SentenceTransformer(folder).encode(sentences, batch_size=batch_size)` gives them.
    verbose: progress on stderr for long inputs, and how many were truncated.
    forward: embedder(model, pooling) by default; benchmark.py passes a compiled one."""
    max_len = max_length(model, tokenizer, pooling)
    forward = forward or embedder(model, pooling)
    if pooling.do_lower_case:
        sentences = [s.lower() for s in sentences]
    # Longest first, as sentence-transformers.
    order = np.argsort([-len(s) for s in sentences], kind="stable")
    out = np.empty((len(sentences), model.config.hidden_size), dtype=np.float32)
    if verbose and len(sentences) > batch_size:
        print(
            f"embedding {len(sentences):,} sentences in batches of {batch_size} on "
            f"{mx.default_device()}",
            file=sys.stderr,
            flush=True,
        )
    progress, truncated, previous = Progress(len(sentences), verbose), 0, None
    for start in range(0, len(sentences), batch_size):
        rows = order[start : start + batch_size]
        ids, mask, cut = tokenize(tokenizer, [sentences[i] for i in rows], max_len)
        embeddings = forward(ids, mask)
        # Start this batch, then wait for the one before: the next batch is tokenized
        # while this one runs.
        mx.async_eval(embeddings)
        if previous is not None:
            out[previous[0]] = np.array(previous[1])
        previous, truncated = (rows, embeddings), truncated + cut
        progress(start + len(rows))
    if previous is not None:
        out[previous[0]] = np.array(previous[1])
    if verbose and truncated:
        print(
            f"{truncated:,} of {len(sentences):,} sentences were longer than {max_len} "
            f"tokens and were truncated to {max_len}, as sentence-transformers does",
            file=sys.stderr,
        )
    return out


def cosine_similarity(a, b):
    a, b = (
        x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12) for x in (a, b)
    )
    return a @ b.T


def search(query_embedding, corpus_embeddings, top_k):
    """[(corpus index, cosine similarity)] of the top_k corpus rows most similar to the
    query, best first."""
    scores = cosine_similarity(query_embedding[None], corpus_embeddings)[0]
    best = np.argsort(-scores, kind="stable")[:top_k]
    return [(int(i), float(scores[i])) for i in best]


def read_sentences(path):
    """The non-blank lines of a UTF-8 text file, with their line numbers (from 1)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})")
    lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not lines:
        raise ValueError(f"{path} has no sentences; it needs one sentence a line")
    return [n for n, _ in lines], [line for _, line in lines]


def print_similarities(sentences, embeddings):
    similarity = cosine_similarity(embeddings, embeddings)
    print(
        f"cosine similarity of {len(sentences)} sentences ({embeddings.shape[1]} "
        "dimensions):"
    )
    print("     " + "".join(f"{f'[{j}]':>8}" for j in range(len(sentences))))
    for i, sentence in enumerate(sentences):
        shown = sentence if len(sentence) <= 60 else sentence[:57] + "..."
        print(
            f"{f'[{i}]':>5}"
            + "".join(f"{s:8.4f}" for s in similarity[i])
            + f"  {shown}"
        )


def write_atomically(path, write):
    """write(binary file) fills a temporary file, renamed to `path` when whole: a
    reader finds the old file or the new one, never half of one. Also for convert.py."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except OSError as e:
        raise OSError(f"cannot write {path}: {e.strerror}; it is as it was") from None
    finally:
        tmp.unlink(missing_ok=True)


def positive_int(text):
    value = int(text)  # argparse turns a ValueError into one line
    if value < 1:
        raise ValueError
    return value


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="Sentence embeddings, their cosine similarities, and semantic "
        "search with the MLX BERT, equal to sentence-transformers' encode()."
    )
    parser.add_argument(
        "sentences",
        nargs="*",
        type=utf8,
        help="sentences to embed (or --input, or --search)",
    )
    parser.add_argument(
        "--bert-model",
        required=True,
        help="Hugging Face name or local folder (config, tokenizer)",
    )
    parser.add_argument(
        "--mlx-model", required=True, help="the .npz written by convert.py"
    )
    parser.add_argument(
        "--input", help="a UTF-8 text file of sentences, one a line (blank: skipped)"
    )
    parser.add_argument(
        "--out", help="write the (N, dim) float32 embeddings to this .npy file"
    )
    parser.add_argument(
        "--search",
        metavar="CORPUS",
        help="a UTF-8 text file, one sentence a line, to search with --query",
    )
    parser.add_argument(
        "--query", type=utf8, help="the sentence to search --search's corpus for"
    )
    parser.add_argument(
        "--top-k",
        type=positive_int,
        default=5,
        help="matches --search prints (default: 5)",
    )
    parser.add_argument(
        "--batch-size",
        type=positive_int,
        default=32,
        help="sentences encoded at once (default: 32)",
    )
    parser.add_argument(
        "--dtype",
        choices=list(DTYPES),
        default="float32",
        help="inference dtype (default: float32)",
    )
    args = parser.parse_args(argv)
    check_args(parser, args)
    return args


def check_args(parser, args):
    """The combinations of flags that argparse cannot check by itself."""
    if sum(map(bool, (args.sentences, args.input, args.search))) > 1:
        parser.error(
            "give the sentences one way: as arguments, in --input FILE, or as "
            "--search CORPUS"
        )
    if (args.search is None) != (args.query is None):
        parser.error("--search CORPUS and --query TEXT go together")
    if args.out and not args.out.endswith(".npy"):
        parser.error(f"--out must end in .npy, got {args.out}")


def main(args):
    line_numbers, sentences = None, args.sentences
    if args.input or args.search:
        line_numbers, sentences = read_sentences(args.input or args.search)
    no_query = args.query is not None and not args.query.strip()
    if not any(s.strip() for s in sentences) or no_query:
        raise ValueError(
            "no sentences: give them as arguments, in --input FILE (one a line), or "
            "--search CORPUS --query TEXT"
        )
    model, tokenizer, pooling = load_encoder(
        args.bert_model, args.mlx_model, DTYPES[args.dtype], verbose=True
    )
    embeddings = encode(
        model, tokenizer, sentences, pooling, args.batch_size, verbose=True
    )
    if not np.isfinite(embeddings).all():
        advice = "" if args.dtype == "float32" else "; try --dtype float32"
        raise ValueError(f"the embeddings are not finite in {args.dtype}{advice}")
    if args.out:
        write_atomically(args.out, lambda f: np.save(f, embeddings, allow_pickle=False))
        n, dim = embeddings.shape
        print(f"Wrote the {n:,} x {dim} float32 embeddings to {args.out}")
    if args.search:
        (query,) = encode(model, tokenizer, [args.query], pooling)
        print(f"query: {args.query}")
        for i, score in search(query, embeddings, args.top_k):
            print(f"{score:8.4f}  line {line_numbers[i]}: {sentences[i]}")
    elif not args.out:
        print_similarities(sentences, embeddings)


if __name__ == "__main__":
    try:
        main(parse_args())
        sys.stdout.flush()  # a closed or full stdout is found here, not at exit
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except (ValueError, OSError) as e:  # OSError: also stdout closed or full
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit("error: " + " ".join(str(e).split()))  # one line
