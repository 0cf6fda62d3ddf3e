"""Print the Hugging Face `transformers` BertModel output for the sample batch of
model.py.

    python bert/hf_model.py --bert-model bert-base-uncased

Compare with `python bert/model.py --bert-model bert-base-uncased --mlx-model ...`.
"""

import sys

try:  # Ctrl-C while the libraries load ends with one line too
    import argparse
    import os

    import torch
    from model import SAMPLE_BATCH, utf8
    from transformers import AutoModel, AutoTokenizer
except KeyboardInterrupt:
    print("interrupted", file=sys.stderr)
    sys.exit(130)


def main():
    parser = argparse.ArgumentParser(
        description="transformers' BertModel on the sample batch of model.py."
    )
    parser.add_argument(
        "--bert-model", required=True, help="Hugging Face model name or local folder"
    )
    parser.add_argument(
        "--text", nargs="+", type=utf8, default=SAMPLE_BATCH, help="sentences"
    )
    args = parser.parse_args()
    try:
        tokenizer = AutoTokenizer.from_pretrained(args.bert_model)
        model = AutoModel.from_pretrained(args.bert_model).eval()
    except Exception as e:  # missing, unreachable, damaged: transformers raises many
        raise ValueError(f"cannot load {args.bert_model}: {e}") from None
    tokens = tokenizer(args.text, return_tensors="pt", padding=True, truncation=True)
    with torch.no_grad():
        output = model(**tokens)
    print("HF BERT:", output.last_hidden_state, sep="\n")
    print("\n pooled output:", output.pooler_output, sep="\n")


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
