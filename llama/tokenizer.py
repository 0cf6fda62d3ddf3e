"""Llama's tokenizers, found from a file's content: SentencePiece, Meta's Llama 3 rank
file, tokenizer.json.

    from tokenizer import load_tokenizer
    tokenizer = load_tokenizer("path/to/tokenizer.model", vocab_size=32000)
    ids = tokenizer.prompt("The capital of France is")  # BOS and the text
    text = tokenizer.decode(ids)

- Llama 1 and 2 ship a SentencePiece `tokenizer.model` (a protobuf), run here.
- Llama 3.x ship a `tokenizer.model` in tiktoken's format, one "base64(token bytes)
  rank" per line: llama3_tokenizer.py, read only for one.
- Hugging Face folders ship `tokenizer.json`, with `tokenizer_config.json` (special
  tokens, the chat template) and `generation_config.json` (the ids that end a reply):
  hf_tokenizer.py, read only for one.

Text given to `encode` and `prompt` is always plain text: "<|eot_id|>" typed by a user
is 7 ordinary tokens, as in Meta's reference. Only chat formats insert special tokens.
"""

import re
from pathlib import Path

KINDS = (
    "a SentencePiece tokenizer.model (Llama 1 and 2), Meta's Llama 3 tokenizer.model "
    "(a base64 token and a rank on each line), a Hugging Face tokenizer.json, or a "
    "folder holding one"
)


class TokenizerError(ValueError):
    """A tokenizer that is missing, damaged, or does not fit the model."""


class SentencePieceTokenizer:
    """Llama 1 and 2: BOS 1, EOS 2."""

    kind = "SentencePiece"

    def __init__(self, path):
        from sentencepiece import SentencePieceProcessor

        try:
            self.sp = SentencePieceProcessor(model_file=str(path))
        except (OSError, RuntimeError) as e:
            raise ValueError(
                f"cannot load {path} as a SentencePiece model "
                f"({str(e).splitlines()[0]})"
            ) from None
        self.vocab_size = self.sp.vocab_size()
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
        self.stop_ids = {self.eos_id}

    def encode(self, text):
        return self.sp.encode(text)

    def prompt(self, text):
        return [self.bos_id] + self.sp.encode(text)

    def decode(self, ids):
        return self.sp.decode(list(ids))


def tokenizer_class(path):
    """The class that reads the tokenizer file `path`, found from its first bytes."""
    with open(path, "rb") as f:
        head = f.read(256)
    if head.lstrip().startswith(b"{"):
        from hf_tokenizer import HFTokenizer

        return HFTokenizer
    # tiktoken's format: "IQ== 0" is byte 0x21 ("!") at rank 0.
    if re.match(rb"[A-Za-z0-9+/]+=* 0\r?\n", head):
        from llama3_tokenizer import Llama3Tokenizer

        return Llama3Tokenizer
    # SentencePiece: a protobuf whose first field (the pieces) has tag 0x0a.
    if head[:1] == b"\n":
        return SentencePieceTokenizer
    raise ValueError(
        f"cannot load {path}: it is not a tokenizer of a known kind; give {KINDS}"
    )


def load_tokenizer(source, vocab_size=None):
    """The tokenizer in `source` (file, folder or Hub name), its kind found from the
    content, checked against the model's vocabulary size when one is given."""
    path = Path(source)
    if not path.exists():  # a Hugging Face Hub name (fetched by hub.py), or a mistake
        from hub import TOKENIZER_FILES, download, is_hub_name

        if not ("/" in str(source) and is_hub_name(source)):
            raise TokenizerError(f"{source} does not exist; give {KINDS}")
        path = download(str(source), TOKENIZER_FILES, TokenizerError)
    if path.is_dir():
        found = [path / "tokenizer.json", path / "tokenizer.model"]
        found = [file for file in found if file.is_file()]
        if not found:
            raise TokenizerError(f"{path} has no tokenizer; give {KINDS}")
        path = found[0]
    try:
        tokenizer = tokenizer_class(path)(path)
    except OSError as e:
        raise TokenizerError(f"cannot read {path}: {e.strerror}") from None
    except ValueError as e:  # the lazily read tokenizer files raise ValueError
        raise TokenizerError(str(e)) from None
    if vocab_size is not None and tokenizer.vocab_size != vocab_size:
        raise TokenizerError(
            f"{path} has {tokenizer.vocab_size} tokens but the weights expect "
            f"{vocab_size}; use the tokenizer that came with the checkpoint"
        )
    return tokenizer


class StreamingDecoder:
    """Turn tokens into text as they arrive, with the spaces right.

    A token's text can depend on its neighbours (SentencePiece drops the leading space
    of the first token decoded) and one character can span several byte tokens. So
    decode a short window that starts a few tokens back, and print what it adds beyond
    the same window without the new tokens; hold the text back while it ends in an
    incomplete UTF-8 sequence (decoded as \ufffd).
    """

    def __init__(self, tokenizer, prompt_tokens):
        self.tokenizer, self.tokens = tokenizer, list(prompt_tokens)
        # The window's first token: context for the new ones.
        self.start = max(0, len(self.tokens) - 4)
        self.printed = len(self.tokens)  # tokens whose text has been printed

    def add(self, token=None):
        """The text that `token` adds; None: the text still held back, at the end
        (bytes that never formed a character print as \ufffd)."""
        if token is not None:
            self.tokens.append(token)
        window = self.tokenizer.decode(self.tokens[self.start :])
        if token is not None and window.endswith("\ufffd"):
            return ""  # wait for the character's next byte token
        before = self.tokenizer.decode(self.tokens[self.start : self.printed])
        self.start, self.printed = max(self.start, self.printed - 4), len(self.tokens)
        return window[len(before) :]
