"""Fill in [MASK] tokens with BERT's masked-language-model head.

    python bert/main.py --bert-model bert-base-uncased \\
        --mlx-model weights/bert-base-uncased.npz "The capital of France is [MASK]."

For every [MASK] in every sentence, prints the top-k tokens and their probabilities.
"""

import sys

try:  # Ctrl-C while the libraries load ends with one line too
    import argparse
    import os

    import mlx.core as mx
    from embed import positive_int
    from model import DTYPES, load_model, utf8
except KeyboardInterrupt:
    print("interrupted", file=sys.stderr)
    sys.exit(130)


def fill_mask(model, tokenizer, sentences, top_k):
    """For each sentence, a list (one per [MASK]) of [(token, probability), ...],
    best first."""
    tokens = tokenizer(sentences, return_tensors="np", padding=True, truncation=True)
    hidden, _ = model(**{k: mx.array(v) for k, v in tokens.items()})
    logits = model.mlm(hidden, model.embeddings.word_embeddings)
    probs = mx.softmax(logits.astype(mx.float32), axis=-1)  # (B, T, vocab)
    results = []
    for b, ids in enumerate(tokens["input_ids"]):
        fills = []
        for t in (ids == tokenizer.mask_token_id).nonzero()[0]:
            best = mx.argsort(-probs[b, t])[:top_k].tolist()
            tokens_of = tokenizer.convert_ids_to_tokens
            fills.append([(tokens_of(i), probs[b, t, i].item()) for i in best])
        results.append(fills)
    return results


def main():
    parser = argparse.ArgumentParser(
        description="Predict the words behind [MASK] with BERT in MLX."
    )
    parser.add_argument(
        "text",
        nargs="+",
        type=utf8,
        help="one or more sentences, each with at least one [MASK]",
    )
    parser.add_argument(
        "--bert-model",
        required=True,
        help="Hugging Face model name or local folder (config, tokenizer)",
    )
    parser.add_argument(
        "--mlx-model",
        required=True,
        help="the .npz written by convert.py, with the masked-LM head",
    )
    parser.add_argument(
        "--top-k",
        type=positive_int,
        default=5,
        help="candidates per [MASK] (default: 5)",
    )
    parser.add_argument(
        "--dtype",
        choices=list(DTYPES),
        default="float32",
        help="inference dtype (default: float32)",
    )
    args = parser.parse_args()

    model, tokenizer = load_model(args.bert_model, args.mlx_model, DTYPES[args.dtype])
    if "mlm" not in model:
        raise ValueError(
            f"{args.mlx_model} has no masked-LM head; convert a checkpoint that has "
            "one, such as bert-base-uncased (BertForPreTraining) or a BertForMaskedLM"
        )
    missing = [s for s in args.text if tokenizer.mask_token not in s]
    if missing:
        raise ValueError(f"no {tokenizer.mask_token} in {missing[0]!r}")
    results = fill_mask(model, tokenizer, args.text, args.top_k)

    for sentence, fills in zip(args.text, results):
        print(sentence)
        for n, candidates in enumerate(fills, 1):
            shown = ", ".join(f"{token} ({p:.3f})" for token, p in candidates)
            print(f"  [MASK] {n}: {shown}")


if __name__ == "__main__":
    try:
        main()
        sys.stdout.flush()  # a closed or full stdout is found here, not at exit
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except (ValueError, OSError) as e:  # OSError: also stdout closed or full
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit("error: " + " ".join(str(e).split()))  # one line
