"""Meta's Llama 3 tokenizer.model, for tokenizer.py's load_tokenizer: one "base64(token
bytes) rank" per line, run by tiktoken as Meta's reference runs it.

    from tokenizer import load_tokenizer
    tokenizer = load_tokenizer("path/to/Llama3.1-8B/tokenizer.model")
"""

import base64
from pathlib import Path

# Meta's Llama 3 split pattern (llama_models/llama3/tokenizer.py).
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| "
    r"?[^\s\p{L}\p{N}]+[\r\n]*|"
    r"\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Meta's Llama 3.1 special tokens, ids 128000 to 128255 (Llama 3.0 named 128008 and
# 128010 reserved).
LLAMA3_SPECIAL_TOKENS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|step_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
]
LLAMA3_SPECIAL_TOKENS += [
    f"<|reserved_special_token_{i}|>"
    for i in range(2, 2 + 256 - len(LLAMA3_SPECIAL_TOKENS))
]
LLAMA3_STOP_TOKENS = ["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"]


class Llama3Tokenizer:
    """Meta's Llama 3 tokenizer.model, run by tiktoken as Meta's reference runs it:
    split the text with Meta's pattern; a piece that is a token is that token; otherwise
    start from its bytes and join the adjacent pair whose concatenation has the lowest
    rank, again and again, until no adjacent pair joins into a token."""

    kind = "Llama 3"

    def __init__(self, path):
        import tiktoken

        ranks = read_ranks(
            path
        )  # {token bytes: id}; the special tokens come after them, from BOS on
        self.special = {
            token: len(ranks) + i for i, token in enumerate(LLAMA3_SPECIAL_TOKENS)
        }
        self.tiktoken = tiktoken.Encoding(
            path.name,
            pat_str=LLAMA3_PATTERN,
            mergeable_ranks=ranks,
            special_tokens=self.special,
        )
        self.vocab_size, self.bos_id = (
            self.tiktoken.n_vocab,
            self.special["<|begin_of_text|>"],
        )
        self.stop_ids = {self.special[token] for token in LLAMA3_STOP_TOKENS}
        self.encode = (
            self.tiktoken.encode_ordinary
        )  # special tokens' names in the text are plain text

    def token_id(self, token):
        return self.special.get(token)

    def prompt(self, text):
        return [self.bos_id] + self.encode(text)

    def decode(
        self, ids
    ):  # special tokens decode to nothing; an incomplete character to \ufffd
        return self.tiktoken.decode(
            [i for i in ids if i < self.bos_id], errors="replace"
        )


def read_ranks(path):
    """{token bytes: rank} from a tiktoken-format file, checked: ranks 0..n-1, every
    single byte present."""
    ranks = {}
    for number, line in enumerate(Path(path).read_bytes().splitlines(), 1):
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError:
            raise ValueError(
                f"{path} line {number} is not 'base64 rank': not a Llama 3 "
                "tokenizer.model"
            ) from None
    if sorted(ranks.values()) != list(range(len(ranks))) or any(
        bytes([b]) not in ranks for b in range(256)
    ):
        raise ValueError(
            f"{path}: the ranks are not 0 to {len(ranks) - 1} each once, with all 256 "
            "single bytes among the tokens; is it a Llama 3 tokenizer.model?"
        )
    return ranks
