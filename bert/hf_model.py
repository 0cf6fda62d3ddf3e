"""Print the Hugging Face `transformers` BertModel output for the same sample batch as model.py.

    python bert/hf_model.py --bert-model bert-base-uncased

Compare by eye with `python bert/model.py --bert-model bert-base-uncased --mlx-model ...`.
"""

import argparse

from cli import run, text
from model import SAMPLE_BATCH


def main():
    parser = argparse.ArgumentParser(
        description="Run transformers' BertModel on the sample batch and print its output."
    )
    parser.add_argument(
        "--bert-model", required=True, help="Hugging Face model name or local folder"
    )
    parser.add_argument(
        "--text",
        nargs="+",
        type=text,
        default=SAMPLE_BATCH,
        help="sentences to encode (default: the same sample batch as model.py)",
    )
    args = parser.parse_args()
    import torch  # here, not at the top: Ctrl-C during these seconds of imports is one line too
    from transformers import AutoModel, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(args.bert_model)
        model = AutoModel.from_pretrained(args.bert_model).eval()
    except Exception as e:  # missing, unreachable, damaged
        raise ValueError(
            f"cannot load {args.bert_model!r}: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
        ) from None
    tokens = tokenizer(args.text, return_tensors="pt", padding=True)
    with torch.no_grad():
        output = model(**tokens)
    print("HF BERT:")
    print(output.last_hidden_state)
    if output.pooler_output is not None:
        print("\n pooled output:")
        print(output.pooler_output)


if __name__ == "__main__":
    run(main)
