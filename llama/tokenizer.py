"""Llama's tokenizers, found from a file's content: SentencePiece, Meta's Llama 3 rank file, tokenizer.json.

    from tokenizer import load_tokenizer
    tokenizer = load_tokenizer("path/to/tokenizer.model", vocab_size=128256)  # or tokenizer.json, or a folder
    ids = tokenizer.prompt("The capital of France is")   # BOS and the text, as the family does it
    text = tokenizer.decode(ids)

- Llama 1 and 2 ship a SentencePiece `tokenizer.model` (a protobuf).
- Llama 3.x ship a `tokenizer.model` in tiktoken's format: one "base64(token bytes) rank" per line, 128,000
  byte sequences. Meta's tokenizer splits text with a regular expression (words, up to 3 digits, runs of
  punctuation or whitespace), then merges each piece's bytes by byte-pair encoding: repeatedly join the
  adjacent pair whose concatenation has the lowest rank. 256 special tokens follow from id 128,000.
  `Llama3Tokenizer` below runs it with the `tiktoken` package, as Meta's reference does.
- Hugging Face folders ship `tokenizer.json` (run by the `tokenizers` library), with `tokenizer_config.json`
  (BOS/EOS names, the chat template) and `generation_config.json` (the ids that end a reply): hf_tokenizer.py,
  read only for one.

Text given to `encode` and `prompt` is always plain text: "<|eot_id|>" typed by a user is 7 ordinary
tokens, never the end-of-turn token, as in Meta's reference. Only chat formats insert special tokens.
"""

import base64
import re
from pathlib import Path

# Meta's Llama 3 split pattern (llama_models/llama3/tokenizer.py).
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
    r"\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Meta's Llama 3.1 special tokens, ids 128000 to 128255 (Llama 3.0 named 128008 and 128010 reserved).
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


class TokenizerError(Exception):
    pass


class SentencePieceTokenizer:
    """Llama 1 and 2: BOS 1, EOS 2."""

    kind = "SentencePiece"

    def __init__(self, path):
        from sentencepiece import SentencePieceProcessor

        try:
            self.sp = SentencePieceProcessor(model_file=str(path))
        except (OSError, RuntimeError) as e:
            raise TokenizerError(
                f"cannot load {path} as a SentencePiece model ({str(e).splitlines()[0]})"
            ) from None
        self.vocab_size, self.bos_id, self.eos_id = (
            self.sp.vocab_size(),
            self.sp.bos_id(),
            self.sp.eos_id(),
        )
        self.stop_ids, self.encode = {self.eos_id}, self.sp.encode

    def prompt(self, text):
        return [self.bos_id] + self.sp.encode(text)

    def decode(self, ids):
        return self.sp.decode(list(ids))


class Llama3Tokenizer:
    """Meta's Llama 3 tokenizer.model, run by tiktoken as Meta's reference runs it: split the text with Meta's
    pattern; a piece that is a token is that token; otherwise start from its bytes and join the adjacent pair
    whose concatenation has the lowest rank, again and again, until no adjacent pair joins into a token."""

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
    """{token bytes: rank} from a tiktoken-format file, checked: ranks 0..n-1, every single byte present."""
    ranks = {}
    for number, line in enumerate(Path(path).read_bytes().splitlines(), 1):
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError:
            raise TokenizerError(
                f"{path} line {number} is not 'base64 rank': not a Llama 3 tokenizer.model"
            ) from None
    if sorted(ranks.values()) != list(range(len(ranks))) or any(
        bytes([b]) not in ranks for b in range(256)
    ):
        raise TokenizerError(
            f"{path}: the ranks are not 0 to {len(ranks) - 1} each once, with all 256 single bytes "
            "among the tokens; is it a Llama 3 tokenizer.model?"
        )
    return ranks


# ---- Finding the kind ---------------------------------------------------------------------------

KINDS = (
    "a SentencePiece tokenizer.model (Llama 1 and 2), Meta's Llama 3 tokenizer.model (a base64 token and "
    "a rank on each line), a Hugging Face tokenizer.json, or a folder holding one"
)


def load_tokenizer(source, vocab_size=None):
    """The tokenizer in `source` (file, folder or Hub name), its kind found from the content, checked
    against the model's vocabulary size when one is given."""
    path = Path(source)
    if not path.exists():  # a Hugging Face Hub name (fetched by hub.py), or a mistake
        from hub import TOKENIZER_FILES, download, is_hub_name

        if not ("/" in str(source) and is_hub_name(source)):
            raise TokenizerError(f"{source} does not exist; give {KINDS}")
        path = download(str(source), TOKENIZER_FILES, TokenizerError)
    if path.is_dir():
        found = [
            path / name
            for name in ("tokenizer.json", "tokenizer.model")
            if (path / name).is_file()
        ]
        if not found:
            raise TokenizerError(
                f"{path} has no tokenizer.json or tokenizer.model; give {KINDS}"
            )
        path = found[0]
    with open(path, "rb") as f:
        head = f.read(256)
    if head.lstrip().startswith(b"{"):
        from hf_tokenizer import HFTokenizer

        tokenizer = HFTokenizer(path)
    elif re.match(
        rb"[A-Za-z0-9+/]+=* 0\r?\n", head
    ):  # tiktoken: "IQ== 0" is byte 0x21 ("!") at rank 0
        tokenizer = Llama3Tokenizer(path)
    elif (
        head[:1] == b"\n"
    ):  # SentencePiece: a protobuf whose first field (the pieces) has tag 0x0a
        tokenizer = SentencePieceTokenizer(path)
    else:
        raise TokenizerError(
            f"cannot load {path}: it is not a tokenizer of a known kind; give {KINDS}"
        )
    if vocab_size is not None and tokenizer.vocab_size != vocab_size:
        raise TokenizerError(
            f"{path} has {tokenizer.vocab_size} tokens but the weights expect {vocab_size}; "
            "use the tokenizer that came with the checkpoint"
        )
    return tokenizer


# ---- Streaming ----------------------------------------------------------------------------------


class StreamingDecoder:
    """Turn tokens into text as they arrive, with the spaces right.

    A token's text can depend on its neighbours (SentencePiece drops the leading space of the first token
    decoded) and one character can span several byte tokens. So decode a short window that starts a few
    tokens back, and print what it adds beyond the same window without the new tokens; hold the text back
    while it ends in an incomplete UTF-8 sequence (decoded as \ufffd). Each step decodes a few tokens only.
    """

    def __init__(self, tokenizer, prompt_tokens):
        self.tokenizer, self.tokens = tokenizer, list(prompt_tokens)
        self.start = max(
            0, len(self.tokens) - 4
        )  # the window's first token: context for the new ones
        self.printed = len(self.tokens)  # tokens whose text has been printed

    def add(self, token=None):
        """The text that `token` adds; None: the text still held back, at the end (bytes that never formed a
        character print as \ufffd)."""
        if token is not None:
            self.tokens.append(token)
        window = self.tokenizer.decode(self.tokens[self.start :])
        if token is not None and window.endswith(
            "\ufffd"
        ):  # wait for the character's next byte token
            return ""
        new = window[
            len(self.tokenizer.decode(self.tokens[self.start : self.printed])) :
        ]
        self.start, self.printed = max(self.start, self.printed - 4), len(self.tokens)
        return new
